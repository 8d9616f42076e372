"""Split BatchNorm (one-device shuffle BN): statistics per sub-batch, any memory format."""

import pytest
import torch
from torch import nn

from moco_fast.backbone import SplitBatchNorm2d


def reference_split(x, bn: nn.BatchNorm2d, s: int):
    outs = []
    for chunk in x.chunk(s):
        b = nn.BatchNorm2d(bn.num_features)
        b.load_state_dict(bn.state_dict())
        outs.append(b(chunk))
    return torch.cat(outs)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("s", [1, 2, 4])
def test_split_bn_matches_per_chunk_bn(s, channels_last):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 5) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bn = SplitBatchNorm2d(3, num_splits=s)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    ref = reference_split(x.contiguous(), bn, s)
    out = bn(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    # Running stats: the mean over sub-batches of what each sub-batch's BN would record.
    chunks = x.contiguous().chunk(s)
    exp_mean = 0.9 * 0 + 0.1 * torch.stack([c.mean(dim=(0, 2, 3)) for c in chunks]).mean(0)
    torch.testing.assert_close(bn.running_mean, exp_mean, rtol=1e-4, atol=1e-5)
    # BN records the unbiased variance of each sub-batch (n - 1 in the denominator).
    exp_var = 0.9 * 1 + 0.1 * torch.stack([c.var(dim=(0, 2, 3), unbiased=True) for c in chunks]).mean(0)
    torch.testing.assert_close(bn.running_var, exp_var, rtol=1e-4, atol=1e-5)


def test_split_bn_eval_is_plain_bn_and_rejects_uneven_batches():
    bn = SplitBatchNorm2d(3, num_splits=4)
    with pytest.raises(ValueError, match="divisible"):
        bn(torch.randn(6, 3, 2, 2))
    bn.eval()
    x = torch.randn(6, 3, 2, 2)
    torch.testing.assert_close(bn(x), x / (1 + 1e-5) ** 0.5)
