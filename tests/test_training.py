"""Training end to end on the PyTorch path: the loss falls on real images; resume is exact.

Resume and accumulation run on the embedded photos (data=None), so they never skip on a clone
without ../shared/data; the loss-falls check uses CIFAR-10 when it is there."""
from __future__ import annotations

import json

import torch

from engine.presets import PretrainConfig
from engine.trainer import RunOptions, pretrain


def tiny_run_config(**changes) -> PretrainConfig:
    values = dict(img_size=32, patch_size=8, dim=48, depth=2, heads=3, decoder_dim=48,
                  decoder_heads=3, projector_depth=1, predictor_depth=1, batch_size=32,
                  steps=30, warmup_steps=3, blr=1e-3, crop_scale=(0.2, 1.0), blur=False,
                  workers=0, log_every=1, checkpoint_every=1000, preset="test-tiny")
    values.update(changes)
    return PretrainConfig(**values).validate()


def losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_over_30_steps_on_cifar(cifar_train_subset, tmp_path):
    torch.manual_seed(0)
    result = pretrain(tiny_run_config(), RunOptions(out=tmp_path / "run", data=str(cifar_train_subset),
                                                    device="cpu", fused=False, quiet=True))
    curve = losses(result["out"])
    assert len(curve) == 30
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    # At initialisation the loss is ≈ 1 + λ·(something); 30 steps must cut it clearly.
    assert last < 0.8 * first, (first, last)
    assert (result["out"] / "checkpoint.pt").is_file()
    assert (result["out"] / "loss_curve.png").stat().st_size > 1000


def test_a_fresh_run_drops_the_records_of_a_run_that_left_no_checkpoint(tmp_path):
    """A run killed before its first checkpoint left metrics.jsonl behind; starting again in the
    same folder (no checkpoint: a fresh start) must not keep those records beside its own."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 20, "loss": 99.0}) + "\n")
    pretrain(tiny_run_config(steps=2, batch_size=8),
             RunOptions(out=out, device="cpu", fused=False, quiet=True))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2] and 99.0 not in [r["loss"] for r in records]


def test_resume_gives_identical_parameters(tmp_path):
    cfg = dict(steps=20, batch_size=16, checkpoint_every=5)
    straight = pretrain(tiny_run_config(**cfg), RunOptions(out=tmp_path / "straight",
                                                          device="cpu", fused=False, quiet=True))
    first = pretrain(tiny_run_config(**cfg), RunOptions(out=tmp_path / "split",
                                                       device="cpu",
                                                       fused=False, quiet=True, stop_after=10))
    assert first["step"] == 10
    saved = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=False)
    assert {"model", "optimizer", "scaler", "config", "step", "schedule", "data_position",
            "rng"} <= saved.keys()
    assert saved["step"] == 10 and saved["schedule"]["total_steps"] == 20
    assert any(k.startswith("target_encoder.") for k in saved["model"])  # the EMA branch too
    # 47 photos make 2 batches of 16 per epoch: 10 steps end after epoch 4, batch 2 (exclusive).
    assert saved["data_position"] == {"epoch": 4, "batch": 2}
    resumed = pretrain(tiny_run_config(**cfg), RunOptions(out=tmp_path / "split",
                                                         device="cpu", fused=False, quiet=True,
                                                         resume=True))
    assert resumed["step"] == 20
    a, b = straight["model"].state_dict(), resumed["model"].state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert losses(straight["out"]) == losses(resumed["out"])


def test_accumulation_builds_F_over_the_whole_accumulated_batch(tmp_path, monkeypatch):
    """spec §6.4: with accum micro-batches, every micro-batch's loss uses F from all of them."""
    import engine.methods.sim as trainer
    from kernels import unigrad_covariance

    calls = []
    real_loss = trainer.unigrad_loss

    def spy(pred, target, *args, covariance=None, **kwargs):
        calls.append((target.detach().clone(), covariance))
        return real_loss(pred, target, *args, covariance=covariance, **kwargs)

    monkeypatch.setattr(trainer, "unigrad_loss", spy)
    pretrain(tiny_run_config(steps=2, batch_size=8, accum=3),
             RunOptions(out=tmp_path / "accum", device="cpu",
                        fused=False, quiet=True))
    assert len(calls) == 6
    for step in range(2):
        step_calls = calls[3 * step: 3 * step + 3]
        assert all(c[1] is step_calls[0][1] for c in step_calls)  # one F per optimiser step
        expected = unigrad_covariance(torch.cat([c[0] for c in step_calls]))
        torch.testing.assert_close(step_calls[0][1], expected)
        single = unigrad_covariance(step_calls[0][0])
        assert not torch.allclose(single, expected)  # and it is not one micro-batch's F
