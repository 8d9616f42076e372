"""The backbone's convolutions: a 1 x 1 map through a padded 3 x 3 convolution (16 px, ImageNet stem)."""

import pytest
import torch
from torch import nn

from moco_fast.backbone import Conv2d, build_backbone


def test_bf16_gradients_of_a_16px_resnet_are_zero_where_only_padding_is_seen():
    # At 16 px with the ImageNet stem, layer4 starts on 1 x 1 maps: its first 3 x 3 stride-2 conv sees
    # the input with the centre tap only, so the other taps' gradient is exactly zero. CPU oneDNN's
    # bf16 weight-gradient kernel left them uninitialised (garbage in most calls, at times inf/NaN):
    # --amp bf16 --image-size 16 diverged within a few steps.
    torch.manual_seed(0)
    net, _ = build_backbone("resnet18", "imagenet", bn_splits=2)
    conv = net.layer4[0].conv1
    assert (conv.kernel_size, conv.stride, conv.padding) == ((3, 3), (2, 2), (1, 1))
    off_centre = torch.ones(3, 3, dtype=torch.bool)
    off_centre[1, 1] = False
    for _ in range(8):  # the garbage came in ~9 calls out of 10
        net.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(torch.randn(8, 3, 16, 16))
        out.float().square().mean().backward()
        g = conv.weight.grad
        assert torch.isfinite(g).all()
        assert not g[:, :, off_centre].any(), "gradient on taps that see only zero padding"
        assert g[:, :, 1, 1].any()
        assert all(torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize(
    "size,kernel,stride,padding",
    [(1, 3, 2, 1), (1, 3, 1, 1), (1, 5, 2, 2), (1, 3, 1, 2), (2, 3, 2, 1), (4, 3, 1, 1), (1, 1, 2, 0)],
)
def test_conv_is_nn_conv2d(size, kernel, stride, padding):
    # The 1 x 1 shortcut (1 x 1 in and out: the first three) computes what nn.Conv2d does, gradients too.
    torch.manual_seed(0)
    ref = nn.Conv2d(6, 4, kernel, stride, padding, bias=True).double()
    conv = Conv2d(6, 4, kernel, stride, padding, bias=True).double()
    conv.load_state_dict(ref.state_dict())
    x = torch.randn(3, 6, size, size, dtype=torch.float64)
    y_ref, y = ref(x), conv(x)
    torch.testing.assert_close(y, y_ref)
    go = torch.randn_like(y)
    torch.testing.assert_close(
        torch.autograd.grad(y, conv.parameters(), go), torch.autograd.grad(y_ref, ref.parameters(), go)
    )
