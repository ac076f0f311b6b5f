"""The torchvision-named ResNet encoders (engine/models/resnet.py).

Reference numbers are torchvision's documented ones (it cannot be imported beside this torch):
resnet18 has 11,689,512 parameters and resnet50 25,557,032, each including its fc (512·1000 + 1000
and 2048·1000 + 1000); torchvision's model tables list 1.81 and 4.09 GFLOPS (multiply-accumulates)
at 224 px.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from engine.models.resnet import (
    LEVELS,
    Bottleneck,
    ResNet,
    build_resnet,
    resnet18,
    resnet50,
    resnet_flops_per_image,
    torchvision_resnet_state_keys,
)

TORCHVISION_PARAMS = {"resnet18": 11_689_512 - (512 * 1000 + 1000),
                      "resnet50": 25_557_032 - (2048 * 1000 + 1000)}
C5 = {"resnet18": 512, "resnet50": 2048}


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """Small convs on a shared machine: one thread is faster and steadier than a spinning team."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def models() -> dict[str, ResNet]:
    """One of each, built once (tests that change a model deep-copy it first)."""
    torch.manual_seed(0)
    return {"resnet18": resnet18().eval(), "resnet50": resnet50().eval()}


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_parameter_count_is_torchvisions_without_fc(models, name):
    model = models[name]
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS[name]
    assert not hasattr(model, "fc") and not hasattr(model, "avgpool")
    assert model.out_channels == C5[name]
    expansion = 4 if name == "resnet50" else 1
    assert model.channels == {lv: c * expansion for lv, c in zip(LEVELS, (64, 128, 256, 512))}
    assert model.stride == {"c2": 4, "c3": 8, "c4": 16, "c5": 32}


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_state_dict_names_shapes_and_order_are_torchvisions(models, name):
    state = models[name].state_dict()
    reference = torchvision_resnet_state_keys(name)
    assert list(state) == list(reference)
    assert {k: tuple(v.shape) for k, v in state.items()} == dict(reference)
    assert state["bn1.num_batches_tracked"].dtype == torch.int64
    # spot checks written out literally
    assert "layer2.0.downsample.1.running_var" in state
    assert "layer3.0.downsample.0.weight" in state
    assert not any(k.startswith("layer4.1.downsample") for k in state)
    assert not any(k.startswith(("fc.", "avgpool")) for k in state)
    assert state["conv1.weight"].shape == (64, 3, 7, 7)
    if name == "resnet50":
        assert state["layer3.5.conv3.weight"].shape == (1024, 256, 1, 1)
        assert state["layer1.0.downsample.0.weight"].shape == (256, 64, 1, 1)  # width change
        assert state["layer4.2.bn3.running_mean"].shape == (2048,)
        assert len(state) == 320 - 2      # torchvision: 320 entries with fc.weight, fc.bias
    else:
        assert "layer1.0.downsample.0.weight" not in state                      # 64 → 64
        assert state["layer4.1.conv2.weight"].shape == (512, 512, 3, 3)
        assert "layer1.0.conv3.weight" not in state
        assert len(state) == 122 - 2


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_cifar_stem_keeps_the_names(name):
    model = build_resnet(name, cifar_stem=True)
    state = model.state_dict()
    reference = torchvision_resnet_state_keys(name)
    assert list(state) == list(reference)
    assert state["conv1.weight"].shape == (64, 3, 3, 3)
    assert (model.conv1.stride, model.conv1.padding) == ((1, 1), (1, 1))
    assert isinstance(model.maxpool, nn.Identity)
    assert model.stride == {"c2": 1, "c3": 2, "c4": 4, "c5": 8}
    assert sum(p.numel() for p in model.parameters()) == TORCHVISION_PARAMS[name] - 64 * 3 * 40


def test_stride_placement_is_v1_5(models):
    stem = models["resnet50"].conv1
    assert (stem.kernel_size, stem.stride, stem.padding) == ((7, 7), (2, 2), (3, 3))
    assert stem.bias is None
    pool = models["resnet50"].maxpool
    assert (pool.kernel_size, pool.stride, pool.padding) == (3, 2, 1)
    for name, model in models.items():
        for k, stage in enumerate(model.stages):
            first = stage[0]
            want = (2, 2) if k > 0 else (1, 1)
            if name == "resnet50":
                assert isinstance(first, Bottleneck)
                assert first.conv1.stride == (1, 1) and first.conv2.stride == want
                assert first.conv3.stride == (1, 1)
            else:
                assert first.conv1.stride == want and first.conv2.stride == (1, 1)
            if first.downsample is not None:
                assert first.downsample[0].stride == want
                assert isinstance(first.downsample[1], nn.BatchNorm2d)
            for block in stage[1:]:
                assert all(m.stride == (1, 1) for m in block.modules()
                           if isinstance(m, nn.Conv2d))
        assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Conv2d))


def _conv_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of every conv, counted from the shapes seen in a forward pass."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        k = module.kernel_size[0] * module.kernel_size[1]
        total += output[0].numel() * (module.in_channels // module.groups) * k

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return total


@pytest.mark.parametrize("name, cifar, size", [("resnet18", False, 224), ("resnet50", False, 64),
                                               ("resnet18", True, 32), ("resnet50", True, 32)])
def test_output_shapes_per_level(models, name, cifar, size):
    model = models[name] if not cifar else build_resnet(name, cifar_stem=True).eval()
    x = torch.randn(1, 3, size, size)
    with torch.no_grad():
        feats = model.forward_features(x)
        out = model(x)
    assert list(feats) == list(LEVELS)
    for level, f in feats.items():
        s = model.stride[level]
        assert f.shape == (1, model.channels[level], size // s, size // s), level
    assert out.shape == (1, C5[name], size // model.stride["c5"], size // model.stride["c5"])
    torch.testing.assert_close(out, feats["c5"], rtol=0, atol=0)
    # the analytic FLOPs equal the conv MACs of this very forward pass
    assert resnet_flops_per_image(name, size, cifar_stem=cifar) == 2 * _conv_macs(model, x)


def test_forward_features_runs_only_as_far_as_needed(models):
    model = models["resnet18"]
    calls = []
    handles = [stage.register_forward_hook(lambda m, i, o, k=k: calls.append(k))
               for k, stage in enumerate(model.stages)]
    x = torch.randn(2, 3, 40, 48)
    try:
        with torch.no_grad():
            feats = model.forward_features(x, levels=("c3", "c2"))
            assert calls == [0, 1] and set(feats) == {"c2", "c3"}
            calls.clear()
            c4 = model.forward_features(x, levels="c4")
            assert calls == [0, 1, 2] and list(c4) == ["c4"]
            full = model.forward_features(x)
    finally:
        for h in handles:
            h.remove()
    torch.testing.assert_close(feats["c2"], full["c2"], rtol=0, atol=0)
    torch.testing.assert_close(c4["c4"], full["c4"], rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"^unknown feature level"):
        model.forward_features(x, levels=("c6",))


def test_initialisation_matches_torchvision():
    torch.manual_seed(1)
    model = resnet50()
    big = model.layer4[0].conv2.weight            # 512×512×3×3: fan_out = 512·9
    want = math.sqrt(2.0 / (512 * 9))
    assert abs(big.std().item() / want - 1) < 0.1
    assert abs(big.mean().item()) < 0.1 * want
    stem = model.conv1.weight                     # fan_out = 64·49
    assert abs(stem.std().item() / math.sqrt(2.0 / (64 * 49)) - 1) < 0.1
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))
            assert torch.equal(m.running_var, torch.ones_like(m.running_var))


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_zero_init_residual(name):
    model = build_resnet(name, zero_init_residual=True, cifar_stem=True).eval()
    last = "bn3" if name == "resnet50" else "bn2"
    for block_name, block in model.named_modules():
        if block_name.count(".") != 1 or not block_name.startswith("layer"):
            continue
        for bn_name, bn in block.named_children():
            if isinstance(bn, nn.BatchNorm2d):
                zero = bn_name == last
                assert torch.equal(bn.weight, torch.full_like(bn.weight, 0.0 if zero else 1.0))
    # each block without a projection starts as the identity on non-negative inputs
    block = model.layer2[1]
    x = torch.rand(2, model.channels["c3"], 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(block(x.clone()), x, rtol=0, atol=0)
    plain = build_resnet(name)
    assert all(torch.equal(getattr(b, last).weight, torch.ones_like(getattr(b, last).weight))
               for stage in plain.stages for b in stage)


def test_tiny_forward_backward():
    torch.manual_seed(2)
    model = resnet18(cifar_stem=True).train()
    x = torch.randn(2, 3, 16, 16)
    out = model(x)
    assert out.shape == (2, 512, 2, 2)
    out.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.conv1.weight.grad.abs().sum() > 0
    assert int(model.bn1.num_batches_tracked) == 1


def test_channels_last_and_sync_batchnorm(models):
    model = models["resnet18"]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model(x)
        last = copy.deepcopy(model).to(memory_format=torch.channels_last)
        out = last(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(model))
    bns = [m for m in synced.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert bns and all(isinstance(m, nn.SyncBatchNorm) for m in bns)
    assert len(bns) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert list(synced.state_dict()) == list(model.state_dict())
    with torch.no_grad():   # eval mode: running statistics, no process group needed
        torch.testing.assert_close(synced.eval()(x), ref, rtol=0, atol=0)


def test_flops_match_the_published_numbers():
    # torchvision: 4.09 and 1.81 GMAC at 224 px (2 FLOPs per MAC)
    assert abs(resnet_flops_per_image("resnet50", 224) / 8.18e9 - 1) < 0.02
    assert abs(resnet_flops_per_image("resnet18", 224) / 3.62e9 - 1) < 0.02
    assert resnet_flops_per_image("resnet50", (224, 224)) == resnet_flops_per_image("resnet50",
                                                                                    224)
    # 32 px with the CIFAR stem (no downsampling in the stem): ~0.56 GFLOP for resnet18
    assert abs(resnet_flops_per_image("resnet18", 32, cifar_stem=True) / 1.11e9 - 1) < 0.02


def test_unknown_name_is_a_one_line_error():
    for call in (lambda: build_resnet("resnet34"), lambda: torchvision_resnet_state_keys("vit"),
                 lambda: resnet_flops_per_image("resnet101", 224)):
        with pytest.raises(ValueError, match=r"^unknown ResNet '\w+': use one of resnet18, "
                                             r"resnet50$"):
            call()
