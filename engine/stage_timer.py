"""Wall time per stage of a training step: `optimisation_step(..., stages=StageTimer(device))`.

`engine.trainer.optimisation_step` calls its optional `stages` hook with a stage's name as each
stage ends (see STAGES); the default (no hook) adds nothing to a step. A `StageTimer` is such a
hook: it synchronises the device at every mark, so that a stage's kernels are charged to that
stage and not to whichever later stage first waits for them, and adds the wall time since the
previous mark to the stage named. The synchronisation removes the overlap of host and device work
across stage boundaries, so a timed step is somewhat slower than a free-running one: report the
free-running step time beside the breakdown (bench/test_train_step.py does).
"""
from __future__ import annotations

import time

import torch

# The stages in step order. "data_wait" is marked by the caller (the wait for the next batch,
# before optimisation_step); "ema", "backward", "queue" and "optimizer" by optimisation_step; the
# others by the method (engine/methods/), each as it ends. "online_forward" includes making SIM's
# mask and view geometry; "target_forward" the EMA/key network's forward; "matching" the
# correspondence work of dense methods (feature argmax, geometry); "loss" includes SIM's F over
# all targets and each micro-batch's loss; "queue" the enqueue of keys (after_step);
# "optimizer" is unscale, clip, optimiser step and zero_grad.
STAGES = ("data_wait", "ema", "target_forward", "online_forward", "matching", "loss", "backward",
          "queue", "optimizer")


class StageTimer:
    """Accumulates wall seconds per stage over any number of steps.

    `start()` opens a step (and counts it); each `timer(stage)` closes the stage that ran since the
    previous mark and adds its time to `stage` (a stage may be marked several times per step, e.g.
    once per micro-batch). `mean_ms()` gives milliseconds per step, in step order.
    """

    def __init__(self, device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.seconds: dict[str, float] = {}
        self.steps = 0
        self._last: float | None = None

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def start(self) -> None:
        self._sync()
        self.steps += 1
        self._last = time.perf_counter()

    def __call__(self, stage: str) -> None:
        if self._last is None:
            raise RuntimeError("StageTimer: call start() before marking a stage")
        self._sync()
        now = time.perf_counter()
        self.seconds[stage] = self.seconds.get(stage, 0.0) + (now - self._last)
        self._last = now

    def mean_ms(self) -> dict[str, float]:
        """Milliseconds per step for each stage marked, known stages first in step order."""
        if not self.steps:
            return {}
        order = [s for s in STAGES if s in self.seconds]
        order += [s for s in self.seconds if s not in STAGES]
        return {s: 1e3 * self.seconds[s] / self.steps for s in order}


__all__ = ["STAGES", "StageTimer"]
