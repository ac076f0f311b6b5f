"""Where the time of a fused op goes on a GPU: wall time per call, host time to issue it, and GPU
kernel time, for relpos_query_embed, unigrad_loss and token_gather at the recipe sizes -- the same
figures as the op benchmarks' `host_overhead` column (one helper: `bench.measure.host_overhead`),
plus torch.profiler's per-op table to see which host calls cost the time.

Run on a CUDA machine from the repository root: `PYTHONPATH=$PWD python bench/profile_ops.py`.
Output of one run (before the shared helper): bench/results/h100-kernels/host-overhead-profile.txt.
"""
import importlib

import torch
from torch.profiler import ProfilerActivity, profile

from bench.measure import host_overhead

rk = importlib.import_module("kernels.relpos_embed")
ug = importlib.import_module("kernels.unigrad_loss")
pg = importlib.import_module("kernels.patch_gather")


def main():
    dev = torch.device("cuda")
    B, G, D = 128, 14, 768
    rel = torch.tensor([[0.1, -0.2, 1.1, 0.9, 0.0, 0.3]], device=dev).repeat(B, 1)
    w = torch.randn(D, 2 * D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    m = torch.randn(D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    P = torch.randn(B, 196, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    T = torch.randn(B, 196, D, device=dev, dtype=torch.bfloat16)
    tok = torch.randn(B, 196, D, device=dev, dtype=torch.bfloat16, requires_grad=True)
    idx = torch.stack([torch.randperm(196, device=dev)[:78].sort().values for _ in range(B)])
    cases = {
        "relpos_fwd_bwd": lambda: rk.relpos_query_embed(rel, G, w, b, m,
                                                        backend="triton").sum().backward(),
        "relpos_fwd_bwd_nocheck": lambda: rk.relpos_query_embed(
            rel, G, w, b, m, backend="triton", check_values=False).sum().backward(),
        "unigrad_fwd_bwd": lambda: ug.unigrad_loss(P, T, backend="triton").backward(),
        "token_gather_fwd": lambda: pg.token_gather(tok, idx, backend="triton", check_index=False),
    }
    for name, fn in cases.items():
        f = host_overhead(fn, dev)
        print(f"== {name}: wall {1e3 * f['wall_ms']:.0f} us/call, host issue "
              f"{1e3 * f['host_ms']:.0f} us/call, GPU kernels {1e3 * f['gpu_kernel_ms']:.0f} "
              f"us/call ({f['kernels_per_call']:.1f} kernels), wall / GPU {f['host_overhead']:.2f}")
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12,
                                        max_name_column_width=50))


if __name__ == "__main__":
    main()
