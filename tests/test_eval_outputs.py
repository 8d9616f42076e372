"""What the evaluation commands write, on the CPU: outputs tried before training, only an earlier
output of the same kind replaced, never the checkpoint a command reads nor a run's own files, the
fine-tuned network saved as torchvision weights, the kNN progress bar and its weights at a small
temperature, the printed top-1 and top-k."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torchvision
from eval_cli_helpers import Stop, one_line_error, stop_training
from eval_helpers import checkpoint_backbone_state
from torch import nn

from moco_fast.cli import main
from moco_fast.config import build_config


# -- outputs tried before training --------------------------------------------------------------------
def bad_outputs(tmp_path: Path) -> dict[str, Path]:
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder").mkdir()
    bad = {"folder": tmp_path / "a_folder", "under a file": tmp_path / "a_file" / "r.json"}
    if Path("/proc/self").is_dir():
        bad["/proc"] = Path("/proc/moco-fast-test.json")  # not writable, not even for root
    return bad


@pytest.mark.parametrize("cmd", ["lincls", "finetune"])
def test_out_is_checked_before_training(cmd, run_dir, tmp_path, monkeypatch, capsys):
    stop_training(monkeypatch)
    for why, out in bad_outputs(tmp_path).items():
        argv = [cmd, "--checkpoint", str(run_dir / "checkpoint.pt"), "--device", "cpu", "--out", str(out)]
        assert main(argv) == 2, why
        assert one_line_error(capsys).startswith(f"moco-fast {cmd}: error: --out"), why
    assert not (tmp_path / "a_file").is_dir() and not list(Path(tmp_path / "a_folder").iterdir())


@pytest.mark.parametrize("cmd", ["lincls", "finetune"])
def test_a_run_that_fails_before_writing_removes_the_out_folders_it_made(cmd, run_dir, tmp_path, capsys):
    # --out a/b/r.json made a/ and b/ for its lock: a run that failed on its data left them behind; a
    # folder that was there before stays
    out = tmp_path / "a" / "b" / "r.json"
    argv = [cmd, "--checkpoint", str(run_dir / "checkpoint.pt"), "--device", "cpu", "--out", str(out)]
    assert main([*argv, "--data", str(tmp_path / "missing"), "--epochs", "1"]) == 2
    assert one_line_error(capsys) == f"moco-fast {cmd}: error: data folder not found: {tmp_path / 'missing'}"
    assert tmp_path.is_dir() and not any(tmp_path.iterdir())


def test_finetune_save_model_is_checked_before_training(run_dir, tmp_path, monkeypatch, capsys):
    stop_training(monkeypatch)
    argv = ["finetune", "--checkpoint", str(run_dir), "--device", "cpu", "--out", str(tmp_path / "r.json")]
    for why, path in bad_outputs(tmp_path).items():
        assert main([*argv, "--save-model", str(path)]) == 2, why
        assert "--save-model" in one_line_error(capsys), why
    assert main([*argv[:-1], str(tmp_path / "r.pt")]) == 2  # the model would go where the JSON goes
    assert "--save-model and --out" in one_line_error(capsys)


def test_only_an_earlier_output_of_the_same_kind_is_replaced(run_dir, tmp_path, monkeypatch, capsys):
    # A run folder's own files and other commands' results are not overwritten by --out or --save-model.
    from moco_fast.finetune import PROTOCOL as FINETUNE
    from moco_fast.lincls import PROTOCOL as LINCLS

    stop_training(monkeypatch)
    earlier = {"protocol": FINETUNE, "top1": 60.0, "model": str(tmp_path / "finetune.pt")}
    files = {
        "config.json": json.dumps({"optim": {"lr": 0.03}}),
        "metrics.jsonl": '{"epoch": 1, "loss": 9.1}\n',
        "lincls.json": json.dumps({"protocol": LINCLS, "top1": 50.0}),
        "finetune.json": json.dumps(earlier),
        "sweep_lincls.json": json.dumps({"protocol": LINCLS, "top1": 40.0}),  # the sweep's short classifier
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "finetune.pt")  # the network it names
    torch.save(torchvision.models.resnet18().state_dict(), tmp_path / "resnet18-tv.pth")  # torchvision's own
    exported = torchvision.models.resnet18().state_dict()
    del exported["fc.weight"], exported["fc.bias"]
    torch.save(exported, tmp_path / "r18.pth")  # `moco-fast export`'s: no fc
    ckpt = ["--checkpoint", str(run_dir), "--device", "cpu"]
    refused = [
        ("lincls", "--out", "config.json", []),
        ("lincls", "--out", "metrics.jsonl", []),
        ("lincls", "--out", "finetune.json", []),
        ("lincls", "--out", "sweep_lincls.json", []),
        ("finetune", "--out", "lincls.json", ["--no-save-model"]),
        ("finetune", "--save-model", "lincls.json", ["--out", str(tmp_path / "finetune.json")]),
        ("finetune", "--save-model", "r18.pth", ["--out", str(tmp_path / "finetune.json")]),
        ("finetune", "--save-model", "resnet18-tv.pth", ["--out", str(tmp_path / "finetune.json")]),
        ("finetune", "--save-model", "finetune.pt", ["--out", str(tmp_path / "new.json")]),  # no result names it
    ]
    for cmd, flag, name, extra in refused:
        assert main([cmd, *ckpt, flag, str(tmp_path / name), *extra]) == 2, (cmd, flag, name)
        err = one_line_error(capsys)
        assert err.startswith(f"moco-fast {cmd}: error: {flag} {tmp_path / name} exists and is"), err
    for name, text in files.items():
        assert (tmp_path / name).read_text() == text
    # an earlier result of the same kind, and the network it names, are replaced: the command runs
    with pytest.raises(Stop):
        main(["lincls", *ckpt, "--out", str(tmp_path / "lincls.json")])
    with pytest.raises(Stop):
        main(
            ["finetune", *ckpt, "--out", str(tmp_path / "finetune.json"), "--save-model", str(tmp_path / "finetune.pt")]
        )


def test_another_commands_state_of_the_same_name_is_named_not_offered_for_deletion(
    run_dir, tmp_path, monkeypatch, capsys
):
    # finetune's state for x.json is x.state.pt; lincls --out x.txt would keep its own there
    stop_training(monkeypatch)
    state = tmp_path / "x.state.pt"
    torch.save({"command": "finetune", "config": {}, "epoch": 1, "history": []}, state)
    before = state.read_bytes()
    argv = ["lincls", "--checkpoint", str(run_dir), "--device", "cpu", "--out", str(tmp_path / "x.txt")]
    for resume in ([], ["--resume"]):
        assert main([*argv, *resume]) == 2
        err = one_line_error(capsys)
        assert f"{state} is the state of an interrupted finetune run" in err and "delete" not in err, err
        assert "give --out another name" in err
    assert state.read_bytes() == before


def test_finetune_saves_the_network_as_torchvision_weights(run_dir, data, tmp_path, capsys):
    out = tmp_path / "res" / "ft.json"
    argv = ["finetune", "--checkpoint", str(run_dir), "--data", str(data), "--epochs", "1", "--batch-size", "8"]
    assert main([*argv, "--workers", "0", "--device", "cpu", "--out", str(out)]) == 0
    weights = out.with_suffix(".pt")
    assert json.loads(out.read_text())["model"] == str(weights)
    printed = capsys.readouterr().out
    assert str(weights) in printed
    assert "note: torchvision.models.resnet18(num_classes=3) loads it strictly" in printed  # not its default 1000
    state = torch.load(weights)
    net = torchvision.models.resnet18(num_classes=3)
    net.load_state_dict(state)  # strict: every key, the classifier included
    ref = checkpoint_backbone_state(run_dir / "checkpoint.pt")
    assert not torch.equal(state["conv1.weight"], ref["conv1.weight"])  # the fine-tuned weights, not the start
    assert not [p.name for p in weights.parent.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_finetune_no_save_model_writes_only_the_json(tmp_path, monkeypatch):
    import moco_fast.finetune

    res = {"init": "scratch", "top1": 50.0, "top5": 100.0, "topk": 3, "num_classes": 3}
    res.update(eval_images=6, eval_split="val")
    monkeypatch.setattr(moco_fast.finetune, "fine_tune", lambda cfg, loaded=None: (res, None))
    out = tmp_path / "ft.json"
    assert main(["finetune", "--from-scratch", "--device", "cpu", "--out", str(out), "--no-save-model"]) == 0
    assert json.loads(out.read_text()) == res and not out.with_suffix(".pt").exists()


def test_export_refuses_a_folder_as_output(run_dir, tmp_path, capsys):
    folder = tmp_path / "exports"
    folder.mkdir()
    for force in ([], ["--force"]):
        assert main(["export", str(run_dir), "--format", "torchvision", "--output", str(folder), *force]) == 2
        assert "--output" in one_line_error(capsys)


def test_export_never_replaces_a_run_s_own_files_even_with_force(run_dir, tmp_path, capsys):
    # --force replaces an earlier export; `--output RUN/config.json --force` overwrote the run's
    # config (and another run's checkpoint.pt its weights), which --resume and the evaluations read.
    other = tmp_path / "other"
    shutil.copytree(run_dir, other)
    for name in ("config.json", "checkpoint.pt", "metrics.jsonl", "summary.json", "lincls.json"):
        target = other / name
        if not target.exists():
            target.write_text("{}")
        before = target.read_bytes()
        argv = ["export", str(run_dir), "--format", "torchvision", "--output", str(target), "--force"]
        assert main(argv) == 2 and target.read_bytes() == before
        assert one_line_error(capsys) == (
            f"moco-fast export: error: --output {target} exists and is a training run's {name}: "
            "give another path, or delete it first"
        )
    out = tmp_path / "r18.pth"  # an earlier export is replaced with --force
    out.write_bytes(b"old")
    assert main(["export", str(run_dir), "--format", "torchvision", "--output", str(out), "--force"]) == 0
    assert len(torch.load(out)) > 0


def test_knn_feature_pass_shows_a_bar_when_long(data, monkeypatch):
    import moco_fast.knn as knn
    from moco_fast.data import load_splits

    bars = []
    real = knn.progress

    def recording(total, desc, enabled=True):
        bars.append((total, desc, enabled))
        return real(total=total, desc=desc, enabled=False)

    monkeypatch.setattr(knn, "progress", recording)
    train = load_splits(str(data)).train
    net = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
    spec = build_config("cifar", {}).data.aug
    feats, labels = knn.extract_features(net, train, spec, torch.device("cpu"), batch_size=2, workers=0)
    assert feats.shape == (18, 3) and labels.shape == (18,)
    knn.extract_features(net, train, spec, torch.device("cpu"), batch_size=64, workers=0)
    assert bars == [(9, "kNN features", True), (1, "kNN features", False)]


# -- outputs never replace the checkpoint a command reads -------------------------------------------
def test_no_command_writes_over_its_own_checkpoint(run_dir, tmp_path, monkeypatch, capsys):
    stop_training(monkeypatch)
    ckpt = tmp_path / "moco_r18.pt"
    ckpt.write_bytes((run_dir / "checkpoint.pt").read_bytes())
    before = ckpt.read_bytes()
    common = ["--checkpoint", str(ckpt), "--device", "cpu"]
    # finetune's default --save-model is the JSON's path with .pt: here the checkpoint itself
    for argv in (
        ["finetune", *common, "--out", str(tmp_path / "moco_r18.json")],
        ["lincls", *common, "--out", str(ckpt)],
        ["export", str(ckpt), "--format", "torchvision", "--output", str(ckpt), "--force"],
    ):
        assert main(argv) == 2, argv
        assert "is the checkpoint this command reads" in one_line_error(capsys), argv
    assert ckpt.read_bytes() == before


# -- what they compute and print ----------------------------------------------------------------------
def test_knn_weights_do_not_overflow_at_a_small_temperature():
    from moco_fast.knn import knn_predict

    # The query's nearest neighbours are class 1; at t = 0.005, exp(sim / t) overflows fp32.
    query = torch.nn.functional.normalize(torch.tensor([[1.0, 0.05]]), dim=1)
    bank = torch.nn.functional.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.2, 1.0]]), dim=1)
    labels = torch.tensor([1, 1, 0, 0])
    for t in (0.1, 0.005):
        assert knn_predict(query, bank, labels, num_classes=2, k=4, t=t).tolist() == [1], t


def test_lincls_prints_top1_alone_where_topk_is_every_class(run_dir, data, tmp_path, capsys):
    # it printed "top-3 100.00%" on 3 classes, true of any backbone
    argv = ["lincls", "--checkpoint", str(run_dir), "--data", str(data), "--epochs", "1", "--cached-features"]
    assert main([*argv, "--workers", "0", "--device", "cpu", "--out", str(tmp_path / "l.json")]) == 0
    res = json.loads((tmp_path / "l.json").read_text())
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert res["topk"] == res["num_classes"] == 3 and res["top5"] == 100.0  # the result keeps it, with its k
    assert line.startswith(f"linear classification: top-1 {res['top1']:.2f}%  (6 eval"), line


@pytest.mark.parametrize("command", ["lincls", "finetune"])
def test_the_split_scored_is_named_where_the_root_holds_val_and_test(command, run_dir, data, tmp_path, capsys):
    # val/ is scored before test/; the line said "(4 eval images, 1 epoch" and the result named neither
    import shutil

    root = shutil.copytree(data, tmp_path / "data")
    shutil.copytree(root / "test", root / "val")
    shutil.rmtree(root / "val" / sorted((root / "val").iterdir())[0].name)  # val/ and test/ differ: 4 and 6 images
    out = tmp_path / "r.json"
    argv = [command, "--checkpoint", str(run_dir), "--data", str(root), "--epochs", "1", "--batch-size", "6"]
    argv += ["--workers", "0", "--device", "cpu", "--out", str(out)]
    argv += ["--cached-features"] if command == "lincls" else ["--no-save-model"]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    assert res["eval_split"] == str(root / "val") and res["eval_images"] == 4
    assert "(4 eval images of val/, 1 epoch" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("n", "said"), [(1, "(1 eval image of test/, 1 epoch; "), (2, "(2 eval images of test/, 2 epochs; ")]
)
def test_lincls_line_says_one_epoch_in_the_singular(n, said, run_dir, data, tmp_path, monkeypatch, capsys):
    import moco_fast.lincls

    res = {"top1": 50.0, "top5": 100.0, "topk": 2, "num_classes": 2, "eval_images": n, "eval_split": str(data / "test")}
    monkeypatch.setattr(moco_fast.lincls, "run_lincls", lambda cfg, loaded=None: res)  # the line alone: no training
    argv = ["lincls", "--checkpoint", str(run_dir), "--data", str(data), "--epochs", str(n), "--device", "cpu"]
    assert main([*argv, "--out", str(tmp_path / "l.json")]) == 0
    assert said in capsys.readouterr().out  # --epochs 1 said "1 epochs"
