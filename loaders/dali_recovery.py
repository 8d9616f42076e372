"""How the DALI loader gets past a file it cannot decode (the mixin of `DaliLoader`): find the
culprit (named in DALI's error, or found by decoding the batches in flight one at a time with the
run's decoder), log it by name and skip it; the loader then rebuilds its pipeline at the same step.

A folder's culprit is left out of the file list for the rest of the run; a shard set's sample is
dropped from its shard's index (found, when DALI names no sample, by replaying the failed
pipeline's reader up to the batches in flight: at most one epoch of this rank's share).

A shard that DALI's reader cannot read (damaged after the set was checked when opened, see
`wds.shard_index`, or in a way that check does not see) is no sample to skip: its error, a C++ assert
and traceback, becomes one DataError naming the shard (`_unreadable_shard`).
"""

from __future__ import annotations

import logging
import os
import re

import numpy as np

from moco_fast.data import DataError
from moco_fast.metrics import progress

from .dali_pipeline import probe_pipeline, wds_replay_pipeline
from .wds import REWRITE, split_name

log = logging.getLogger("moco_fast")


def path_bytes(path: str) -> np.ndarray:
    return np.frombuffer(os.fsencode(path), np.uint8)


def dali_reason(msg: str) -> str:
    """The line of a DALI error that says what went wrong (after "encountered:"), less the text of the
    C++ assert: 'Malformed index file at "x.idx" line 3 - tar offset is not a multiple of ...'."""
    lines = [line.strip() for line in msg.splitlines()]
    after = lines[lines.index("encountered:") + 1 :] if "encountered:" in lines else lines
    reason = next((line for line in after if line and not line.startswith("Critical error")), msg.strip())
    return re.sub(r'^Assert on ".*?" failed: ', "", reason)


def one_per_iteration(items: list[np.ndarray]):
    def source(iteration: int):
        return ([items[min(iteration, len(items) - 1)]],)

    return source


class SkipsBadSamples:
    """Needs the loader's `folder` or `wds` source, `settings`, `opts`, `args`, `_stream` and
    `_consumed` (see DaliLoader)."""

    def _skip_culprits(self, msg: str) -> bool:
        """Find and skip what made DALI fail; False when nothing can be blamed (then the error stands)."""
        if "decoders" not in msg and "file.read" not in msg:
            return False
        if self.wds is not None:
            named = [
                (p, split_name(m)[0]) for p, _, m in re.findall(r"(\S+\.tar):(\d+):(\S+)", msg) if p in self.wds.paths
            ]
            if not named:  # DALI's decoders name no sample: replay the reader to find it
                named = self._undecodable_samples()
            for path, key in named:
                log.warning("skipping sample %s of %s: DALI could not decode it", key, path)
                self.wds.drop(path, key)
            return bool(named)
        f = self.folder
        batches = f.in_flight(self._consumed)
        candidates = sorted({k for b in batches for k in b})
        bad = [k for k in candidates if f.files[k] in msg]
        if not bad:
            m = re.search(r"sample #(\d+)", msg)
            first = sorted({b[int(m.group(1))] for b in batches if m and int(m.group(1)) < len(b)})
            bad = self._undecodable_files(first) or self._undecodable_files(candidates)
        for k in bad:
            log.warning("skipping unreadable image %s: DALI could not decode it", f.files[k])
        f.bad.update(bad)
        return bool(bad)

    def _unreadable_shard(self, msg: str) -> DataError | None:
        """A DALI error from the shard reader as one DataError naming the shard (named in the error by
        its path or its index's path); None for any other error, which then stands."""
        if self.wds is None or "readers.webdataset" not in msg:
            return None
        named = [tar for tar, idx in zip(self.wds.paths, self.wds.index_paths, strict=True) if tar in msg or idx in msg]
        what = f"shard {max(named, key=len)}" if named else f"the shard set {self.wds.meta.root}"
        return DataError(f"DALI cannot read {what} ({dali_reason(msg)}): {REWRITE}")

    def _undecodable_files(self, candidates: list[int]) -> list[int]:
        """The folder images among `candidates` that the run's decoder fails on."""
        paths = [path_bytes(self.folder.files[k]) for k in candidates]
        return [candidates[i] for i in self._undecodable(paths, read_files=True)]

    def _undecodable_samples(self) -> list[tuple[str, str]]:
        """(shard path, key) of the shard samples in flight that the run's decoder fails on. A reader
        with the failed pipeline's settings replays its stream up to the batches in flight (reading,
        not decoding: at most one epoch of this rank's share, since each epoch starts a new stream)."""
        start, s = self._stream
        first = self._consumed - start
        a, w = self.args, self.wds
        replay = wds_replay_pipeline(w.paths, w.index_paths, self.opts.shuffle_buffer, a.rank, a.world_size, s)
        replay.build()
        data, names = [], []
        bar = progress(total=first, desc="finding the sample DALI failed on", enabled=first > 100)
        for b in range(first + s.prefetch + 1):
            try:
                jpg, _ = replay.run()
            except RuntimeError:  # the reader itself failed (a damaged tar): nothing to blame here
                break
            if b < first:
                bar.update(1)
                continue
            for i in range(len(jpg)):
                path, _, member = jpg[i].source_info().rsplit(":", 2)
                data.append(np.array(jpg[i]))
                names.append((path, split_name(member)[0]))
        bar.close()
        del replay
        # a sample can be in flight twice (the stream runs on across epoch ends): name it once
        return list(dict.fromkeys(names[i] for i in self._undecodable(data, read_files=False)))

    def _undecodable(self, items: list[np.ndarray], read_files: bool) -> list[int]:
        """Decode `items` (paths as bytes, or encoded images) one at a time with the run's decoder;
        returns the positions of those that fail."""
        bad, i = [], 0
        while i < len(items):
            # a failed probe pipeline is dead: a new one starts after the bad item
            probe = probe_pipeline(one_per_iteration(items[i:]), self.settings, read_files=read_files)
            probe.build()
            try:
                while i < len(items):
                    probe.run()
                    i += 1
            except RuntimeError:
                bad.append(i)
                i += 1
            del probe
        return bad
