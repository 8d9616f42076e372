"""What tells the images a classifier run reads without reading them: a fingerprint of its splits'
listing. The state that lincls and finetune keep between epochs records it beside `--data`'s path,
so that `--resume` on the same images at another path (the folder renamed, or copied elsewhere)
continues the run, and other images, there or at the same path since, are refused with what changed
(classifier_settings.moved_data, listing_change)."""

from __future__ import annotations

import hashlib

from moco_fast.data import DataSplits


def listing_fingerprint(splits: DataSplits) -> str:
    """The class names, and each split's folder name and file names relative to it (class folder and
    file name), in listing order, hashed; with the counts in words. What the listing holds already:
    no file is opened or stat'ed again, one hash update per name (ImageNet: 1.28M). The files the
    listing skipped (unreadable) are left out, as the run leaves them out."""
    digest = hashlib.sha256()
    counts = []
    for split in (splits.train, splits.eval):
        if split is None:
            continue
        counts.append(str(len(split)))
        cut = len(str(split.root)) + 1  # list_images names each file root/class/name
        digest.update(f"{split.root.name}\0{len(split)}\0{len(split.classes)}\0".encode("utf-8", "surrogateescape"))
        for name in (*split.classes, *(f[cut:] for f in split.files)):
            digest.update(name.encode("utf-8", "surrogateescape") + b"\0")  # undecodable bytes too
    return f"{len(splits.train.classes)} classes, {' + '.join(counts)} images, sha256 {digest.hexdigest()}"


def listing_change(before: str, now: str) -> str:
    """What differs between two fingerprints, in words: the counts that changed ("6 classes, now 7",
    "36 + 18 images, now 37 + 18"), or, where none did, that the names did (an image renamed or
    replaced by another of another name)."""
    was, is_ = (fingerprint.rpartition(", sha256 ")[0].split(", ") for fingerprint in (before, now))
    changed = [f"{a}, now {b.rpartition(' ')[0]}" for a, b in zip(was, is_, strict=True) if a != b]
    return "; ".join(changed) or "as many classes and images, other class or file names"
