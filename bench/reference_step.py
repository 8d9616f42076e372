"""The MoCo step as the official code does it, on one device: the baseline row of bench/throughput.py.

What makes it the official step (facebookresearch/moco, main_moco.py + moco/builder.py, and the
one-GPU CIFAR demo for split BN), written here from that description, not copied:
- fp32, NCHW: no autocast, no channels-last;
- the key encoder's momentum update is a Python loop over parameters that allocates new tensors
  (`param_k.data = param_k.data * m + param_q.data * (1 - m)`: three kernels per tensor);
- the queue is C x K and its pointer is read on the host every step (`ptr = int(self.queue_ptr)`,
  a device -> host sync), then written back from the host;
- the shuffle for shuffle-BN draws its permutation on the CPU and copies it over;
- per-device BN statistics on one device through the CIFAR demo's split BN (a reshape to S x C
  channels and one `F.batch_norm`);
- `torch.optim.SGD` with the optimiser defaults of the installed torch (foreach on CUDA today), and
  the training loop's `loss.item()` every step (for its AverageMeter), another sync. The loop's
  top-1/top-5 accuracy is left out: a small cost that would only flatter the ratios.
It runs as the official code would on today's torch: cuDNN's TF32 convolutions are on by default,
and bench/throughput.py sets `cudnn.benchmark` (as main_moco.py does) for every row alike.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from moco_fast.backbone import resnet


class DemoSplitBatchNorm(nn.BatchNorm2d):
    """Split BN the way the official CIFAR demo does it: N x C -> (N / S) x (S * C) channels."""

    def __init__(self, num_features: int, num_splits: int, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        s = self.num_splits
        if not self.training or s == 1:
            return super().forward(x)
        mean_split = self.running_mean.repeat(s)
        var_split = self.running_var.repeat(s)
        out = F.batch_norm(
            x.view(-1, c * s, h, w),
            mean_split,
            var_split,
            self.weight.repeat(s),
            self.bias.repeat(s),
            True,
            self.momentum,
            self.eps,
        ).view(n, c, h, w)
        self.running_mean.data.copy_(mean_split.view(s, c).mean(dim=0))
        self.running_var.data.copy_(var_split.view(s, c).mean(dim=0))
        return out


def _encoder(arch: str, dim: int, mlp: bool, bn_splits: int, cifar_stem: bool) -> nn.Module:
    norm = partial(DemoSplitBatchNorm, num_splits=bn_splits) if bn_splits > 1 else nn.BatchNorm2d
    net = resnet(arch, num_classes=dim, norm_layer=norm)  # torchvision's, or the paper's wider ResNet-50s
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    if mlp:  # MoCo v2: the fc layer becomes Linear-ReLU-fc
        width = net.fc.weight.shape[1]
        net.fc = nn.Sequential(nn.Linear(width, width), nn.ReLU(), net.fc)
    return net


class ReferenceMoCo(nn.Module):
    def __init__(
        self,
        arch: str = "resnet50",
        dim: int = 128,
        k: int = 65536,
        m: float = 0.999,
        t: float = 0.2,
        mlp: bool = True,
        bn_splits: int = 8,
        cifar_stem: bool = False,
    ):
        super().__init__()
        self.K, self.m, self.T = k, m, t
        self.encoder_q = _encoder(arch, dim, mlp, bn_splits, cifar_stem)
        self.encoder_k = _encoder(arch, dim, mlp, bn_splits, cifar_stem)
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False
        self.register_buffer("queue", F.normalize(torch.randn(dim, k), dim=0))  # C x K
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data = param_k.data * self.m + param_q.data * (1.0 - self.m)

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)  # host sync, as in the official code
        if self.K % batch_size:
            raise ValueError(f"the official queue needs K ({self.K}) divisible by the batch ({batch_size})")
        self.queue[:, ptr : ptr + batch_size] = keys.T
        self.queue_ptr[0] = (ptr + batch_size) % self.K

    @torch.no_grad()
    def _batch_shuffle(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx_shuffle = torch.randperm(x.shape[0]).to(x.device)  # drawn on the CPU, then copied
        return x[idx_shuffle], torch.argsort(idx_shuffle)

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = F.normalize(self.encoder_q(im_q), dim=1)  # N x C
        with torch.no_grad():
            self._momentum_update_key_encoder()
            im_k, idx_unshuffle = self._batch_shuffle(im_k)
            k = F.normalize(self.encoder_k(im_k), dim=1)[idx_unshuffle]  # N x C
        l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(-1)  # N x 1
        l_neg = torch.einsum("nc,ck->nk", q, self.queue.clone().detach())  # N x K
        logits = torch.cat([l_pos, l_neg], dim=1) / self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        self._dequeue_and_enqueue(k)
        return logits, labels


def build_reference(cfg, device: torch.device, shuffle_bn: bool = True) -> tuple[ReferenceMoCo, torch.optim.Optimizer]:
    """The reference model and optimiser for a moco_fast TrainConfig (same arch, K, T, m, splits);
    without `shuffle_bn` (or the config's), plain BN over the whole batch, as the official ImageNet
    code computes it on one GPU."""
    from moco_fast.backbone import resolve_stem

    splits = cfg.moco.bn_splits if cfg.moco.shuffle_bn and shuffle_bn else 1
    model = ReferenceMoCo(
        cfg.model.arch,
        cfg.model.dim,
        cfg.moco.k,
        cfg.moco.m,
        cfg.moco.t,
        cfg.model.mlp,
        splits,
        resolve_stem(cfg.model.stem, cfg.data.aug.image_size) == "cifar",
    ).to(device)
    lr = cfg.optim.lr * cfg.optim.batch_size / 256
    optimizer = torch.optim.SGD(
        model.parameters(), lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay
    )
    return model, optimizer


def reference_step(model: ReferenceMoCo, optimizer: torch.optim.Optimizer, im_q: torch.Tensor, im_k: torch.Tensor):
    """One official-style training iteration; returns the loss as a Python float (a host sync)."""
    output, target = model(im_q, im_k)
    loss = F.cross_entropy(output, target)
    loss_value = loss.item()  # the official loop's losses.update(loss.item(), ...)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss_value
