"""Optimisers of the published recipes: AdamW (SIM), SGD (MoCo v2, DenseCL, SimSiam), LARS
(PixPro, BYOL) and LAMB (apex, optional), with each recipe's weight-decay rule.

Weight-decay rules (`cfg.weight_decay_filter`):
  "bias_norm"  no decay on biases and on every 1-d tensor (norm weights), decay on the rest
               (SIM's released code; PixPro's and BYOL's LARS, which also exclude the same
               tensors from the trust-ratio adaptation)
  "none"       decay on every trainable tensor (MoCo v2, DenseCL and SimSiam hand
               `model.parameters()` to SGD with weight_decay=1e-4)
Frozen tensors (SIM's patch embedding, every EMA target) are never handed to the optimiser.

LARS (PixPro `contrast/lars.py`, the same update as BYOL's `optimizers.lars`): for every tensor not
excluded, g ← g + wd·p, then g ← g · η‖p‖ / (‖g‖ + 1e-8) when ‖p‖ > 0 and ‖g‖ > 0; excluded tensors
(biases, norms) get neither decay nor adaptation; then momentum SGD: buf ← μ·buf + g, p ← p − lr·buf.
It runs as `_foreach` ops with the trust ratios computed on the device (no host sync).
"""
from __future__ import annotations

import torch
from torch.distributed.tensor import DTensor

from engine.presets import ConfigError, PretrainConfig

OPTIMIZERS = ("adamw", "sgd", "lars", "lamb")
WEIGHT_DECAY_FILTERS = ("bias_norm", "none")


def parameter_groups(model: torch.nn.Module, weight_decay: float,
                     decay_filter: str = "bias_norm") -> list[dict]:
    """[decayed group, excluded group] over the trainable parameters (see the module docstring).
    The excluded group carries `lars_exclude=True`."""
    if decay_filter not in WEIGHT_DECAY_FILTERS:
        raise ConfigError(f"unknown weight-decay filter {decay_filter!r}: use "
                          f"{', '.join(WEIGHT_DECAY_FILTERS)}")
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        excluded = decay_filter == "bias_norm" and (param.ndim <= 1 or name.endswith(".bias"))
        (no_decay if excluded else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay, "lars_exclude": False},
            {"params": no_decay, "weight_decay": 0.0, "lars_exclude": True}]


class LARS(torch.optim.Optimizer):
    """Layer-wise adaptive rate scaling around momentum SGD (module docstring). Groups with
    `lars_exclude=True` get plain momentum SGD without weight decay."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 trust_coefficient: float = 1e-3, eps: float = 1e-8):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError("LARS: lr, momentum and weight_decay must be >= 0, "
                             "trust_coefficient > 0")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                        trust_coefficient=trust_coefficient, eps=eps, lars_exclude=False)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if not group["lars_exclude"]:
                if group["weight_decay"]:
                    grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
                param_norms = torch.stack(torch._foreach_norm(params))
                grad_norms = torch.stack(torch._foreach_norm(grads))
                ratio = group["trust_coefficient"] * param_norms / (grad_norms + group["eps"])
                ratio = torch.where((param_norms > 0) & (grad_norms > 0), ratio,
                                    torch.ones_like(ratio))
                grads = torch._foreach_mul(grads, list(ratio.unbind(0)))
            buffers = []
            for p, g in zip(params, grads):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buffers.append(state["momentum_buffer"])
            found_inf = getattr(self, "found_inf", None)
            if found_inf is None:
                torch._foreach_mul_(buffers, group["momentum"])
                torch._foreach_add_(buffers, grads)
                torch._foreach_add_(params, buffers, alpha=-group["lr"])
                continue
            # a step that may be skipped (engine.trainer sets found_inf, a device tensor): the
            # same arithmetic into new tensors, kept only where found_inf is 0 -- no host sync
            keep = found_inf.reshape(()) == 0
            new_buffers = torch._foreach_mul(buffers, group["momentum"])
            torch._foreach_add_(new_buffers, grads)
            new_params = torch._foreach_add(params, new_buffers, alpha=-group["lr"])
            for old, new in zip(buffers + params, new_buffers + new_params):
                old.copy_(torch.where(keep, new, old))
        return loss


def make_optimizer(model: torch.nn.Module, cfg: PretrainConfig) -> torch.optim.Optimizer:
    """The recipe's optimiser over `model`'s trainable parameters. The lr is set every step from
    the schedule; the value given here is a placeholder."""
    groups = parameter_groups(model, cfg.weight_decay, cfg.weight_decay_filter)
    groups = [g for g in groups if g["params"]]
    if cfg.optimizer == "adamw":
        for g in groups:
            g.pop("lars_exclude")
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=True)
    if cfg.optimizer == "sgd":
        for g in groups:
            g.pop("lars_exclude")
        # DTensor (--fsdp) has no fused SGD: the foreach one, whose skip of a non-finite step
        # reads `ok` on the host (engine.trainer._step_unless_bad)
        sharded = any(isinstance(p, DTensor) for g in groups for p in g["params"])
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.sgd_momentum,
                               fused=not sharded, foreach=sharded or None)
    if cfg.optimizer == "lars":
        return LARS(groups, lr=cfg.lr, momentum=cfg.sgd_momentum,
                    weight_decay=cfg.weight_decay, trust_coefficient=cfg.lars_trust)
    if cfg.optimizer == "lamb":
        try:
            from apex.optimizers import FusedLAMB  # NVIDIA apex; not on PyPI
        except ImportError as exc:
            raise ConfigError("--optimizer lamb needs NVIDIA apex (built from source; the 'apex' "
                              "package on PyPI is unrelated): use --optimizer adamw") from exc
        for g in groups:
            g.pop("lars_exclude")
        return FusedLAMB(groups, lr=cfg.lr, betas=cfg.betas)
    raise ConfigError(f"unknown optimizer {cfg.optimizer!r}: use {', '.join(OPTIMIZERS)}")


__all__ = ["LARS", "OPTIMIZERS", "WEIGHT_DECAY_FILTERS", "make_optimizer", "parameter_groups"]
