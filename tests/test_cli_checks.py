"""Flags and outputs of knn, export, lincls, sweep (and train's --device) that are checked before any
work: each a one-line error (exit 2) that leaves what is on disk as it was."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from eval_cli_helpers import one_line_error
from run_helpers import refuses_workers

from moco_fast.cli import build_parser, main
from moco_fast.config import build_config, to_dict
from moco_fast.model import MoCo

TINY = {"model.arch": "resnet18", "model.stem": "imagenet", "moco.k": 16, "optim.batch_size": 8, "optim.epochs": 1}


class Ran(Exception):
    """Raised by a stand-in for the command's work: the command got past its checks."""


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Iterator[Path]:
    """checkpoint.pt of an untrained ResNet-18 (enough for export: config + model), 90 MB: removed
    after the module, not kept to the session's end."""
    path = tmp_path_factory.mktemp("run") / "checkpoint.pt"
    cfg = build_config("cifar", TINY)
    model = MoCo(cfg.model, cfg.moco, cfg.data.aug.image_size)
    torch.save({"config": to_dict(cfg), "model": model.state_dict(), "epoch": 1}, path)
    yield path
    shutil.rmtree(path.parent, ignore_errors=True)


def test_an_output_that_is_a_fifo_or_device_is_refused_not_replaced(ckpt, tmp_path, monkeypatch, capsys):
    # The output is written to a temporary file renamed over the path: `--output /dev/null --force`
    # (as root) replaced the device node by a 45 MB file; a FIFO became a regular file.
    import moco_fast.lincls

    def ran(cfg, loaded=None):
        raise Ran

    monkeypatch.setattr(moco_fast.lincls, "run_lincls", ran)
    fifo = tmp_path / "pipe.pkl"
    os.mkfifo(fifo)
    for argv in (
        ["export", str(ckpt), "--format", "torchvision", "--output", str(fifo), "--force"],
        ["export", str(ckpt), "--format", "detectron2", "--output", str(fifo), "--force"],
        ["lincls", "--checkpoint", str(ckpt), "--device", "cpu", "--out", str(fifo)],
    ):
        assert main(argv) == 2, argv
        assert one_line_error(capsys).endswith(
            f"{fifo} is not a regular file (a device, FIFO or socket): give a file path"
        ), argv
        assert stat.S_ISFIFO(fifo.stat().st_mode)


@pytest.mark.parametrize("ending", ["", ".", ".."])
@pytest.mark.parametrize("command", ["export", "lincls", "finetune", "finetune --save-model"])
def test_an_output_path_ending_with_a_slash_is_refused_not_written_as_a_file(
    command, ending, ckpt, tmp_path, monkeypatch, capsys
):
    # Path("exports/") and Path("exports/.") are Path("exports"): `--output exports/` wrote the export
    # as a file named exports; exports/.. names a folder too
    import moco_fast.finetune
    import moco_fast.lincls

    def ran(*args, **kwargs):
        raise Ran

    monkeypatch.setattr(moco_fast.lincls, "run_lincls", ran)
    monkeypatch.setattr(moco_fast.finetune, "run_finetune", ran)
    folder = tmp_path / "exports"
    given = f"{folder}{os.sep}{ending}"
    ft = ["finetune", "--checkpoint", str(ckpt), "--device", "cpu"]
    argv, flag = {
        "export": (["export", str(ckpt), "--format", "torchvision", "--output", given], "--output"),
        "lincls": (["lincls", "--checkpoint", str(ckpt), "--device", "cpu", "--out", given], "--out"),
        "finetune": ([*ft, "--out", given], "--out"),
        "finetune --save-model": ([*ft, "--out", str(tmp_path / "f.json"), "--save-model", given], "--save-model"),
    }[command]
    assert main(argv) == 2
    assert one_line_error(capsys).endswith(
        f"{flag} {given} ends with {ending or os.sep}, a folder that does not exist: give a file path "
        f"({os.path.join(given, 'NAME')})"
    )
    assert not folder.exists()


@pytest.mark.parametrize("lr", ["0", "-1", "nan", "inf"])
def test_sweep_linear_classifier_lr_must_be_a_positive_number(lr, tmp_path, monkeypatch, capsys):
    # --lincls-lr inf passed the check: every setting trained, then its classifier's weights were NaN.
    import moco_fast.sweep

    def ran(*args, **kwargs):
        raise Ran

    monkeypatch.setattr(moco_fast.sweep, "run_sweep", ran)
    out = tmp_path / "sweep"
    argv = ["sweep", "--out", str(out), "--device", "cpu", "--lincls-epochs", "1", "--lincls-lr", lr]
    assert main([*argv, "--", "--data", str(tmp_path)]) == 2
    assert one_line_error(capsys) == f"moco-fast sweep: error: --lincls-lr must be a positive number (got {float(lr)})"
    assert not out.exists()


def test_an_unknown_arch_is_refused_with_the_flags(tmp_path, capsys):
    # Checked with the other flags (trainer.validate): train read the data before it said so, the
    # sweep created its folder, and the bench measured rows (its reference row failed with an
    # AttributeError).
    out = tmp_path / "run"
    argv = ["train", "--arch", "resnet1", "--data", str(tmp_path / "missing"), "--out", str(out), "--device", "cpu"]
    assert main(argv) == 2
    assert one_line_error(capsys) == (
        "moco-fast train: error: unknown arch 'resnet1': use a torchvision ResNet such as resnet18, resnet50 or "
        "wide_resnet50_2, or the paper's wider ResNet-50s resnet50w2 and resnet50w4"
    )
    assert not out.exists()


def test_knn_names_the_splits_it_used(ckpt, tmp_path, capsys):
    # With val/ and test/ both in the root the output did not say which one was scored (val/).
    from conftest import make_image_root

    root = make_image_root(tmp_path / "data", per_class=4, classes=2, test_per_class=2)
    shutil.copytree(root / "test", root / "val")
    shutil.rmtree(root / "val" / sorted(os.listdir(root / "val"))[0])  # val/ and test/ differ
    argv = ["knn", "--checkpoint", str(ckpt), "--data", str(root), "--k", "3", "--device", "cpu", "--workers", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"kNN memory: 8 images of {root / 'train'}; queries: 2 of {root / 'val'}"
    assert out[1].startswith("kNN top-1 (backbone, k=3, t=0.1): ")


def test_knn_counts_the_images_it_used_not_those_listed(ckpt, tmp_path, capsys):
    # A JPEG cut short passes the listing's header check and is left out by the feature pass: the
    # line said "queries: 3" while top-1 was of 2.
    from conftest import make_image_root

    root = make_image_root(tmp_path / "data", per_class=4, classes=2, test_per_class=2)
    first = sorted((root / "test").iterdir())[0]
    good = sorted(first.iterdir())[0].read_bytes()
    (first / "cut.jpg").write_bytes(good[: int(len(good) * 0.9)])
    argv = ["knn", "--checkpoint", str(ckpt), "--data", str(root), "--k", "3", "--device", "cpu", "--workers", "0"]
    with pytest.warns(UserWarning, match="cut.jpg"):
        assert main(argv) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"kNN memory: 8 images of {root / 'train'}; queries: 4 of {root / 'test'}"


def test_a_detectron2_export_must_be_named_pkl(ckpt, tmp_path, capsys):
    # detectron2 unpickles a .pkl only; `--output r50.pth` wrote a plain pickle that its checkpointer
    # hands to torch.load, which cannot read it.
    out = tmp_path / "r50.pth"
    assert main(["export", str(ckpt), "--format", "detectron2", "--output", str(out)]) == 2
    assert one_line_error(capsys) == (
        f"moco-fast export: error: --output {out}: detectron2 reads this format only from a .pkl file: name it .pkl"
    )
    assert not out.exists()
    # detectron2's test of the name is case-sensitive: a .PKL went to torch.load too
    assert main(["export", str(ckpt), "--format", "detectron2", "--output", str(tmp_path / "r50.PKL")]) == 2
    assert main(["export", str(ckpt), "--format", "detectron2", "--output", str(tmp_path / "r50.pkl")]) == 0


@pytest.mark.parametrize(
    "grid, train",
    [
        (["--moco-k", "64,128"], ["--moco-k", "4096"]),
        (["--moco-m", "0,0.99"], ["--moco-m=0.9"]),
        (["--mechanism", "moco"], ["--mechanism", "end-to-end"]),
        (["--shuffle-bn", "on"], ["--no-shuffle-bn"]),
    ],
)
def test_sweep_warns_that_a_grid_flag_replaces_the_same_flag_after_the_dash_dash(
    grid, train, tmp_path, monkeypatch, caplog
):
    # The grid's values replaced the train flag's in every setting without a word.
    import moco_fast.sweep

    def ran(*args, **kwargs):
        raise Ran

    monkeypatch.setattr(moco_fast.sweep, "run_sweep", ran)
    out = tmp_path / "sweep"
    flag = grid[0]
    with caplog.at_level(logging.WARNING, logger="moco_fast"), pytest.raises(Ran):
        main(["sweep", "--out", str(out), "--device", "cpu", *grid, "--", *train])
    assert [r.getMessage() for r in caplog.records] == [
        f"{flag} after -- is replaced in every setting by the grid's {flag}"
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moco_fast"), pytest.raises(Ran):  # a grid over another flag
        other = ["--moco-k", "8192"] if flag != "--moco-k" else ["--moco-m", "0.9"]
        main(["sweep", "--out", str(out), "--device", "cpu", *other, "--", *train])
    assert not caplog.records


def test_sweep_plot_on_a_full_disk_names_sweep_png(tmp_path, monkeypatch):
    # The plot was drawn into .sweep.tmp.png and renamed: a full disk's error named no file (or the
    # temporary one); it is now written as sweep.png itself, atomically, and the error names it.
    pytest.importorskip("matplotlib")
    import errno

    from matplotlib.figure import Figure

    from moco_fast.sweep_table import write_table

    def full(self, fh, **kw):
        fh.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", full)
    rows = [{"name": "moco_K16_m0.99_sbn-on", "mechanism": "moco", "knn_top1": 50.0, "pretext_acc": 10.0}]
    with pytest.raises(OSError) as e:
        write_table(rows, tmp_path)
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "sweep.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sweep.json", "sweep.md"]


def test_moco_fast_warnings_print_as_one_line_each(ckpt, tmp_path):
    # Python's format put "…/moco_fast/knn.py:186: UserWarning:" before the text and the source line
    # `warn_few_neighbours(k, len(bank), train)` after it, which read as part of a traceback. A real
    # process: pytest records warnings instead of printing them.
    import subprocess
    import sys

    from conftest import make_image_root

    root = make_image_root(tmp_path / "data", per_class=4, classes=2, test_per_class=2)
    argv = ["knn", "--checkpoint", str(ckpt), "--data", str(root), "--k", "100", "--device", "cpu", "--workers", "0"]
    done = subprocess.run([sys.executable, "-m", "moco_fast", *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [
        f"WARNING kNN: k=100 is more than the 8 images of {root / 'train'}: all 8 are the neighbours"
    ]


def test_the_warning_format_is_the_cli_s_only_while_it_runs(ckpt, tmp_path):
    import warnings

    from moco_fast import cli, knn

    before = warnings.formatwarning
    line = cli._warning_as_a_line(before)
    assert line(UserWarning("kNN: k=9"), UserWarning, knn.__file__, 186) == "WARNING kNN: k=9\n"
    assert "UserWarning: other" in line(UserWarning("other"), UserWarning, warnings.__file__, 1)  # not ours
    assert main(["knn", "--checkpoint", str(ckpt), "--k", "0"]) == 2
    assert warnings.formatwarning is before


def test_a_warning_filter_added_while_a_command_runs_outlives_it_and_the_commands_own_does_not():
    # warnings_as_lines put back every filter as the command ended (warnings.catch_warnings): one that
    # a library's import added during the command (once per process) was gone for the rest of a
    # process that went on (a test, a notebook)
    import warnings

    from moco_fast import cli

    with warnings.catch_warnings():  # the test's: the filters as they were, after it
        before = list(warnings.filters)
        with cli.warnings_as_lines():
            warnings.filterwarnings("ignore", "a library's filter, added at its import")
            added = warnings.filters[0]
        assert warnings.filters == [added, *before]


def test_a_commands_filter_that_shows_moco_fasts_warnings_ends_with_the_command(ckpt):
    # main() set "default" for moco_fast's warnings (shown under PYTHONWARNINGS=ignore too) for the
    # rest of a process that went on; warnings_as_lines sets it now, and puts it back
    import warnings

    from moco_fast import cli

    registry: dict = {}

    def warn():
        warnings.warn_explicit("kNN: k=9", UserWarning, "knn.py", 186, module="moco_fast.knn", registry=registry)

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("error")  # the caller's
        before = list(warnings.filters)
        with cli.warnings_as_lines():
            warn()  # shown, not the caller's error
        assert [str(w.message) for w in seen] == ["kNN: k=9"]
        assert warnings.filters == before
        with pytest.raises(UserWarning):  # the caller's filter again, for a warning shown in the command too
            warn()
        assert cli.main(["knn", "--checkpoint", str(ckpt), "--k", "0"]) == 2
        assert warnings.filters == before


def test_a_gpus_workers_warnings_print_as_one_line_each(tmp_path, monkeypatch):
    # a --gpus worker runs launch._reported, not main(): its kNN monitor's warning kept Python's
    # "knn.py:186: UserWarning:" prefix and source line
    import warnings

    from moco_fast import knn
    from moco_fast.launch import _reported

    monkeypatch.setenv("RANK", "0")

    def formatted():
        return warnings.formatwarning(UserWarning("kNN: k=9"), UserWarning, knn.__file__, 186)

    before = warnings.formatwarning
    assert _reported(formatted, str(tmp_path), None) == "WARNING kNN: k=9\n"
    assert warnings.formatwarning is before


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["train", "--device", "cpu", "--out", ""], "--out"),  # the current folder became the run folder
        (["train", "--device", "cpu", "--data", " ", "--out", "x"], "--data"),
        (["knn", "--checkpoint", ""], "--checkpoint"),  # ./checkpoint.pt was read
        (["export", "", "--format", "torchvision", "--output", "x.pth"], "CHECKPOINT"),  # as its usage names it
        (["export", "--checkpoint", " ", "--format", "torchvision", "--output", "x.pth"], "--checkpoint"),
        (["convert", "src", ""], "DST"),
        (["lincls", "--checkpoint", "c.pt", "--out", ""], "--out"),
        (["sweep", "--out", "s", "--", "--device", "cpu", "--data", ""], "after --: --data"),  # trained on ./
    ],
)
def test_an_empty_path_is_a_one_line_error(argv, flag, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"moco-fast {argv[0]}: error: {flag} is empty: give a path (an unset shell variable?)"], err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--device", "cpu", "--features", "head"],  # knn's flag
        ["train", "--data", "d", "runs/x"],  # a positional train has none of, --data given: no hint
        ["convert", "src", "dst.beton", "runs/x"],  # a command without --data: no hint
        ["train", "--epochs", "100", "200"],  # a flag's value given twice is no path: no hint
        ["train", "-5"],  # nor a negative number
        ["knn", "--checkpoint", "c.pt", "--epochs", "5"],  # lincls's flag
        ["lincls", "--checkpoint", "c.pt", "--features", "head"],
        ["finetune", "--checkpoint", "c.pt", "--features", "head"],
        ["export", "c.pt", "--format", "torchvision", "--output", "x.pth", "--epochs", "5"],
        ["convert", "src", "dst.beton", "--epochs", "5"],
    ],
)
def test_a_flag_the_command_does_not_take_is_its_own_error_under_its_usage(argv, tmp_path, monkeypatch, capsys):
    # argparse left it to the top-level parser: "usage: moco-fast [-h] [-v] [--version] COMMAND ..." and
    # "moco-fast: error: unrecognized arguments", as if the command were the word it did not know
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as end:
        main(argv)
    assert end.value.code == 2
    err = capsys.readouterr().err
    extras = " ".join(argv[-2:] if argv[-2].startswith("--") else argv[-1:])
    assert err.startswith(f"usage: moco-fast {argv[0]} "), err
    assert err.strip().splitlines()[-1] == f"moco-fast {argv[0]}: error: unrecognized arguments: {extras}", err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "argv, says",
    [
        (["train", "/data/x"], "/data/x (a path goes after a flag: --data /data/x)"),
        (["train", "--epochs", "1", "my data"], "my data (a path goes after a flag: --data 'my data')"),
        (["knn", "--checkpoint", "c.pt", "d", "--epochs", "5"], "d --epochs 5 (a path goes after a flag: --data d)"),
    ],
)
def test_a_path_where_the_command_reads_data_names_the_data_flag(argv, says, tmp_path, monkeypatch, capsys):
    # `moco-fast train /data/x` said "unrecognized arguments: /data/x" without a word of --data
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as end:
        main(argv)
    assert end.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"moco-fast {argv[0]}: error: unrecognized arguments: {says}", err
    assert list(tmp_path.iterdir()) == []


def test_version_prints_the_package_version_and_exits_0(capsys):
    import moco_fast

    with pytest.raises(SystemExit) as end:
        main(["--version"])
    assert end.value.code == 0
    assert capsys.readouterr().out.strip() == f"moco-fast {moco_fast.__version__}"


def test_the_package_installs_with_the_version_that_version_prints(tmp_path):
    # setup.py wrote its own "0.1.0" beside moco_fast.__version__: a release that raised one left the
    # other behind. A copy with another version shows that setup.py reads it from the package.
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    (tmp_path / "moco_fast").mkdir()
    shutil.copy(root / "setup.py", tmp_path)
    (tmp_path / "moco_fast" / "__init__.py").write_text('"""x"""\n\n__version__ = "9.8.7"\n')
    done = subprocess.run([sys.executable, "setup.py", "--version"], cwd=tmp_path, capture_output=True, text=True)
    assert done.stdout.strip().splitlines()[-1] == "9.8.7", done.stderr[-2000:]


def test_a_gpu_index_past_the_machine_s_gpus_is_a_one_line_error_in_train_too(tiny_root, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    argv = ["--device", "cuda:3", "--out", str(tmp_path / "run")]
    assert main(["train", "--data", str(tiny_root), "--epochs", "1", "--workers", "0", *argv]) == 2
    # train's torch.cuda.set_device(3) raised CUDA's 'invalid device ordinal' traceback
    assert capsys.readouterr().err.strip().endswith("--device cuda:3: this machine has 1 GPU (cuda:0..)")


def test_more_workers_than_the_cores_can_use_are_refused_before_any_start(tiny_root, tmp_path, monkeypatch, capsys):
    # --workers 1000 on a 2-core CPU started every worker, which all decoded ahead while the step waited
    # for the cores: a SIGTERM acted on at step 10's sync ended the run after ~68 s (400: 90 s)
    import moco_fast.trainer

    monkeypatch.setattr(moco_fast.trainer, "available_cores", lambda: 2)
    monkeypatch.setattr("moco_fast.cores.available_cores", lambda: 2)  # the --workers cap's count
    argv = ["train", "--data", str(tiny_root), "--device", "cpu", "--loader", "torch", "--epochs", "1"]
    assert main([*argv, "--workers", "1000", "--out", str(tmp_path / "run")]) == 2
    assert refuses_workers(one_line_error(capsys), "--workers 1000", 2, 16)
    assert not (tmp_path / "run").exists()
    # each of a machine's processes has its share: 4 processes on 2 cores, 4 each
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    with pytest.raises(moco_fast.trainer.ConfigError, match=r"^--workers 5 in each of its 4 processes: .* at most 4 "):
        moco_fast.trainer.check_workers(5)
    moco_fast.trainer.check_workers(4)
    moco_fast.trainer.check_workers(-1)


def test_a_resumed_run_takes_its_saved_workers_as_far_as_this_machine_s_cores_do(tmp_path, monkeypatch, capsys, caplog):
    # a run configured with --workers 100 on a large machine, resumed on 2 cores without --workers: the
    # saved count was refused ('--workers 100: ... use at most 16'), a flag the command line did not have
    import moco_fast.trainer
    from moco_fast.cli import build_parser
    from moco_fast.commands.train import config_from_args, configured

    out = tmp_path / "run"
    out.mkdir()
    args = build_parser().parse_args(["train", "--loader", "synthetic", "--workers", "100", "--out", str(out)])
    torch.save(
        {"config": to_dict(config_from_args(args)), "model": {}, "optimizer": {}, "epoch": 1}, out / "checkpoint.pt"
    )
    monkeypatch.setattr(moco_fast.trainer, "available_cores", lambda: 2)
    monkeypatch.setattr("moco_fast.cores.available_cores", lambda: 2)  # the --workers cap's count

    def resumed_workers(*flags: str) -> int:
        capsys.readouterr()
        assert main(["train", "--resume", "--out", str(out), *flags, "--print-config"]) == 0
        return json.loads(capsys.readouterr().out)["data"]["workers"]

    assert resumed_workers() == 16
    said = (
        "--resume: the run was configured with --workers 100, more than this machine's 2 CPU cores take: it "
        "continues with 16, the most they take, which its config.json and checkpoint record {} "
        "(--workers N to choose, here or where it resumes next)"
    )
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warned == [said.format("when it goes on")]  # --print-config records nothing
    caplog.clear()
    assert configured(build_parser().parse_args(["train", "--resume", "--out", str(out)]))[0].data.workers == 16
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [said.format("from now on")]
    assert resumed_workers("--workers", "100") == 100  # typed: the run refuses it (check_workers)
    monkeypatch.setattr(moco_fast.trainer, "available_cores", lambda: 16)
    monkeypatch.setattr("moco_fast.cores.available_cores", lambda: 16)  # the --workers cap's count
    assert resumed_workers() == 100  # within this machine's 128


@pytest.mark.parametrize("command", ["knn", "lincls", "finetune"])
def test_the_evaluations_refuse_more_workers_than_the_cores_take_as_train_does(tmp_path, monkeypatch, capsys, command):
    # bd7a260 refused them in train alone: knn, lincls and finetune started all 17 on 2 cores; here the
    # checkpoint, not there, was named first
    import moco_fast.trainer

    monkeypatch.setattr(moco_fast.trainer, "available_cores", lambda: 2)
    monkeypatch.setattr("moco_fast.cores.available_cores", lambda: 2)  # the --workers cap's count
    argv = [command, "--checkpoint", str(tmp_path / "nowhere.pt"), "--data", str(tmp_path), "--workers", "17"]
    assert main(argv) == 2
    assert refuses_workers(one_line_error(capsys), "--workers 17", 2, 16)


def test_the_evaluations_refuse_only_a_typed_workers_count(tmp_path, monkeypatch, capsys):
    # c9f3884 checked the count after the default was applied: 32 processes on this machine's 2 cores
    # (LOCAL_WORLD_SIZE) take 1 worker each, and knn's default (4, no more than the cores: 2) was refused
    # as '--workers 2 in each of its 32 processes', a flag nobody typed
    import moco_fast.trainer

    monkeypatch.setattr(moco_fast.trainer, "available_cores", lambda: 2)
    monkeypatch.setattr("moco_fast.cores.available_cores", lambda: 2)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "32")
    argv = ["knn", "--checkpoint", str(tmp_path / "nowhere.pt"), "--data", str(tmp_path), "--device", "cpu"]
    for workers in ([], ["--workers", "-1"], ["--workers", "0"], ["--workers", "1"]):
        assert main([*argv, *workers]) == 2
        assert "nowhere.pt" in one_line_error(capsys), workers  # the checkpoint's line, not the workers'
    # and the default itself stays within the cap: 1 worker for each of the 32 processes, not 2 (64 on 2 cores)
    from moco_fast.commands import resolve_eval_runtime

    args = build_parser().parse_args(argv)
    resolve_eval_runtime(args)
    assert args.workers == 1
    assert main([*argv, "--workers", "2"]) == 2
    assert refuses_workers(one_line_error(capsys), "--workers 2 in each of its 32 processes", 2, 1)
