"""The backbones: the convolutions (a 1 x 1 map through a padded 3 x 3 convolution, 16 px, ImageNet
stem), and the paper's wider ResNet-50s (resnet50w2/w4): their shapes, and their exports."""

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


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_a_printed_model_says_how_its_bn_layers_split_and_what_runs_them(kernel, monkeypatch):
    # print(model) showed a split BN layer as nn.BatchNorm2d's repr under another name: neither
    # --bn-splits nor bn_kernel could be checked there
    if kernel == "triton":
        pytest.importorskip("triton")
        monkeypatch.setenv("TRITON_INTERPRET", "1")  # builds on the CPU; nothing runs here
    net, _ = build_backbone("resnet18", "cifar", bn_splits=4, bn_kernel=kernel)
    bns = [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns
    for bn in bns:  # BatchNorm's own fields (they vary with the torch version) unchanged, then split BN's two
        plain = nn.BatchNorm2d(bn.num_features).extra_repr()
        assert repr(bn) == f"SplitBatchNorm2d({plain}, num_splits=4, kernel='{kernel}')"
    assert str(net).count(f", num_splits=4, kernel='{kernel}')\n") == len(bns)  # and so print(model)


def test_the_papers_wider_resnet50s_are_every_layer_k_times_wider():
    # R50w2x (MoCo Table 1, after Kolesnikov et al.): every tensor of torchvision's ResNet-50 under
    # the same name, its channel counts times 2 (the stem's output too; its 3 input channels stay)
    base = build_backbone("resnet50")[0].state_dict()
    net, width = build_backbone("resnet50w2")
    wide = net.state_dict()
    assert width == 2 * 2048 and list(wide) == list(base)
    for name, t in base.items():
        expect = list(t.shape)
        if t.dim() == 4:  # conv: out x in x kh x kw
            expect = [2 * expect[0], expect[1] if name == "conv1.weight" else 2 * expect[1], *expect[2:]]
        elif t.dim() == 1:  # BN
            expect = [2 * expect[0]]
        assert list(wide[name].shape) == expect, name
    assert sum(p.numel() for p in net.parameters()) / 1e6 == pytest.approx(94, abs=0.5)  # the paper's 94M
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 4096)
    cifar, _ = build_backbone("resnet50w2", "cifar", bn_splits=2)  # its 3x3 stem keeps the stem's width
    assert cifar.conv1.out_channels == 128 and cifar(torch.randn(4, 3, 8, 8)).shape == (4, 4096)


def test_an_unknown_arch_names_the_wider_resnets():
    from moco_fast.config import ConfigError

    with pytest.raises(ConfigError, match="resnet50w2 and resnet50w4"):
        build_backbone("resnet50w3")


@pytest.mark.parametrize("arch", ["resnet", "resnet50_", "ResNet"])
def test_a_name_in_torchvision_models_that_is_no_network_is_an_unknown_arch(arch):
    # torchvision.models.resnet is the module the ResNets live in: --arch resnet passed the check and
    # train, finetune and the bench ended in "TypeError: 'module' object is not callable"
    from moco_fast.backbone import check_arch
    from moco_fast.config import ConfigError

    with pytest.raises(ConfigError, match=f"unknown arch '{arch}'"):
        check_arch(arch)
    check_arch("resnext50_32x4d")  # every torchvision ResNet stays a choice
    check_arch("wide_resnet101_2")


def test_a_wider_resnet50_exports_for_torchvision_and_detectron2(tmp_path, capsys):
    import pickle

    from moco_fast.backbone import resnet
    from moco_fast.cli import main
    from moco_fast.config import build_config, to_dict
    from moco_fast.model import MoCo

    # end-to-end: the query encoder that export reads, without the key encoder's copy of its 94M
    # parameters in the checkpoint written and read twice
    wide = {"model.arch": "resnet50w2", "model.stem": "imagenet", "model.mlp": False, "moco.mechanism": "end-to-end"}
    cfg = build_config("cifar", wide)
    model = MoCo(cfg.model, cfg.moco, cfg.data.aug.image_size)
    torch.save({"config": to_dict(cfg), "model": model.state_dict(), "epoch": 0}, tmp_path / "w2.pt")
    pth, pkl = tmp_path / "w2.pth", tmp_path / "w2.pkl"
    assert main(["export", str(tmp_path / "w2.pt"), "--format", "torchvision", "--output", str(pth)]) == 0
    assert "moco_fast.backbone.resnet('resnet50w2')" in capsys.readouterr().out
    net = resnet("resnet50w2")
    assert net.load_state_dict(torch.load(pth), strict=False).missing_keys == ["fc.weight", "fc.bias"]
    net.fc = nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), model.backbone().eval()(x))
    assert main(["export", str(tmp_path / "w2.pt"), "--format", "detectron2", "--output", str(pkl)]) == 0
    out = capsys.readouterr().out
    assert "STEM_OUT_CHANNELS 128" in out and "RES2_OUT_CHANNELS 512" in out and "WIDTH_PER_GROUP 128" in out
    with open(pkl, "rb") as fh:
        keys = pickle.load(fh)["model"]
    assert keys["stem.conv1.weight"].shape == (128, 3, 7, 7) and keys["res5.2.conv3.weight"].shape[0] == 4096


@pytest.mark.slow  # ~30 s on 2 cores: a 94M-parameter network built three times
def test_finetune_of_a_wider_resnet50_says_how_to_load_its_network(tiny_root, tmp_path, capsys):
    from moco_fast.backbone import resnet
    from moco_fast.cli import main

    model = tmp_path / "ft.pt"
    args = ["finetune", "--from-scratch", "--arch", "resnet50w2", "--stem", "cifar", "--image-size", "8"]
    flags = ["--epochs", "1", "--batch-size", "16", "--workers", "0", "--device", "cpu", "--schedule", "1"]
    assert main([*args, "--data", str(tiny_root), *flags, "--out", str(tmp_path / "ft.json")]) == 0
    out = capsys.readouterr().out
    # what the notes say, followed: torchvision has no resnet50w2, and its CIFAR stem is 128 wide
    assert "moco_fast.backbone.resnet('resnet50w2', num_classes=2)" in out
    assert "nn.Conv2d(3, 128, 3, 1, 1, bias=False)" in out
    net = resnet("resnet50w2", num_classes=2)
    net.conv1, net.maxpool = nn.Conv2d(3, 128, 3, 1, 1, bias=False), nn.Identity()
    net.load_state_dict(torch.load(model))  # strictly: the classifier is there
