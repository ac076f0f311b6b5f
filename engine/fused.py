"""Which kernel backend a run uses: `--fused` asks for the Triton kernels where the machine can run them.

The answer is found by asking each op for `backend="triton"` on a tiny input (an op that cannot
run raises a clear error instead of falling back), so this file never goes stale when kernels land.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

import kernels

# Every op a method may call with ctx.backend(op): --no-fused sets all of them to "reference" (an
# op missing here would run "auto", i.e. Triton on CUDA, even with --no-fused).
FUSED_OPS = ("patch_gather", "relpos_embed", "unigrad_loss", "dense_match", "pixpro_loss",
             "queue_infonce", "pixel_propagation", "sinkhorn", "roi_align",
             "linear_sum_assignment", "ms_deform_attn")


@dataclass
class KernelChoice:
    backend: dict[str, str] = field(default_factory=lambda: {op: "reference" for op in FUSED_OPS})
    message: str = ""

    def __getitem__(self, op: str) -> str:
        return self.backend.get(op, "reference")

    @property
    def any_fused(self) -> bool:
        return any(b == "triton" for b in self.backend.values())


def _probe(op: str, device: torch.device) -> None:
    """Run `op` once with backend='triton' on a tiny input; raises whatever stops it."""
    if op == "patch_gather":
        images = torch.randn(1, 3, 8, 8, device=device)
        kernels.patch_gather(images, torch.zeros(1, 2, dtype=torch.long, device=device), 4,
                             backend="triton")
    elif op == "relpos_embed":
        rel = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0, 0.0]], device=device)
        kernels.relpos_embed(rel, 2, 8, backend="triton")
    elif op == "unigrad_loss":
        pred = torch.randn(4, 8, device=device)
        kernels.unigrad_loss(pred, torch.randn(4, 8, device=device), backend="triton")
    elif op == "dense_match":
        kernels.dense_match(torch.randn(1, 4, 8, device=device), torch.randn(1, 4, 8, device=device),
                            backend="triton")
    elif op == "pixpro_loss":
        boxes = torch.tensor([[[0.0, 0.0, 8.0, 8.0], [2.0, 2.0, 6.0, 6.0]]], device=device)
        flips = torch.zeros(1, 2, dtype=torch.bool, device=device)
        kernels.pixpro_loss(torch.randn(1, 4, 8, device=device), torch.randn(1, 4, 8, device=device),
                            boxes, flips, 2, image_size=(10, 10), backend="triton")
    elif op == "queue_infonce":
        unit = lambda *shape: torch.nn.functional.normalize(  # noqa: E731
            torch.randn(*shape, device=device), dim=-1)
        kernels.queue_infonce(unit(2, 8), unit(2, 8), unit(16, 8), 0.2, backend="triton")
    elif op == "pixel_propagation":
        kernels.pixel_propagation(torch.randn(1, 4, 8, device=device),
                                  torch.randn(1, 4, 8, device=device), backend="triton")
    elif op == "sinkhorn":
        kernels.sinkhorn(torch.randn(4, 8, device=device), backend="triton")
    elif op == "roi_align":
        boxes = torch.tensor([[0.0, 1.0, 1.0, 6.0, 6.0]], device=device)
        kernels.roi_align(torch.randn(1, 2, 8, 8, device=device), boxes, 2, backend="triton")
    elif op == "linear_sum_assignment":
        kernels.batched_linear_sum_assignment(torch.rand(1, 3, 2, device=device), backend="triton")
    elif op == "ms_deform_attn":
        value = torch.randn(1, 6, 1, 4, device=device)
        levels = (torch.tensor([[2, 3]], device=device), torch.tensor([0], device=device))
        kernels.ms_deform_attn(value, *levels, torch.rand(1, 2, 1, 1, 1, 2, device=device),
                               torch.rand(1, 2, 1, 1, 1, device=device), backend="triton")
    else:
        raise KeyError(op)


def interpreter_enabled() -> bool:
    """TRITON_INTERPRET=1 runs Triton kernels on CPU tensors (correct, 25-300x slower): the tests
    use it to check the fused path on machines without a GPU."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def choose_kernels(fused: bool, device: torch.device) -> KernelChoice:
    if not fused:
        return KernelChoice(message="kernels: PyTorch reference path (--no-fused)")
    interpreted = device.type == "cpu" and interpreter_enabled()
    if device.type != "cuda" and not interpreted:
        return KernelChoice(message=f"--fused: the Triton kernels need a CUDA device and this run "
                                    f"is on {device.type}; running the PyTorch reference path")
    choice, reasons = KernelChoice(), {}
    for op in FUSED_OPS:
        try:
            _probe(op, device)
            choice.backend[op] = "triton"
        except Exception as exc:  # grouped by reason into the one line below
            reason = _short_reason(op, exc)
            reasons.setdefault(reason, []).append(op)
    used = [op for op in FUSED_OPS if choice.backend[op] == "triton"]
    where = " in the Triton interpreter (TRITON_INTERPRET=1: correct but slow)" if interpreted else ""
    if not reasons:
        choice.message = f"--fused: Triton kernels{where} for {', '.join(used)}"
    else:
        fallbacks = "; ".join(f"{', '.join(ops)}: {reason}" for reason, ops in reasons.items())
        choice.message = (f"--fused: Triton{where} for {', '.join(used) or 'no op'}; PyTorch "
                          f"reference path for {fallbacks}")
    return choice


def _short_reason(op: str, exc: Exception) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = text.removeprefix(f"{op}: ")
    return text.split(" (backend=")[0].split("; use ")[0]
