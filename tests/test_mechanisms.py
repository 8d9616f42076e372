"""The paper's three mechanisms (Figure 3), each checked against what it is meant to do.

- moco: the key encoder follows the query encoder with momentum m; each step's keys enter the
  queue at the pointer; the negatives are the queue as it was before the step.
- memory-bank (Wu et al. 2018): one feature per image; the step's rows become
  normalize(bank_m * old + (1 - bank_m) * q), every other row stays; the bank stays unit-norm.
- end-to-end: keys come from the query encoder itself, with gradients; the negatives are the other
  keys of the batch (K = batch), and there is no queue.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from moco_fast.loaders import LoaderArgs, create_loader

from moco_fast.config import ConfigError, build_config
from moco_fast.model import MoCo, info_nce
from moco_fast.trainer import StepState, make_optimizer, train_step, validate

N, DIM, IMAGES = 8, 16, 40


def make(
    mechanism: str, shuffle_bn: bool = False, bn_splits: int = 2, k: int = 24, m: float = 0.9, symmetric: bool = False
) -> MoCo:
    cfg = build_config(
        "cifar",
        {
            "model.arch": "resnet18",
            "model.stem": "imagenet",
            "model.dim": DIM,
            "moco.mechanism": mechanism,
            "moco.k": k,
            "moco.m": m,
            "moco.shuffle_bn": shuffle_bn,
            "moco.bn_splits": bn_splits,
            "moco.symmetric": symmetric,
        },
    )
    torch.manual_seed(0)
    return MoCo(cfg.model, cfg.moco, 32, num_images=IMAGES)


def views(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, 3, 32, 32, generator=g), torch.randn(N, 3, 32, 32, generator=g)


@pytest.mark.parametrize("mechanism", ["moco", "memory-bank", "end-to-end"])
def test_each_mechanism_trains_a_step_on_real_images(tiny_root, mechanism):
    cfg = build_config(
        "cifar",
        {"model.arch": "resnet18", "model.stem": "imagenet", "moco.mechanism": mechanism, "moco.k": 16},
    )
    cfg.moco.bn_splits = 2
    loader = create_loader(
        "torch", LoaderArgs(str(tiny_root), cfg.data.aug, batch_size=N, device=torch.device("cpu"), workers=0)
    )
    model = MoCo(cfg.model, cfg.moco, 32, num_images=loader.num_images)
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    s = StepState(model, opt, torch.amp.GradScaler("cpu", enabled=False), None, torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batch = next(iter(loader))
    loss, acc = train_step(s, batch, cfg.moco.m)
    assert torch.isfinite(loss) and 0 <= acc.item() <= 1
    after = model.state_dict()
    assert not torch.equal(after["encoder_q.backbone.conv1.weight"], before["encoder_q.backbone.conv1.weight"])
    assert ("encoder_k.backbone.conv1.weight" in after) == (mechanism == "moco")
    changed_queue = not torch.equal(after["queue"], before["queue"])
    assert changed_queue == (mechanism == "moco")
    if mechanism == "memory-bank":
        rows = (after["bank"] != before["bank"]).any(dim=1).nonzero().flatten()
        assert sorted(rows.tolist()) == sorted(batch.index.tolist())


def test_moco_momentum_update_and_queue():
    model = make("moco", m=0.9)
    with torch.no_grad():  # make the encoders differ, as after some training
        for p in model.encoder_q.parameters():
            p.add_(0.01 * torch.randn_like(p))
    k_before = [p.clone() for p in model.encoder_k.parameters()]
    q_params = [p.clone() for p in model.encoder_q.parameters()]
    model.queue_ptr.fill_(20)  # near the end: the step's keys wrap around (K = 24, N = 8)
    queue_before = model.queue.clone()
    im_q, im_k = views()
    loss, _ = model(im_q, im_k, 0.9)

    for pk, old, pq in zip(model.encoder_k.parameters(), k_before, q_params):
        torch.testing.assert_close(pk, 0.9 * old + 0.1 * pq)
    with torch.no_grad():
        k = F.normalize(model.encoder_k(im_k), dim=1)  # the updated key encoder, as in the step
        q = F.normalize(model.encoder_q(im_q), dim=1)
    rows = [(20 + i) % 24 for i in range(N)]
    torch.testing.assert_close(model.queue[rows], k)
    others = [i for i in range(24) if i not in rows]
    assert torch.equal(model.queue[others], queue_before[others])
    assert model.queue_ptr.item() == (20 + N) % 24
    # The negatives were the queue before this step's keys entered it.
    torch.testing.assert_close(loss, info_nce(q, k, queue_before, model.t)[0])


def test_the_ema_lists_the_encoders_parameters_once_not_every_step(monkeypatch):
    model = make("moco")
    walks = []
    for name in ("encoder_q", "encoder_k"):
        encoder = getattr(model, name)
        walk = encoder.parameters
        monkeypatch.setattr(
            encoder, "parameters", lambda *a, name=name, walk=walk, **k: walks.append(name) or walk(*a, **k)
        )
    im_q, im_k = views()
    for _ in range(3):
        model(im_q, im_k, 0.9)
    assert sorted(walks) == ["encoder_k", "encoder_q"]


def ema_moves_the_key_parameters(model: MoCo) -> bool:
    """Whether momentum_update(0.5) moves each key parameter that the key encoder has now."""
    k_before = [p.clone() for p in model.encoder_k.parameters()]
    model.momentum_update(0.5)
    expected = [0.5 * old + 0.5 * q for old, q in zip(k_before, model.encoder_q.parameters())]
    return all(torch.allclose(p, e) for p, e in zip(model.encoder_k.parameters(), expected))


def test_the_ema_follows_parameters_that_to_or_load_state_dict_put_in(monkeypatch):
    model = make("moco")
    model.momentum_update(0.9)  # the lists are made
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(1.0)
    # .to() with torch.__future__'s overwrite flag, and load_state_dict(assign=True), put new
    # Parameter objects in the encoders
    monkeypatch.setattr(torch.__future__, "get_overwrite_module_params_on_conversion", lambda: True)
    old = list(model.encoder_k.parameters())
    model.to(torch.float64)
    assert not any(a is b for a, b in zip(model.encoder_k.parameters(), old))
    assert ema_moves_the_key_parameters(model)
    old = list(model.encoder_k.parameters())
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()}, assign=True)
    assert not any(a is b for a, b in zip(model.encoder_k.parameters(), old))
    assert ema_moves_the_key_parameters(model)


def test_shuffle_bn_restores_the_key_order():
    # Without split BN the batch statistics do not depend on the order, so shuffled keys must come
    # back equal to unshuffled ones: the unshuffle pairs each key with its own query.
    a, b = make("moco", shuffle_bn=True, bn_splits=1), make("moco", shuffle_bn=False)
    im_q, im_k = views()
    a(im_q, im_k, 0.9)
    b(im_q, im_k, 0.9)
    torch.testing.assert_close(a.queue, b.queue)


def test_shuffle_bn_with_split_bn_encodes_the_keys_of_a_shuffled_batch():
    # With 2 BN splits the keys depend on which images share a sub-batch: they must be the keys of
    # the batch permuted by the step's draw, put back in the queries' order, and not the plain keys.
    model = make("moco", shuffle_bn=True, bn_splits=2)
    ref = copy.deepcopy(model)
    im_q, im_k = views()
    torch.manual_seed(3)
    model(im_q, im_k, 0.9)
    torch.manual_seed(3)
    idx = torch.randperm(N)  # the step's only random draw
    assert set(idx[: N // 2].tolist()) != set(range(N // 2))  # the draw mixes the two sub-batches
    with torch.no_grad():
        ref.momentum_update(0.9)
        shuffled = F.normalize(ref.encoder_k(im_k[idx]), dim=1)[torch.argsort(idx)]
        plain = F.normalize(ref.encoder_k(im_k), dim=1)
    torch.testing.assert_close(model.queue[:N], shuffled)
    assert not torch.allclose(model.queue[:N], plain, atol=1e-3)


@pytest.mark.parametrize("mechanism", ["moco", "memory-bank", "end-to-end"])
def test_each_mechanisms_bn_splits_as_the_few_images_warning_counts(mechanism, monkeypatch):
    # train's warning of few images a BN (bn_batch) counts the splits that the model's BN layers make:
    # --bn-splits with shuffle BN in one process, plain BN with shuffle BN off or several processes
    from moco_fast import distributed as dist_utils
    from moco_fast.backbone import SplitBatchNorm2d
    from moco_fast.bn_batch import bn_splits

    for world, shuffle_bn in [(1, True), (1, False), (2, True)]:
        monkeypatch.setattr(dist_utils, "world_size", lambda world=world: world)
        model = make(mechanism, shuffle_bn=shuffle_bn, bn_splits=4)
        bns = [b for b in model.modules() if isinstance(b, torch.nn.BatchNorm2d)]
        made = {b.num_splits if isinstance(b, SplitBatchNorm2d) else 1 for b in bns}
        assert made == {bn_splits(build_config("v2", {"moco.shuffle_bn": shuffle_bn, "moco.bn_splits": 4}).moco, world)}
        assert made == {4 if (world, shuffle_bn) == (1, True) else 1}


def test_symmetric_loss_uses_both_views_as_queries():
    model = make("moco", k=24, symmetric=True)
    model.queue_ptr.fill_(20)  # the 2N = 16 keys wrap around
    ref, queue_before = copy.deepcopy(model), model.queue.clone()
    im_q, im_k = views()
    loss, acc = model(im_q, im_k, 0.9)
    with torch.no_grad():
        ref.momentum_update(0.9)
        q1, q2 = F.normalize(ref.encoder_q(im_q), dim=1), F.normalize(ref.encoder_q(im_k), dim=1)
        k1, k2 = F.normalize(ref.encoder_k(im_q), dim=1), F.normalize(ref.encoder_k(im_k), dim=1)
    (l12, a12), (l21, a21) = info_nce(q1, k2, queue_before, model.t), info_nce(q2, k1, queue_before, model.t)
    torch.testing.assert_close(loss, l12 + l21)
    torch.testing.assert_close(acc, (a12 + a21) / 2)
    rows = [(20 + i) % 24 for i in range(2 * N)]
    torch.testing.assert_close(model.queue[rows], torch.cat([k1, k2]))
    assert model.queue_ptr.item() == (20 + 2 * N) % 24
    loss.backward()  # both losses saw the queue before the enqueue overwrote it in place


def test_symmetric_needs_a_queue_of_two_batches():
    cfg = build_config("cifar", {"optim.batch_size": 64, "moco.k": 100, "moco.symmetric": True, "moco.bn_splits": 2})
    with pytest.raises(ConfigError, match=r"--moco-k 100 is smaller than the keys one step enqueues \(128\)"):
        validate(cfg, world=1)
    cfg.moco.symmetric = False
    validate(cfg, world=1)  # 64 keys a step fit


def test_memory_bank_updates_its_rows_with_momentum():
    model = make("memory-bank")
    model.bank_m = 0.5
    bank_before = model.bank.clone()
    index = torch.tensor([3, 0, 17, 39, 8, 21, 5, 30])
    im_q, im_k = views()
    loss, acc = model(im_q, im_k, 0.9, index)
    with torch.no_grad():
        q = F.normalize(model.encoder_q(im_q), dim=1)  # the step's queries (no optimizer step yet)
    expected = F.normalize(0.5 * bank_before[index] + 0.5 * q, dim=1)
    torch.testing.assert_close(model.bank[index], expected)
    others = torch.ones(IMAGES, dtype=torch.bool)
    others[index] = False
    assert torch.equal(model.bank[others], bank_before[others])
    torch.testing.assert_close(model.bank.norm(dim=1), torch.ones(IMAGES))
    assert model.k == 24 and torch.isfinite(loss) and 0 <= acc.item() <= 1
    assert torch.equal(model.queue, make("memory-bank").queue)  # the moco queue is not used

    model.bank_m = 0.0  # m = 0: the row becomes the new feature itself
    model(im_q, im_k, 0.9, index)
    torch.testing.assert_close(model.bank[index], q)


def test_memory_bank_loss_reads_the_bank():
    # Positives: each image's own bank row; negatives: K random rows; both as before the update.
    model = make("memory-bank")
    index = torch.arange(N)
    bank = model.bank.clone()
    im_q, im_k = views()
    with torch.no_grad():
        q = F.normalize(model.encoder_q(im_q), dim=1)
    torch.manual_seed(5)
    loss, _ = model(im_q, im_k, 0.9, index)
    torch.manual_seed(5)
    neg_idx = torch.randint(IMAGES, (model.k,))  # the step's draw
    torch.testing.assert_close(loss, info_nce(q, bank[index], bank[neg_idx], model.t)[0])


def test_memory_bank_needs_indices():
    with pytest.raises(ValueError, match="indices"):
        make("memory-bank")(*views(), 0.9, None)


def test_end_to_end_negatives_are_the_batch_and_keys_get_gradients():
    model = make("end-to-end", shuffle_bn=False)
    assert model.encoder_k is None
    queue_before, ptr_before = model.queue.clone(), model.queue_ptr.clone()
    im_q, im_k = views()
    loss, _ = model(im_q, im_k, 0.9)
    q = F.normalize(model.encoder_q(im_q), dim=1)
    k = F.normalize(model.encoder_q(im_k), dim=1)
    logits = q @ k.t() / model.t  # N x N: K = batch, the positive on the diagonal
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.arange(N)))
    assert torch.equal(model.queue, queue_before) and torch.equal(model.queue_ptr, ptr_before)

    # Gradients flow through the keys too: detaching them changes the gradient.
    w = model.encoder_q.backbone.conv1.weight
    (g_full,) = torch.autograd.grad(loss, w)
    (g_detached,) = torch.autograd.grad(F.cross_entropy(q @ k.detach().t() / model.t, torch.arange(N)), w)
    assert not torch.allclose(g_full, g_detached)


def test_only_moco_keeps_a_queue():
    # end-to-end's K is the batch: --moco-k 0 is fine there, and no K x C queue is allocated for nothing
    assert make("end-to-end", k=0).queue.shape == (0, DIM)
    assert make("memory-bank", k=24).queue.shape == (0, DIM) and make("memory-bank", k=24).k == 24
    assert make("moco", k=24).queue.shape == (24, DIM)
    with pytest.raises(ValueError, match="--moco-k"):
        make("moco", k=0)


@pytest.mark.parametrize("mechanism", ["end-to-end", "memory-bank"])
def test_checkpoints_with_the_old_unused_queue_still_load(mechanism):
    old = make(mechanism).state_dict()
    old["queue"] = F.normalize(torch.randn(24, DIM), dim=1)  # as saved before only MoCo kept a queue
    model = make(mechanism)
    model.load_state_dict(old)
    assert model.queue.shape == (0, DIM)


def test_a_memory_bank_k_above_the_image_count_says_the_negatives_it_draws(tiny_root, tmp_path, caplog):
    # the bank holds one row per image, and K was cut to that count without a word: config.json said
    # K 64 for a run that drew 32 negatives a step (the sweep's table said so, train did not)
    import logging

    from run_helpers import tiny_args

    from moco_fast.cli import main

    argv = [*tiny_args(tiny_root, tmp_path / "mb"), "--mechanism", "memory-bank", "--moco-k", "64"]
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert main(argv) == 0
    assert (
        "--moco-k 64 is more than the 32 training images, one row each in the memory bank: "
        "each step draws 32 negatives from it" in caplog.text
    )


def test_a_flag_the_mechanism_does_not_read_is_named(tiny_root, tmp_path, capsys, caplog):
    # --mechanism end-to-end --moco-k 4096 trained with the batch's keys without a word
    import logging

    from moco_fast.cli import main

    base = ["train", "--data", str(tiny_root), "--out", str(tmp_path / "run"), "--device", "cpu", "--print-config"]
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert main([*base, "--mechanism", "end-to-end", "--moco-k", "4096", "--moco-m", "0.9"]) == 0
        assert main([*base, "--mechanism", "memory-bank", "--moco-k", "4096", "--moco-m", "0.9"]) == 0
        assert main([*base, "--mechanism", "moco", "--moco-k", "4096", "--moco-m", "0.9"]) == 0
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert said == [
        "--moco-k 4096 has no effect with --mechanism end-to-end: its negatives are the other keys of the batch "
        "(K = the batch)",
        "--moco-m 0.9 has no effect with --mechanism end-to-end: its keys come from the query encoder",
        "--moco-m 0.9 has no effect with --mechanism memory-bank: it has no key encoder",
    ]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moco_fast"):
        assert main([*base, "--no-shuffle-bn", "--bn-splits", "4"]) == 0  # split BN is part of shuffle BN
        assert main([*base, "--shuffle-bn", "--bn-splits", "4"]) == 0
    said = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert said == ["--bn-splits 4 has no effect with --no-shuffle-bn: BN normalises each process's whole batch"]


def test_a_flag_the_mechanism_does_not_read_is_named_once_a_job(tiny_root, tmp_path, monkeypatch, caplog):
    # under torchrun every rank runs `moco-fast train` and each said the same lines (4 GPUs: 4 times)
    import logging

    from moco_fast.cli import main

    args = ["train", "--data", str(tiny_root), "--out", str(tmp_path / "run"), "--device", "cpu", "--print-config"]
    args += ["--mechanism", "end-to-end", "--moco-m", "0.9", "--no-shuffle-bn", "--bn-splits", "4"]
    for rank, lines in (("1", 0), ("0", 2)):
        monkeypatch.setenv("RANK", rank)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="moco_fast"):
            assert main(args) == 0
        assert len([r for r in caplog.records if "has no effect" in r.getMessage()]) == lines


def test_bn_splits_with_several_processes_is_named(tiny_root, tmp_path, monkeypatch, caplog):
    # split BN is shuffle BN on one device: with several processes each one's BN normalises its own
    # batch (trainer.validate's splits), and --bn-splits 4 went without a word into config.json
    import logging

    from distributed_helpers import torchrun_env

    from moco_fast.cli import main

    args = ["train", "--data", str(tiny_root), "--out", str(tmp_path / "run"), "--device", "cpu", "--print-config"]
    torchrun_env(monkeypatch, RANK="0")
    for world, lines in (("2", 1), ("1", 0)):
        monkeypatch.setenv("WORLD_SIZE", world)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="moco_fast"):
            assert main([*args, "--bn-splits", "4", "--batch-size", "16", "--moco-k", "64"]) == 0
        said = [r.getMessage() for r in caplog.records if "has no effect" in r.getMessage()]
        assert said == ["--bn-splits 4 has no effect with 2 processes: each one's BN normalises its own batch"][:lines]
