"""The Triton path of patch_gather / token_gather against float64 references (fresh random inputs).

On a CPU-only machine the kernels run under TRITON_INTERPRET=1 (set by the root conftest) on CPU
tensors, so the shapes stay small; on a CUDA machine the same tests run the compiled kernels.
"""
import importlib

import pytest
import torch
import torch.nn.functional as F

from kernels import patch_gather, patch_gather_reference, token_gather
from tests.host_sync import count_host_syncs

# the module itself (kernels.patch_gather the attribute is the function of the same name)
pg = importlib.import_module("kernels.patch_gather")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
LOW_PRECISION = (torch.bfloat16, torch.float16)


def _indices(batch, num_items, count, duplicates=False):
    if duplicates:
        idx = torch.randint(0, num_items, (batch, count))
        if count > 1:
            idx[0, 1] = idx[0, 0]  # at least one duplicate: its gradients must add up
        return idx.to(DEVICE)
    return torch.stack([torch.randperm(num_items)[:count] for _ in range(batch)]).to(DEVICE)


def _rows(tokens, idx):
    return tokens[torch.arange(tokens.shape[0], device=tokens.device)[:, None], idx]


def _embed64(images, idx, patch, weight, bias, pos_embed):
    """Conv2d over the whole image in float64, gathered at idx, plus the position rows."""
    dim = weight.shape[0]
    conv_weight = weight.double().reshape(dim, images.shape[1], patch, patch)
    tokens = F.conv2d(images.double(), conv_weight, None if bias is None else bias.double(),
                      stride=patch).flatten(2).transpose(1, 2)
    out = _rows(tokens, idx)
    return out if pos_embed is None else out + pos_embed.double()[idx]


def _leaves(*tensors, dtype=None):
    return [None if t is None else t.to(dtype or t.dtype).detach().requires_grad_()
            for t in tensors]


def _grads(out, inputs, upstream):
    wanted = [t for t in inputs if t is not None]
    got = iter(torch.autograd.grad(out, wanted, upstream))
    return [None if t is None else next(got) for t in inputs]


def _assert_fp32_close(actual, expected, name=""):
    expected = expected.double()
    scale = max(expected.abs().max().item(), 1.0) if expected.numel() else 1.0
    torch.testing.assert_close(actual.double(), expected, rtol=1e-5, atol=2e-5 * scale,
                               msg=lambda m: f"{name}: {m}")


def _assert_lowp_rule(kernel, torch_lowp, ref64, name=""):
    """|kernel - ref64| <= 2 |torch_lowp - ref64| + small atol (elementwise maxima)."""
    kernel_err = (kernel.double() - ref64).abs().max().item()
    torch_err = (torch_lowp.double() - ref64).abs().max().item()
    atol = 1e-3 * max(ref64.abs().max().item(), 1.0)
    assert kernel_err <= 2 * torch_err + atol, f"{name}: kernel {kernel_err} vs torch {torch_err}"


# ---------------------------------------------------------------------------------------------
# plain patch gather
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,channels,height,width,patch,count", [
    (2, 3, 16, 24, 4, 5),    # non-square grid 4x6
    (1, 3, 20, 20, 4, 25),   # B=1, every patch
    (3, 5, 15, 9, 3, 4),     # odd sizes everywhere (C*p*p = 45)
])
def test_plain_gather_is_exact(dtype, batch, channels, height, width, patch, count):
    images = torch.randn(batch, channels, height, width, device=DEVICE).to(dtype)
    idx = _indices(batch, (height // patch) * (width // patch), count, duplicates=True)
    out = patch_gather(images, idx, patch, backend="triton")
    unfolded = F.unfold(images.double(), kernel_size=patch, stride=patch).transpose(1, 2)
    assert out.shape == (batch, count, channels * patch * patch) and out.dtype == dtype
    torch.testing.assert_close(out.double(), _rows(unfolded, idx), rtol=0, atol=0)


def test_plain_gather_gradient_scatters_into_gathered_patches():
    images = torch.randn(2, 3, 12, 16, device=DEVICE, requires_grad=True)
    idx = _indices(2, 12, 5, duplicates=True)
    out = patch_gather(images, idx, 4, backend="triton")
    upstream = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, images, upstream)
    images64 = images.detach().double().requires_grad_()
    (expected,) = torch.autograd.grad(patch_gather_reference(images64, idx, 4), images64,
                                      upstream.double())
    _assert_fp32_close(grad, expected, "images")


# ---------------------------------------------------------------------------------------------
# embedded forward and gradients
# ---------------------------------------------------------------------------------------------

EMBED_CASES = [
    # batch, channels, height, width, patch, dim, count, bias, pos
    (3, 3, 16, 16, 4, 24, 7, True, True),     # the recipe's structure, tiny
    (1, 3, 12, 20, 4, 10, 15, True, True),    # B=1, every patch, D not a block multiple
    (2, 5, 15, 9, 3, 17, 5, False, True),     # odd everything (C*p*p = 45), no bias
    (2, 3, 8, 8, 2, 33, 3, True, False),      # no pos table; D spans blocks
    (2, 1, 12, 12, 3, 16, 9, False, False),   # projection only
]


@pytest.mark.parametrize("batch,channels,height,width,patch,dim,count,has_bias,has_pos",
                         EMBED_CASES)
def test_embed_forward_and_gradients_fp32(batch, channels, height, width, patch, dim, count,
                                          has_bias, has_pos):
    num_patches = (height // patch) * (width // patch)
    images = torch.randn(batch, channels, height, width, device=DEVICE)
    weight = torch.randn(dim, channels * patch * patch, device=DEVICE) * 0.2
    bias = torch.randn(dim, device=DEVICE) if has_bias else None
    pos_embed = torch.randn(num_patches, dim, device=DEVICE) if has_pos else None
    idx = _indices(batch, num_patches, count, duplicates=True)
    inputs = _leaves(images, weight, bias, pos_embed)
    out = patch_gather(inputs[0], idx, patch, *inputs[1:], backend="triton")
    assert out.dtype == torch.float32 and out.shape == (batch, count, dim)
    inputs64 = _leaves(images, weight, bias, pos_embed, dtype=torch.float64)
    expected = _embed64(inputs64[0], idx, patch, *inputs64[1:])
    _assert_fp32_close(out, expected, "forward")

    upstream = torch.randn_like(out)
    grads = _grads(out, inputs, upstream)
    grads64 = _grads(expected, inputs64, upstream.double())
    for name, grad, grad64 in zip(("images", "weight", "bias", "pos_embed"), grads, grads64):
        if grad64 is not None:
            _assert_fp32_close(grad, grad64, name)
    # patches that were never gathered get exactly zero gradient
    grad_patches = F.unfold(grads[0], kernel_size=patch, stride=patch).transpose(1, 2)
    for b in range(batch):
        unused = sorted(set(range(num_patches)) - set(idx[b].tolist()))
        assert torch.all(grad_patches[b, unused] == 0)


@pytest.mark.parametrize("dtype", LOW_PRECISION)
@pytest.mark.parametrize("pos_dtype", ["same", torch.float32])
def test_embed_low_precision_within_twice_torch_error(dtype, pos_dtype):
    batch, channels, size, patch, dim, count = 3, 3, 16, 4, 20, 9
    num_patches = (size // patch) ** 2
    pos_dtype = dtype if pos_dtype == "same" else pos_dtype
    images = torch.randn(batch, channels, size, size, device=DEVICE).to(dtype)
    weight = (torch.randn(dim, channels * patch * patch, device=DEVICE) * 0.2).to(dtype)
    bias = torch.randn(dim, device=DEVICE).to(dtype)
    pos_embed = torch.randn(num_patches, dim, device=DEVICE).to(pos_dtype)
    idx = _indices(batch, num_patches, count, duplicates=True)

    inputs = _leaves(images, weight, bias, pos_embed)
    out = patch_gather(inputs[0], idx, patch, *inputs[1:], backend="triton")
    lowp = _leaves(images, weight, bias, pos_embed)
    torch_lowp = patch_gather_reference(lowp[0], idx, patch, *lowp[1:])
    assert out.dtype == torch_lowp.dtype == torch.promote_types(dtype, pos_dtype)
    inputs64 = _leaves(images, weight, bias, pos_embed, dtype=torch.float64)
    ref64 = _embed64(inputs64[0], idx, patch, *inputs64[1:])
    _assert_lowp_rule(out, torch_lowp, ref64, "forward")

    upstream = torch.randn(out.shape, device=DEVICE).to(out.dtype)
    grads = _grads(out, inputs, upstream)
    grads_lowp = _grads(torch_lowp, lowp, upstream)
    grads64 = _grads(ref64, inputs64, upstream.double())
    for name, grad, grad_lowp, grad64, leaf in zip(("images", "weight", "bias", "pos_embed"),
                                                   grads, grads_lowp, grads64, inputs):
        assert grad.dtype == leaf.dtype, name
        _assert_lowp_rule(grad, grad_lowp, grad64, name)


def test_embed_non_contiguous_inputs_and_conv_weight():
    batch, channels, patch, dim = 2, 3, 4, 12
    images_cl = torch.randn(batch, 20, 24, channels, device=DEVICE).permute(0, 3, 1, 2)
    images_sliced = torch.randn(batch, channels + 2, 23, 30,
                                device=DEVICE)[:, 1:1 + channels, 3:23, 2:26]
    weight_t = torch.randn(channels * patch * patch, dim, device=DEVICE).t() * 0.2  # transposed
    conv_weight = torch.randn(dim, channels, patch, patch, device=DEVICE) * 0.2     # Conv2d shape
    bias = torch.randn(2 * dim, device=DEVICE)[::2]                                 # strided
    pos_embed = torch.randn(dim, 30, device=DEVICE).t()                              # (N, D) view
    idx = _indices(batch, 30, 12)[:, ::2]                                            # strided
    for images in (images_cl, images_sliced):
        for weight in (weight_t, conv_weight):
            assert not images.is_contiguous()
            inputs = _leaves(images, weight, bias, pos_embed)
            out = patch_gather(inputs[0], idx, patch, *inputs[1:], backend="triton")
            inputs64 = _leaves(images, weight, bias, pos_embed, dtype=torch.float64)
            expected = _embed64(inputs64[0], idx, patch, *inputs64[1:])
            _assert_fp32_close(out, expected, "forward")
            upstream = torch.randn(out.shape[::-1], device=DEVICE).permute(2, 1, 0)  # strided
            grads = _grads(out, inputs, upstream)
            grads64 = _grads(expected, inputs64, upstream.double())
            for name, grad, grad64 in zip(("images", "weight", "bias", "pos"), grads, grads64):
                assert grad.shape == grad64.shape
                _assert_fp32_close(grad, grad64, name)


def test_only_requested_gradients_are_computed(monkeypatch):
    images = torch.randn(2, 3, 8, 8, device=DEVICE)
    weight = torch.randn(6, 48, device=DEVICE)
    bias = torch.randn(6, device=DEVICE)
    pos_embed = torch.randn(4, 6, device=DEVICE)
    idx = _indices(2, 4, 3)
    # frozen embedding (SIM): no graph at all
    out = patch_gather(images, idx, 4, weight, bias, pos_embed, backend="triton")
    assert not out.requires_grad
    # only the table trains: neither the patch re-gather nor the image scatter may run
    calls = []
    for name in ("_launch_patch_pixels", "_launch_patch_scatter"):
        original = getattr(pg, name)
        monkeypatch.setattr(pg, name, lambda *a, _o=original, _n=name, **k: (calls.append(_n),
                                                                             _o(*a, **k))[1])
    pos_leaf = pos_embed.clone().requires_grad_()
    out = patch_gather(images, idx, 4, weight, bias, pos_leaf, backend="triton")
    (grad_pos,) = torch.autograd.grad(out, pos_leaf, torch.ones_like(out))
    assert calls == []
    expected = torch.zeros(4, 6, dtype=torch.float64, device=DEVICE)
    expected.index_add_(0, idx.reshape(-1), torch.ones(6, 6, dtype=torch.float64, device=DEVICE))
    _assert_fp32_close(grad_pos, expected, "pos_embed")


def test_poisoned_outputs_are_fully_overwritten():
    batch, channels, size, patch, dim, count = 2, 3, 12, 3, 20, 7
    images = torch.randn(batch, channels, size, size, device=DEVICE)
    weight = torch.randn(dim, channels * patch * patch, device=DEVICE)
    bias, pos_embed = torch.randn(dim, device=DEVICE), torch.randn(16, dim, device=DEVICE)
    idx = _indices(batch, 16, count)
    out = torch.full((batch, count, dim), float("nan"), device=DEVICE)
    pg._launch_embed_forward(images, idx, weight, bias, pos_embed, patch, out=out)
    _assert_fp32_close(out, _embed64(images, idx, patch, weight, bias, pos_embed))
    pixels = torch.full((batch, count, channels * patch * patch), float("nan"), device=DEVICE)
    pg._launch_patch_pixels(images, idx, patch, out=pixels)
    assert torch.equal(pixels, patch_gather_reference(images, idx, patch))
    tokens = torch.randn(batch, 9, 13, device=DEVICE)
    gathered = torch.full((batch, count, 13), float("nan"), device=DEVICE)
    pg._launch_token_gather(tokens, _indices(batch, 9, count), out=gathered)
    assert torch.isfinite(gathered).all()


def test_unchecked_out_of_range_indices_stay_in_bounds():
    """check_index=False skips the range check; the kernels still mask every access."""
    images = torch.randn(2, 3, 8, 8, device=DEVICE, requires_grad=True)
    weight = torch.randn(5, 48, device=DEVICE, requires_grad=True)
    bias = torch.randn(5, device=DEVICE, requires_grad=True)
    pos_embed = torch.randn(4, 5, device=DEVICE, requires_grad=True)
    idx = torch.tensor([[0, -1, 3], [4, 2, 1 << 40]], device=DEVICE)
    bad = (idx < 0) | (idx >= 4)
    out = patch_gather(images, idx, 4, weight, bias, pos_embed, backend="triton",
                       check_index=False)
    assert torch.equal(out[bad], bias.detach().expand(int(bad.sum()), 5))
    good = idx.clamp(0, 3)
    expected = _embed64(images, good, 4, weight, bias, pos_embed)
    _assert_fp32_close(out[~bad], expected[~bad])
    upstream = torch.randn_like(out)
    upstream_good = upstream.masked_fill(bad[..., None], 0)
    grads = torch.autograd.grad(out, (images, weight, pos_embed), upstream)
    grads64 = torch.autograd.grad(expected, (images, weight, pos_embed), upstream_good.double())
    # the plain gather and the image / pos scatters ignore the bad rows too
    for grad, grad64 in zip(grads[::2], grads64[::2]):
        _assert_fp32_close(grad, grad64)
    plain = patch_gather(images.detach(), idx, 4, backend="triton", check_index=False)
    assert torch.all(plain[bad] == 0)
    tokens = torch.randn(2, 4, 6, device=DEVICE, requires_grad=True)
    gathered = token_gather(tokens, idx, backend="triton", check_index=False)
    assert torch.all(gathered[bad] == 0)
    (grad_tokens,) = torch.autograd.grad(gathered, tokens, torch.ones_like(gathered))
    assert grad_tokens.sum().item() == 6 * int((~bad).sum())


# ---------------------------------------------------------------------------------------------
# token_gather
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch,num_tokens,dim,count", [(3, 11, 5, 9), (1, 7, 300, 4),
                                                        (2, 20, 16, 20)])
def test_token_gather_forward_and_scatter_add(dtype, batch, num_tokens, dim, count):
    tokens = torch.randn(dim, num_tokens, batch, device=DEVICE).permute(2, 1, 0).to(dtype)
    tokens.requires_grad_()                                           # non-contiguous
    idx = _indices(batch, num_tokens, count, duplicates=True)
    out = token_gather(tokens, idx, backend="triton")
    assert out.dtype == dtype and out.shape == (batch, count, dim)
    assert torch.equal(out, _rows(tokens.detach(), idx))

    upstream = torch.randn(batch, count, dim, device=DEVICE).to(dtype)
    (grad,) = torch.autograd.grad(out, tokens, upstream)
    assert grad.dtype == dtype
    tokens64 = tokens.detach().double().requires_grad_()
    (grad64,) = torch.autograd.grad(_rows(tokens64, idx), tokens64, upstream.double())
    if dtype == torch.float32:
        _assert_fp32_close(grad, grad64)
    else:
        lowp = tokens.detach().requires_grad_()
        (grad_lowp,) = torch.autograd.grad(_rows(lowp, idx), lowp, upstream)
        _assert_lowp_rule(grad, grad_lowp, grad64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_token_gather_unique_indices_backward_is_exact(dtype):
    tokens = torch.randn(3, 14, 24, device=DEVICE).to(dtype).requires_grad_()
    idx = _indices(3, 14, 12)[:, ::2]                                  # unique per row, strided
    out = token_gather(tokens, idx, backend="triton", unique_indices=True)
    upstream = torch.randn(out.shape, device=DEVICE).to(dtype)
    (grad,) = torch.autograd.grad(out, tokens, upstream)
    expected = torch.zeros_like(tokens)
    expected[torch.arange(3, device=DEVICE)[:, None], idx] = upstream
    assert grad.dtype == dtype and torch.equal(grad, expected)


# ---------------------------------------------------------------------------------------------
# validation and dispatch
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def no_launch(monkeypatch):
    """Fail the test if any launcher runs (validation must raise first)."""
    def boom(*args, **kwargs):
        raise AssertionError("a kernel was launched before validation failed")
    for name in ("_launch_embed_forward", "_launch_patch_pixels", "_launch_patch_scatter",
                 "_launch_token_gather", "_launch_token_scatter"):
        monkeypatch.setattr(pg, name, boom)


@pytest.mark.parametrize("call,needle", [
    (lambda im, ix: patch_gather(im, ix.clone().fill_(16), 4, backend="triton"), "idx values"),
    (lambda im, ix: patch_gather(im, -ix - 1, 4, backend="triton"), "idx values"),
    (lambda im, ix: patch_gather(im, ix.int(), 4, backend="triton"), "idx must be int64"),
    (lambda im, ix: patch_gather(im[:1], ix, 4, backend="triton"), "B=1"),
    (lambda im, ix: patch_gather(im, ix, 4, torch.randn(8, 47, device=DEVICE),
                                 backend="triton"), "weight must have shape"),
    (lambda im, ix: patch_gather(im, ix, 4, torch.randn(8, 48, device=DEVICE), None,
                                 torch.randn(15, 8, device=DEVICE), backend="triton"),
     "pos_embed must have shape"),
    (lambda im, ix: patch_gather(im, ix, 4, None, torch.randn(8, device=DEVICE),
                                 backend="triton"), "need weight"),
    (lambda im, ix: token_gather(im[:, 0], ix.clone().fill_(16), backend="triton"),
     "token_gather: idx values"),
    (lambda im, ix: token_gather(im[:, 0], ix, backend="cuda"), "backend must be one of"),
])
def test_bad_inputs_raise_before_any_launch(no_launch, call, needle):
    images, idx = torch.randn(2, 3, 16, 16, device=DEVICE), _indices(2, 16, 5)
    with pytest.raises(ValueError, match=needle):
        call(images, idx)


def test_float64_is_refused_by_triton_and_routed_to_reference_by_auto(no_launch):
    images, idx = torch.randn(2, 3, 8, 8, dtype=torch.float64, device=DEVICE), _indices(2, 4, 3)
    with pytest.raises(RuntimeError, match="fp32/bf16/fp16"):
        patch_gather(images, idx, 4, backend="triton")
    with pytest.raises(RuntimeError, match="fp32/bf16/fp16"):
        token_gather(images[:, 0], idx, backend="triton")
    assert torch.equal(patch_gather(images, idx, 4), patch_gather_reference(images, idx, 4))


def test_triton_without_cuda_or_interpreter_raises(monkeypatch, no_launch):
    images, idx = torch.randn(2, 3, 8, 8), torch.zeros(2, 3, dtype=torch.int64)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        patch_gather(images, idx, 4, backend="triton")
    with pytest.raises(RuntimeError, match="needs CUDA tensors"):
        token_gather(images[:, 0], idx, backend="triton")
    assert torch.equal(patch_gather(images, idx, 4), patch_gather_reference(images, idx, 4))
    monkeypatch.setattr(pg, "_TRITON_IMPORTABLE", False)
    with pytest.raises(RuntimeError, match="triton package"):
        patch_gather(images, idx, 4, backend="triton")


def test_auto_uses_reference_on_cpu():
    assert pg._select_backend("patch_gather", "auto", torch.device("cpu"),
                              [torch.float32]) == "reference"
    assert pg._select_backend("patch_gather", "reference", DEVICE, [torch.float32]) == "reference"


@pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
def test_auto_picks_triton_on_cuda(monkeypatch):
    images = torch.randn(2, 3, 32, 32, device="cuda")
    weight = torch.randn(16, 48, device="cuda")
    idx = _indices(2, 64, 10)
    calls = []
    original = pg._launch_embed_forward
    monkeypatch.setattr(pg, "_launch_embed_forward",
                        lambda *a, **k: (calls.append(1), original(*a, **k))[1])
    out = patch_gather(images, idx, 4, weight)
    assert calls == [1]
    _assert_fp32_close(out, _embed64(images, idx, 4, weight, None, None))


# ---------------------------------------------------------------------------------------------
# the registered ops' Triton implementation (use_triton=True): opcheck, torch.compile, no host
# sync, autocast, edge inputs, the launch-plan cache
# ---------------------------------------------------------------------------------------------
OPS = torch.ops.densesim


def _embed_case(batch=2, channels=3, height=12, width=16, patch=4, dim=7, count=5):
    num_patches = (height // patch) * (width // patch)
    images = torch.randn(batch, channels, height, width, device=DEVICE)
    weight = torch.randn(dim, channels * patch * patch, device=DEVICE) * 0.2
    bias = torch.randn(dim, device=DEVICE)
    pos_embed = torch.randn(num_patches, dim, device=DEVICE)
    return images, _indices(batch, num_patches, count, duplicates=True), patch, weight, bias, pos_embed


def test_opcheck_triton_path():
    images, idx, patch, weight, bias, pos_embed = _embed_case()
    forward, backward = OPS.patch_gather.default, OPS.patch_gather_backward.default
    leaves = _leaves(images, weight, bias, pos_embed)
    torch.library.opcheck(forward, (leaves[0], idx, patch, *leaves[1:], None, True))
    torch.library.opcheck(forward, (images.clone().requires_grad_(), idx, patch, None, None, None,
                                    None, True))
    upstream = torch.randn(2, 5, 7, device=DEVICE)
    for needs in ((True, True, True, True), (False, False, False, True)):
        torch.library.opcheck(backward, (upstream, images, idx, patch, weight, None, bias.dtype,
                                         pos_embed.dtype, *needs, True))
    tokens = torch.randn(3, 11, 6, device=DEVICE)
    token_idx = _indices(3, 11, 6, duplicates=True)
    torch.library.opcheck(OPS.token_gather.default,
                          (tokens.clone().requires_grad_(), token_idx, False, True))
    unique_idx = _indices(3, 11, 6)
    torch.library.opcheck(OPS.token_gather.default,
                          (tokens.clone().requires_grad_(), unique_idx, True, True))
    torch.library.opcheck(OPS.token_gather_backward.default,
                          (torch.randn(3, 6, 6, device=DEVICE), token_idx, 11, False, True))


def test_triton_path_inside_torch_compile():
    images, idx, patch, weight, bias, pos_embed = _embed_case()
    tokens, token_idx = torch.randn(2, 9, 6, device=DEVICE), _indices(2, 9, 4, duplicates=True)

    def step(images, weight, bias, pos_embed, tokens):
        embedded = patch_gather(images, idx, patch, weight, bias, pos_embed, backend="triton")
        plain = patch_gather(images, idx, patch, backend="triton")
        gathered = token_gather(tokens, token_idx, backend="triton")
        return embedded.square().sum() + 0.5 * plain.sum() + (gathered * 2.0).sin().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (step, compiled):
        leaves = _leaves(images, weight, bias, pos_embed, tokens)
        loss = fn(*leaves)
        results.append((loss, torch.autograd.grad(loss, leaves)))
    (loss, grads), (loss_compiled, grads_compiled) = results
    torch.testing.assert_close(loss_compiled, loss, rtol=1e-6, atol=1e-5)
    for grad, grad_compiled in zip(grads, grads_compiled):
        torch.testing.assert_close(grad_compiled, grad, rtol=1e-6, atol=1e-6)


def test_no_host_syncs_triton_path():
    """Forward + backward of every public op on the Triton path, index checks on: no Python-level
    read of a tensor value (on CPU the interpreter runs the same launchers)."""
    images, idx, patch, weight, bias, pos_embed = _embed_case()
    tokens = torch.randn(2, 12, 5, device=DEVICE)

    def step():
        leaves = _leaves(images, weight, bias, pos_embed)
        token_leaf = tokens.clone().requires_grad_()
        out = patch_gather(leaves[0], idx, patch, *leaves[1:], backend="triton")
        plain = patch_gather(leaves[0], idx, patch, backend="triton")
        gathered = token_gather(token_leaf, idx, backend="triton")
        unique = token_gather(token_leaf, _unique_idx, backend="triton", unique_indices=True)
        (out.sum() + plain.sum() + gathered.sum() + unique.sum()).backward()
        return leaves + [token_leaf]

    _unique_idx = _indices(2, 12, 6)
    step()  # warm-up: compilation and (on CUDA) autotuning read timings back, once
    with count_host_syncs() as syncs:
        leaves = step()
    assert not syncs, syncs.report()
    assert all(leaf.grad is not None for leaf in leaves)


@pytest.mark.parametrize("images_dtype", [torch.float32, torch.bfloat16])
def test_triton_path_ignores_autocast(images_dtype):
    """The op receives its inputs as they are under autocast (as the old autograd.Function did) and
    the kernels compute in promote(images, weight): results and dtypes are those without autocast."""
    images, idx, patch, weight, bias, pos_embed = _embed_case()
    images = images.to(images_dtype)
    upstream = None
    results = []
    for enabled in (False, True):
        leaves = _leaves(images, weight, bias, pos_embed)
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16, enabled=enabled):
            out = patch_gather(leaves[0], idx, patch, *leaves[1:], backend="triton",
                               check_index=False)
        upstream = torch.randn_like(out) if upstream is None else upstream
        results.append((out, _grads(out, leaves, upstream)))
    (out, grads), (out_autocast, grads_autocast) = results
    assert out_autocast.dtype == out.dtype == torch.float32
    assert torch.equal(out_autocast, out)
    for grad, grad_autocast in zip(grads, grads_autocast):
        assert grad_autocast.dtype == grad.dtype and torch.equal(grad_autocast, grad)


TRITON_EDGE_CASES = [
    # batch, channels, height, width, patch, dim, count
    (2, 3, 12, 16, 4, 5, 1),    # K = 1
    (3, 2, 5, 5, 5, 6, 3),      # N = 1: a single patch, gathered three times (duplicates)
    (0, 3, 8, 8, 4, 5, 3),      # B = 0
    (2, 3, 8, 8, 4, 5, 0),      # K = 0
    (1, 1, 3, 3, 1, 1, 4),      # p = 1, C = 1, D = 1
]


@pytest.mark.parametrize("batch,channels,height,width,patch,dim,count", TRITON_EDGE_CASES)
def test_triton_edge_shapes_against_float64(batch, channels, height, width, patch, dim, count):
    num_patches = (height // patch) * (width // patch)
    images = torch.randn(batch, channels, height, width, device=DEVICE)
    weight = torch.randn(dim, channels * patch * patch, device=DEVICE) * 0.3
    bias = torch.randn(dim, device=DEVICE)
    pos_embed = torch.randn(num_patches, dim, device=DEVICE)
    idx = torch.randint(0, num_patches, (batch, count), device=DEVICE)
    inputs = _leaves(images, weight, bias, pos_embed)
    out = patch_gather(inputs[0], idx, patch, *inputs[1:], backend="triton")
    assert out.shape == (batch, count, dim) and out.dtype == torch.float32
    inputs64 = _leaves(images, weight, bias, pos_embed, dtype=torch.float64)
    expected = _embed64(inputs64[0], idx, patch, *inputs64[1:])
    _assert_fp32_close(out, expected, "forward")
    upstream = torch.randn(out.shape, device=DEVICE)
    for name, grad, grad64 in zip(("images", "weight", "bias", "pos_embed"),
                                  _grads(out, inputs, upstream),
                                  _grads(expected, inputs64, upstream.double())):
        assert grad.shape == grad64.shape, name
        _assert_fp32_close(grad, grad64, name)
    plain = patch_gather(inputs[0], idx, patch, backend="triton")
    (grad_plain,) = torch.autograd.grad(plain, inputs[0], torch.ones_like(plain))
    unfolded = F.unfold(images.double(), kernel_size=patch, stride=patch).transpose(1, 2)
    torch.testing.assert_close(plain.double(), _rows(unfolded, idx), rtol=0, atol=0)
    images64 = images.double().requires_grad_()
    (grad_plain64,) = torch.autograd.grad(patch_gather_reference(images64, idx, patch), images64,
                                          torch.ones(plain.shape, dtype=torch.float64,
                                                     device=DEVICE))
    _assert_fp32_close(grad_plain, grad_plain64, "plain images")


@pytest.mark.parametrize("batch,num_tokens,dim,count,pattern", [
    (3, 10, 6, 1, "random"),      # K = 1
    (2, 1, 5, 4, "random"),       # N = 1: every index is 0
    (0, 7, 4, 3, "random"),       # B = 0
    (2, 9, 1, 6, "same"),         # D = 1, one token picked K times: its gradient adds up K times
    (3, 8, 5, 8, "permutation"),  # K = N, unique (also with unique_indices=True)
])
def test_triton_token_gather_edge_shapes(batch, num_tokens, dim, count, pattern):
    tokens = torch.randn(dim, num_tokens, batch, device=DEVICE).permute(2, 1, 0)  # non-contiguous
    if pattern == "same":
        idx = torch.randint(0, num_tokens, (batch, 1), device=DEVICE).expand(batch, count)
    elif pattern == "permutation":
        idx = _indices(batch, num_tokens, count)
    else:
        idx = torch.randint(0, num_tokens, (batch, count), device=DEVICE)
    for unique in ((False, True) if pattern == "permutation" else (False,)):
        (leaf,) = _leaves(tokens)
        out = token_gather(leaf, idx, backend="triton", unique_indices=unique)
        assert out.shape == (batch, count, dim)
        assert torch.equal(out, _rows(tokens, idx))
        upstream = torch.randn(out.shape, device=DEVICE)
        (grad,) = torch.autograd.grad(out, leaf, upstream)
        tokens64 = tokens.double().requires_grad_()
        (grad64,) = torch.autograd.grad(_rows(tokens64, idx), tokens64, upstream.double())
        _assert_fp32_close(grad, grad64, f"unique={unique}")


def test_triton_bad_index_values_raise_on_cpu_or_assert_on_cuda():
    images, idx, patch, weight, bias, pos_embed = _embed_case()
    bad = idx.clone()
    bad[0, 0] = 12
    message = "patch_gather: idx values must lie in [0, 12)"
    if not CUDA:
        with pytest.raises(ValueError) as info:
            patch_gather(images, bad, patch, weight, bias, pos_embed, backend="triton")
        assert str(info.value) == message
        return
    # on CUDA the check is asynchronous: the call returns, the next synchronisation fails (and
    # leaves the CUDA context unusable, so this is checked in a fresh process)
    import os
    import subprocess
    import sys
    code = ("import torch; from kernels import patch_gather\n"
            "images = torch.randn(2, 3, 12, 16, device='cuda')\n"
            "idx = torch.zeros(2, 5, dtype=torch.int64, device='cuda'); idx[0, 0] = 12\n"
            "out = patch_gather(images, idx, 4, backend='triton')\n"
            "print('returned', flush=True)\n"
            "torch.cuda.synchronize()\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, check=False,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    # the call itself returned (no host sync); the synchronisation after it failed
    assert "returned" in result.stdout and result.returncode != 0, result.stderr[-2000:]


def test_launch_plans_are_cached():
    """The per-shape launch decisions are computed once per key (functools.lru_cache)."""
    for plan in (pg._embed_plan, pg._pixels_plan, pg._token_plan):
        plan.cache_clear()
    images, idx, patch, weight, bias, pos_embed = _embed_case()
    tokens = torch.randn(2, 12, 5, device=DEVICE)
    for _ in range(3):
        patch_gather(images, idx, patch, weight, bias, pos_embed, backend="triton")
        patch_gather(images, idx, patch, backend="triton")
        token_gather(tokens, idx, backend="triton")
    for plan in (pg._embed_plan, pg._pixels_plan, pg._token_plan):
        info = plan.cache_info()
        assert info.misses == 1 and info.hits == 2, (plan.__name__, info)
