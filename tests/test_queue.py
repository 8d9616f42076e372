"""The queue is a device-side ring buffer: wraps around, never reads its pointer on the host."""

import pytest
import torch

from moco_fast.config import ConfigError, MoCoConfig, ModelConfig
from moco_fast.model import MoCo


def small_moco(k: int, **kw) -> MoCo:
    return MoCo(ModelConfig(arch="resnet18", stem="imagenet", dim=4, mlp=False), MoCoConfig(k=k, **kw), image_size=32)


@pytest.mark.parametrize(("k", "n", "steps"), [(8, 4, 3), (10, 4, 3), (7, 3, 5), (5, 5, 2)])
def test_enqueue_wraps_around(k, n, steps):
    m = small_moco(k)
    expected = m.queue.clone()
    ptr = 0
    for s in range(steps):
        keys = torch.arange(n * 4, dtype=torch.float32).view(n, 4) + 100 * (s + 1)  # each row its own
        m.enqueue(keys)
        for j in range(n):  # the same ring buffer, written by hand
            expected[(ptr + j) % k] = keys[j]
        ptr = (ptr + n) % k
    assert torch.equal(m.queue, expected)
    assert m.queue_ptr.dim() == 0 and m.queue_ptr.item() == ptr


def test_queue_smaller_than_batch_is_refused():
    m = small_moco(3)
    with pytest.raises(ValueError, match="smaller than the keys"):
        m.enqueue(torch.zeros(4, 4))


def test_queue_and_pointer_are_in_the_state_dict():
    m = small_moco(6)
    m.enqueue(torch.ones(4, 4))
    state = m.state_dict()
    assert state["queue_ptr"].item() == 4
    other = small_moco(6)
    other.load_state_dict(state)
    assert torch.equal(other.queue, m.queue)
    assert other.queue_ptr.item() == 4  # the pointer comes back too, not only the keys


def test_bad_k_is_a_config_error():
    # worded as trainer.validate words it (config.check_at_least): the model said no value
    with pytest.raises(ConfigError, match=r"^--moco-k must be at least 1 \(got 0\)$"):
        small_moco(0)
