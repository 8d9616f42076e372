"""MoCo (He et al. 2020) as one module: query encoder, momentum key encoder, queue, InfoNCE.

Shapes: N = batch, C = feature dim (128), K = queue length. The queue is a ring buffer of K x C
fp32 keys on the training device; its pointer is a 0-d device tensor that the step never reads on
the host. Also the paper's two other mechanisms (Figure 3): "end-to-end" (keys from the query
encoder, negatives are the batch) and "memory-bank" (one momentum-updated feature per image).
"""

from __future__ import annotations

import copy
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from moco_fast import distributed as dist_utils
from moco_fast.backbone import build_backbone, build_head, resolve_stem
from moco_fast.bn_batch import bn_splits
from moco_fast.config import ConfigError, MoCoConfig, ModelConfig, check_at_least
from moco_fast.kernels import momentum_update

MECHANISMS = ("moco", "memory-bank", "end-to-end")


def fp32(x: torch.Tensor):
    """A region where autocast is off on x's device: the float32 inputs stay float32."""
    return torch.autocast(x.device.type, enabled=False)


def info_nce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, t: float) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE in fp32. q, k: N x C (L2-normalised); negatives: K x C. Returns (loss, top-1 acc).

    Logits are N x (1 + K) with the positive in column 0.
    """
    with fp32(q):  # the step runs under autocast, which would run the N x K matmul in bf16/fp16
        q, k, negatives = q.float(), k.float(), negatives.float()
        l_pos = (q * k).sum(dim=1, keepdim=True)  # N x 1
        l_neg = q @ negatives.t()  # N x K
        logits = torch.cat([l_pos, l_neg], dim=1) / t
        labels = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        return F.cross_entropy(logits, labels), (logits.argmax(dim=1) == 0).float().mean()


def info_nce_in_batch(q: torch.Tensor, k: torch.Tensor, t: float, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """End-to-end InfoNCE: the other keys of the batch are the negatives.

    q: N x C, k: M x C (M >= N, all ranks' keys); q[i]'s positive is k[offset + i].
    """
    with fp32(q):
        logits = q.float() @ k.float().t() / t  # N x M
        labels = torch.arange(q.shape[0], device=q.device) + offset
        return F.cross_entropy(logits, labels), (logits.argmax(dim=1) == labels).float().mean()


def build_encoder(model: ModelConfig, image_size: int, bn_splits: int, bn_kernel: str = "torch") -> nn.Sequential:
    backbone, width = build_backbone(model.arch, resolve_stem(model.stem, image_size), bn_splits, bn_kernel)
    return nn.Sequential(OrderedDict(backbone=backbone, head=build_head(width, model.dim, model.mlp)))


def reads_k(mechanism: str) -> bool:
    """Whether a mechanism reads --moco-k: MoCo's queue length, the memory bank's negatives drawn each
    step; end-to-end's negatives are the other keys of the batch (K = the batch), --moco-k unused."""
    return mechanism != "end-to-end"


def k_sizes_state(mechanism: str) -> bool:
    """Whether a checkpoint of a mechanism holds something sized by --moco-k, so that a resume cannot
    change it: MoCo's queue. The memory bank's rows are one a training image, its K only how many each
    step draws; end-to-end has no K."""
    return mechanism == "moco"


def memory_bank_k(k: int, num_images: int) -> int:
    """The negatives a memory-bank step draws from its rows: --moco-k, at most one a training image."""
    return min(k, num_images)


class MoCo(nn.Module):
    def __init__(
        self,
        model: ModelConfig,
        moco: MoCoConfig,
        image_size: int,
        num_images: int = 0,
        momentum_backend: str = "foreach",
        bn_kernel: str = "torch",
    ):
        super().__init__()
        if moco.mechanism not in MECHANISMS:
            raise ConfigError(f"unknown mechanism {moco.mechanism!r}; choose one of {MECHANISMS}")
        if reads_k(moco.mechanism):
            check_at_least("--moco-k", moco.k, 1)
        self.mechanism = moco.mechanism
        self.t = moco.t
        self.symmetric = moco.symmetric
        self.shuffle_bn = moco.shuffle_bn
        self.shuffle_exchange = moco.shuffle_exchange
        self.bank_m = moco.bank_m
        self.momentum_backend = momentum_backend
        self._ema_pairs: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None  # _list_ema_pairs
        # Emulated shuffle BN on one device: sub-batches with their own statistics. Across several
        # processes each rank's batch already has its own statistics (see distributed.py). `bn_kernel`:
        # split BN's training pass, torch's (kernels/split_bn.py) or triton's (opt-in, split_bn_triton.py).
        splits = bn_splits(moco, dist_utils.world_size())
        self.encoder_q = build_encoder(model, image_size, splits, bn_kernel)
        self.encoder_k: nn.Module | None = None
        if self.mechanism == "moco":
            self.encoder_k = copy.deepcopy(self.encoder_q)
            for p in self.encoder_k.parameters():
                p.requires_grad_(False)
        if self.mechanism == "memory-bank":
            if num_images < 1:
                raise ValueError("the memory bank needs the number of training images")
            bank = F.normalize(torch.randn(num_images, model.dim), dim=1)
            self.register_buffer("bank", bank)
            self.k = memory_bank_k(moco.k, num_images)
        else:
            self.k = moco.k
        # Ring buffer of negatives: K x C, oldest keys overwritten first (only MoCo reads it: the other
        # mechanisms keep an empty one, so that every checkpoint has the same keys).
        queue_len = moco.k if self.mechanism == "moco" else 0
        self.register_buffer("queue", F.normalize(torch.randn(queue_len, model.dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before 2026-11-28 kept an unused K x C queue for end-to-end and the
        # memory bank; only MoCo has one now: such a queue is dropped, not a size mismatch.
        key = prefix + "queue"
        if self.mechanism != "moco" and key in state_dict and state_dict[key].shape[0] != 0:
            state_dict[key] = self.queue.detach().clone()
        self._ema_pairs = None  # load_state_dict(assign=True) puts the saved tensors in as parameters
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- the queue ------------------------------------------------------------------------------
    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write N keys at the pointer, wrapping around; no host sync (the pointer stays on device)."""
        n, k = keys.shape[0], self.queue.shape[0]
        if n > k:
            raise ValueError(f"the queue (K={k}) is smaller than the keys of one step ({n}): raise --moco-k")
        idx = (self.queue_ptr + torch.arange(n, device=keys.device)) % k  # N
        self.queue.index_copy_(0, idx, keys.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + n) % k)

    @torch.no_grad()
    def momentum_update(self, m: float) -> None:
        k, q = self._ema_pairs or self._list_ema_pairs()
        momentum_update(k, q, m, self.momentum_backend)

    def _list_ema_pairs(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The key and query parameters the EMA pairs, listed once: walking both encoders' modules
        cost more host time every step than the update's launch (ResNet-50 + head: ~1 ms on a 2-core CPU)."""
        assert self.encoder_k is not None
        self._ema_pairs = (list(self.encoder_k.parameters()), list(self.encoder_q.parameters()))
        return self._ema_pairs

    def _apply(self, fn, recurse=True):
        # .to() and the like may put new Parameter objects in place (torch.__future__'s
        # set_overwrite_module_params_on_conversion): the EMA's lists are made again at its next
        # call, as after load_state_dict. An encoder replaced by assignment would keep the old lists.
        self._ema_pairs = None
        return super()._apply(fn, recurse)

    # -- encoders -------------------------------------------------------------------------------
    def encode_q(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.encoder_q(x), dim=1)  # N x C

    def encode_k(self, x: torch.Tensor, encoder: nn.Module) -> torch.Tensor:
        """Keys through shuffled BN: shuffle the batch, encode, restore the order."""
        if not self.shuffle_bn:
            return F.normalize(encoder(x), dim=1)
        x, idx_unshuffle = dist_utils.batch_shuffle(x, self.shuffle_exchange)
        k = F.normalize(encoder(x), dim=1)
        return dist_utils.batch_unshuffle(k, idx_unshuffle)

    def backbone(self) -> nn.Module:
        return self.encoder_q.backbone

    # -- the step -------------------------------------------------------------------------------
    def forward(
        self, im_q: torch.Tensor, im_k: torch.Tensor, m: float, index: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (loss, pretext top-1 accuracy) as device tensors; updates keys and queue."""
        if self.mechanism == "end-to-end":
            q = self.encode_q(im_q)
            k = self.encode_k(im_k, self.encoder_q)  # gradients flow into the keys too
            k_all = dist_utils.all_gather_with_grad(k)  # (N * world) x C
            return info_nce_in_batch(q, k_all, self.t, offset=dist_utils.rank() * q.shape[0])
        if self.mechanism == "memory-bank":
            return self._memory_bank_step(im_q, index)
        with torch.no_grad():
            self.momentum_update(m)
        if self.symmetric:
            q1, q2 = self.encode_q(im_q), self.encode_q(im_k)
            with torch.no_grad():
                k1, k2 = self.encode_k(im_q, self.encoder_k), self.encode_k(im_k, self.encoder_k)
            negatives = self.queue.clone()  # one copy for both losses (see below)
            loss1, acc1 = info_nce(q1, k2, negatives, self.t)
            loss2, acc2 = info_nce(q2, k1, negatives, self.t)
            self.enqueue(dist_utils.all_gather(torch.cat([k1, k2])))
            return loss1 + loss2, (acc1 + acc2) / 2
        q = self.encode_q(im_q)
        with torch.no_grad():
            k = self.encode_k(im_k, self.encoder_k)
        # The queue is read by the loss before the new keys overwrite it; autograd keeps the value
        # it saw only if we hand it a copy (index_copy_ below is in place).
        loss, acc = info_nce(q, k, self.queue.clone(), self.t)
        self.enqueue(dist_utils.all_gather(k))
        return loss, acc

    def _memory_bank_step(self, im_q: torch.Tensor, index: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if index is None:
            raise ValueError("the memory-bank mechanism needs sample indices from the loader")
        q = self.encode_q(im_q)
        n = self.bank.shape[0]
        neg_idx = torch.randint(n, (self.k,), device=q.device)  # K random entries (may include positives)
        loss, acc = info_nce(q, self.bank[index], self.bank[neg_idx], self.t)
        with torch.no_grad():
            idx = dist_utils.all_gather(index)
            feats = dist_utils.all_gather(q.detach().float())
            new = F.normalize(self.bank[idx] * self.bank_m + feats * (1 - self.bank_m), dim=1)
            self.bank.index_copy_(0, idx, new)
        return loss, acc
