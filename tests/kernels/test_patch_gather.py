"""patch_gather / token_gather against float64 Conv2d / unfold references (fresh random inputs),
and the registered ops' CPU implementation (reference maths): opcheck, torch.compile, meta
tensors, the no-host-sync rule, autocast, edge inputs. The Triton implementation is tested in
test_patch_gather_triton.py."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from kernels import patch_gather, patch_gather_reference, token_gather
from tests.host_sync import count_host_syncs


def _random_indices(batch, num_patches, count, duplicates=False):
    if duplicates:
        return torch.randint(0, num_patches, (batch, count))
    return torch.stack([torch.randperm(num_patches)[:count] for _ in range(batch)])


def _conv_tokens64(images, weight, bias, patch_size):
    """Conv2d over the whole image in float64, flattened to (B, N, D) in raster order."""
    embed_dim = weight.shape[0]
    conv_weight = weight.double().reshape(embed_dim, images.shape[1], patch_size, patch_size)
    out = F.conv2d(images.double(), conv_weight, None if bias is None else bias.double(),
                   stride=patch_size)
    return out.flatten(2).transpose(1, 2)


def _gather_rows(tokens, idx):
    return tokens[torch.arange(tokens.shape[0])[:, None], idx]


@pytest.mark.parametrize("batch,channels,height,width,patch,count", [
    (4, 3, 32, 48, 8, 7),    # non-square grid 4x6
    (1, 3, 20, 20, 4, 25),   # B=1, all patches
    (3, 5, 15, 9, 3, 4),     # odd sizes everywhere
])
def test_patches_equal_unfold(batch, channels, height, width, patch, count):
    images = torch.randn(batch, channels, height, width)
    num_patches = (height // patch) * (width // patch)
    idx = _random_indices(batch, num_patches, count)
    out = patch_gather(images, idx, patch)
    # unfold flattens each patch in (channel, row, col) order and walks patches in raster order
    unfolded = F.unfold(images.double(), kernel_size=patch, stride=patch).transpose(1, 2)
    assert out.shape == (batch, count, channels * patch * patch)
    assert out.dtype == images.dtype
    torch.testing.assert_close(out.double(), _gather_rows(unfolded, idx), rtol=0, atol=0)


def test_embedding_forward_and_gradients_match_conv64():
    batch, channels, size, patch, embed_dim, count = 3, 3, 28, 7, 10, 9
    grid = size // patch
    images = torch.randn(batch, channels, size, size, requires_grad=True)
    weight = torch.randn(embed_dim, channels * patch * patch, requires_grad=True)
    bias = torch.randn(embed_dim, requires_grad=True)
    pos_embed = torch.randn(grid * grid, embed_dim, requires_grad=True)
    idx = _random_indices(batch, grid * grid, count, duplicates=True)
    idx[0, :2] = 5  # make sure a duplicate exists: its gradients must accumulate
    out = patch_gather(images, idx, patch, weight, bias, pos_embed)

    leaves64 = [t.detach().double().requires_grad_() for t in (images, weight, bias, pos_embed)]
    images64, weight64, bias64, pos64 = leaves64
    expected = _gather_rows(_conv_tokens64(images64, weight64, bias64, patch), idx) + pos64[idx]
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)

    upstream = torch.randn(batch, count, embed_dim)
    out.backward(upstream)
    expected.backward(upstream.double())
    for name, leaf, leaf64 in zip(("images", "weight", "bias", "pos_embed"),
                                  (images, weight, bias, pos_embed), leaves64):
        torch.testing.assert_close(leaf.grad.double(), leaf64.grad, rtol=1e-5, atol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")
    # patches that were never gathered get exactly zero gradient
    grad_tokens = F.unfold(images.grad, kernel_size=patch, stride=patch).transpose(1, 2)
    for b in range(batch):
        unused = sorted(set(range(grid * grid)) - set(idx[b].tolist()))
        assert torch.all(grad_tokens[b, unused] == 0)


def test_conv_shaped_weight_is_accepted():
    images = torch.randn(2, 3, 16, 16)
    conv_weight = torch.randn(6, 3, 4, 4)
    idx = _random_indices(2, 16, 5)
    flat = patch_gather(images, idx, 4, conv_weight.reshape(6, -1))
    torch.testing.assert_close(patch_gather(images, idx, 4, conv_weight), flat)


def test_non_contiguous_inputs():
    batch, channels, patch, embed_dim = 2, 3, 4, 8
    base = torch.randn(batch, 20, 24, channels)
    images_cl = base.permute(0, 3, 1, 2)                         # channels-last strides
    images_sliced = torch.randn(batch, channels + 2, 23, 30)[:, 1:1 + channels, 3:23, 2:26]
    weight = torch.randn(channels * patch * patch, embed_dim).t()  # transposed weight
    pos_embed = torch.randn(embed_dim, 30).t()                   # (N=30, D) non-contiguous
    idx = _random_indices(batch, 30, 12)[:, ::2]                 # strided index tensor
    for images in (images_cl, images_sliced):
        assert not images.is_contiguous()
        out = patch_gather(images, idx, patch, weight, None, pos_embed)
        expected = _gather_rows(_conv_tokens64(images, weight, None, patch), idx) + pos_embed.double()[idx]
        torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_within_twice_torch_error(dtype):
    images = torch.randn(3, 3, 32, 32)
    weight = torch.randn(16, 3 * 8 * 8) * 0.1
    bias = torch.randn(16)
    idx = _random_indices(3, 16, 6)
    ref64 = _gather_rows(_conv_tokens64(images, weight, bias, 8), idx)
    out = patch_gather(images.to(dtype), idx, 8, weight.to(dtype), bias.to(dtype))
    assert out.dtype == dtype
    torch_lowp = _gather_rows(F.conv2d(images.to(dtype), weight.to(dtype).reshape(16, 3, 8, 8),
                                       bias.to(dtype), stride=8).flatten(2).transpose(1, 2), idx)
    kernel_err = (out.double() - ref64).abs().max()
    torch_err = (torch_lowp.double() - ref64).abs().max()
    assert kernel_err <= 2 * torch_err + 1e-2


def test_pos_embed_promotes_like_sim():
    # fp16 projection + fp32 table -> fp32 tokens (SIM keeps the residual stream in fp32)
    images = torch.randn(2, 3, 8, 8).half()
    weight = torch.randn(4, 12).half()
    pos_embed = torch.randn(16, 4)
    out = patch_gather(images, _random_indices(2, 16, 3), 2, weight, None, pos_embed)
    assert out.dtype == torch.float32


def test_token_gather_forward_and_scatter_add_gradient():
    batch, num_tokens, dim, count = 3, 11, 5, 9
    tokens = torch.randn(dim, num_tokens, batch).permute(2, 1, 0).requires_grad_()  # non-contiguous
    idx = torch.randint(0, num_tokens, (batch, count))
    idx[:, 0] = idx[:, 1]  # guaranteed duplicates
    out = token_gather(tokens, idx)
    tokens64 = tokens.detach().double()
    expected = torch.stack([tokens64[b, idx[b]] for b in range(batch)])
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=0)

    upstream = torch.randn(batch, count, dim)
    out.backward(upstream)
    expected_grad = torch.zeros(batch, num_tokens, dim, dtype=torch.float64)
    for b in range(batch):
        for k in range(count):
            expected_grad[b, idx[b, k]] += upstream[b, k].double()
    torch.testing.assert_close(tokens.grad.double(), expected_grad, rtol=1e-6, atol=1e-6)


def test_token_gather_b1_bf16():
    tokens = torch.randn(1, 7, 4, dtype=torch.bfloat16)
    idx = torch.tensor([[6, 0, 3]])
    torch.testing.assert_close(token_gather(tokens, idx), tokens[0, [6, 0, 3]][None])


# ---------------------------------------------------------------------------------------------
# bad inputs
# ---------------------------------------------------------------------------------------------

def _good_args():
    return torch.randn(2, 3, 16, 16), torch.randint(0, 16, (2, 5))


@pytest.mark.parametrize("bad_idx,needle", [
    (torch.tensor([[0, -1, 2], [1, 2, 3]]), "idx"),
    (torch.tensor([[0, 16, 2], [1, 2, 3]]), "idx"),
    (torch.zeros(2, 3, dtype=torch.float32), "idx must be int64"),
    (torch.zeros(2, 3, dtype=torch.int32), "idx must be int64"),
    (torch.zeros(3, 3, dtype=torch.int64), "B=2"),
    (torch.zeros(2, 3, 1, dtype=torch.int64), "idx must be int64 of shape (B, K)"),
])
def test_patch_gather_rejects_bad_idx(bad_idx, needle):
    images, _ = _good_args()
    with pytest.raises(ValueError, match="patch_gather: idx") as info:
        patch_gather(images, bad_idx, 4)
    assert needle in str(info.value)


def test_patch_gather_rejects_bad_images_weight_and_devices():
    images, idx = _good_args()
    with pytest.raises(ValueError, match="images must have shape"):
        patch_gather(images[0], idx, 4)
    with pytest.raises(ValueError, match="divisible by patch_size"):
        patch_gather(torch.randn(2, 3, 18, 16), idx, 4)
    with pytest.raises(ValueError, match="images must be a floating"):
        patch_gather(images.to(torch.int32), idx, 4)
    with pytest.raises(ValueError, match="patch_size"):
        patch_gather(images, idx, 0)
    with pytest.raises(ValueError, match="weight must have shape"):
        patch_gather(images, idx, 4, torch.randn(8, 47))
    with pytest.raises(ValueError, match="bias must have shape"):
        patch_gather(images, idx, 4, torch.randn(8, 48), torch.randn(7))
    with pytest.raises(ValueError, match="pos_embed must have shape"):
        patch_gather(images, idx, 4, torch.randn(8, 48), None, torch.randn(15, 8))
    with pytest.raises(ValueError, match="need weight"):
        patch_gather(images, idx, 4, None, torch.randn(8))
    with pytest.raises(ValueError, match="idx must be on the same device"):
        patch_gather(images, idx.to("meta"), 4)
    with pytest.raises(ValueError, match="weight must be on the same device"):
        patch_gather(images, idx, 4, torch.randn(8, 48, device="meta"))


def test_token_gather_rejects_bad_inputs():
    tokens = torch.randn(2, 6, 4)
    with pytest.raises(ValueError, match="token_gather: idx values must lie in \\[0, 6\\)"):
        token_gather(tokens, torch.tensor([[0, 6], [1, 2]]))
    with pytest.raises(ValueError, match="token_gather: idx values"):
        token_gather(tokens, torch.tensor([[0, -2], [1, 2]]))
    with pytest.raises(ValueError, match="token_gather: idx must be int64 of shape \\(B, K\\) with B=2"):
        token_gather(tokens, torch.tensor([[0.0, 1.0], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="token_gather: tokens must have shape"):
        token_gather(tokens[0], torch.tensor([[0, 1]]))


def test_backend_selection():
    images, idx = _good_args()
    torch.testing.assert_close(patch_gather(images, idx, 4, backend="reference"),
                               patch_gather_reference(images, idx, 4))
    with pytest.raises(ValueError, match="backend must be one of"):
        patch_gather(images, idx, 4, backend="cuda")
    # backend="triton" (interpreter on CPU, compiled on CUDA) is tested in test_patch_gather_triton.py


# ---------------------------------------------------------------------------------------------
# the registered ops (densesim::patch_gather / token_gather and their backward ops): the CPU
# implementation (reference maths, use_triton=False); the Triton implementation is tested in
# test_patch_gather_triton.py
# ---------------------------------------------------------------------------------------------
pg = importlib.import_module("kernels.patch_gather")
OPS = torch.ops.densesim


def _leaves(*tensors, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_()
            for t in tensors]


def _grads(out, inputs, upstream):
    wanted = [t for t in inputs if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(out, wanted, upstream))
    return [next(got) if t is not None and t.requires_grad else None for t in inputs]


def _embed_case(batch=2, channels=3, height=12, width=16, patch=4, dim=7, count=5):
    """Fresh random inputs of an embedded gather (odd D, duplicates in idx)."""
    num_patches = (height // patch) * (width // patch)
    images = torch.randn(batch, channels, height, width)
    weight = torch.randn(dim, channels * patch * patch) * 0.2
    bias, pos_embed = torch.randn(dim), torch.randn(num_patches, dim)
    idx = _random_indices(batch, num_patches, count, duplicates=True)
    if count > 1:
        idx[0, 1] = idx[0, 0]
    return images, idx, patch, weight, bias, pos_embed


def test_auto_on_cpu_runs_the_registered_ops_and_reference_does_not(monkeypatch):
    images, idx, patch, weight, bias, pos_embed = _embed_case()
    tokens = torch.randn(2, 9, 4)
    for backend, expect in (("auto", True), ("reference", False)):
        calls = []
        for name in ("_reference_patch_forward", "_reference_patch_backward",
                     "_reference_token_backward"):
            original = getattr(pg, name)
            monkeypatch.setattr(pg, name, lambda *a, _o=original, _n=name, _c=calls:
                                (_c.append(_n), _o(*a))[1])
        leaves = _leaves(images, weight, bias, pos_embed)
        out = patch_gather(leaves[0], idx, patch, *leaves[1:], backend=backend)
        out.sum().backward()
        token_leaf = tokens.clone().requires_grad_()
        gathered = token_gather(token_leaf, idx % 9, backend=backend)
        gathered.sum().backward()
        monkeypatch.undo()
        names = (out.grad_fn.name(), gathered.grad_fn.name())
        assert ("densesim_patch_gather" in names[0] and "densesim_token_gather" in names[1]) == expect
        assert (set(calls) == {"_reference_patch_forward", "_reference_patch_backward",
                               "_reference_token_backward"}) == expect, (backend, calls)


def test_opcheck_registered_ops():
    images, idx, patch, weight, bias, pos_embed = _embed_case()
    forward, backward = OPS.patch_gather.default, OPS.patch_gather_backward.default
    leaves = _leaves(images, weight, bias, pos_embed)
    # embedded, every input requiring grad (checks the autograd registration and the backward op)
    torch.library.opcheck(forward, (leaves[0], idx, patch, *leaves[1:], None, False))
    # only the table trains (SIM's frozen patch embedding has none at all); no bias
    torch.library.opcheck(forward, (images, idx, patch, weight, None,
                                    pos_embed.clone().requires_grad_(), None, False))
    # the plain gather, and an explicit (autocast) matmul dtype
    torch.library.opcheck(forward, (images.clone().requires_grad_(), idx, patch, None, None, None,
                                    None, False))
    torch.library.opcheck(forward, (leaves[0], idx, patch, leaves[1], None, None, torch.bfloat16,
                                    False))
    out = forward(images, idx, patch, weight, bias, pos_embed, None, False)
    upstream = torch.randn_like(out)
    for needs in ((True, True, True, True), (False, False, True, True), (True, False, False, False)):
        torch.library.opcheck(backward, (upstream, images, idx, patch, weight, None, bias.dtype,
                                         pos_embed.dtype, *needs, False))
    plain_upstream = torch.randn(2, 5, 48)
    torch.library.opcheck(backward, (plain_upstream, images, idx, patch, None, None, None, None,
                                     True, False, False, False, False))
    tokens = torch.randn(3, 11, 6)
    token_idx = torch.randint(0, 11, (3, 8))
    token_idx[:, 1] = token_idx[:, 0]  # duplicates
    for unique in (False, True):
        torch.library.opcheck(OPS.token_gather.default,
                              (tokens.clone().requires_grad_(), token_idx, unique, False))
    torch.library.opcheck(OPS.token_gather_backward.default,
                          (torch.randn(3, 8, 6), token_idx, 11, False, False))


def _drop_in_step(images, idx, weight, bias, pos_embed, tokens, token_idx, backend="auto"):
    """A user's function around the public ops (forward and backward go through the ops)."""
    embedded = patch_gather(images, idx, 4, weight, bias, pos_embed, backend=backend)
    plain = patch_gather(images, idx, 4, backend=backend)
    gathered = token_gather(tokens, token_idx, backend=backend)
    return embedded.square().sum() + 0.5 * plain.sum() + (gathered * 2.0).sin().sum()


def test_works_inside_torch_compile():
    from torch._dynamo.testing import CompileCounterWithBackend

    images, idx, _, weight, bias, pos_embed = _embed_case()  # patch 4, as _drop_in_step
    tokens, token_idx = torch.randn(2, 9, 6), torch.randint(0, 9, (2, 4))
    inputs = (images, weight, bias, pos_embed, tokens)
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(_drop_in_step, fullgraph=True, backend=counter)
    results = []
    for step in (_drop_in_step, compiled):
        leaves = _leaves(*inputs)
        loss = step(leaves[0], idx, *leaves[1:4], leaves[4], token_idx)
        results.append((loss, torch.autograd.grad(loss, leaves)))
    (loss_eager, grads_eager), (loss_compiled, grads_compiled) = results
    torch.testing.assert_close(loss_compiled, loss_eager, rtol=1e-6, atol=1e-5)
    for grad, grad_eager in zip(grads_compiled, grads_eager):
        torch.testing.assert_close(grad, grad_eager, rtol=1e-6, atol=1e-6)
    assert counter.frame_count == 1
    code = counter.graphs[0].code
    assert "densesim.patch_gather" in code and "densesim.token_gather" in code


@pytest.mark.parametrize("fullgraph", [False, True])
def test_bad_input_under_compile_gives_the_same_message(fullgraph):
    images, idx, patch, weight, _, _ = _embed_case()

    def bad_patch(images, idx, weight):
        return patch_gather(images, idx, patch, weight[:, 1:]).sum() * 2.0

    def bad_token(tokens, idx):
        return token_gather(tokens, idx[:1]).sum() * 2.0

    message = "patch_gather: weight must have shape"
    token_message = "token_gather: idx must be int64 of shape (B, K) with B=2"
    for fn, args, needle in ((bad_patch, (images, idx, weight), message),
                             (bad_token, (torch.randn(2, 9, 3), idx % 9), token_message)):
        with pytest.raises(ValueError, match=needle.replace("(", "\\(").replace(")", "\\)")):
            fn(*args)  # eager
        compiled = torch.compile(fn, fullgraph=fullgraph, backend="aot_eager")
        if fullgraph:
            with pytest.raises(Exception) as info:
                compiled(*args)
            assert needle in str(info.value)
        else:
            with pytest.raises(ValueError, match=needle.replace("(", "\\(").replace(")", "\\)")):
                compiled(*args)


@pytest.mark.parametrize("fullgraph", [False, True])
def test_out_of_range_index_under_compile_gives_the_same_message(fullgraph):
    """Inside torch.compile the range check is torch._assert_async in the graph: it fails when
    the graph runs (a RuntimeError, as on CUDA), with the eager ValueError's message."""
    images, idx, patch, weight, bias, pos_embed = _embed_case()
    bad = idx.clone()
    bad[1, 2] = 12  # N = 12

    def embed(images, idx):
        return patch_gather(images, idx, patch, weight, bias, pos_embed).sum() * 2.0

    def gather(tokens, idx):
        return token_gather(tokens, idx).sum() * 2.0

    for fn, data, message in ((embed, images, "patch_gather: idx values must lie in [0, 12)"),
                              (gather, torch.randn(2, 12, 3), "token_gather: idx values must lie in [0, 12)")):
        compiled = torch.compile(fn, fullgraph=fullgraph, backend="aot_eager")
        torch.testing.assert_close(compiled(data, idx), fn(data, idx))
        with pytest.raises(ValueError) as eager_info:
            fn(data, bad)
        assert str(eager_info.value) == message
        with pytest.raises(RuntimeError) as info:
            compiled(data, bad)
        assert message in str(info.value)


def test_meta_tensors_need_no_values():
    batch, channels, size, patch, dim, count = 128, 3, 224, 16, 768, 78  # the recipe's shapes
    images = torch.empty(batch, channels, size, size, device="meta", requires_grad=True)
    weight = torch.empty(dim, channels, patch, patch, device="meta", requires_grad=True)
    bias = torch.empty(dim, device="meta", requires_grad=True)
    pos_embed = torch.empty(196, dim, device="meta", requires_grad=True)
    idx = torch.empty(batch, count, dtype=torch.int64, device="meta")
    out = patch_gather(images, idx, patch, weight, bias, pos_embed)  # check_index=True: no read
    assert out.device.type == "meta" and out.shape == (batch, count, dim)
    out.sum().backward()
    for leaf in (images, weight, bias, pos_embed):
        assert leaf.grad.shape == leaf.shape and leaf.grad.device.type == "meta"
    plain = patch_gather(images.detach().bfloat16(), idx, patch)
    assert plain.shape == (batch, count, 768) and plain.dtype == torch.bfloat16
    tokens = torch.empty(batch, 196, dim, device="meta", requires_grad=True)
    gathered = token_gather(tokens, idx)
    assert gathered.shape == (batch, count, dim) and gathered.device.type == "meta"
    gathered.sum().backward()
    assert tokens.grad.shape == tokens.shape


def test_no_host_syncs_on_the_op_path():
    """Forward + backward of every public op on the registered op's reference maths (backend
    'auto' on CPU), default arguments (index checks on): no Python-level read of a value."""
    images, idx, patch, weight, bias, pos_embed = _embed_case()
    tokens = torch.randn(2, 12, 5)
    leaves = _leaves(images, weight, bias, pos_embed)
    token_leaf = tokens.clone().requires_grad_()
    with count_host_syncs() as syncs:
        out = patch_gather(leaves[0], idx, patch, *leaves[1:])
        plain = patch_gather(leaves[0], idx, patch)
        gathered = token_gather(token_leaf, idx)
        (out.sum() + plain.sum() + gathered.sum()).backward()
    assert not syncs, syncs.report()
    assert all(leaf.grad is not None for leaf in leaves) and token_leaf.grad is not None


def test_index_check_runs_on_the_device(monkeypatch):
    """The range check goes through _check_on_device (a 0-d bool tensor, no host read);
    check_index=False skips it."""
    images, idx, patch, weight, bias, pos_embed = _embed_case()
    seen = []
    original = pg._check_on_device
    monkeypatch.setattr(pg, "_check_on_device",
                        lambda ok, message: (seen.append((ok, message)), original(ok, message))[1])
    patch_gather(images, idx, patch, weight, bias, pos_embed)
    token_gather(torch.randn(2, 7, 3), idx % 7)
    assert [message for _, message in seen] == ["patch_gather: idx values must lie in [0, 12)",
                                                "token_gather: idx values must lie in [0, 7)"]
    assert all(ok.dim() == 0 and ok.dtype == torch.bool for ok, _ in seen)
    seen.clear()
    patch_gather(images, idx, patch, weight, bias, pos_embed, check_index=False)
    token_gather(torch.randn(2, 7, 3), idx % 7, check_index=False)
    assert seen == []


def test_check_index_false_as_the_vit_calls_it():
    """engine/models/vit.py: weight/bias cast to the images' dtype, the fp32 sin-cos table,
    check_index=False; equals the float64 Conv2d reference."""
    images, idx, patch, weight, bias, pos_embed = _embed_case(count=7)
    out = patch_gather(images, idx, patch, weight.to(images.dtype), bias.to(images.dtype),
                       pos_embed, check_index=False)
    expected = _gather_rows(_conv_tokens64(images, weight, bias, patch), idx) + pos_embed.double()[idx]
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("images_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("weight_form", ["flat", "conv", "transposed"])
@pytest.mark.parametrize("has_bias,has_pos", [(True, True), (True, False), (False, True),
                                              (False, False)])
def test_op_path_equals_reference_bit_for_bit_under_autocast(autocast, images_dtype, weight_form,
                                                             has_bias, has_pos):
    """The CPU 'auto' path (the registered op) used to run patch_gather_reference itself, whose
    matmul autocast turns into a bf16 one: the op reproduces that exactly (output dtype, values and
    gradients), with and without torch.autocast('cpu', dtype=torch.bfloat16)."""
    images, idx, patch, weight, bias, pos_embed = _embed_case(dim=9, count=6)
    images = images.to(images_dtype)
    if weight_form == "conv":
        weight = weight.reshape(9, 3, patch, patch)
    elif weight_form == "transposed":
        weight = weight.t().contiguous().t()
    bias = bias if has_bias else None
    pos_embed = pos_embed if has_pos else None
    upstream_seed = int(torch.randint(0, 2**31, ()))
    results = []
    for backend in ("auto", "reference"):
        leaves = _leaves(images, weight, bias, pos_embed)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = patch_gather(leaves[0], idx, patch, *leaves[1:], backend=backend)
        upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(upstream_seed))
        results.append((out, _grads(out, leaves, upstream.to(out.dtype))))
    (out, grads), (ref, ref_grads) = results
    assert out.dtype == ref.dtype and torch.equal(out, ref)
    for name, grad, ref_grad in zip(("images", "weight", "bias", "pos_embed"), grads, ref_grads):
        assert (grad is None) == (ref_grad is None), name
        if grad is not None:
            assert grad.dtype == ref_grad.dtype and torch.equal(grad, ref_grad), name


# edge inputs, against float64, on the op path ("auto") and the plain reference ("reference")
EDGE_CASES = [
    # batch, channels, height, width, patch, dim, count, duplicates
    (2, 3, 12, 16, 4, 5, 1, False),   # K = 1: one patch per image
    (3, 2, 5, 5, 5, 6, 3, True),      # N = 1: a single patch, gathered three times
    (0, 3, 8, 8, 4, 5, 3, False),     # B = 0: empty batch (legal: empty output, zero gradients)
    (2, 3, 8, 8, 4, 5, 0, False),     # K = 0: nothing gathered
    (1, 1, 3, 3, 1, 1, 4, True),      # p = 1, C = 1, D = 1 (C*p*p = 1)
]


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("batch,channels,height,width,patch,dim,count,duplicates", EDGE_CASES)
def test_edge_shapes_against_float64(backend, batch, channels, height, width, patch, dim, count,
                                     duplicates):
    num_patches = (height // patch) * (width // patch)
    images = torch.randn(batch, channels, height, width)
    weight = torch.randn(dim, channels * patch * patch) * 0.3
    bias, pos_embed = torch.randn(dim), torch.randn(num_patches, dim)
    idx = (torch.randint(0, num_patches, (batch, count)) if duplicates or batch == 0
           else _random_indices(batch, num_patches, count))
    leaves = _leaves(images, weight, bias, pos_embed)
    out = patch_gather(leaves[0], idx, patch, *leaves[1:], backend=backend)
    assert out.shape == (batch, count, dim) and out.dtype == torch.float32
    leaves64 = _leaves(images, weight, bias, pos_embed, dtype=torch.float64)
    expected = _gather_rows(_conv_tokens64(leaves64[0], leaves64[1], leaves64[2], patch), idx)
    expected = expected + leaves64[3][idx]
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)
    upstream = torch.randn(out.shape)
    for name, grad, grad64 in zip(("images", "weight", "bias", "pos_embed"),
                                  _grads(out, leaves, upstream),
                                  _grads(expected, leaves64, upstream.double())):
        assert grad.shape == grad64.shape, name
        torch.testing.assert_close(grad.double(), grad64, rtol=1e-5, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")
    plain = patch_gather(leaves[0], idx, patch, backend=backend)
    unfolded = F.unfold(images.double(), kernel_size=patch, stride=patch).transpose(1, 2)
    assert plain.shape == (batch, count, channels * patch * patch)
    torch.testing.assert_close(plain.double(), _gather_rows(unfolded, idx), rtol=0, atol=0)


TOKEN_EDGE_CASES = [
    # batch, num_tokens, dim, count, index pattern
    (3, 10, 6, 1, "random"),     # K = 1
    (2, 1, 5, 4, "random"),      # N = 1: every index is 0
    (0, 7, 4, 3, "random"),      # B = 0
    (2, 9, 1, 6, "same"),        # D = 1, every k picks the same token: gradients add up K times
    (3, 8, 5, 8, "permutation"),  # K = N, unique
]


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("batch,num_tokens,dim,count,pattern", TOKEN_EDGE_CASES)
def test_token_gather_edge_shapes_against_float64(backend, batch, num_tokens, dim, count, pattern):
    tokens = torch.randn(dim, num_tokens, batch).permute(2, 1, 0)  # non-contiguous
    if pattern == "same":
        idx = torch.randint(0, num_tokens, (batch, 1)).expand(batch, count)  # stride-0 index
    elif pattern == "permutation":
        idx = _random_indices(batch, num_tokens, count)
    else:
        idx = torch.randint(0, num_tokens, (batch, count))
    for unique in ((False, True) if pattern == "permutation" else (False,)):
        (leaf,) = _leaves(tokens)
        out = token_gather(leaf, idx, backend=backend, unique_indices=unique)
        assert out.shape == (batch, count, dim)
        torch.testing.assert_close(out, _gather_rows(tokens, idx), rtol=0, atol=0)
        upstream = torch.randn(out.shape)
        (grad,) = torch.autograd.grad(out, leaf, upstream)
        expected = torch.zeros(batch, num_tokens, dim, dtype=torch.float64)
        for b in range(batch):
            for k in range(count):
                expected[b, idx[b, k]] += upstream[b, k].double()
        torch.testing.assert_close(grad.double(), expected, rtol=1e-6, atol=1e-6)


def test_bad_index_values_raise_the_one_line_value_error_on_cpu():
    images, idx, patch, weight, bias, pos_embed = _embed_case()
    for value in (-1, 12, 1 << 40):
        bad = idx.clone()
        bad[1, 0] = value
        with pytest.raises(ValueError) as info:
            patch_gather(images, bad, patch, weight, bias, pos_embed)
        assert str(info.value) == "patch_gather: idx values must lie in [0, 12)"
        with pytest.raises(ValueError) as info:
            token_gather(torch.randn(2, 12, 3), bad)
        assert str(info.value) == "token_gather: idx values must lie in [0, 12)"
        # the reference backend is checked the same way
        with pytest.raises(ValueError, match="idx values"):
            patch_gather(images, bad, patch, backend="reference")
