"""The numbers the runs log: learning-rate schedules, kNN accuracy, top-k accuracy, the demo set's size.

Every expected value is derived by hand (or by a plain reference written here), not read back from the code.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from moco_fast import lincls
from moco_fast.augment import AugSpec
from moco_fast.config import ConfigError, build_config
from moco_fast.data import DEMO_ROOT, list_images, load_splits
from moco_fast.knn import knn_predict, knn_score
from moco_fast.trainer import lr_at

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# -- the pretraining schedule (moco_fast.trainer.lr_at) -------------------------------------------
def test_cosine_schedule_is_the_half_cosine():
    cfg = build_config("v2", {"optim.epochs": 200})
    assert cfg.optim.schedule == "cosine"
    base = 0.24
    assert lr_at(cfg, 0, base) == pytest.approx(base, rel=1e-12)
    assert lr_at(cfg, 100, base) == pytest.approx(base / 2, rel=1e-12)
    # cos(pi/4) = sqrt(2)/2 and cos(3pi/4) = -sqrt(2)/2
    assert lr_at(cfg, 50, base) == pytest.approx(base * (2 + math.sqrt(2)) / 4, rel=1e-12)
    assert lr_at(cfg, 150, base) == pytest.approx(base * (2 - math.sqrt(2)) / 4, rel=1e-12)
    # the last epoch run (199 of 0..199) is small but not zero: cos(pi * 199/200) = -cos(pi/200)
    assert lr_at(cfg, 199, base) == pytest.approx(base * (1 - math.cos(math.pi / 200)) / 2, rel=1e-9)
    assert 0 < lr_at(cfg, 199, base) < 2e-4 * base
    # monotone decreasing over the run
    lrs = [lr_at(cfg, e, base) for e in range(200)]
    assert all(a > b for a, b in itertools.pairwise(lrs))


@pytest.mark.parametrize(
    ("epochs", "lr_steps", "expected"),
    [
        # v1 over 200 epochs: x0.1 from epoch 120 (60%), x0.01 from epoch 160 (80%)
        (200, None, {0: 1, 119: 1, 120: 0.1, 159: 0.1, 160: 0.01, 199: 0.01}),
        # 10 epochs: the drops at epochs 6 and 8
        (10, None, {0: 1, 5: 1, 6: 0.1, 7: 0.1, 8: 0.01, 9: 0.01}),
        # 7 epochs: 60% and 80% are 4.2 and 5.6, the drops at the nearest epochs 4 and 6
        (7, None, {3: 1, 4: 0.1, 5: 0.1, 6: 0.01}),
        # the fractions come from optim.lr_steps, not from constants
        (10, (0.5,), {4: 1, 5: 0.1, 9: 0.1}),
    ],
)
def test_step_schedule_drops_at_fractions_of_the_run(epochs, lr_steps, expected):
    overrides = {"optim.epochs": epochs}
    if lr_steps is not None:
        overrides["optim.lr_steps"] = lr_steps
    cfg = build_config("v1", overrides)
    assert cfg.optim.schedule == "step"
    base = 0.03
    for epoch, factor in expected.items():
        assert lr_at(cfg, epoch, base) == pytest.approx(base * factor, rel=1e-12), epoch


def test_unknown_schedule_is_a_config_error():
    cfg = build_config("v2", {"optim.schedule": "linear"})
    with pytest.raises(ConfigError, match="unknown schedule 'linear'"):
        lr_at(cfg, 0, 0.1)


# -- the linear-classification schedule (moco_fast.lincls) -----------------------------------------
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("60,80", (60, 80)),
        ("30", (30,)),
        (" 60 , 80 ", (60, 80)),
        ("60,80,", (60, 80)),
        ("cos", None),
        ("cosine", None),
        (" COS ", None),
    ],
)
def test_parse_schedule_valid(text, expected):
    assert lincls.parse_schedule(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("a,b", "expects epochs like 60,80"),
        ("60;80", "expects epochs like 60,80"),
        ("60.5", "expects epochs like 60,80"),
        ("cosin", "expects epochs like 60,80"),
        ("0,80", "must be positive"),
        ("60,-80", "must be positive"),
    ],
)
def test_parse_schedule_errors(text, message):
    with pytest.raises(ConfigError, match=message):
        lincls.parse_schedule(text)


def test_lincls_step_schedule():
    base = 30.0
    expected = {0: 30.0, 59: 30.0, 60: 3.0, 79: 3.0, 80: 0.3, 99: 0.3}
    for epoch, lr in expected.items():
        assert lincls.lr_at(base, epoch, 100, (60, 80)) == pytest.approx(lr, rel=1e-12), epoch
    # one step; and no steps: a constant lr
    assert lincls.lr_at(base, 9, 20, (10,)) == pytest.approx(30.0)
    assert lincls.lr_at(base, 10, 20, (10,)) == pytest.approx(3.0)
    assert lincls.lr_at(base, 19, 20, ()) == pytest.approx(30.0)


def test_lincls_cosine_schedule():
    base = 0.1
    assert lincls.lr_at(base, 0, 90, None) == pytest.approx(0.1, rel=1e-12)
    assert lincls.lr_at(base, 45, 90, None) == pytest.approx(0.05, rel=1e-12)
    assert lincls.lr_at(base, 30, 90, None) == pytest.approx(0.1 * 0.75, rel=1e-12)  # cos(pi/3) = 1/2
    assert lincls.lr_at(base, 60, 90, None) == pytest.approx(0.1 * 0.25, rel=1e-12)  # cos(2pi/3) = -1/2


# -- kNN -------------------------------------------------------------------------------------------
def unit(angle_deg: float) -> list[float]:
    a = math.radians(angle_deg)
    return [math.cos(a), math.sin(a)]


def bank_at(sims: list[float]) -> torch.Tensor:
    """Unit vectors in 2-D whose cosine similarities with the query (1, 0) are `sims`."""
    return torch.tensor([[s, math.sqrt(1 - s * s)] for s in sims])


QUERY = torch.tensor([[1.0, 0.0]])


def test_knn_weighted_vote_beats_the_majority():
    # k=3: one neighbour of class 0 at similarity 0.99 and two of class 1 at 0.5.
    bank = bank_at([0.99, 0.5, 0.5])
    labels = torch.tensor([0, 1, 1])
    # t=0.1: class 0 weighs exp(9.9), class 1 2 exp(5) -- 2 exp(-4.9) = 0.015 of class 0's
    assert knn_predict(QUERY, bank, labels, num_classes=2, k=3, t=0.1).tolist() == [0]
    # t=10: the weights are almost equal (exp(0.099) against 2 exp(0.05)) and the majority wins
    assert knn_predict(QUERY, bank, labels, num_classes=2, k=3, t=10.0).tolist() == [1]


def test_knn_k_truncates_the_neighbours():
    # Similarities 0.9 (class 0), 0.8, 0.8 (class 1), 0.7, 0.7 (class 0). With t=1 and x = 0.1:
    # k=1: class 0 alone; k=3: 1 against 2 e^-x = 1.81 -> class 1;
    # k=4: 1 + e^-2x against 2 e^-x -> class 0 ((1 - e^-x)^2 > 0); k=5 and k > bank: class 0.
    bank = bank_at([0.8, 0.7, 0.9, 0.8, 0.7])  # not in similarity order
    labels = torch.tensor([1, 0, 0, 1, 0])
    got = {k: knn_predict(QUERY, bank, labels, num_classes=2, k=k, t=1.0).item() for k in (1, 3, 4, 5, 200)}
    assert got == {1: 0, 3: 1, 4: 0, 5: 0, 200: 0}


def test_knn_small_temperature_does_not_overflow():
    # exp(sim / 0.001) overflows float32 (exp(999) = inf) for both classes: the weights must be
    # relative to the nearest neighbour. Class 1 at 0.999 weighs 1, class 0 at 0.998 (twice)
    # 2 exp(-1) = 0.74, class 0 at -0.9 exp(-1899) = 0: class 1. (Relative to the farthest of the k,
    # exp(1899) would overflow just the same.)
    bank = bank_at([0.998, 0.999, 0.998, -0.9])
    labels = torch.tensor([0, 1, 0, 0])
    assert knn_predict(QUERY, bank, labels, num_classes=2, k=4, t=1e-3).tolist() == [1]


def reference_knn(query, bank, labels, num_classes, k, t):
    """Plain weighted kNN: for each query, the k most similar bank rows vote exp(sim / t)."""
    preds = []
    for row in (query.double() @ bank.double().T).tolist():
        nearest = sorted(zip(row, labels.tolist()), key=lambda s: -s[0])[:k]
        score = [0.0] * num_classes
        for s, y in nearest:
            score[y] += math.exp(s / t)
        preds.append(max(range(num_classes), key=lambda c: score[c]))
    return preds


def test_knn_matches_a_plain_reference_across_query_chunks():
    # More than 1024 queries: the implementation works in chunks, whose results must stay in order.
    g = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(40, 6, generator=g), dim=1)
    labels = torch.randint(0, 4, (40,), generator=g)
    query = F.normalize(torch.randn(1100, 6, generator=g), dim=1)
    got = knn_predict(query, bank, labels, num_classes=4, k=7, t=0.5)
    want = reference_knn(query, bank, labels, 4, 7, 0.5)
    assert got.tolist() == want


class ChannelMean(nn.Module):
    """A trivial "backbone": the per-channel mean of the (normalised) image, N x 3."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))


REDS = [(255, 0, 0), (200, 30, 20), (230, 10, 40), (170, 0, 10)]
BLUES = [(0, 0, 255), (20, 30, 200), (10, 40, 230), (0, 10, 170)]


def write_split(root, split, folders: dict[str, list[tuple[int, int, int]]]):
    for cls, colours in folders.items():
        d = root / split / cls
        d.mkdir(parents=True, exist_ok=True)
        for i, colour in enumerate(colours):
            Image.new("RGB", (16, 16), colour).save(d / f"{i:02d}.png")


def colour_splits(root, eval_folders):
    write_split(root, "train", {"blue": BLUES[:3], "red": REDS[:3]})
    write_split(root, "test", eval_folders)
    train = list_images(root / "train")
    return train, list_images(root / "test", classes=train.classes)


def test_knn_accuracy_on_colour_separable_classes(tmp_path):
    train, test = colour_splits(tmp_path, {"blue": BLUES, "red": REDS})
    net = ChannelMean().train()
    rng = torch.get_rng_state()
    with pytest.warns(UserWarning, match=r"k=200 is more than the 6 images of .*train: all 6 are the neighbours"):
        acc, *_ = knn_score(net, train, test, AugSpec(image_size=8), torch.device("cpu"), k=200, t=0.1, workers=0)
    assert acc == 100.0
    assert torch.equal(torch.get_rng_state(), rng)  # train's monitor does not change what training draws
    assert net.training  # the feature pass puts the net back in training mode


def test_knn_accuracy_counts_a_mislabelled_eval_image(tmp_path):
    # A red image filed under blue/ in the eval split: kNN calls it red, so 7 of 8 are right.
    train, test = colour_splits(tmp_path, {"blue": [*BLUES[:3], REDS[3]], "red": REDS})
    assert len(test) == 8
    acc, *_ = knn_score(ChannelMean(), train, test, AugSpec(image_size=8), torch.device("cpu"), k=200, workers=0)
    assert acc == 87.5


# -- top-k accuracy (moco_fast.lincls) -------------------------------------------------------------
def ranked_logits(rank_of_label: list[int], num_classes: int, labels: list[int]) -> torch.Tensor:
    """Logits where each row's label is the `rank`-th highest class (0: top-1)."""
    rows = []
    for rank, y in zip(rank_of_label, labels):
        others = [c for c in range(num_classes) if c != y]
        order = [*others[:rank], y, *others[rank:]]  # classes from highest to lowest
        row = torch.empty(num_classes)
        for position, c in enumerate(order):
            row[c] = float(num_classes - position)
        rows.append(row)
    return torch.stack(rows)


def test_topk_correct_counts_hits():
    labels = [3, 0, 7, 9, 5, 2]
    ranks = [0, 0, 1, 4, 5, 9]  # top-1, top-1, 2nd, 5th, 6th, last
    logits = ranked_logits(ranks, 10, labels)
    y = torch.tensor(labels)
    top1, top5 = lincls.topk_correct(logits, y, 5)
    assert (top1.item(), top5.item()) == (2, 4)
    top1, top2 = lincls.topk_correct(logits, y, 2)
    assert (top1.item(), top2.item()) == (2, 3)
    top1, top10 = lincls.topk_correct(logits, y, 10)
    assert (top1.item(), top10.item()) == (2, 6)


def test_evaluate_pools_batches_and_reports_top5():
    # 10 classes: top-5. Batch 1: 4 rows (ranks 0, 0, 4, 5); batch 2: 1 row (rank 2).
    # top-1: 2 of 5 = 40 %; top-5: 4 of 5 = 80 % (a mean of per-batch figures would give 25 % and 87.5 %).
    b1 = (ranked_logits([0, 0, 4, 5], 10, [1, 2, 3, 4]), torch.tensor([1, 2, 3, 4]))
    b2 = (ranked_logits([2], 10, [8]), torch.tensor([8]))
    top1, top5, n = lincls.evaluate(lambda x: x, [b1, b2], torch.device("cpu"), num_classes=10)
    assert (top1, top5, n) == (40.0, 80.0, 5)


def test_evaluate_with_fewer_than_five_classes_uses_all_of_them():
    # 3 classes: top-min(5, 3) = top-3, which holds every label; top-1 is 1 of 4.
    labels = [0, 1, 2, 0]
    logits = ranked_logits([0, 1, 2, 2], 3, labels).half()  # low-precision logits are fine
    top1, top3, _ = lincls.evaluate(lambda x: x, [(logits, torch.tensor(labels))], torch.device("cpu"), num_classes=3)
    assert (top1, top3) == (25.0, 100.0)


def test_evaluate_uses_the_forward_function():
    # forward negates the logits: the label that was last is now first.
    labels = torch.tensor([0, 1])
    logits = ranked_logits([5, 5], 6, [0, 1])  # each label the lowest of 6
    top1, top5, _ = lincls.evaluate(lambda x: -x, [(logits, labels)], torch.device("cpu"), num_classes=6)
    assert (top1, top5) == (100.0, 100.0)


def test_evaluate_with_no_batches_is_zero_not_an_error():
    assert lincls.evaluate(lambda x: x, [], torch.device("cpu"), num_classes=10) == (0.0, 0.0, 0)


# -- the shipped demo set --------------------------------------------------------------------------
def test_demo_set_has_the_documented_size():
    # demo_data/README.md: CIFAR-10's 10 classes, the first 500 train and 100 test images of each.
    splits = load_splits(None)
    assert splits.train.root == DEMO_ROOT / "train"
    assert splits.eval is not None and splits.eval.root == DEMO_ROOT / "test"
    assert splits.train.classes == CIFAR10_CLASSES and splits.eval.classes == CIFAR10_CLASSES
    assert len(splits.train) == 5000 and len(splits.eval) == 1000
    assert Counter(splits.train.labels) == {c: 500 for c in range(10)}
    assert Counter(splits.eval.labels) == {c: 100 for c in range(10)}
    assert splits.train.skipped == [] and splits.eval.skipped == []
    # each file sits in the folder of its label
    for images in (splits.train, splits.eval):
        assert all(f.split("/")[-2] == images.classes[y] for f, y in zip(images.files, images.labels))


def test_lincls_warns_of_lr_steps_past_the_last_epoch(caplog):
    # The steps are epoch numbers: with --epochs 10 the default 60,80 would train at lr 30 throughout.
    from moco_fast.commands import check_schedule

    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert check_schedule("60,80", 10) == (60, 80)
    assert "the lr never drops at 60,80" in caplog.text and "below 10" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        check_schedule("60,80", 1)
    assert "never drops" in caplog.text and "below 1" not in caplog.text  # no milestone fits one epoch
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        check_schedule("60,80", 100)
        check_schedule("6,8", 10)
        check_schedule("cos", 1)
    assert caplog.text == ""


@pytest.mark.parametrize(
    "per_s,shown", [(0.234, "0.23"), (0.0042, "0.0042"), (9.46, "9.5"), (10.4, "10"), (1234.6, "1235")]
)
def test_images_a_second_read_as_whole_numbers_and_two_digits_below_10(per_s, shown):
    from moco_fast.metrics import rate  # train's closing line and progress bar

    assert rate(per_s) == shown
