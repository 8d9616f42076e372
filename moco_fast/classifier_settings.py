"""What a resumed lincls or finetune run must share with the interrupted one, and how it differs:
the settings that the epoch loop's state records (classifier_epochs), compared flag by flag, with a
moved --data or checkpoint told from other images or weights (data_listing's fingerprint, a save's
id)."""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

from moco_fast import checkpoint as ckpt
from moco_fast.data_listing import listing_change
from moco_fast.step import amp_as_run

# settings a resumed run may change: where it runs and how fast, and when it evaluates (not --amp: it
# changes what the features are, and a GradScaler state cannot move between fp16 and not; not --out:
# the state lies beside the result)
MAY_CHANGE = ("workers", "device", "out", "resume", "eval_every")

# classifier_epochs.check_state's listing of --data: none yet (the command's check, before the data is
# read); a moved --data whose state records its listing is left to the check once listed (run_lincls)
# and EpochLoop._load
LISTED_LATER = "listed later"


def settings(cfg: Any, checkpoint_stamp: list[Any] | None = None, data_listing: str | None = None) -> dict[str, Any]:
    """What a resumed run must share with the interrupted one: every setting but MAY_CHANGE, paths
    made absolute, the schedule in one spelling, and the checkpoint file itself (trained further
    since, it is another backbone). With a checkpoint, finetune's --arch and --stem are the
    checkpoint's whatever was typed. `data_listing` (where the data is listed): what tells the same
    images at another --data (moved_data)."""
    from moco_fast.lincls import parse_schedule

    now = {k: v for k, v in asdict(cfg).items() if k not in MAY_CHANGE}
    for k in ("checkpoint", "data"):
        if now.get(k):
            now[k] = os.path.abspath(os.path.expanduser(now[k]))
    now["schedule"] = parse_schedule(cfg.schedule) or "cos"
    if cfg.checkpoint:
        now.pop("arch", None)
        now.pop("stem", None)
    if checkpoint_stamp is None and cfg.checkpoint:
        checkpoint_stamp = ckpt.file_stamp(cfg.checkpoint)
    now["checkpoint_stamp"] = checkpoint_stamp
    now["data_listing"] = data_listing
    now["amp_ran"] = amp_ran(cfg)
    return now


def amp_ran(cfg: Any) -> str:
    """--amp as it runs on --device (which may change on --resume): step.amp_as_run; the device is
    resolved for auto only (--device cuda on a machine without one is the run's error to say)."""
    if cfg.amp != "auto":
        return cfg.amp
    from moco_fast.trainer import resolve_device

    return amp_as_run(cfg.amp, resolve_device(cfg.device).type)


def differences(state: dict[str, Any], cfg: Any, listing: str | None = None) -> list[str]:
    """How `cfg` differs from what the state was run with: other images at the same --data first,
    then flag by flag ([] when it may resume). `listing`: the listing of `cfg`'s data (moved_data;
    None: unknown, LISTED_LATER: not listed yet)."""
    images, flags = what_differs(state, cfg, listing)
    return [images, *flags] if images else flags


def what_differs(state: dict[str, Any], cfg: Any, listing: str | None) -> tuple[str, list[str]]:
    """`differences` in two parts: the images added or removed at the same --data since the run
    stopped ("" where none), which no flag resumes, and the flags that differ."""
    saved, now = state["config"], settings(cfg, data_listing=listing)
    other_images = other_listing(saved, now)
    images = ""
    if other_images and saved.get("data") == now["data"]:  # it would go on on other images
        images = f"--data {now['data']!r} lists other images since ({other_images})"
    diff = []
    for k in now:
        if k in ("amp_ran", "data_listing"):
            continue  # with --amp, with --data
        if k == "amp":
            # what ran: auto and off on the CPU are the same features, auto on a GPU (bf16) and on the
            # CPU (off) are not; a state saved before amp_ran has --amp as typed only
            if saved["amp_ran"] != now["amp_ran"] if "amp_ran" in saved else saved[k] != now[k]:
                # the flag that resumes it: "resume with those" read as the --amp auto given, which
                # runs as another setting on this --device
                fix = f": --amp {saved['amp_ran']} runs as it ran" if "amp_ran" in saved else ""
                diff.append(f"--amp {_amp_as_given(saved)} (now {_amp_as_given(now)}{fix})")
            continue
        if saved.get(k) == now[k] or _same_when_resolved(k, saved, now, cfg):
            continue
        if (k == "checkpoint" and moved_checkpoint(saved, now)) or (k == "data" and moved_data(saved, now)):
            continue  # EpochLoop._load says so
        if k == "checkpoint_stamp":
            if saved.get("checkpoint") == now.get("checkpoint"):  # another file's stamp differs anyway
                diff.append("the checkpoint has changed since (trained further?)")
        else:
            other = f", other images: {other_images}" if k == "data" and other_images else ""
            diff.append(f"--{k.replace('_', '-')} {_as_given(saved.get(k))} (now {_as_given(now[k])}{other})")
    return images, diff


def moved_checkpoint(saved: dict[str, Any], now: dict[str, Any]) -> bool:
    """The state's checkpoint at another path, a run folder moved or copied since: the same save id
    (checkpoint.file_stamp), which a copy keeps. A checkpoint without one (another tool's) is told
    from another file by its mtime and size alone, too little to take it for the same weights."""
    stamp = saved.get("checkpoint_stamp")
    return (
        saved.get("checkpoint") != now.get("checkpoint")
        and isinstance(stamp, list)
        and stamp[:1] == ["save_id"]
        and stamp == now.get("checkpoint_stamp")
    )


def moved_data(saved: dict[str, Any], now: dict[str, Any]) -> bool:
    """The state's --data at another path, the folder renamed or copied since: the same listing
    (data_listing.listing_fingerprint: class folders and file names, which a copy keeps), or one not
    listed yet (LISTED_LATER: the loop compares it once listed). A state written before the listing
    was recorded has none: another path is other data, as then."""
    listing = saved.get("data_listing")
    return (
        saved.get("data") != now.get("data")
        and isinstance(listing, str)
        and now.get("data_listing") in (listing, LISTED_LATER)
    )


def moved_paths(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The state's --data and checkpoint that a resumed run finds at another path (moved_data,
    moved_checkpoint), each as its warning says it. "It continues on that one" read as either path:
    each names the one it reads now."""
    said = {"data": ("--data", "lists the same images as"), "checkpoint": ("the checkpoint", "is the same save as")}
    return [
        f"{said[k][0]} {saved[k]}, which {said[k][1]} --{k} {now[k]} (moved or copied since): it continues on "
        f"{now[k]}, the one given now"
        for k, moved in (("data", moved_data), ("checkpoint", moved_checkpoint))
        if moved(saved, now)
    ]


def other_listing(saved: dict[str, Any], now: dict[str, Any]) -> str:
    """What differs, in words (data_listing.listing_change), between the listing the state recorded
    and `now`'s, where both are known and differ; "" otherwise (a state written before the listing
    was recorded, a --data not listed yet)."""
    before, after = saved.get("data_listing"), now.get("data_listing")
    if not isinstance(before, str) or after in (None, LISTED_LATER, before):
        return ""
    return listing_change(before, after)


def _same_when_resolved(k: str, saved: dict[str, Any], now: dict[str, Any], cfg: Any) -> bool:
    """A flag given with the value its default resolves to is the same setting: --image-size left out
    is the checkpoint's training size (224 without one), --stem auto the stem of the image size (a
    scratch finetune's; a checkpoint's stem is its own). `--resume --image-size 32` of a run that left
    it out at 32 px was refused as "--image-size not given (now 32)"."""
    if k == "image_size":
        return (saved.get(k) or default_image_size(cfg)) == (now[k] or default_image_size(cfg))
    if k == "stem":
        from moco_fast.backbone import resolve_stem

        def stem(settings: dict[str, Any]) -> Any:
            size = settings.get("image_size") or default_image_size(cfg)
            return resolve_stem(settings[k], size) if isinstance(settings.get(k), str) else settings.get(k)

        return stem(saved) == stem(now)
    return False


def default_image_size(cfg: Any) -> int:
    """The size a run without --image-size trains and evaluates at: the checkpoint's training size
    (its config; a foreign checkpoint's as foreign.py reads it), 224 without a checkpoint."""
    if not cfg.checkpoint:
        return 224
    return ckpt.read_config(cfg.checkpoint, cfg.arch).data.aug.image_size


def _amp_as_given(settings: dict[str, Any]) -> str:
    """--amp as typed, and what auto made of it where known (a state saved before amp_ran has not)."""
    ran = settings.get("amp_ran", settings["amp"])
    return repr(settings["amp"]) + ("" if ran == settings["amp"] else f", i.e. {ran}")


def _as_given(value: Any) -> str:
    """A setting as `differences` shows it: None (a flag left to its default: --image-size, --data)
    as "not given", not as a value the flag never takes ("--image-size None (now 32)")."""
    return "not given" if value is None else repr(value)
