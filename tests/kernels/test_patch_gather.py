"""patch_gather / token_gather against float64 Conv2d / unfold references (fresh random inputs)."""
import pytest
import torch
import torch.nn.functional as F

from kernels import patch_gather, patch_gather_reference, token_gather


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
