"""Backbones: any torchvision ResNet or the paper's wider ResNet-50s, with an optional CIFAR stem and
split BatchNorm."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from moco_fast.config import ConfigError
from moco_fast.kernels.momentum_triton import check_device
from moco_fast.kernels.split_bn import split_batch_norm
from moco_fast.kernels.split_bn_triton import split_batch_norm_triton

BN_KERNELS = ("torch", "triton")  # SplitBatchNorm2d's training pass: kernels/split_bn.py, split_bn_triton.py


class SplitBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm whose training statistics come from `num_splits` equal sub-batches.

    On one device this stands in for the paper's per-GPU BatchNorm: with the key batch shuffled
    before the key encoder, a query and its positive key never share BN statistics, so the model
    cannot cheat through them. Running statistics are the mean of the sub-batches' statistics, as
    in the official MoCo CIFAR demo. The arithmetic is kernels/split_bn.py's: a few whole-batch
    passes whatever the number of splits, any memory format, fp32 statistics.

    Evaluation is nn.BatchNorm2d's pass: the running statistics, or, built without them
    (track_running_stats=False), the whole batch's statistics, not each sub-batch's as the demo's
    `training or not track_running_stats` would take (it fails there on the statistics it does not
    have): an evaluation batch, kNN's last, need not divide into the splits.

    `kernel` "triton" runs the training pass in kernels/split_bn_triton.py's six kernels instead
    (opt-in: its GPU speed is unmeasured). An attribute, not state: the state_dict is the same.
    """

    def __init__(self, num_features: int, num_splits: int = 1, kernel: str = "torch", **kw):
        check_bn_kernel(kernel)
        super().__init__(num_features, **kw)
        self.num_splits = num_splits
        self.kernel = kernel

    def extra_repr(self) -> str:
        # nn.BatchNorm2d's fields, then what the training pass runs: print(model) would otherwise show
        # a split BN layer as a plain one, whatever --bn-splits or bn_kernel built
        return f"{super().extra_repr()}, num_splits={self.num_splits}, kernel={self.kernel!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1 or not x.numel():
            # an empty batch: nothing to normalise, and the statistics kernel would record 0 / 0
            return super().forward(x)
        self._check_input_dim(x)
        # track_running_stats=False (running statistics None, or set off later), or built without running
        # statistics and turned on later: none recorded, no count, as nn.BatchNorm2d does
        track = self.track_running_stats and self.running_mean is not None
        if self.momentum is None and track:  # nn.BatchNorm2d's cumulative average
            raise ValueError("split BN needs a momentum: momentum=None (a cumulative average) is not implemented")
        running = (self.running_mean, self.running_var) if track else (None, None)
        split_bn = split_batch_norm_triton if self.kernel == "triton" else split_batch_norm
        y = split_bn(x, self.num_splits, *running, self.weight, self.bias, self.momentum, self.eps)
        if track:
            self.num_batches_tracked.add_(1)
        return y


def check_bn_kernel(kernel: str, runs: bool = True) -> None:
    """ValueError unless split BN can run `kernel` here: one of BN_KERNELS, and for triton, where split
    BN `runs` it, the package and a GPU, or TRITON_INTERPRET=1 (checked when the model is built, before
    any batch). A model without split BN (one split, several processes, no shuffle BN) runs no kernel:
    the name is checked, not the machine."""
    if kernel not in BN_KERNELS:
        raise ValueError(f"unknown split BN kernel {kernel!r}; choose from {', '.join(BN_KERNELS)}")
    if kernel == "triton" and runs:
        check_device(torch.device("cuda" if torch.cuda.is_available() else "cpu"), "split BN's kernel 'triton'")


class Conv2d(nn.Conv2d):
    """nn.Conv2d that computes a 1 x 1 map from a 1 x 1 map with the one tap that covers the input.

    A ResNet's stride-2 3 x 3 convolution meets a 1 x 1 map where the images are small (layer4's
    first one with the ImageNet stem at 16 px). There every tap but the centre sees only zero
    padding, so its gradient is exactly zero; on the CPU, oneDNN's bf16 weight-gradient kernel
    (jit_bf16:avx512_core_bf16; torch 2.14.1, oneDNN 3.12) leaves those taps uninitialised instead:
    garbage in ~9 calls out of 10, at times 1e33 or inf/NaN, and --amp bf16 then diverges within a
    few steps. The 1 x 1 convolution with the centre tap is the same function and never reaches
    that kernel; autograd gives the other taps exact zeros.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tap = self._covering_tap(x)
        if tap is None:
            return super().forward(x)
        i, j = tap
        return F.conv2d(x, self.weight[:, :, i : i + 1, j : j + 1], self.bias, groups=self.groups)

    def _covering_tap(self, x: torch.Tensor) -> tuple[int, int] | None:
        """(i, j) where a 1 x 1 input makes a 1 x 1 output through tap (i, j) alone, else None."""
        if x.shape[-2:] != (1, 1) or self.kernel_size == (1, 1) or isinstance(self.padding, str):
            return None
        if self.padding_mode != "zeros" or self.dilation != (1, 1):
            return None
        for k, p, s in zip(self.kernel_size, self.padding, self.stride):
            if not (p < k and 0 <= 1 + 2 * p - k < s):  # the input under a tap, one output position
                return None
        return self.padding[0], self.padding[1]


def resolve_stem(stem: str, image_size: int) -> str:
    if stem == "auto":
        return "cifar" if image_size <= 64 else "imagenet"
    if stem not in ("cifar", "imagenet"):
        raise ConfigError(f"unknown stem {stem!r}: use cifar, imagenet or auto")
    return stem


# The paper's bigger backbones (MoCo, Table 1: R50w2x and R50w4x, after Kolesnikov et al. 2019):
# ResNet-50 with every layer k times wider, the stem too: 64k stem channels, 2048k features, about
# 94M and 375M parameters. torchvision's wide_resnet50_2 is another network: only the bottlenecks'
# inner width doubles (2048 features, 67M parameters).
WIDER = {"resnet50w2": 2, "resnet50w4": 4}


class WiderResNet50(ResNet):
    """ResNet-50 with all widths times k: torchvision's ResNet (its forward, its layer builder and
    its state-dict names, so the exports and every reader of a torchvision ResNet state dict work)
    with 64k stem channels and Bottleneck blocks of k times the planes."""

    def __init__(self, k: int, norm_layer=nn.BatchNorm2d, num_classes: int = 1000):
        nn.Module.__init__(self)
        # what ResNet._make_layer reads
        self._norm_layer, self.dilation, self.groups, self.base_width = norm_layer, 1, 1, 64
        self.inplanes = 64 * k
        self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = norm_layer(self.inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(Bottleneck, 64 * k, 3)
        self.layer2 = self._make_layer(Bottleneck, 128 * k, 4, stride=2)
        self.layer3 = self._make_layer(Bottleneck, 256 * k, 6, stride=2)
        self.layer4 = self._make_layer(Bottleneck, 512 * k, 3, stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(512 * k * Bottleneck.expansion, num_classes)
        for m in self.modules():  # torchvision's ResNet initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


def check_arch(arch: str | None) -> None:
    """ConfigError unless `arch` names a torchvision ResNet or one of WIDER (checked with the flags,
    before any data is read or a model built); None (an --arch not given) is nothing to check."""
    if arch is None or arch in WIDER:
        return
    # torchvision's registry of networks: its namespace also holds modules (torchvision.models.resnet,
    # which --arch resnet built as "'module' object is not callable")
    if not arch.startswith(("resnet", "wide_resnet", "resnext")) or arch not in torchvision.models.list_models(
        module=torchvision.models
    ):
        raise ConfigError(
            f"unknown arch {arch!r}: use a torchvision ResNet such as resnet18, resnet50 or wide_resnet50_2, "
            "or the paper's wider ResNet-50s resnet50w2 and resnet50w4"
        )


def resnet(arch: str, **kw) -> ResNet:
    """torchvision.models.<arch>(**kw), or a WiderResNet50 for WIDER's names; ConfigError for others."""
    check_arch(arch)
    if arch in WIDER:
        return WiderResNet50(WIDER[arch], **kw)
    return getattr(torchvision.models, arch)(weights=None, **kw)


def build_backbone(
    arch: str, stem: str = "imagenet", bn_splits: int = 1, bn_kernel: str = "torch"
) -> tuple[nn.Module, int]:
    """A ResNet (`resnet`) without its classifier (`fc` is Identity) and its feature width; with
    bn_splits > 1 its BN layers are SplitBatchNorm2d running `bn_kernel`."""
    check_bn_kernel(bn_kernel, runs=bn_splits > 1)  # once; a wrong name also where no split BN is built
    norm = partial(SplitBatchNorm2d, num_splits=bn_splits, kernel=bn_kernel) if bn_splits > 1 else nn.BatchNorm2d
    net = resnet(arch, norm_layer=norm)
    if stem == "cifar":
        net.conv1 = nn.Conv2d(3, net.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    for m in net.modules():
        if type(m) is nn.Conv2d:
            m.__class__ = Conv2d  # the same module (parameters, state_dict keys); see Conv2d
    width = net.fc.in_features
    net.fc = nn.Identity()
    return net, width


def build_head(width: int, dim: int, mlp: bool) -> nn.Module:
    """MoCo v1: one linear layer; v2: Linear-ReLU-Linear."""
    if not mlp:
        return nn.Linear(width, dim)
    return nn.Sequential(nn.Linear(width, width), nn.ReLU(inplace=True), nn.Linear(width, dim))


def plain_bn_state(module: nn.Module) -> None:
    """Turn SplitBatchNorm2d layers back into nn.BatchNorm2d in place (for export and eval)."""
    for name, child in module.named_children():
        if isinstance(child, SplitBatchNorm2d):
            bn = nn.BatchNorm2d(child.num_features, eps=child.eps, momentum=child.momentum)
            bn.load_state_dict(child.state_dict())
            setattr(module, name, bn)
        else:
            plain_bn_state(child)
