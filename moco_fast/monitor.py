"""kNN on a training run's own data: the monitor every `--knn-every` epochs, the final figures of
train's summary, and the same figures for each setting of a sweep.

Only an image folder with an eval split (train/ and val/ or test/, read by the torch, DALI or
resident loader) has data for it; `eval_splits` says what is missing where there is none.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import replace
from pathlib import Path

import torch

from moco_fast.config import ConfigError, TrainConfig, read_json_object
from moco_fast.convert_dst import sidecar_of
from moco_fast.data import SPLIT_NAMES, DataError, DataSplits, load_splits, resolve_root, split_dirs
from moco_fast.knn import knn_score, warn_if_single_class
from moco_fast.loaders import IMAGE_FOLDER_LOADERS
from moco_fast.loaders.wds import META_NAME, is_wds_root
from moco_fast.model import MoCo


def reads_image_folder(cfg: TrainConfig) -> bool:
    """Whether the run's --data is an image folder that its loader lists (torch, DALI or resident;
    not a shard set): the only data with an eval split, and one a caller may list for the loader
    (a sweep, once for all its settings)."""
    return cfg.data.loader in IMAGE_FOLDER_LOADERS and not is_wds_root(cfg.data.data)


def eval_splits(cfg: TrainConfig, listed: DataSplits | None = None) -> tuple[DataSplits | None, str]:
    """The run's train and eval image lists, or (None, what the data lacks). `listed`: the lists
    the caller made already (the loader's, header-checked; a sweep's, for all its settings); without
    them the folder is listed here, unchecked (a truncated JPEG passes a header check anyway: the kNN
    feature passes leave out every image that fails to decode, as `moco-fast knn` does)."""
    if cfg.data.loader not in IMAGE_FOLDER_LOADERS:
        return None, (
            f"an image folder with an eval split; --loader {cfg.data.loader} has none "
            "(run `moco-fast knn --checkpoint ... --data FOLDER` on the checkpoint instead)"
        )
    if is_wds_root(cfg.data.data):
        return None, "an image folder with train/ and val/ or test/, not a shard set"
    splits = listed if listed is not None else load_splits(cfg.data.data, check=False)
    if splits.eval is None:
        return None, "an eval split: a data root with train/ and val/ or test/"
    return splits, ""


def eval_split_use(cfg: TrainConfig) -> str:
    """How the run's loader treats the eval split (moco_fast.data.load_splits): `--knn-every` needs
    it; the final kNN, on by default, is skipped without it (a warning says why); a run with neither
    does not read it."""
    r = cfg.runtime
    return "list" if r.knn_every else "try" if r.final_knn else "skip"


def may_have_eval_split(cfg: TrainConfig) -> bool:
    """Whether the run's data may hold an eval split for the final kNN, told from its folders alone
    (no image is listed): False for a loader without image folders, a shard set, or a root without
    train/ and val/ or test/; True where the folders show one (it may still be unreadable: the final
    kNN is then skipped) or where the data cannot be looked at (the data scan then says why)."""
    if not reads_image_folder(cfg):
        return False
    try:
        root = resolve_root(cfg.data.data)
    except DataError:
        return True
    return split_dirs(root)[1] is not None


def converted_from(cfg: TrainConfig) -> Path | None:
    """The folder that convert recorded as the source of the run's .beton (in its sidecar, where
    that describes this .beton) or shard set (meta.json), else None: other data, or a source not
    recorded as an absolute path (an older convert's was relative to a folder it did not record)."""
    data = cfg.data.data
    if cfg.data.loader == "ffcv" and data and Path(data).is_file():
        meta = sidecar_of(Path(data))  # not a stale one: it names another .beton's source
    elif cfg.data.loader == "dali" and is_wds_root(data):
        meta = read_json_object(Path(data) / META_NAME)
    else:
        return None
    source = None if meta is None else meta.get("source")
    return Path(source) if isinstance(source, str) and os.path.isabs(source) else None


def knn_root(source: Path) -> Path | None:
    """The data root whose train/ or eval split `source` is, where that root still has train/ and
    val/ or test/ (what `moco-fast knn --data` reads); else None (moved, deleted, no eval split)."""
    root = source.parent
    if source.name in SPLIT_NAMES and source.is_dir() and split_dirs(root)[1] is not None:
        return root
    return None


# Why a run or a sweep has no kNN figure: the start of its line (train's last, a sweep's warning)
NO_EVAL_IMAGES = "--data gives no eval images (a .beton, shards, synthetic data, no val/ or test/)"


def knn_data(cfg: TrainConfig) -> tuple[str, str]:
    """What `moco-fast knn --data` takes to measure a checkpoint of the run, whose data gives no
    eval images, and what that is: the root of the split that convert recorded as the .beton's or
    shard set's source where it still has train/ and val/ or test/, else ROOT for the user to give
    (naming a recorded source that is gone)."""
    source = converted_from(cfg)
    root = None if source is None else knn_root(source)
    if root is not None:
        return shlex.quote(str(root)), ", the image folder --data was converted from"
    note = ", ROOT with train/ and val/ or test/"
    if source is not None and not source.is_dir():
        note += f" ({source}, which --data was converted from, is gone)"
    return "ROOT", note


def monitor_splits(cfg: TrainConfig, listed: DataSplits | None = None) -> DataSplits | None:
    """The data of train's kNN monitor and final kNN, or None where neither is asked or there is
    none to use; `--knn-every` without it is an error (the final kNN is skipped quietly)."""
    r = cfg.runtime
    if not (r.knn_every or r.final_knn):
        return None
    splits, missing = eval_splits(cfg, listed)
    if splits is None:
        if r.knn_every:
            raise ConfigError(f"--knn-every needs {missing}")
        return None
    warn_if_single_class(splits.train)
    return splits


def knn_top1(net: torch.nn.Module, splits: DataSplits, cfg: TrainConfig, device: torch.device) -> float:
    """Weighted kNN top-1 (%) of `net` on the run's splits, with the run's k, t and eval workers."""
    return knn_top1_and_k(net, splits, cfg, device)[0]


def knn_top1_and_k(
    net: torch.nn.Module, splits: DataSplits, cfg: TrainConfig, device: torch.device
) -> tuple[float, int]:
    """knn_top1 and the k it used (knn.knn_score)."""
    from moco_fast.trainer import eval_workers

    score = knn_score(
        net,
        splits.train,
        splits.eval,
        cfg.data.aug,
        device,
        k=cfg.runtime.knn_k,
        t=cfg.runtime.knn_t,
        workers=eval_workers(cfg.data.workers, device),
    )
    return score.top1, score.k


def knn_figures(
    model: MoCo, splits: DataSplits, cfg: TrainConfig, device: torch.device, backbone_top1: float | None = None
) -> dict[str, float]:
    """kNN top-1 on the backbone (`backbone_top1` when the monitor has just measured it), on the
    head's output (128-d: the figure the official CIFAR-10 demo reports) and, with --knn-baseline,
    on the random-init network; "knn_k" is the k used (every decodable train image where fewer than
    --knn-k)."""
    head, k = knn_top1_and_k(model.encoder_q, splits, cfg, device)
    res = {
        "knn_k": k,
        "knn_top1": knn_top1(model.backbone(), splits, cfg, device) if backbone_top1 is None else backbone_top1,
        "knn_head_top1": head,
    }
    if cfg.runtime.knn_baseline:
        res["random_knn_top1"] = knn_top1(random_init_backbone(cfg, device), splits, cfg, device)
    return res


def random_init_backbone(cfg: TrainConfig, device: torch.device) -> torch.nn.Module:
    """The random-init baseline of the final kNN (train's summary, the sweep): the backbone the
    run started from, drawn from its seed, not from the RNG where training left it (the same network
    however long the run trained). Built as end-to-end: the same backbone (the query encoder is
    drawn first in every mechanism) without a key encoder, queue or memory bank to make."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.runtime.seed)
        rand = MoCo(cfg.model, replace(cfg.moco, mechanism="end-to-end"), cfg.data.aug.image_size)
    return rand.to(device).eval().backbone()
