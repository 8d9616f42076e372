"""`moco-fast export`: torchvision weights that round-trip, the CIFAR stem, detectron2's names
for a ResNet-50, and an official MoCo checkpoint that the official scripts read."""

from __future__ import annotations

import pickle
import re

import pytest
import torch
import torchvision
from eval_helpers import TINY
from torch import nn

from moco_fast.cli import main
from moco_fast.config import build_config, to_dict
from moco_fast.model import MoCo


def save_untrained_checkpoint(path, preset="cifar", **overrides):
    """A checkpoint of a freshly built model (enough for export: load_model reads config + model)."""
    cfg = build_config(preset, {**TINY, **overrides})
    model = MoCo(cfg.model, cfg.moco, cfg.data.aug.image_size)
    torch.save({"config": to_dict(cfg), "model": model.state_dict(), "epoch": 0}, path)
    return model


# -- export ---------------------------------------------------------------------------------------
def test_export_torchvision_round_trip(ckpt, tmp_path, capsys):
    from moco_fast.checkpoint import load_model

    out = tmp_path / "r18.pth"
    assert main(["export", str(ckpt), "--format", "torchvision", "--output", str(out)]) == 0
    net = torchvision.models.resnet18()
    missing, unexpected = net.load_state_dict(torch.load(out), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected
    net.fc = nn.Identity()
    net.load_state_dict(torch.load(out), strict=True)  # the help's strict load
    ours = load_model(ckpt)[0].backbone()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), ours.eval()(x))
    # No silent overwrite.
    assert main(["export", str(ckpt), "--format", "torchvision", "--output", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export", str(ckpt), "--format", "torchvision", "--output", str(out), "--force"]) == 0


def test_export_cifar_stem(tmp_path, capsys):
    path = tmp_path / "cifar.pt"
    model = save_untrained_checkpoint(path, **{"model.stem": "cifar", "moco.shuffle_bn": True})
    out = tmp_path / "r18.pth"
    assert main(["export", str(path), "--format", "torchvision", "--output", str(out)]) == 0
    assert "CIFAR stem" in capsys.readouterr().out
    net = torchvision.models.resnet18()
    net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = nn.Identity()
    net.load_state_dict(torch.load(out), strict=False)
    net.fc = nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), model.backbone().eval()(x))  # split BN state is plain BN
    for fmt, reader in (("detectron2", "detectron2 has no CIFAR stem"), ("moco", "the official MoCo scripts")):
        assert main(["export", str(path), "--format", fmt, "--output", str(tmp_path / "out.pkl")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and reader in err[0] and "CIFAR" in err[0], fmt
        assert not (tmp_path / "out.pkl").exists()


def test_export_detectron2_names_resnet50(tmp_path):
    path = tmp_path / "r50.pt"
    model = save_untrained_checkpoint(path, "v2", **{"model.arch": "resnet50", "model.stem": "imagenet"})
    out = tmp_path / "r50.pkl"
    assert main(["export", str(path), "--format", "detectron2", "--output", str(out)]) == 0
    with open(out, "rb") as fh:
        obj = pickle.load(fh)
    assert obj["__author__"] == "MOCO" and obj["matching_heuristics"] is True
    keys = obj["model"]
    # Names that the official convert-pretrain-to-detectron2.py produces for a ResNet-50.
    for key in (
        "stem.conv1.weight",
        "stem.conv1.norm.weight",
        "stem.conv1.norm.running_var",
        "res2.0.conv1.weight",
        "res2.0.conv3.norm.bias",
        "res2.0.shortcut.weight",
        "res2.0.shortcut.norm.running_mean",
        "res3.3.conv2.norm.weight",
        "res4.5.conv3.weight",
        "res5.0.shortcut.norm.weight",
        "res5.2.conv3.norm.running_var",
    ):
        assert key in keys, key
    assert not [k for k in keys if any(s in k for s in ("layer", "bn", "downsample", "fc", "encoder", "head"))]
    assert len(keys) == len(torchvision.models.resnet50().state_dict()) - 2  # everything but fc
    ref = model.encoder_q.backbone.state_dict()
    assert (keys["res4.5.conv3.weight"] == ref["layer3.5.conv3.weight"].numpy()).all()
    assert (keys["stem.conv1.norm.running_mean"] == ref["bn1.running_mean"].numpy()).all()


def test_the_detectron2_export_unpickles_without_numpy_2_s_modules(tmp_path):
    # numpy 2 pickles an array by numpy._core.multiarray._reconstruct, which numpy before 1.26.1 (often
    # pinned where detectron2 runs) cannot import: its pickle.load of the export failed there
    path = tmp_path / "r18.pt"
    model = save_untrained_checkpoint(path, "v2")
    out = tmp_path / "r18.pkl"
    assert main(["export", str(path), "--format", "detectron2", "--output", str(out)]) == 0
    assert out.read_bytes()[:2] == pickle.PROTO + bytes([4])  # 3.14's default, 5, writes other opcodes
    named = set()

    class Recording(pickle.Unpickler):
        def find_class(self, module, name):
            named.add((module, name))
            return super().find_class(module, name)

    with open(out, "rb") as fh:
        obj = Recording(fh, encoding="latin1").load()  # as detectron2's DetectionCheckpointer reads a .pkl
    assert named == {("numpy", "ndarray"), ("builtins", "bytearray")}  # names every numpy has
    ref = model.encoder_q.backbone.state_dict()
    weight, count = obj["model"]["res3.0.shortcut.weight"], obj["model"]["stem.conv1.norm.num_batches_tracked"]
    assert weight.flags.writeable and (weight == ref["layer2.0.downsample.0.weight"].numpy()).all()
    assert count.shape == () and count.dtype == "int64"


def test_a_detectron2_export_of_another_resnet_names_its_config(ckpt, tmp_path, capsys):
    # detectron2's R-50 configs (the official MoCo detection ones) skip each weight of another shape
    # with a warning: a ResNet-18 export loaded there trained mostly from scratch without a word here
    from moco_fast.commands.export import detectron2_resnet

    out = tmp_path / "r18.pkl"
    assert main(["export", str(ckpt), "--format", "detectron2", "--output", str(out)]) == 0
    note = capsys.readouterr().out.splitlines()[1]
    assert note.startswith("note: resnet18 is not detectron2's default R-50")
    assert "MODEL.RESNETS.DEPTH 18 and MODEL.RESNETS.RES2_OUT_CHANNELS 64" in note
    # the values detectron2 builds each network with (resnet50 is its default: no note)
    assert detectron2_resnet("resnet50") == {
        "DEPTH": 50,
        "STEM_OUT_CHANNELS": 64,
        "RES2_OUT_CHANNELS": 256,
        "NUM_GROUPS": 1,
        "WIDTH_PER_GROUP": 64,
    }
    assert detectron2_resnet("resnet101")["DEPTH"] == 101
    assert detectron2_resnet("resnext101_32x8d")["NUM_GROUPS"] == 32
    assert detectron2_resnet("resnext101_32x8d")["WIDTH_PER_GROUP"] == 8
    assert detectron2_resnet("wide_resnet50_2")["WIDTH_PER_GROUP"] == 128


def test_a_detectron2_export_of_basic_blocks_says_that_a_c4_config_does_not_fit_its_res5():
    # detectron2's Res5ROIHeads (the C4 configs, the official MoCo ones) builds res5 of bottleneck
    # blocks for any DEPTH: a ResNet-18's res5 loaded there only where shapes happen to fit
    from moco_fast.commands.export import loading_notes

    for arch in ("resnet18", "resnet34"):
        c4 = [n for n in loading_notes("detectron2", arch, "imagenet") if "C4 config" in n]
        assert len(c4) == 1 and "use an FPN config" in c4[0], arch
        # detectron2's own FPN configs feed BGR with caffe's mean and a std of 1, not what these weights saw
        assert c4[0].endswith(
            "MODEL.PIXEL_MEAN [123.675, 116.280, 103.530], MODEL.PIXEL_STD [58.395, 57.120, 57.375], INPUT.FORMAT RGB"
        ), arch
    for arch in ("resnet50", "resnet101", "resnext50_32x4d"):  # bottlenecks: a C4 head fits their res5
        assert not [n for n in loading_notes("detectron2", arch, "imagenet") if "C4 config" in n], arch


def official_detectron2_name(name: str) -> str:
    """The renaming of the official detection/convert-pretrain-to-detectron2.py, as read there, of a
    name without its module.encoder_q. prefix: the stem's under stem., layerN -> res(N+1), bnK ->
    convK.norm, downsample.0/1 -> shortcut and shortcut.norm."""
    if "layer" not in name:
        name = "stem." + name
    name = re.sub(r"layer(\d)", lambda m: f"res{int(m[1]) + 1}", name)
    name = re.sub(r"bn(\d)", r"conv\1.norm", name)
    return name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def test_the_strict_loading_note_of_a_cifar_stem_network_says_to_rebuild_its_stem():
    # finetune's note said torchvision.models.resnet18(num_classes=4) loads the network strictly, which
    # a CIFAR stem's 3x3 conv1 does not fit: only the next note, followed first, made it true
    from moco_fast.backbone import build_backbone
    from moco_fast.commands.export import loading_notes
    from moco_fast.export import backbone_state

    backbone, width = build_backbone("resnet18", "cifar")
    state = backbone_state(backbone, nn.Linear(width, 4))
    with pytest.raises(RuntimeError, match=re.escape("size mismatch for conv1.weight")):
        torchvision.models.resnet18(num_classes=4).load_state_dict(state)
    notes = loading_notes("torchvision", "resnet18", "cifar", num_classes=4)
    strict = [n for n in notes if "loads it strictly" in n]
    assert strict == [
        "torchvision.models.resnet18(num_classes=4) loads it strictly once its stem is the CIFAR one (next note)"
    ]
    assert notes[notes.index(strict[0]) + 1].startswith("CIFAR stem. Before load_state_dict, set net.conv1")
    net = torchvision.models.resnet18(num_classes=4)
    net.conv1, net.maxpool = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity()
    net.load_state_dict(state)  # strict, as the notes say together
    imagenet = loading_notes("torchvision", "resnet18", "imagenet", num_classes=4)
    assert imagenet == ["torchvision.models.resnet18(num_classes=4) loads it strictly"]


def test_a_moco_export_is_what_the_official_scripts_read(ckpt, six_root, tmp_path, capsys):
    from moco_fast.checkpoint import load_model
    from moco_fast.commands.export import loading_notes

    out = tmp_path / "moco.pth.tar"
    assert main(["export", str(ckpt), "--format", "moco", "--output", str(out)]) == 0
    assert "tensors of the resnet18 query encoder (moco)" in capsys.readouterr().out
    ours = load_model(ckpt)[0]
    saved = torch.load(out, map_location="cpu")  # as both scripts load it (weights_only where torch says so)
    assert saved["arch"] == "resnet18"
    tensors = saved["state_dict"]

    # main_lincls.py --pretrained: module.encoder_q.* but its fc, the prefix removed, into torchvision's
    # network with strict=False, whose missing keys it asserts are fc's alone
    kept = {
        k[len("module.encoder_q.") :]: v
        for k, v in tensors.items()
        if k.startswith("module.encoder_q") and not k.startswith("module.encoder_q.fc")
    }
    net = torchvision.models.resnet18()
    assert set(net.load_state_dict(kept, strict=False).missing_keys) == {"fc.weight", "fc.bias"}
    # its sanity check after the first epoch finds every tensor but fc's under module.encoder_q.<name>
    for name, t in net.state_dict().items():
        if name not in ("fc.weight", "fc.bias"):
            assert torch.equal(t, tensors["module.encoder_q." + name]), name
    net.fc = nn.Identity()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), ours.backbone().eval()(x))

    # convert-pretrain-to-detectron2.py: every module.encoder_q.* renamed, as numpy arrays: export
    # --format detectron2's file, plus the head's stem.fc.* that detectron2 leaves unused
    converted = {
        official_detectron2_name(k[len("module.encoder_q.") :]): v.numpy()
        for k, v in tensors.items()
        if k.startswith("module.encoder_q.")
    }
    d2 = tmp_path / "r18.pkl"
    assert main(["export", str(ckpt), "--format", "detectron2", "--output", str(d2)]) == 0
    with open(d2, "rb") as fh:
        direct = pickle.load(fh)["model"]
    head = {k: v for k, v in converted.items() if k.startswith("stem.fc.")}
    assert head and sorted(set(converted) - set(head)) == sorted(direct)
    for name, array in direct.items():
        assert (converted[name] == array).all(), name

    # moco-fast reads it back as an official checkpoint: the same query encoder, head included
    back = load_model(out)[0]
    for part in ("backbone", "head"):
        mine, theirs = getattr(ours.encoder_q, part).state_dict(), getattr(back.encoder_q, part).state_dict()
        assert sorted(mine) == sorted(theirs) and all(torch.equal(mine[k], theirs[k]) for k in mine), part
    knn = [
        "knn",
        "--checkpoint",
        str(out),
        "--data",
        str(six_root),
        "--features",
        "head",
        "--image-size",
        "32",
        "--k",
        "5",
    ]
    assert main([*knn, "--device", "cpu", "--workers", "0"]) == 0
    assert "kNN top-1 (head, " in capsys.readouterr().out
    # a wider ResNet-50 is no torchvision model, which main_lincls.py builds
    assert any("main_lincls.py cannot build it" in n for n in loading_notes("moco", "resnet50w2", "imagenet"))


def test_a_device_export_does_not_use_is_named(ckpt, tmp_path, caplog):
    # `export --device cuda` wrote the file on the CPU without a word, as if the flag took effect
    import logging

    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert main(["export", str(ckpt), "--format", "torchvision", "--output", str(tmp_path / "a.pth")]) == 0
        assert (
            main(
                [
                    *("export", str(ckpt), "--format", "torchvision"),
                    "--output",
                    str(tmp_path / "b.pth"),
                    "--device",
                    "cpu",
                ]
            )
            == 0
        )
        assert (
            main(
                [
                    *("export", str(ckpt), "--format", "torchvision"),
                    "--output",
                    str(tmp_path / "c.pth"),
                    "--device",
                    "cuda",
                ]
            )
            == 0
        )
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert said == ["--device cuda has no effect: export copies tensors and runs on the CPU"]
    assert (tmp_path / "c.pth").is_file()


def test_an_output_that_is_a_symbolic_link_is_replaced_with_force_only_its_target_kept(tmp_path, capsys):
    # as convert's DST: the export replaces the link, never writes through it (a link to a run's
    # checkpoint.pt would pass the run-file check, which judges the name given); a link to nothing
    # was replaced without --force, a loop of links too, and a folder above --output that is a link
    # to nothing said "[Errno 17] File exists"
    ckpt = tmp_path / "c.pt"
    save_untrained_checkpoint(ckpt)
    export = ["export", str(ckpt), "--format", "torchvision", "--output"]
    target = tmp_path / "target.pth"
    target.write_text("kept")
    (tmp_path / "link.pth").symlink_to(target)
    (tmp_path / "dead.pth").symlink_to(tmp_path / "gone.pth")
    (tmp_path / "l1").symlink_to(tmp_path / "l2")
    (tmp_path / "l2").symlink_to(tmp_path / "l1")
    (tmp_path / "deaddir").symlink_to(tmp_path / "nodir")
    for name in ("link.pth", "dead.pth"):
        assert main([*export, str(tmp_path / name)]) == 2
        assert "exists: pass --force to overwrite it" in capsys.readouterr().err
        assert (tmp_path / name).is_symlink()
    assert main([*export, str(tmp_path / "l1")]) == 2
    assert "leads into a loop of symbolic links" in capsys.readouterr().err
    assert main([*export, str(tmp_path / "deaddir" / "x.pth")]) == 2
    assert f"lies in {tmp_path / 'deaddir'}, a symbolic link to {tmp_path / 'nodir'}" in capsys.readouterr().err
    assert main([*export, str(tmp_path / "link.pth"), "--force"]) == 0
    assert not (tmp_path / "link.pth").is_symlink() and target.read_text() == "kept"
    assert "conv1.weight" in torch.load(tmp_path / "link.pth")
    assert f"note: {tmp_path / 'link.pth'} was a symbolic link to {target}: the file replaced the link" in (
        capsys.readouterr().out
    )
