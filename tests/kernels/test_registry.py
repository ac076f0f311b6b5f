"""The kernel contract across every op (issue 10, point 1): each public op of `kernels` runs as a
registered `densesim::` torch op when called with backend="auto", and every registered op has a
fake implementation. A new op added to `kernels.__all__` without being registered fails here."""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import kernels

# public op -> the registered op(s) its forward must dispatch to
PUBLIC_OPS = {
    "patch_gather": {"patch_gather"},
    "token_gather": {"token_gather"},
    "relpos_embed": {"relpos_embed"},
    "relpos_query_embed": {"relpos_query_embed"},
    "unigrad_covariance": {"unigrad_covariance"},
    "unigrad_loss": {"unigrad_loss"},
    "dense_match": {"dense_match"},
    "geometric_correspondence": {"geometric_correspondence"},
    "pixpro_loss": {"pixpro_loss"},
    "queue_infonce": {"queue_infonce"},
    "queue_infonce_grouped": {"queue_infonce_grouped"},
    "pixel_propagation": {"pixel_propagation"},
    "sinkhorn": {"sinkhorn"},
    "roi_align": {"roi_align"},
    "linear_sum_assignment": {"linear_sum_assignment"},
    "batched_linear_sum_assignment": {"linear_sum_assignment"},
    "ms_deform_attn": {"ms_deform_attn"},
}
# helpers that are not ops: references (plain autograd, by design) and geometry/table builders
NOT_OPS = {"absolute_sincos_table", "relpos_coordinates", "grid_sample_coordinates",
           "pixpro_normalised_boxes", "pixpro_positive_mask"}


class OpNames(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "densesim":
            self.names.add(func._opname)
        return func(*args, **(kwargs or {}))


def unit(*shape):
    return torch.nn.functional.normalize(torch.randn(*shape), dim=-1)


def calls():
    boxes = torch.tensor([[[0.0, 0.0, 16.0, 16.0], [4.0, 2.0, 10.0, 12.0]]])
    flips = torch.tensor([[False, True]])
    rel = torch.tensor([[0.1, -0.2, 1.1, 0.9, 0.0, 0.3]])
    dim = 8
    return {
        "patch_gather": lambda: kernels.patch_gather(
            torch.randn(1, 3, 8, 8), torch.tensor([[0, 3]]), 4, torch.randn(dim, 48),
            torch.randn(dim), torch.randn(4, dim)),
        "token_gather": lambda: kernels.token_gather(torch.randn(1, 5, dim), torch.tensor([[0, 4]])),
        "relpos_embed": lambda: kernels.relpos_embed(rel, 2, dim),
        "relpos_query_embed": lambda: kernels.relpos_query_embed(
            rel, 2, torch.randn(dim, 2 * dim), torch.randn(dim), torch.randn(1, 1, dim)),
        "unigrad_covariance": lambda: kernels.unigrad_covariance(torch.randn(2, 4, dim)),
        "unigrad_loss": lambda: kernels.unigrad_loss(torch.randn(2, 4, dim),
                                                     torch.randn(2, 4, dim)),
        "dense_match": lambda: kernels.dense_match(torch.randn(1, 4, dim), torch.randn(1, 4, dim)),
        "geometric_correspondence": lambda: kernels.geometric_correspondence(boxes, flips, 2),
        "pixpro_loss": lambda: kernels.pixpro_loss(
            torch.randn(1, 4, dim), torch.randn(1, 4, dim), boxes, flips, 2,
            image_size=torch.tensor([[20.0, 20.0]])),
        "queue_infonce": lambda: kernels.queue_infonce(unit(2, dim), unit(2, dim), unit(16, dim),
                                                       0.2),
        "queue_infonce_grouped": lambda: kernels.queue_infonce_grouped(
            unit(3, 2, dim), unit(3, 2, dim), unit(2, 16, dim), [0, 1, 0], 0.2),
        "pixel_propagation": lambda: kernels.pixel_propagation(torch.randn(1, 4, dim),
                                                               torch.randn(1, 4, dim)),
        "sinkhorn": lambda: kernels.sinkhorn(torch.randn(6, 10)),
        "roi_align": lambda: kernels.roi_align(
            torch.randn(2, 3, 8, 8), torch.tensor([[1, 0.5, 1.0, 6.0, 7.5]]), 2, 0.5),
        "linear_sum_assignment": lambda: kernels.linear_sum_assignment(torch.rand(4, 3)),
        "batched_linear_sum_assignment": lambda: kernels.batched_linear_sum_assignment(
            torch.rand(2, 4, 3)),
        "ms_deform_attn": lambda: kernels.ms_deform_attn(
            torch.randn(1, 6, 1, 4), torch.tensor([[2, 3]]), torch.tensor([0]),
            torch.rand(1, 2, 1, 1, 1, 2), torch.rand(1, 2, 1, 1, 1)),
    }


def test_every_public_op_is_listed_here():
    public = {name for name in kernels.__all__ if not name.endswith("_reference")}
    assert public == set(PUBLIC_OPS) | NOT_OPS, (
        "a new public op must be registered (torch.library, namespace densesim) and listed in "
        "PUBLIC_OPS, or be a helper in NOT_OPS")


def test_every_public_op_dispatches_to_its_registered_op():
    for name, call in calls().items():
        with OpNames() as seen:
            call()
        assert PUBLIC_OPS[name] <= seen.names, f"{name} ran {sorted(seen.names)}"


def test_every_registered_op_has_a_fake_implementation():
    from torch._library.custom_ops import OPDEFS

    ops = {qualname: op for qualname, op in OPDEFS.items() if qualname.startswith("densesim::")}
    expected = {f"densesim::{op}" for names in PUBLIC_OPS.values() for op in names}
    assert expected <= set(ops), sorted(expected - set(ops))
    missing = [name for name, op in ops.items() if op._abstract_fn is None]
    assert not missing, f"registered without a fake implementation: {missing}"
