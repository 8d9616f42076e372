"""bench/: the throughput script end to end on the CPU, its row parsing, its flags' checks, the plot,
the momentum, split-BN and FFCV benches' flags, the epoch-start bench's JSON, bench/pack_folder.py,
and each script's --help as gpu_check.sh runs it (the profile breakdown and the reference step:
test_bench_reference.py; the table and its ratios: test_bench_report.py)."""

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import pack_folder  # noqa: E402
import plot  # noqa: E402
import throughput  # noqa: E402
from gpu_stats import GpuSampler  # noqa: E402

TINY = ["--device", "cpu", "--arch", "resnet18", "--image-size", "32", "--batch-size", "16", "--moco-k", "64"]


@pytest.mark.slow
def test_cpu_run_writes_the_table_json_and_plot(tiny_root, tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    args = [*TINY, "--data", str(tiny_root), "--workers", "0", "--steps", "1", "--warmup", "0"]
    run = subprocess.run(
        [sys.executable, str(BENCH / "throughput.py"), *args, "--json", str(out), "--plot", str(png)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    assert {"rows", "device", "torch", "config", "time"} <= set(result)
    assert result["device"]["type"] == "cpu" and result["torch"] == torch.__version__
    rows = {r["name"]: r for r in result["rows"]}
    assert list(rows) == ["loader", "trainer", "end-to-end", "reference"]
    ref = rows["reference"]["img_per_s"]
    for r in rows.values():
        assert r["img_per_s"] > 0 and r["ms_per_step"] > 0 and r["steps"] == 1
        # images/s and ms/step describe the same timing: batch 16 per step
        assert r["img_per_s"] == pytest.approx(16 * 1000 / r["ms_per_step"], rel=1e-6)
        if r["kind"] == "loader":  # over the fastest step row, not the reference
            step = max(rows["trainer"]["img_per_s"], ref)
            assert r["loader_over_step"] == pytest.approx(r["img_per_s"] / step) and "vs_reference" not in r
        else:
            assert r["vs_reference"] == pytest.approx(r["img_per_s"] / ref)
        assert "gpu_util_pct" not in r and "peak_mem_gib" not in r  # no GPU: no GPU figures
    assert result["config"]["train"]["optim"]["batch_size"] == 16
    assert "img/s" in run.stdout and "reference" in run.stdout and "GPU %" not in run.stdout
    assert "\nloader/step: a loader row's img/s over " in run.stdout  # the table says what its ratios are
    if plot_available():
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# each bench that lists --data, with its flags for one short row (the folder: tmp_path/train)
LISTING_BENCHES = {
    "throughput.py": lambda tmp: [*TINY, "--data", str(tmp), "--rows", "loader", "--loader", "torch", "--workers", "0"],
    "ffcv_loader.py": lambda tmp: [
        "--data",
        str(tmp / "train"),
        *("--rows", "torch", "--workers", "1", "--batch-size", "4", "--min-seconds", "0"),
    ],
}


@pytest.mark.slow
@pytest.mark.parametrize("bench", sorted(LISTING_BENCHES))
def test_the_data_listings_warnings_read_as_the_clis(tmp_path, bench):
    # The benches set up no logging: the listing's warnings (a file it skips) came through logging's
    # last resort as bare messages, where the CLI writes "WARNING ..." (cli.log_as_lines)
    from PIL import Image

    for c in "ab":
        (tmp_path / "train" / c).mkdir(parents=True)
        for i in range(8):
            Image.new("RGB", (40, 40), (30 * i, 10, 200)).save(tmp_path / "train" / c / f"{i}.jpg")
    Image.new("RGB", (40, 40)).save(tmp_path / "train" / "stray.jpg")  # read by nothing: skipped, said
    run = subprocess.run(
        [sys.executable, str(BENCH / bench), *LISTING_BENCHES[bench](tmp_path), "--steps", "1", "--warmup", "0"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    skipped = [line for line in run.stderr.splitlines() if "stray.jpg" in line]
    assert skipped and all(line.startswith("WARNING skipping ") for line in skipped), run.stderr[-3000:]
    # once: the data check listed it, and the loader row again, each saying it
    assert len(skipped) == 1, run.stderr[-3000:]


@pytest.mark.parametrize("loader", ["torch", "resident"])
def test_the_data_is_listed_once_for_all_the_loader_rows(tiny_root, loader, listed, capsys):
    # check_data listed --data, and then every loader row's loader listed it again: minutes a row on
    # ImageNet, for the same listing
    rows = ["--rows", "loader,loader:fp32", "--loader", loader, "--workers", "0", "--steps", "1", "--warmup", "0"]
    assert throughput.main([*TINY, "--data", str(tiny_root), *rows]) == 0, capsys.readouterr().err
    assert listed == ["train"]  # no row evaluates: the eval split is not read


def flat_val_root(tiny_root: Path, root: Path) -> None:
    """`root` as ImageNet comes: tiny_root's train/, and a val/ of files in one folder (not sorted
    into class folders), which no bench row reads."""
    shutil.copytree(tiny_root / "train", root / "train")
    (root / "val").mkdir()
    for f in sorted((tiny_root / "test").rglob("*.jpg"))[:2]:
        shutil.copy(f, root / "val" / f.name)


def test_the_bench_runs_on_a_root_whose_val_is_not_sorted_into_classes(tiny_root, tmp_path, listed, capsys):
    # ImageNet's val/ as downloaded is 50,000 files in one folder; the bench listed it, and refused
    # the root ("no class subfolders in val"), though no row reads it
    flat_val_root(tiny_root, tmp_path)
    rows = ["--rows", "loader", "--workers", "0", "--steps", "1", "--warmup", "0"]
    assert throughput.main([*TINY, "--data", str(tmp_path), *rows]) == 0, capsys.readouterr().err
    assert listed == ["train"]


@pytest.mark.slow
def test_the_ffcv_bench_lists_a_folder_once_for_the_torch_rows_that_read_it(tiny_root, listed, capsys):
    # torch and torch-crops read the same folder, each listing it again after the conversion did
    import ffcv_loader

    flags = ["--rows", "torch,torch-crops", "--workers", "1", "--batch-size", "4", "--min-seconds", "0"]
    run = [*flags, "--steps", "1", "--warmup", "0"]
    assert ffcv_loader.main(["--data", str(tiny_root / "train"), *run]) == 0, capsys.readouterr().err
    assert listed == ["train", "train"]  # the conversion's (header-checked), the torch rows' (not)


@pytest.mark.slow
def test_the_ffcv_benchs_torch_rows_run_on_a_root_whose_val_is_not_sorted_into_classes(
    tiny_root, tmp_path, listed, capsys
):
    # the torch rows listed the eval split beside train/, which none reads: ImageNet's val/ as
    # downloaded (one folder of files) failed them with 'no class subfolders in val'
    import ffcv_loader

    flat_val_root(tiny_root, tmp_path)
    flags = ["--rows", "torch", "--workers", "1", "--batch-size", "4", "--min-seconds", "0", "--steps", "1"]
    assert ffcv_loader.main(["--data", str(tmp_path), *flags, "--warmup", "0"]) == 0, capsys.readouterr().err
    assert "error" not in capsys.readouterr().out
    assert listed == ["train", "train"]  # the conversion's, the torch row's: not val/


def plot_available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def parse(rows: str, *extra: str):
    args = throughput.build_parser().parse_args([*TINY, *extra, "--rows", rows])
    return throughput.parse_rows(args.rows, args)


def test_rows_and_modifiers():
    specs = parse("trainer,trainer:fp16+compile+graph,reference,end-to-end:nchw+triton", "--amp", "bf16")
    assert [s.kind for s in specs] == ["trainer", "trainer", "reference", "end-to-end"]
    plain, fast, _, e2e = specs
    assert (plain.amp, plain.compile, plain.graph, plain.channels_last) == ("bf16", False, False, True)
    assert (fast.amp, fast.compile, fast.graph) == ("fp16", True, True)
    assert (e2e.channels_last, e2e.momentum) == (False, "triton")
    # global flags are the modifiers' starting point; "eager" takes compile and graph off again
    (spec,) = parse("trainer:eager", "--compile", "--cuda-graph")
    assert not spec.compile and not spec.graph
    # ... but not the reference row's: it stays the official step
    (ref,) = parse("reference", "--compile", "--cuda-graph", "--amp", "fp16")
    assert (ref.compile, ref.graph, ref.amp, ref.channels_last) == (False, False, "off", False)
    # split BN's kernel: bntriton, not the EMA's triton; --bn-kernel the starting point, bntorch back
    bn, both, plain, back = parse("trainer:bntriton,trainer:triton+bntriton,trainer,trainer:bntorch", "--amp", "bf16")
    assert (bn.bn_kernel, bn.momentum, both.bn_kernel, both.momentum) == ("triton", "foreach", "triton", "triton")
    assert plain.bn_kernel == back.bn_kernel == "torch"
    assert "EMA foreach, split BN triton" in bn.settings(torch.bfloat16, 0, "synthetic")
    assert "split BN torch" in plain.settings(torch.bfloat16, 0, "synthetic")
    ((spec, back),) = [parse("end-to-end,trainer:bntorch", "--bn-kernel", "triton")]
    assert (spec.bn_kernel, back.bn_kernel) == ("triton", "torch")
    # --bn-splits 1 is plain BN (the key batch still shuffled): no split BN, so no kernel to name or choose
    (one,) = parse("trainer", "--bn-splits", "1")
    assert not one.split_bn and one.settings(None, 0, "synthetic").endswith("EMA foreach, plain BN (--bn-splits 1)")
    with pytest.raises(
        throughput.ConfigError, match="'trainer:bntorch': bntorch chooses split BN's kernel, and --bn-splits 1 runs"
    ):
        parse("trainer:bntorch", "--bn-splits", "1")


@pytest.mark.parametrize(
    "rows",
    [
        *["trainer:fp8", "warp-drive", ",", "reference:fp16", "reference:compile", "trainer,trainer"],
        *["trainer:fp16+bf16", "loader:fp16", "trainer:cl+graph"],  # the last two: what a CPU cannot run
    ],
)
def test_bad_rows_are_one_line_errors(rows, capsys):
    assert throughput.main([*TINY, "--rows", rows]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --rows") and err.count("\n") == 1


@pytest.mark.parametrize(
    "rows, says",
    [  # split BN's kernel where no split BN runs, two kernels, and the triton one without the interpreter
        ("trainer:noshuffle+bntriton", "bntriton chooses split BN's kernel, and noshuffle runs plain BN"),
        ("loader:bntriton", "bntriton chooses split BN's kernel, and the loader row runs no step"),
        ("reference:bntriton", "only noshuffle (plain BN) applies to it"),
        ("trainer:bntriton+bntorch", "bntriton and bntorch contradict each other"),
        ("trainer:bntriton", "split BN's kernel 'triton' needs a CUDA batch (or TRITON_INTERPRET=1 on the CPU)"),
    ],
)
def test_split_bn_kernel_rows_that_cannot_run_are_one_line_errors(rows, says, capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert throughput.main([*TINY, "--rows", rows]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --rows: {rows!r}: ") and says in err and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "flags, says",
    [
        (["--steps", "0"], "--steps must be at least 1 (got 0)"),
        (["--warmup", "-1"], "--warmup must be at least 0 (got -1)"),
        (["--batch-size", "0"], "--batch-size must be at least 1 (got 0)"),  # said "must be positive"
        (["--image-size", "0"], "--image-size must be at least 8"),  # train's bounds (config.check_image_size)
        (["--image-size", "22400"], "--image-size must be at most 4096"),
        (["--json", "{tmp}/r.txt"], "--json {tmp}/r.txt: name a .json file"),
        (["--json", "{tmp}"], "name a .json file"),
        (["--json", "{tmp}/afile/r.json"], "afile is not a folder"),
        (["--plot", "{tmp}/p.txt"], "name a .png file"),
        (["--loader", "bogus", "--rows", "trainer"], "--loader 'bogus': choose from"),
        (["--momentum-backend", "bogus", "--rows", "trainer"], "unknown momentum backend 'bogus'"),
        (["--data", "{tmp}/missing", "--rows", "reference,end-to-end"], "not found"),
        # the loader's own lines (loaders/wds.beton_file), not a bare "got None" nor a path without its fault
        (["--loader", "ffcv", "--rows", "loader"], "needs --data X.beton (make one with `moco-fast convert"),
        (["--loader", "ffcv", "--data", "{tmp}/missing", "--rows", "loader"], "{tmp}/missing is not found (make"),
        (["--loader", "ffcv", "--data", "{tmp}", "--rows", "loader"], "--data {tmp} is a folder (make one"),
        (["--rows", "trainer", "--profile", "--profile-steps", "0"], "--profile-steps must be at least 1 (got 0)"),
        (["--rows", "reference", "--profile"], "--rows has none"),
        # read by nothing without --profile, without a word
        (["--rows", "trainer", "--profile-steps", "5"], "--profile-steps 5 sets the steps of --profile: add --profile"),
        (["--batch-size", "6", "--bn-splits", "4"], "--batch-size 6 must be a multiple of --bn-splits 4"),
        (["--arch", "resnet1"], "unknown arch 'resnet1'"),
        (["--rows", "trainer", "--bn-kernel", "triton", "--bn-splits", "1"], "--bn-splits 1 runs plain BN"),
    ],
)
def test_bad_flags_fail_before_the_first_row(flags, says, tmp_path, capsys, monkeypatch):
    # Each is one line and exit 2 before anything is measured (a value of 0 is not the default).
    (tmp_path / "afile").write_text("x")
    ran = []
    monkeypatch.setattr(throughput.Bench, "run", lambda self, spec: ran.append(spec))
    flags = [f.format(tmp=tmp_path) for f in flags]
    assert throughput.main([*TINY, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says.format(tmp=tmp_path) in err and err.count("\n") == 1, err
    assert not ran


def test_a_bntriton_row_times_the_step_on_split_bns_triton_kernels(tmp_path, monkeypatch):
    # under the interpreter on the CPU: the row's MoCo runs its split BN in the kernels, and its
    # settings and JSON say so; a noshuffle row (plain BN) says no kernel
    pytest.importorskip("triton")
    from moco_fast.kernels import split_bn_triton

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ran = []
    real = split_bn_triton._SplitBatchNormTriton.apply
    monkeypatch.setattr(split_bn_triton._SplitBatchNormTriton, "apply", lambda *a: (ran.append(1), real(*a))[1])
    out = tmp_path / "bn.json"
    flags = ["--steps", "1", "--warmup", "0", "--bn-splits", "2", "--json", str(out)]
    assert throughput.main([*TINY, *flags, "--rows", "trainer:bntriton,trainer:noshuffle"]) == 0
    bn, plain = json.loads(out.read_text())["rows"]
    assert (bn["bn_kernel"], plain["bn_kernel"]) == ("triton", None)
    assert bn["settings"].endswith("split BN triton") and plain["settings"].endswith("no shuffle BN")
    assert len(ran) == 2 * 20  # one step: resnet18's 20 BN layers in each encoder


@pytest.mark.parametrize("device, gpu, says", [("auto", False, True), ("cpu", False, False), ("auto", True, False)])
def test_the_default_device_without_a_gpu_says_the_rows_run_on_the_cpu(device, gpu, says, capsys, monkeypatch):
    # `python bench/throughput.py` (the README's "images/s per GPU") measured the CPU without a word;
    # a GPU found (--steps 0 stops it before any CUDA call) or --device cpu asked for has nothing to say
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
    assert throughput.main([*TINY, "--device", device, "--steps", "0"]) == 2
    err = capsys.readouterr().err
    assert ("no CUDA GPU here: the rows run on the CPU" in err) == says, err
    assert err.splitlines()[-1] == "error: --steps must be at least 1 (got 0)"


def test_json_never_replaces_a_run_s_own_files(tmp_path, capsys, monkeypatch):
    # `--json runs/moco/config.json` (or summary.json, lincls.json) replaced the run's file with the
    # bench's results; an earlier bench result is replaced as before.
    monkeypatch.setattr(throughput.Bench, "run", lambda self, spec: {"name": spec.name, "kind": spec.kind})
    for name in ("config.json", "summary.json", "lincls.json"):
        target = tmp_path / name
        target.write_text('{"kept": true}')
        assert throughput.main([*TINY, "--rows", "reference", "--json", str(target)]) == 2
        err = capsys.readouterr().err
        assert (
            err
            == f"error: --json {target} exists and is a training run's {name}: give another path, or delete it first\n"
        )
        assert target.read_text() == '{"kept": true}'
    table = tmp_path / "sweep.json"  # a sweep's table: it was replaced
    table.write_text("[]")
    assert throughput.main([*TINY, "--rows", "reference", "--json", str(table)]) == 2
    assert "is a sweep's table (sweep.json)" in capsys.readouterr().err and table.read_text() == "[]"
    earlier = tmp_path / "bench.json"
    earlier.write_text("{}")
    assert throughput.main([*TINY, "--rows", "reference", "--json", str(earlier)]) == 1  # the row has no figure
    assert json.loads(earlier.read_text())["rows"][0]["name"] == "reference"


def test_momentum_bench_json_matches_throughputs(tmp_path, capsys):
    # every backend agrees with the float64 reference, and the JSON names the device as
    # throughput.py's does (a record, which bench/plot.py and gpu_check read), not as a bare string
    import momentum_kernels

    out = tmp_path / "momentum.json"
    args = ["--device", "cpu", "--arch", "resnet18", "--repeats", "1", "--warmup", "0", "--json", str(out)]
    assert momentum_kernels.main(args) == 0
    res = json.loads(out.read_text())
    assert res["device"]["type"] == "cpu" and res["device"]["name"] in capsys.readouterr().out
    assert {"reference", "foreach", "official-loop"} <= {r["name"] for r in res["rows"]}
    assert all(r["ms"] > 0 for r in res["rows"])


@pytest.mark.parametrize(
    "flags", [["--device", "gpu"], ["--arch", "resnet7"], ["--repeats", "0"], ["--warmup", "-1"], ["--json", "{tmp}"]]
)
def test_momentum_bench_refuses_bad_flags_in_one_line(flags, tmp_path, capsys):
    import momentum_kernels

    args = ["--device", "cpu", "--arch", "resnet18", *[f.format(tmp=tmp_path) for f in flags]]
    assert momentum_kernels.main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err


@pytest.mark.parametrize(
    "flags",
    [
        *(["--data", "{tmp}/missing"], ["--batch-size", "0"], ["--steps", "0"], ["--rows", ","], ["--device", "gpu"]),
        ["--jpeg-quality", "101"],
        ["--min-seconds", "-1"],
        ["--data", "{tmp}/shards"],  # neither class folders nor images: a traceback naming the bench's temporary folder
    ],
)
def test_ffcv_bench_refuses_bad_flags_in_one_line(flags, tmp_path, capsys, monkeypatch):
    import ffcv_loader

    (tmp_path / "shards").mkdir()
    (tmp_path / "shards" / "shard-000000.tar").write_bytes(b"")
    ran = []
    monkeypatch.setattr(ffcv_loader, "run_loader_rows", lambda *a: ran.append(a))
    assert ffcv_loader.main([f.format(tmp=tmp_path) for f in flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and not ran, err
    if flags[0] in ("--jpeg-quality", "--min-seconds"):  # the flag given, alone, with its value
        other = {"--jpeg-quality": "--min-seconds", "--min-seconds": "--jpeg-quality"}[flags[0]]
        assert flags[0] in err and f"(got {flags[1]})" in err and other not in err, err


def test_ffcv_bench_interrupted_keeps_what_it_measured(tmp_path, capsys, monkeypatch):
    # Ctrl-C (or a time box's SIGINT) in the second row: the first row's figures are printed and
    # written, the others marked, exit 130; before, a traceback and nothing kept
    import ffcv_loader

    def aug_row(row, a):
        if row == "aug-batch":
            raise KeyboardInterrupt
        return {"img_per_s": 123.0, "ms_per_batch": 4.0}

    monkeypatch.setattr(ffcv_loader, "run_aug_row", aug_row)
    out = tmp_path / "ffcv.json"
    assert ffcv_loader.main(["--rows", "aug-sample,aug-batch", "--json", str(out)]) == 130
    result = json.loads(out.read_text())
    rows = {r["row"]: r for r in result["rows"]}
    assert rows["aug-sample"]["img_per_s"] == 123.0 and rows["aug-batch"]["error"] == "not run (interrupted)"
    assert result["complete"] is False  # as throughput.py's JSON says it; a script need not scan the rows
    printed = capsys.readouterr()
    assert "123" in printed.out and "not run (interrupted)" in printed.out and "interrupted" in printed.err
    assert ffcv_loader.main(["--rows", "aug-sample", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["complete"] is True


@pytest.mark.parametrize("row", ["aug-batch-triton", "aug-sample"])
def test_ffcv_bench_aug_rows_time_the_pass_from_ffcvs_uint8_batch(tmp_path, monkeypatch, row):
    # Both kinds of aug row start where FFCVLoader's pass starts, from FFCV's uint8 batch (2 x N
    # views of N x 2 x S x S x 3) through DeviceAugment.from_uint8: the fused kernels read it where
    # it lies, the torch pass pays for its copy to floats. Before, the torch rows started from a
    # uint8 2N x 3 x S x S batch made in that layout, so they skipped FFCVLoader's permute copy. The
    # pass itself is stubbed (the interpreter takes minutes at 224 px); DeviceAugment is built as
    # the row builds it.
    if row.endswith("-triton"):
        pytest.importorskip("triton")
    import ffcv_loader
    from moco_fast.loaders.base import DeviceAugment

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    seen = []
    monkeypatch.setattr(DeviceAugment, "from_uint8", lambda self, x, g: seen.append((self.kernel, x)) or (x, x))
    flags = ["--batch-size", "2", "--steps", "1", "--warmup", "0", "--min-seconds", "0"]
    assert ffcv_loader.main(["--rows", row, *flags]) == 0
    kernel = "triton" if row.endswith("-triton") else "torch"
    assert seen and all(k == kernel and x.dtype == torch.uint8 and x.shape == (2, 2, 3, 224, 224) for k, x in seen)
    assert seen[0][1].permute(1, 0, 3, 4, 2).is_contiguous()  # a view of FFCV's layout: no copy made


def test_ffcv_bench_triton_rows_reach_the_fused_kernels(tmp_path, monkeypatch):
    # On a CPU without Triton's interpreter an aug-*-triton row gets as far as its DeviceAugment,
    # which refuses the kernel (so its order was parsed and its kernel chosen): that row fails and
    # says why, the other is measured, exit 1; before, one failed aug row lost the whole run.
    pytest.importorskip("triton")
    import ffcv_loader

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    out = tmp_path / "ffcv.json"
    flags = ["--batch-size", "1", "--steps", "1", "--warmup", "0", "--min-seconds", "0", "--json", str(out)]
    assert ffcv_loader.main(["--rows", "aug-batch-triton,aug-sample", *flags]) == 1
    rows = {r["row"]: r for r in json.loads(out.read_text())["rows"]}
    assert "needs a CUDA batch" in rows["aug-batch-triton"]["error"] and rows["aug-sample"]["img_per_s"] > 0


def test_a_loader_option_given_twice_is_refused_by_the_bench(capsys):
    flags = ["--loader-option", "decode=once", "--loader-option", "decode=twice"]
    assert throughput.main([*TINY, "--rows", "reference", "--loader", "ffcv", *flags]) == 2
    assert (
        capsys.readouterr().err
        == "error: --loader-option decode is given twice (decode=once, decode=twice): give it once\n"
    )


def test_cuda_graph_on_cpu_is_refused_before_any_work(capsys):
    # each error names what asked for the graph: the flag, or the row's +graph (no flag to drop)
    assert throughput.main([*TINY, "--rows", "trainer", "--cuda-graph"]) == 2
    assert "drop --cuda-graph" in capsys.readouterr().err
    assert throughput.main([*TINY, "--rows", "reference,trainer:fp32+graph"]) == 2
    err = capsys.readouterr().err
    assert "'trainer:fp32+graph'" in err and "--cuda-graph" not in err


def test_gpu_sampler_is_silent_without_a_gpu():
    with GpuSampler(torch.device("cpu")) as s:
        pass
    assert s.summary() == {}


def test_plot_without_matplotlib_says_so(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = {"rows": [{"name": "trainer", "kind": "trainer", "img_per_s": 1.0}]}
    assert plot.plot_rows(result, tmp_path / "x.png") is False
    assert not (tmp_path / "x.png").exists()
    assert "matplotlib" in capsys.readouterr().err


def test_a_full_disk_under_json_or_plot_is_one_line(tmp_path, capsys, monkeypatch):
    # A PNG or JSON write that fails (ENOSPC) ended the run with a traceback from PIL, after the table,
    # and the PNG was written in place (a half file could stay under its name).
    pytest.importorskip("matplotlib")
    import errno

    from matplotlib.figure import Figure

    def full(self, fh, **kw):
        fh.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    row = {"name": "reference", "kind": "reference", "settings": "fp32", "img_per_s": 2.8, "ms_per_step": 5670.9}
    monkeypatch.setattr(throughput.Bench, "run", lambda self, spec: dict(row))
    monkeypatch.setattr(Figure, "savefig", full)
    png = tmp_path / "p.png"
    assert throughput.main([*TINY, "--rows", "reference", "--plot", str(png)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: No space left on device: {png}"
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no half PNG, no temporary file
    (tmp_path / "r.json").write_text(json.dumps({"rows": [row]}))
    assert plot.main([str(tmp_path / "r.json"), str(png)]) == 2  # bench/plot.py too
    assert capsys.readouterr().err == f"error: No space left on device: {png}\n"

    def no_space(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    import report

    monkeypatch.setattr(report, "atomic_write_text", no_space)  # the benches' write_json
    out = tmp_path / "r2.json"
    assert throughput.main([*TINY, "--rows", "reference", "--json", str(out)]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"error: No space left on device: {out}"


def test_plot_script_reads_either_bench_json_and_refuses_others(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    ffcv = {"rows": [{"row": "torch", "img_per_s": 50.0}, {"row": "ffcv", "img_per_s": 450.0, "vs_torch": 9.0}]}
    (tmp_path / "ffcv.json").write_text(json.dumps(ffcv))  # ffcv_loader's rows: "row", no "kind"
    assert plot.main([str(tmp_path / "ffcv.json"), str(tmp_path / "f.png")]) == 0
    assert (tmp_path / "f.png").stat().st_size > 0
    (tmp_path / "bad.json").write_text("[1, 2]")
    for argv in ([str(tmp_path / "missing.json"), "x.png"], [str(tmp_path / "bad.json"), "x.png"], ["a.json", "x.txt"]):
        assert plot.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err


def test_pack_folder_round_trip(tiny_root, tmp_path, capsys, monkeypatch):
    from test_durable_files import file_id, recorded_fsyncs

    pack = tmp_path / "p" / "set.npz"
    synced = recorded_fsyncs(monkeypatch, lambda: (pack.exists(), (tmp_path / "out").exists()))
    assert pack_folder.main(["pack", str(tiny_root), str(pack)]) == 0
    assert not list(pack.parent.glob("*.part*"))
    assert pack_folder.main(["unpack", str(pack), str(tmp_path / "out")]) == 0
    # what each rename puts in place made durable before it (the pack; each file and folder of the
    # unpacked one), and the rename after it: its folder fsynced once the pack, then the folder, is there
    out = [tmp_path / "out", *(tmp_path / "out").rglob("*")]
    assert synced[:2] == [(file_id(pack), (False, False)), (file_id(pack.parent), (True, False))], synced
    assert sorted(synced[2:-1]) == sorted((file_id(p), (True, False)) for p in out), synced
    assert synced[-1] == (file_id(tmp_path), (True, True))
    src = sorted(p.relative_to(tiny_root) for p in tiny_root.rglob("*") if p.is_file())
    got = sorted(p.relative_to(tmp_path / "out") for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert src == got and len(src) == 40
    assert all((tiny_root / f).read_bytes() == (tmp_path / "out" / f).read_bytes() for f in src)
    assert "packed 40 files" in capsys.readouterr().out


def test_pack_folder_imports_no_torch(tiny_root, tmp_path):
    # it imported torch (seconds, and a torch where only numpy is needed) for the fsync helpers alone,
    # through moco_fast.checkpoint: a pack and an unpack, then what the process imported
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import pack_folder; "
        "assert pack_folder.main(['pack', sys.argv[2], sys.argv[3]]) == 0; "
        "assert pack_folder.main(['unpack', sys.argv[3], sys.argv[4]]) == 0; "
        "print('torch' in sys.modules)"
    )
    argv = [str(BENCH), str(tiny_root), str(tmp_path / "set.npz"), str(tmp_path / "out")]
    run = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines()[-1] == "False", run.stdout


def test_pack_folder_refuses_what_it_cannot_use(tiny_root, tmp_path, capsys):
    # one line and exit 2, nothing half-written under a final name
    pack = tmp_path / "set.npz"
    (tmp_path / "notes.txt").write_text("not a pack")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    for argv in (
        ["pack", str(tmp_path / "missing"), str(pack)],
        ["pack", str(tiny_root), str(tmp_path)],  # a folder as the pack
        ["unpack", str(tmp_path / "missing.npz"), str(tmp_path / "o1")],
        ["unpack", str(tmp_path / "notes.txt"), str(tmp_path / "o2")],
        # a place that cannot be written: a traceback naming the temporary file
        ["pack", str(tiny_root), "/proc/set.npz"],
        ["pack", str(tiny_root), str(tmp_path / "notes.txt" / "set.npz")],
    ):
        assert pack_folder.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert pack_folder.main(["pack", str(tiny_root), str(pack)]) == 0
    assert pack_folder.main(["unpack", str(pack), str(tmp_path / "full")]) == 2  # would merge into a full folder
    assert "not an empty folder" in capsys.readouterr().err
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()
    # a pack written inside the folder it packs is not packed again
    inner = tiny_root / "self.npz"
    try:
        assert pack_folder.main(["pack", str(tiny_root), str(inner)]) == 0
        assert pack_folder.main(["pack", str(tiny_root), str(inner)]) == 0
        assert "packed 40 files" in capsys.readouterr().out.splitlines()[-1]
    finally:
        inner.unlink(missing_ok=True)


@pytest.mark.parametrize("action", ["pack", "unpack"])
def test_pack_folder_on_a_full_disk_is_one_line_naming_dst(tiny_root, tmp_path, capsys, monkeypatch, action):
    # an unpack's file write that the disk refused (ENOSPC) was a traceback, its half DST.part left
    # taking the space; a pack's was "cannot write DST (No space left on device)", convert's words apart
    import errno

    pack = tmp_path / "set.npz"
    assert pack_folder.main(["pack", str(tiny_root), str(pack)]) == 0
    dst = tmp_path / ("again.npz" if action == "pack" else "out")
    written = []

    def full(path, data):  # the pack's write fails, an unpack's second one: part of it written
        with open(path, "wb") as fh:
            fh.write(data[:10])
        written.append(path)
        if len(written) == 2 or action == "pack":
            raise OSError(errno.ENOSPC, "No space left on device")

    if action == "pack":
        monkeypatch.setattr(pack_folder.np, "savez", lambda file, **arrays: full(file, b"PK\x03\x04 half a pack"))
    else:
        monkeypatch.setattr(Path, "write_bytes", full)
    capsys.readouterr()
    assert pack_folder.main([action, str(pack if action == "unpack" else tiny_root), str(dst)]) == 2
    assert capsys.readouterr().err == f"error: No space left on device: {dst}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set.npz"]  # no half output, no DST.part


def test_pack_folder_unpack_names_dst_not_a_file_of_its_removed_part(tiny_root, tmp_path, capsys, monkeypatch):
    # a full disk met by open() (no inode left) names the file it made, under DST.part, which the
    # unpack removes: the line names DST, as for a write's error that names no file
    import errno

    pack, dst = tmp_path / "set.npz", tmp_path / "out"
    assert pack_folder.main(["pack", str(tiny_root), str(pack)]) == 0
    real = Path.write_bytes

    def full(path, data):
        if any(path.parent.iterdir()):  # the second file of a folder
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, data)

    monkeypatch.setattr(Path, "write_bytes", full)
    capsys.readouterr()
    assert pack_folder.main(["unpack", str(pack), str(dst)]) == 2
    assert capsys.readouterr().err == f"error: No space left on device: {dst}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set.npz"]


def test_pack_folder_unpack_keeps_an_empty_dst_where_the_rename_fails(tiny_root, tmp_path, capsys, monkeypatch):
    # an empty DST was removed before the rename that puts the unpacked folder there: a rename that
    # failed left the user without their folder, and without a result
    import errno

    pack, dst = tmp_path / "set.npz", tmp_path / "out"
    assert pack_folder.main(["pack", str(tiny_root), str(pack)]) == 0
    dst.mkdir()

    def refused(src, target):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    with monkeypatch.context() as m:
        m.setattr(pack_folder.os, "replace", refused)
        capsys.readouterr()
        assert pack_folder.main(["unpack", str(pack), str(dst)]) == 2
    assert capsys.readouterr().err == f"error: cannot write {dst} (Invalid cross-device link)\n"
    assert dst.is_dir() and not any(dst.iterdir())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "set.npz"]  # no DST.part
    # the rename itself replaces the empty folder
    assert pack_folder.main(["unpack", str(pack), str(dst)]) == 0
    assert len([p for p in dst.rglob("*") if p.is_file()]) == 40


def test_pack_folder_unpack_never_writes_into_a_stale_part_it_could_not_remove(
    tiny_root, tmp_path, capsys, monkeypatch
):
    # DST.part, left by an unpack that was killed, was removed with ignore_errors: one that stayed was
    # written into, and put in place as DST. A link there (rmtree refuses one) took the files into the
    # folder it names; a folder that cannot be removed kept its stale files in DST
    import errno

    pack, dst = tmp_path / "set.npz", tmp_path / "out"
    assert pack_folder.main(["pack", str(tiny_root), str(pack)]) == 0
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "out.part").symlink_to(tmp_path / "elsewhere")
    assert pack_folder.main(["unpack", str(pack), str(dst)]) == 0  # the link removed, not followed
    assert not any((tmp_path / "elsewhere").iterdir()) and dst.is_dir() and not dst.is_symlink()
    stale = tmp_path / "again.part"
    stale.mkdir()
    (stale / "stale.jpg").write_bytes(b"from an earlier unpack")
    real = shutil.rmtree

    def stuck(path, ignore_errors=False, **kwargs):  # as rmtree meets a file it may not remove
        if Path(path) != stale:
            return real(path, ignore_errors=ignore_errors, **kwargs)
        if not ignore_errors:
            raise PermissionError(errno.EACCES, "Permission denied", str(stale / "stale.jpg"))

    monkeypatch.setattr(pack_folder.shutil, "rmtree", stuck)
    capsys.readouterr()
    assert pack_folder.main(["unpack", str(pack), str(tmp_path / "again")]) == 2
    assert capsys.readouterr().err == (
        f"error: {stale}, left by an earlier unpack, cannot be removed (Permission denied): remove it\n"
    )
    assert not (tmp_path / "again").exists() and [p.name for p in stale.iterdir()] == ["stale.jpg"]


@pytest.mark.parametrize("action", ["pack", "unpack"])
def test_pack_folder_says_dst_was_written_where_its_folders_fsync_fails_after_the_rename(
    tiny_root, tmp_path, capsys, monkeypatch, action
):
    # an EIO of DST's folder's fsync, after the rename put DST in place, said "Input/output error:
    # FOLDER": a write that had failed, where DST is there (atomic_write says both)
    import errno

    pack = tmp_path / "set.npz"
    assert pack_folder.main(["pack", str(tiny_root), str(pack)]) == 0
    (tmp_path / "in").mkdir()
    dst = tmp_path / "in" / ("again.npz" if action == "pack" else "out")
    real = os.fsync

    def failing(fd):  # DST's folder alone: an unpack's own folders are fsynced before the rename
        if os.readlink(f"/proc/self/fd/{fd}") == str(dst.parent):
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real(fd)

    monkeypatch.setattr(os, "fsync", failing)
    capsys.readouterr()
    assert pack_folder.main([action, str(pack if action == "unpack" else tiny_root), str(dst)]) == 2
    assert capsys.readouterr().err == (
        f"error: Input/output error flushing the folder to disk after {dst.name} was written in it: {dst.parent} "
        "(the disk or the network file system failed to read or write it)\n"
    )
    assert [p.name for p in dst.parent.iterdir()] == [dst.name]  # in place


@pytest.mark.parametrize("action", ["pack", "unpack"])
def test_pack_folder_interrupted_says_whether_dst_was_written_and_leaves_no_part(
    tiny_root, tmp_path, capsys, monkeypatch, action
):
    # Ctrl-C was Python's traceback, which said nothing of DST: before the rename it is not written
    # (DST.part removed), after it it is in place
    pack = tmp_path / "set.npz"
    assert pack_folder.main(["pack", str(tiny_root), str(pack)]) == 0
    for step, said in (("fsync_contents", "not written"), ("fsync_folder_written_in", "written")):
        dst = tmp_path / step / ("again.npz" if action == "pack" else "out")

        def stopped(path):
            raise KeyboardInterrupt

        with monkeypatch.context() as m:
            m.setattr(pack_folder, step, stopped)
            capsys.readouterr()
            assert pack_folder.main([action, str(pack if action == "unpack" else tiny_root), str(dst)]) == 130
        assert capsys.readouterr().err == f"interrupted: {dst} {said}\n"
        assert [p.name for p in dst.parent.iterdir()] == ([dst.name] if said == "written" else [])
    if action == "pack":  # as it reads the files to pack, before any write
        monkeypatch.setattr(Path, "read_bytes", stopped)
        assert pack_folder.main(["pack", str(tiny_root), str(tmp_path / "early.npz")]) == 130
        assert capsys.readouterr().err == f"interrupted: {tmp_path / 'early.npz'} not written\n"


@pytest.mark.parametrize("action", ["pack", "unpack"])
def test_pack_folder_names_its_part_where_it_cannot_remove_it(tiny_root, tmp_path, capsys, monkeypatch, action):
    # a disk that failed (EIO) and went read-only: DST.part could not be removed, and the line did not
    # say that it was left behind, taking its space
    import errno

    pack = tmp_path / "set.npz"
    assert pack_folder.main(["pack", str(tiny_root), str(pack)]) == 0
    dst = tmp_path / "in" / ("again.npz" if action == "pack" else "out")
    part = dst.with_name(dst.name + (".part.npz" if action == "pack" else ".part"))

    def failing(path):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    def read_only(path, *args, **kwargs):
        if Path(path) == part:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))

    monkeypatch.setattr(pack_folder, "fsync_contents", failing)
    monkeypatch.setattr(os, "unlink", read_only)
    monkeypatch.setattr(os, "rmdir", read_only)
    capsys.readouterr()
    assert pack_folder.main([action, str(pack if action == "unpack" else tiny_root), str(dst)]) == 2
    assert capsys.readouterr().err == (
        f"error: Input/output error: {dst} (the disk or the network file system failed to read or write it); "
        f"{part} is left behind: remove it\n"
    )
    assert [p.name for p in dst.parent.iterdir()] == [part.name]


def gpu_check_summary(out: Path, since: float = 0.0) -> subprocess.CompletedProcess:
    """bench/gpu_check.sh's summary (its heredoc) run on the JSON left in `out`, by a command that
    began at `since` (epoch seconds: every file is this command's by default)."""
    text = (BENCH / "gpu_check.sh").read_text()
    start = text.index("\n", text.index("<<'EOF'")) + 1
    summary = text[start : text.index("\nEOF\n", start)]
    argv = [sys.executable, "-", str(out), str(since)]
    return subprocess.run(argv, input=summary, capture_output=True, text=True, cwd=BENCH.parent)  # as the script cds


def test_gpu_check_script_parses_and_its_summary_computes_the_ratios(tmp_path):
    # The script never runs here (it needs a GPU; `DRY=1` runs it on a CPU in minutes): its shell
    # syntax, and the one table it prints from the JSON the phases leave, are checked.
    script = BENCH / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    rows = {"device": {"name": "H100"}, "torch": "2.11"}
    (tmp_path / "throughput-synthetic.json").write_text(
        json.dumps({**rows, "rows": [{"name": "trainer:bf16", "img_per_s": 3000.0, "ms_per_step": 80.0}]})
    )
    (tmp_path / "throughput-dali.json").write_text(
        json.dumps(
            {
                **rows,
                "rows": [
                    {"name": "loader", "img_per_s": 7500.0, "ms_per_step": 34.1, "loader_over_step": 2.5},
                    {"name": "end-to-end", "img_per_s": 2880.0, "ms_per_step": 88.9},
                    {"name": "trainer", "img_per_s": 3000.0, "ms_per_step": 85.3},
                    {"name": "trainer:graph", "img_per_s": None, "error": "RuntimeError: capture failed"},
                ],
            }
        )
    )
    (tmp_path / "ffcv.json").write_text(
        json.dumps({"rows": [{"row": "aug-batch", "img_per_s": 1e5, "ms_per_batch": 2.0}]})
    )
    (tmp_path / "momentum.json").write_text('{"cut short')
    config = {"arch": "resnet50", "batch_size": 256, "splits": 8, "dtype": "fp16", "channels_last": True}
    for dtype, split in ("fp16", 6.0), ("bf16", 5.0):
        (tmp_path / f"split-bn-{dtype}.json").write_text(
            json.dumps(
                {
                    **rows,
                    "rows": [{"name": "256 x 64 x 112 x 112"}],
                    "total_ms": {"plain": 4.0, "split": split, "regroup": None},
                    "errors": ["regroup on 256 x 64 x 112 x 112: OutOfMemoryError: ..."],
                    "layers": 53,
                    "config": {**config, "dtype": dtype},
                }
            )
        )
    out = gpu_check_summary(tmp_path)
    assert out.returncode == 0, out.stderr
    assert "dali: end-to-end = 96.0% of trainer" in out.stdout
    lines = out.stdout.splitlines()
    head, loader = (next(x for x in lines if x.startswith(s)) for s in ("what ", "dali: loader "))
    x_ref, over = (head.index(h) + len(h) for h in ("x ref", "loader/step"))  # right-aligned columns end there
    assert loader[over - 4 : over] == "2.50" and loader[x_ref - 5 : x_ref].strip() == ""
    assert "loader/step: a loader row's img/s over its run's fastest step row" in out.stdout
    assert "ffcv aug-batch: 2.00 ms = 2.5% of the trainer:bf16 step (80.0 ms)" in out.stdout
    assert "momentum.json: unreadable" in out.stdout
    assert "split BN, 53 BN layers forward + backward, resnet50 batch 256, 8 splits, fp16 channels-last" in out.stdout
    assert "  split      6.00 ms/step, 1.50x plain\n  regroup    failed\n" in out.stdout
    # fp16 first (the default, and the reference's dtype), then bf16: the files' name order put bf16 first
    fp16, bf16 = (out.stdout.index(f"8 splits, {dtype} channels-last") for dtype in ("fp16", "bf16"))
    assert fp16 < bf16 and "  split      5.00 ms/step, 1.25x plain\n" in out.stdout[bf16:]


def test_gpu_check_summary_sets_each_ffcv_row_against_one_step_of_its_own_command(tmp_path):
    # The plan's two commands on a warm machine write into one $OUT: command 1's throughput-synthetic
    # (trainer:bf16, trainer:fp16), then command 2's ffcv.json and e2e's throughput-torch (trainer).
    # The summary printed each augmentation row once per step it found, three lines a row.
    def write(name, rows, age):
        f = tmp_path / name
        f.write_text(json.dumps({"device": {}, "torch": "2.11", "rows": rows}))
        os.utime(f, (now - age, now - age))

    now = time.time()
    step = lambda name, ms: {"name": name, "img_per_s": 1000.0, "ms_per_step": ms}  # noqa: E731
    aug = [{"row": f"aug-{n}", "img_per_s": 1e5, "ms_per_batch": 2.0} for n in ("sample", "batch")]

    def ffcv_lines(since):
        out = gpu_check_summary(tmp_path, since)
        assert out.returncode == 0, out.stderr
        return [x.strip() for x in out.stdout.splitlines() if x.startswith("  ffcv ")]

    write("throughput-synthetic.json", [step("trainer:bf16", 80.0), step("trainer:fp16", 90.0)], 3600)
    write("ffcv.json", aug, 100)
    write("throughput-torch.json", [step("trainer", 100.0)], 10)
    # command 2's summary: its own step (e2e's), not command 1's
    assert ffcv_lines(now - 300) == [
        f"ffcv aug-{n}: 2.00 ms = 2.0% of the trainer step (100.0 ms); 100,000 img/s" for n in ("sample", "batch")
    ]
    # one command that wrote them all: throughput's bf16 row first, as before
    assert ffcv_lines(now - 7200) == [
        f"ffcv aug-{n}: 2.00 ms = 2.5% of the trainer:bf16 step (80.0 ms); 100,000 img/s" for n in ("sample", "batch")
    ]
    # a third command rewrote throughput-synthetic (the compile rows): ffcv.json is command 2's, as e2e's step is
    write("throughput-synthetic.json", [step("trainer:bf16", 70.0)], 0)
    write("throughput-torch.json", [step("trainer", 100.0)], 200)
    assert ffcv_lines(now - 60)[0] == "ffcv aug-sample: 2.00 ms = 2.0% of the trainer step (100.0 ms); 100,000 img/s"


def test_gpu_check_summary_shows_short_steps_as_the_tables_do_and_marks_a_cut_run(tmp_path):
    # its ms/step column said "0.0" for a step of 0.04 ms (report.ms_text's digits: "0.040"), and a run
    # stopped early ("complete": false) was summarised as if whole
    def write(name, complete, rows):
        (tmp_path / name).write_text(json.dumps({"device": {}, "torch": "2.11", "rows": rows, **complete}))

    step = lambda name, ms: {"name": name, "img_per_s": 1000.0, "ms_per_step": ms}  # noqa: E731
    write("throughput-synthetic.json", {"complete": False}, [step("loader", 0.04), step("trainer", 0.4)])
    write("throughput-torch.json", {"complete": True}, [step("trainer", 12.34)])
    write("throughput-dali.json", {}, [step("trainer", 1.0)])  # before 'complete' was written: no mark
    write("ffcv.json", {"complete": False}, [{"row": "aug-batch", "img_per_s": 1e5, "ms_per_batch": 2.0}])
    out = gpu_check_summary(tmp_path)
    assert out.returncode == 0, out.stderr
    table = [x for x in out.stdout.splitlines() if x.startswith(("synthetic:", "torch:", "dali:"))]
    assert {x.split("  ")[0]: x.split()[-1] for x in table} == {  # the row's name: its ms/step
        "synthetic: loader *": "0.040",
        "synthetic: trainer *": "0.40",
        "torch: trainer": "12.3",
        "dali: trainer": "1.0",
    }
    assert "  ffcv aug-batch *: 2.00 ms" in out.stdout
    assert out.stdout.rstrip().endswith(
        '*: a row of a run stopped before its last row ("complete": false in throughput-synthetic.json, '
        "ffcv.json): its rows are not all there"
    )


def test_gpu_check_summary_shows_no_gaps_for_a_cpu_profile(tmp_path):
    # a dry run's profile is a CPU's: profile_step counts no gaps there (None), which the summary
    # printed as "gaps 0.0", a figure no profile measured; a GPU profile's gaps are printed, 0.0
    # included (a measured figure: profile_step clamps at 0 a step whose kernels' times add up to its
    # wall time or more, as kernels on several streams can)
    cpu = {"wall_ms_per_step": 516.0, "busy_ms_per_step": 474.0, "gaps_ms_per_step": None}
    gpu = cpu | {"gaps_ms_per_step": 12.5}
    busy = cpu | {"gaps_ms_per_step": 0.0}
    rows = [
        {
            "name": f"trainer:{n}",
            "img_per_s": 6.3,
            "ms_per_step": 2542.2,
            "profile": p | {"phases_ms": {}, "kernels_ms": {}},
        }
        for n, p in (("bf16", cpu), ("fp16", gpu), ("fp16+noshuffle", busy))
    ]
    (tmp_path / "throughput-synthetic.json").write_text(json.dumps({"device": {}, "torch": "2.14", "rows": rows}))
    out = gpu_check_summary(tmp_path)
    assert out.returncode == 0, out.stderr
    assert "profile of trainer:bf16: wall 516.0 ms/step, busy 474.0\n" in out.stdout
    assert "profile of trainer:fp16: wall 516.0 ms/step, busy 474.0, gaps 12.5\n" in out.stdout
    assert "profile of trainer:fp16+noshuffle: wall 516.0 ms/step, busy 474.0, gaps 0.0\n" in out.stdout


def test_the_progress_line_shows_a_slow_rows_images_a_second():
    # a resnet50w2 trainer row on the CPU: 0.3 img/s, which the line showed as "0 img/s"
    assert throughput.row_done({"img_per_s": 0.3}) == "0.3 img/s"
    assert throughput.row_done({"img_per_s": 12345.4}) == "12,345 img/s"
    assert throughput.row_done({"img_per_s": None, "error": "OutOfMemoryError: ..."}) == "OutOfMemoryError: ..."


def test_help_fits_an_80_column_terminal(capsys, monkeypatch):
    # the rows' epilog, one paragraph, was printed raw as one 540-character line
    monkeypatch.setenv("COLUMNS", "80")
    with pytest.raises(SystemExit):
        throughput.main(["--help"])
    text = capsys.readouterr().out
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "trainer:fp16+compile+graph" in text and "noshuffle" in text


SCRIPTS = sorted(p.name for p in BENCH.glob("*.py") if 'if __name__ == "__main__":' in p.read_text())


@pytest.mark.parametrize("script", SCRIPTS)
def test_each_script_runs_without_its_folder_on_the_path(script, tmp_path):
    # as bench/gpu_check.sh runs them through its package shim: PYTHONSAFEPATH=1 keeps the script's own
    # folder off sys.path, so a script that does not put bench/ there itself cannot import report.py
    # (momentum_kernels.py died so on the first GPU run); from another folder, so the cwd cannot stand in
    env = os.environ | {"PYTHONSAFEPATH": "1"}
    run = subprocess.run(
        [sys.executable, str(BENCH / script), "--help"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0 and run.stdout.startswith("usage: "), run.stderr


def test_every_flag_with_a_default_says_it():
    # --momentum-backend (foreach) and --amp (auto) did not say theirs
    silent = [
        a.dest
        for a in throughput.build_parser()._actions
        if a.option_strings and a.default not in (None, False, [], argparse.SUPPRESS) and "default" not in a.help
    ]
    assert silent == []


def test_split_bn_bench_times_each_candidate_on_each_bn_shape_of_the_encoder(tmp_path, capsys):
    # the shapes are the encoder's own (its BatchNorm layers counted here apart), each weighted by the
    # layers that have it; the totals and the ratios to plain are those of the rows
    import split_bn

    from moco_fast.config import ModelConfig
    from moco_fast.model import build_encoder

    out = tmp_path / "split-bn.json"
    args = ["--device", "cpu", "--arch", "resnet18", "--batch-size", "8", "--image-size", "32", "--splits", "2"]
    assert split_bn.main([*args, "--dtype", "fp32", "--repeats", "1", "--warmup", "0", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    layers = sum(isinstance(m, torch.nn.BatchNorm2d) for m in build_encoder(ModelConfig("resnet18"), 32, 1).modules())
    assert res["layers"] == sum(r["layers"] for r in res["rows"]) == layers == 20
    assert [r["shape"] for r in res["rows"]][:2] == [[8, 64, 32, 32], [8, 128, 16, 16]]  # CIFAR stem: no pooling
    names = ["plain", "split", "reference", "regroup"]
    for n in names:
        assert res["total_ms"][n] == pytest.approx(sum(r[n] for r in res["rows"])) and res["total_ms"][n] > 0
        assert res["vs_plain"][n] == pytest.approx(res["total_ms"][n] / res["total_ms"]["plain"])
    said = capsys.readouterr()
    printed = said.out
    assert "all 20 BN layers" in printed and "x plain" in printed and "fastest split path: " in printed
    assert res["device"]["type"] == "cpu" and res["errors"] == []
    # a line a shape as it is timed (the CPU's run of the GPU defaults wrote nothing for minutes)
    shapes = len(res["rows"])
    assert said.err.splitlines()[:2] == [
        f"[1/{shapes}] 8 x 64 x 32 x 32: plain, split, reference, regroup",
        f"[2/{shapes}] 8 x 128 x 16 x 16: plain, split, reference, regroup",
    ]
    assert len(said.err.splitlines()) == shapes
    assert res["config"]["repeats"] == 1 and res["calls_per_sample"] == 1  # how a figure was taken


def test_split_bn_bench_ranks_only_the_paths_timed_on_every_shape(tmp_path, capsys, monkeypatch):
    # a path that failed on one shape (out of memory on the largest) has no total: the fastest line
    # named the fastest of the others alone, as if it had beaten that one too
    import split_bn

    def split_failing_on_64_channels(x, *args):
        if x.shape[1] == 64:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return split_bn.split_batch_norm(x, *args)

    monkeypatch.setitem(split_bn.CANDIDATES, "split", split_failing_on_64_channels)
    out = tmp_path / "split-bn.json"
    args = ["--device", "cpu", "--arch", "resnet18", "--batch-size", "8", "--image-size", "32", "--splits", "2"]
    flags = ["--rows", "plain,split,regroup", "--repeats", "1", "--warmup", "0", "--json", str(out)]
    assert split_bn.main([*args, *flags]) == 1
    res = json.loads(out.read_text())
    assert res["total_ms"]["split"] is None and res["total_ms"]["regroup"] > 0
    assert res["errors"] == ["split on 8 x 64 x 32 x 32: OutOfMemoryError: CUDA out of memory"]
    assert res["config"]["dtype"] == "fp32"  # the CPU's default, as train's: fp16 ran emulated there
    printed = capsys.readouterr()
    assert "fastest split path: regroup, " in printed.out and "; not ranked, failed on a shape: split\n" in printed.out
    assert "failed: split on 8 x 64 x 32 x 32" in printed.err


def test_split_bn_bench_times_the_triton_kernels_where_they_run(tmp_path, monkeypatch):
    # On a CPU only under Triton's interpreter: left out of the default rows without it, refused when
    # named; timed with it (the figures mean nothing there, the JSON's shape does)
    import split_bn

    from moco_fast.config import ConfigError

    pytest.importorskip("triton")
    args = ["--device", "cpu", "--arch", "resnet18", "--batch-size", "4", "--image-size", "16", "--splits", "2"]
    flags = ["--repeats", "1", "--warmup", "0", "--json", str(tmp_path / "split-bn.json")]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert split_bn.rows_to_time(None, torch.device("cpu")) == ["plain", "split", "reference", "regroup"]
    assert split_bn.rows_to_time(None, torch.device("cuda")) == [*split_bn.CANDIDATES]
    with pytest.raises(ConfigError, match="--rows triton needs the triton package and a CUDA device"):
        split_bn.rows_to_time("plain,triton", torch.device("cpu"))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert split_bn.main([*args, "--rows", "split,triton", *flags]) == 0
    res = json.loads((tmp_path / "split-bn.json").read_text())
    assert res["errors"] == [] and res["total_ms"]["triton"] > 0 and res["config"]["rows"] == "split,triton"


@pytest.mark.parametrize(
    "flags",
    [
        ["--splits", "3"],
        ["--splits", "0"],
        ["--rows", "split,fused"],
        ["--image-size", "4"],
        ["--arch", "vgg"],
        ["--dtype", "fp16"],  # on the CPU: it ran, emulated, a path train refuses (--amp fp16)
    ],
)
def test_split_bn_bench_refuses_bad_flags_in_one_line(flags, capsys):
    import split_bn

    assert split_bn.main(["--device", "cpu", "--batch-size", "16", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err


def test_data_and_workers_that_no_row_reads_are_named(tiny_root, capsys):
    # `--loader synthetic --workers 8` ran as if the workers made its batches, without a word
    run = [*TINY, "--rows", "loader", "--steps", "1", "--warmup", "0"]
    assert throughput.main([*run, "--loader", "synthetic", "--workers", "3", "--data", str(tiny_root)]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert said == [
        f"warning: --loader synthetic makes its own images: --data {tiny_root} is not read",
        "warning: --workers 3 has no effect with --loader synthetic: it makes its batches without workers",
    ]
    assert throughput.main([*TINY, "--rows", "reference", "--steps", "1", "--warmup", "0", "--workers", "2"]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert said == [
        "warning: --workers 2 has no effect: no row of --rows reads data (only loader and end-to-end rows do)"
    ]
    assert throughput.main([*run, "--loader", "synthetic"]) == 0  # nothing given that goes unread
    assert "warning:" not in capsys.readouterr().err


def test_the_epoch_start_bench_marks_its_json_complete_once_every_row_ran(tmp_path, monkeypatch, capsys):
    # the JSON was written after each row only, before `complete` was set: a whole run's file said
    # false, as a run cut short does
    import epoch_start

    row = {"name": "demo set", "settings": "", "first_batch_s": 0.5, "other_batch_ms": 20.0, "epoch_s": 9.0}
    monkeypatch.setattr(epoch_start, "measure", lambda *args: dict(row))
    out = tmp_path / "r.json"
    assert epoch_start.main(["--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["complete"] is True and len(result["rows"]) == 2


def test_the_epoch_start_bench_takes_epochs_of_one_step():
    # an epoch of one step (--images at the demo batch) has no other batch: their median was a
    # StatisticsError's traceback after the row's epochs had run
    import epoch_start

    one_step = [{"first_batch_s": s, "waits_s": [s], "epoch_s": 2 * s} for s in (3.0, 0.5, 0.25)]
    row = epoch_start.figures(one_step, 128)
    assert row["other_batch_ms"] is None and row["first_batch_s"] == 0.375 and row["img_per_s"] == 128 / 0.75
    two_steps = [{"first_batch_s": 1.0, "waits_s": [1.0, w], "epoch_s": 4.0} for w in (9.0, 0.02, 0.04)]
    assert epoch_start.figures(two_steps, 256)["other_batch_ms"] == pytest.approx(30.0)


def test_the_epoch_start_bench_says_too_few_images_for_its_batch_in_its_own_terms(tiny_root, capsys):
    # the loader's line told to lower --batch-size, a flag the bench does not have (the demo preset's batch)
    import epoch_start

    from moco_fast.config import build_config

    batch = build_config("demo", {}).optim.batch_size  # more than tiny_root's 32 images
    for argv in (["--images", "3"], ["--data", str(tiny_root)]):
        assert epoch_start.main(argv) == 2
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert f"fewer than the demo preset's batch of {batch}" in line and "--batch-size" not in line, line


def test_a_torch_loader_row_looks_ahead_across_epochs_as_the_trainers_loader_does(tiny_root, monkeypatch, capsys):
    # the trainer gives the torch loader its epochs, whose workers then start each next epoch's first
    # batch as an epoch ends; the bench's loader was given none: a row crossing epochs (a small set)
    # waited at each epoch's start for what training no longer waits for, and timed it
    from moco_fast.loaders import torch_loader

    started, start_workers = [], torch_loader.start_workers
    monkeypatch.setattr(torch_loader, "start_workers", lambda *a, **k: started.append(1) or start_workers(*a, **k))
    # 32 images, batch 16: 2 steps an epoch, so a row of 5 steps crosses 3 epochs
    rows = ["--rows", "loader", "--loader", "torch", "--workers", "1", "--steps", "4", "--warmup", "1"]
    assert throughput.main([*TINY, "--data", str(tiny_root), *rows]) == 0, capsys.readouterr().err
    assert started == [1]  # one iteration, begun once, goes on into each next epoch


@pytest.mark.slow
def test_the_ffcv_benchs_torch_rows_look_ahead_across_epochs_as_the_trainers_loader_does(
    tiny_root, monkeypatch, capsys
):
    # as throughput.py's rows: the torch rows' loader was given no epochs, so each epoch's start waited
    # for what training's loader has made ahead, against FFCV on a set of a few batches an epoch
    import ffcv_loader
    from moco_fast.loaders import torch_loader

    started, start_workers = [], torch_loader.start_workers
    monkeypatch.setattr(torch_loader, "start_workers", lambda *a, **k: started.append(1) or start_workers(*a, **k))
    # 32 images, batch 16: 2 steps an epoch, so a row of 5 steps crosses 3 epochs
    flags = ["--rows", "torch", "--workers", "1", "--batch-size", "16", "--min-seconds", "0", "--steps", "4"]
    assert ffcv_loader.main(["--data", str(tiny_root / "train"), *flags, "--warmup", "1"]) == 0, capsys.readouterr().err
    assert started == [1]  # one iteration, begun once, goes on into each next epoch
