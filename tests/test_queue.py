"""The MoCo key queue and the single-process behaviour of the MoCo helpers (engine/models/moco.py).

Pinned here, each against something computed by hand (a one-key-at-a-time Python ring, or the
keys the method itself computed):
  * KeyQueue.enqueue writes the keys at ptr, ptr+1, ... (the oldest slot first), wraps around the
    end, keeps only the last `length` keys of a batch longer than the queue (pointer advanced by
    n mod length), touches no other row, returns None and never reads the pointer back to the
    host; bad shapes are a ValueError;
  * the queue's keys and pointer are buffers: in `state_dict()`, so in the checkpoint of a real
    mocov2 run, where after 2 steps of 4 images ptr == 8 and rows 0..7 are the keys the method
    computed, in order, and rows 8.. are still the initial ones;
  * with one process `gather_keys` and `shuffled_forward` change nothing (values and order);
  * a mocov2 run stopped after 2 steps and resumed for 2 more ends bit-identical to a straight
    4-step run: queue, pointer, every parameter and the logged losses.
Everything runs on the CPU on the embedded photos (data=None), so nothing here skips.
"""
from __future__ import annotations

import json

import pytest
import torch

from engine.methods.mocov2 import MoCoV2
from engine.models.moco import KeyQueue, gather_keys, shuffle_generator, shuffled_forward
from engine.presets import PretrainConfig
from engine.trainer import RunOptions, pretrain

LENGTH, DIM = 8, 3


def rows(n: int, start: int = 0) -> torch.Tensor:
    """n distinct recognisable keys: row i is (start+i, start+i+0.25, start+i+0.5)."""
    base = torch.arange(start, start + n, dtype=torch.float32)[:, None]
    return base + torch.tensor([0.0, 0.25, 0.5])


def ring_reference(keys: torch.Tensor, ptr: int, new: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The queue after writing `new` one key at a time (what enqueue must equal)."""
    keys = keys.clone()
    for row in new:
        keys[ptr] = row
        ptr = (ptr + 1) % keys.shape[0]
    return keys, ptr


def fresh_queue(length: int = LENGTH, dim: int = DIM) -> KeyQueue:
    torch.manual_seed(0)
    return KeyQueue(length, dim)


# ------------------------------------------------------------------------------------ KeyQueue
def test_enqueue_writes_at_the_pointer_oldest_first():
    queue = fresh_queue()
    initial = queue.keys.clone()
    assert int(queue.ptr) == 0 and queue.ptr.dtype == torch.int64 and queue.ptr.dim() == 0
    assert torch.allclose(initial.norm(dim=1), torch.ones(LENGTH))  # MoCo: normalize(randn)

    queue.enqueue(rows(3))
    assert torch.equal(queue.keys[:3], rows(3))
    assert torch.equal(queue.keys[3:], initial[3:])        # nothing else touched
    assert int(queue.ptr) == 3

    queue.enqueue(rows(2, start=10))                        # continues at the pointer
    assert torch.equal(queue.keys[:3], rows(3))
    assert torch.equal(queue.keys[3:5], rows(2, start=10))
    assert torch.equal(queue.keys[5:], initial[5:])
    assert int(queue.ptr) == 5


def test_enqueue_wraps_around_the_end():
    queue = fresh_queue()
    queue.enqueue(rows(6))
    initial_2_to_5 = queue.keys[2:6].clone()
    queue.enqueue(rows(4, start=100))                       # slots 6, 7, 0, 1
    assert torch.equal(queue.keys[6:], rows(2, start=100))
    assert torch.equal(queue.keys[:2], rows(2, start=102))
    assert torch.equal(queue.keys[2:6], initial_2_to_5)    # the newer keys survive
    assert int(queue.ptr) == 2
    queue.enqueue(rows(LENGTH, start=200))                  # exactly one lap: back at ptr 2
    assert int(queue.ptr) == 2
    assert torch.equal(queue.keys, torch.roll(rows(LENGTH, start=200), 2, dims=0))


def test_enqueue_of_more_than_length_keeps_only_the_last_length():
    queue = fresh_queue()
    queue.enqueue(rows(1))                                  # ptr 1
    queue.enqueue(rows(19, start=50))                       # 19 = 2·8 + 3 keys from slot 1
    expected, ptr = ring_reference(fresh_queue().keys, 0, torch.cat([rows(1), rows(19, start=50)]))
    assert ptr == (1 + 19) % LENGTH == 4                    # advanced by n mod length
    assert int(queue.ptr) == ptr
    assert torch.equal(queue.keys, expected)
    # Only the last `length` keys are in it, each once.
    assert sorted(queue.keys[:, 0].tolist()) == list(range(50 + 19 - LENGTH, 50 + 19))


def test_enqueue_matches_a_one_key_at_a_time_ring_for_any_sizes():
    generator = torch.Generator().manual_seed(1)
    for length in (1, 5, 8):
        queue = fresh_queue(length, DIM)
        expected, ptr = queue.keys.clone(), 0
        for n in (0, 1, length - 1, length, length + 1, 3 * length + 2, 2, 0, 7):
            new = torch.randn(n, DIM, generator=generator)
            queue.enqueue(new)
            expected, ptr = ring_reference(expected, ptr, new)
            assert int(queue.ptr) == ptr, (length, n)
            assert torch.equal(queue.keys, expected), (length, n)


def test_enqueue_stores_detached_keys_in_the_queue_dtype():
    queue = fresh_queue()
    keys = rows(2).double().requires_grad_()
    queue.enqueue(keys * 1)
    assert queue.keys.dtype == torch.float32 and not queue.keys.requires_grad
    assert torch.equal(queue.keys[:2], rows(2))


@pytest.mark.parametrize("shape", [(4,), (2, DIM + 1), (2, DIM - 1), (1, 2, DIM), ()])
def test_enqueue_rejects_bad_key_shapes(shape):
    queue = fresh_queue()
    before = queue.keys.clone()
    with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
        queue.enqueue(torch.zeros(shape))
    assert torch.equal(queue.keys, before) and int(queue.ptr) == 0


@pytest.mark.parametrize("length, dim", [(0, 4), (4, 0), (-1, 4)])
def test_queue_needs_positive_length_and_dim(length, dim):
    with pytest.raises(ValueError):
        KeyQueue(length, dim)


def test_enqueue_never_syncs_to_host(monkeypatch):
    queue = fresh_queue()
    ptr_object = queue.ptr
    expected, ptr = ring_reference(queue.keys, 0, torch.cat([rows(5), rows(13, start=40)]))

    def host_read(*args, **kwargs):
        raise AssertionError("enqueue read a tensor back to the host")

    for name in ("item", "tolist", "__bool__", "__int__", "__index__", "__float__", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    try:
        assert queue.enqueue(rows(5)) is None
        assert queue.enqueue(rows(13, start=40)) is None    # wraps, n > length
    finally:
        monkeypatch.undo()
    assert queue.ptr is ptr_object                          # updated in place, still a tensor
    assert isinstance(queue.ptr, torch.Tensor) and queue.ptr.dim() == 0
    assert int(queue.ptr) == ptr and torch.equal(queue.keys, expected)
    # On the meta device any read of a value raises: enqueue works there all the same.
    meta = KeyQueue(LENGTH, DIM).to("meta")
    meta.enqueue(torch.empty(3, DIM, device="meta"))
    meta.enqueue(torch.empty(2 * LENGTH + 1, DIM, device="meta"))
    assert meta.ptr.device.type == "meta" and meta.keys.shape == (LENGTH, DIM)


def test_keys_and_pointer_are_in_the_state_dict_and_restore():
    queue = fresh_queue()
    queue.enqueue(rows(11))
    state = queue.state_dict()
    assert set(state) == {"keys", "ptr"}
    assert int(state["ptr"]) == 11 % LENGTH and torch.equal(state["keys"], queue.keys)
    restored = KeyQueue(LENGTH, DIM)
    restored.load_state_dict(state)
    restored.enqueue(rows(2, start=90))                    # continues where the original was
    queue.enqueue(rows(2, start=90))
    assert torch.equal(restored.keys, queue.keys) and torch.equal(restored.ptr, queue.ptr)


# ------------------------------------------------------------------------------------ one process
def test_gather_keys_is_the_identity_with_one_process():
    keys = torch.randn(5, 4)
    for world_size in (0, 1):
        assert torch.equal(gather_keys(keys, world_size), keys)


def test_shuffled_forward_is_plain_encode_with_one_process():
    images = torch.randn(6, 3, generator=torch.Generator().manual_seed(3))
    generator = shuffle_generator(0, 5, 0)
    one = shuffled_forward(lambda x: x * 2 + 1, images, 0, 1, generator)
    assert torch.equal(one, images * 2 + 1)
    a, b = shuffled_forward(lambda x: (x - x.mean(dim=0), x.sum(dim=1)), images, 0, 1, generator)
    assert torch.equal(a, images - images.mean(dim=0))     # whole batch, same order
    assert torch.equal(b, images.sum(dim=1))


def test_shuffle_generator_is_a_pure_function_of_seed_step_micro():
    def draw(*key):
        return torch.randperm(16, generator=shuffle_generator(*key))

    assert torch.equal(draw(0, 3, 1), draw(0, 3, 1))
    assert not torch.equal(draw(0, 3, 1), draw(0, 4, 1))
    assert not torch.equal(draw(0, 3, 1), draw(0, 3, 0))
    assert not torch.equal(draw(0, 3, 1), draw(1, 3, 1))


# ------------------------------------------------------------------------------------ in a real run
def tiny_mocov2(**changes) -> PretrainConfig:
    values = dict(method="mocov2", backbone="vit", img_size=32, patch_size=8, dim=32, depth=1,
                  heads=2, batch_size=4, steps=2, warmup_steps=1, workers=0, optimizer="sgd",
                  clip_grad=0, ema_schedule="constant", momentum=0.99, augmentation="mocov2",
                  blr=0.3, method_args=dict(queue_length=16, hidden=32, dim=8), log_every=1,
                  checkpoint_every=1000, preset="test")
    values.update(changes)
    return PretrainConfig(**values).validate()


def test_checkpoint_holds_the_queue_of_the_keys_the_method_computed(monkeypatch, tmp_path):
    computed, initial = [], []
    real_after_step = MoCoV2.after_step

    def after_step(self, ctx):
        if not initial:
            initial.append(self.queue.keys.clone())
        computed.append(torch.cat(self._step_keys).clone())  # this step's keys, before enqueue
        return real_after_step(self, ctx)

    monkeypatch.setattr(MoCoV2, "after_step", after_step)
    result = pretrain(tiny_mocov2(), RunOptions(out=tmp_path / "run", device="cpu", fused=False,
                                                quiet=True))
    assert result["step"] == 2 and len(computed) == 2
    assert all(keys.shape == (4, 8) for keys in computed)
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)["model"]
    assert {"queue.keys", "queue.ptr"} <= set(saved)
    assert saved["queue.ptr"].dtype == torch.int64 and int(saved["queue.ptr"]) == 2 * 4
    assert torch.equal(saved["queue.keys"][:8], torch.cat(computed))  # step 1's keys, then step 2's
    assert torch.equal(saved["queue.keys"][8:], initial[0][8:])       # the rest not yet replaced
    assert torch.allclose(saved["queue.keys"].norm(dim=1), torch.ones(16))
    # The in-memory method agrees with its checkpoint.
    assert torch.equal(result["model"].queue.keys, saved["queue.keys"])
    assert torch.equal(result["model"].queue.ptr, saved["queue.ptr"])


def test_resumed_mocov2_run_matches_a_straight_run_bit_for_bit(tmp_path):
    options = dict(device="cpu", fused=False, quiet=True)
    pretrain(tiny_mocov2(steps=4), RunOptions(out=tmp_path / "straight", **options))
    pretrain(tiny_mocov2(steps=4), RunOptions(out=tmp_path / "split", stop_after=2, **options))
    halfway = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert halfway["step"] == 2 and int(halfway["model"]["queue.ptr"]) == 8
    pretrain(tiny_mocov2(steps=4), RunOptions(out=tmp_path / "split", resume=True, **options))

    straight = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=False)
    split = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert straight["step"] == split["step"] == 4
    assert int(straight["model"]["queue.ptr"]) == int(split["model"]["queue.ptr"]) == 16 % 16
    assert set(straight["model"]) == set(split["model"])
    differ = [name for name, value in straight["model"].items()
              if not torch.equal(value, split["model"][name])]
    assert not differ, differ                                # queue, pointer and every weight
    # The queue was really refilled: rows 8..15 hold steps 3-4's keys, not step 1-2's.
    assert not torch.equal(halfway["model"]["queue.keys"], split["model"]["queue.keys"])

    def losses(run):
        return [json.loads(line)["loss"]
                for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert losses("split") == losses("straight")              # steps 3 and 4 saw the same queue
