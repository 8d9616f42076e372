"""Two `moco-fast convert` runs to one DST: the second stops at once with one line while the first
holds DST's lock, a DST that another convert published before the lock was taken is checked again,
and the lock file goes with the convert that held it."""

import contextlib
import os

import pytest

import moco_fast.convert as conv
from moco_fast.cli import main
from moco_fast.convert import ConvertConfig, convert
from moco_fast.convert_files import holding, lock_path


def test_a_second_convert_to_the_same_dst_stops_at_once(bad_root, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    dst = out / "wds"
    argv = ["convert", str(bad_root), str(dst), "--format", "wds", "--workers", "1"]
    with holding(dst):  # as a first convert holds it, writing
        assert main(argv) == 2
        assert os.listdir(out) == [lock_path(dst).name]  # the second wrote nothing
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"DST {dst}: another moco-fast convert is writing it now" in err[0], err
    assert not lock_path(dst).exists()
    assert main(argv) == 0
    assert os.listdir(out) == ["wds"]  # no lock file left by a convert that wrote DST
    assert main(argv) == 2  # nor by one that failed (DST exists, no --force)
    assert os.listdir(out) == ["wds"]


def test_a_dst_published_before_the_lock_is_checked_again(bad_root, tmp_path, monkeypatch):
    # Another convert to DST checked it, wrote it and ended between this one's check and its lock:
    # without --force this one stops there, before reading an image, not at its own publishing
    # (which would remove the other's file list first, with --format ffcv).
    dst = tmp_path / "out" / "wds"

    @contextlib.contextmanager
    def another_ends_first(path):
        monkeypatch.setattr(conv, "holding", holding)
        convert(ConvertConfig(str(bad_root), str(dst), format="wds", workers=1))
        monkeypatch.setattr(conv, "source_images", lambda cfg: pytest.fail("read the images of a DST it may not write"))
        with holding(path):
            yield

    monkeypatch.setattr(conv, "holding", another_ends_first)
    with pytest.raises(FileExistsError, match="exists: pass --force"):
        convert(ConvertConfig(str(bad_root), str(dst), format="wds", workers=1))
    meta = (dst / "meta.json").read_text()
    assert '"format": "wds"' in meta and os.listdir(dst.parent) == ["wds"]


def test_a_dst_that_is_a_classifiers_state_names_the_classifier_that_holds_it(tmp_path):
    # DST l.state.pt is the state of a lincls --out l.json beside it, and its lock file is that
    # run's: the line said "another moco-fast convert" while the lincls held it
    from moco_fast.folder_locks import RunFolderBusy
    from moco_fast.run_folder import hold_output

    with hold_output(tmp_path / "l.json", "lincls"):
        with pytest.raises(RunFolderBusy, match="another moco-fast lincls is writing it now"):
            with holding(tmp_path / "l.state.pt"):
                pass


@pytest.mark.parametrize("target", ["missing", "notes.txt"])
def test_a_lock_file_that_is_a_link_is_refused_and_nothing_is_made_where_it_points(target, bad_root, tmp_path, capsys):
    # DST's lock open followed a link at .DST.lock (another user's, in a shared folder): one that
    # pointed nowhere had convert create an empty file at its target
    out = tmp_path / "out"
    out.mkdir()
    notes, dst = out / "notes.txt", out / "wds"
    notes.write_text("a week of notes")
    lock_path(dst).symlink_to(out / target)
    assert main(["convert", str(bad_root), str(dst), "--format", "wds", "--workers", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{lock_path(dst)} is a link" in err[0] and "remove the link" in err[0], err
    assert sorted(os.listdir(out)) == [lock_path(dst).name, "notes.txt"]
    assert notes.read_text() == "a week of notes" and lock_path(dst).is_symlink()
