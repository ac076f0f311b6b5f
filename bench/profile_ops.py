"""Where the time of a fused op goes on a GPU: wall time per call, host time to issue it, and GPU kernel
time (torch.profiler), for relpos_query_embed, unigrad_loss and token_gather at the recipe sizes.

Run on a CUDA machine from the repository root: `PYTHONPATH=$PWD python bench/profile_ops.py`.
Output of one run: bench/results/h100-kernels/host-overhead-profile.txt.
"""
import time, torch, importlib
from torch.profiler import profile, ProfilerActivity
rk = importlib.import_module("kernels.relpos_embed"); ug = importlib.import_module("kernels.unigrad_loss")
pg = importlib.import_module("kernels.patch_gather")
def main():
    dev = "cuda"
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
     "relpos_fwd_bwd": lambda: rk.relpos_query_embed(rel, G, w, b, m, backend="triton").sum().backward(),
     "relpos_fwd_bwd_nocheck": lambda: rk.relpos_query_embed(rel, G, w, b, m, backend="triton",
                                                              check_values=False).sum().backward(),
     "unigrad_fwd_bwd": lambda: ug.unigrad_loss(P, T, backend="triton").backward(),
     "token_gather_fwd": lambda: pg.token_gather(tok, idx, backend="triton", check_index=False),
    }
    for name, fn in cases.items():
        for _ in range(5): fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(20): fn()
        torch.cuda.synchronize(); wall = (time.perf_counter() - t) / 20
        t = time.perf_counter()
        for _ in range(20): fn()
        cpu_issue = (time.perf_counter() - t) / 20  # host time to issue (async unless it syncs)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(5): fn()
            torch.cuda.synchronize()
        gpu = sum(e.device_time_total for e in prof.key_averages() if e.device_type.name == "CUDA") / 5
        print(f"== {name}: wall {wall*1e6:.0f} us/call, host issue {cpu_issue*1e6:.0f} us/call, GPU kernels {gpu:.0f} us/call")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=50))


if __name__ == "__main__":
    main()
