"""Loss terms.

A term is a function ``term(ctx, **params) -> scalar tensor`` registered under a name. It reads
what it needs from the step's :class:`~dfkd.engine.StepContext` (images, labels, teacher and
student logits, BN statistics, tapped features); the context computes each of those on first
use only. A phase's loss is ``Σ weight × term`` over the terms its config names::

    losses:
      kd_kl: {weight: 1.0, T: 4}
      ce: 0.1

Terms that need something a run might lack say so in ``needs`` so that a config asking for
them fails at start-up, not after an hour.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .errors import ConfigError
from .registry import Registry, nearest

LOSSES: Registry[Callable] = Registry("loss term")


def register(name: str, needs: tuple[str, ...] = ()):
    """Register a loss term; ``needs`` ⊂ {"teacher", "teacher_bn", "labels", "generator"}."""

    def decorator(fn):
        fn.needs = needs
        return LOSSES.register(name)(fn)

    return decorator


# --------------------------------------------------------------------------------------
# Building a phase's weighted sum from config
# --------------------------------------------------------------------------------------
@dataclass
class WeightedTerm:
    name: str
    weight: float
    fn: Callable
    params: dict[str, Any]

    def __call__(self, ctx) -> torch.Tensor:
        return self.fn(ctx, **self.params)


def build_terms(spec: dict[str, Any], where: str) -> list[WeightedTerm]:
    """``{name: weight}`` or ``{name: {weight: w, **params}}`` → terms, parameters checked
    against each term's signature so a misspelt parameter fails here, naming its key."""
    terms = []
    for name, value in spec.items():
        base = name.split("@")[0]  # "kd_kl@soft" lets one phase use a term twice with other params
        fn = LOSSES.get(base)
        params = dict(value) if isinstance(value, dict) else {"weight": value}
        weight = params.pop("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise ConfigError(f"{where}.{name}.weight must be a number, got {weight!r}")
        accepted = [p for p in inspect.signature(fn).parameters if p != "ctx"]
        for key in params:
            if key not in accepted:
                close = nearest(key, accepted)
                hint = f"; did you mean '{close[0]}'?" if close else f"; it takes {', '.join(accepted) or 'none'}"
                raise ConfigError(f"{where}.{name}: loss term '{base}' has no parameter '{key}'{hint}")
        terms.append(WeightedTerm(name, float(weight), fn, params))
    return terms


# --------------------------------------------------------------------------------------
# Supervised and response-based KD terms
# --------------------------------------------------------------------------------------
@register("ce", needs=("labels",))
def ce(ctx, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of the student's logits against the batch's labels."""
    return F.cross_entropy(ctx.student_logits, ctx.labels, label_smoothing=label_smoothing)


def kd_kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """KL(p_T ‖ p_S) at temperature T, batch mean, times T² so that gradients keep their scale
    as T changes (Hinton et al. 2015)."""
    log_p_s = F.log_softmax(student_logits.float() / T, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / T, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True) * T * T


@register("kd_kl", needs=("teacher",))
def kd_kl(ctx, T: float = 1.0) -> torch.Tensor:
    """Soft-target distillation: KL(teacher ‖ student) at temperature T, with the T² factor."""
    return kd_kl_divergence(ctx.student_logits, ctx.teacher_logits, T)


@register("l1_logits", needs=("teacher",))
def l1_logits(ctx) -> torch.Tensor:
    """Mean absolute difference of logits (DFAD's student loss)."""
    return F.l1_loss(ctx.student_logits.float(), ctx.teacher_logits.float())


@register("mse_logits", needs=("teacher",))
def mse_logits(ctx) -> torch.Tensor:
    return F.mse_loss(ctx.student_logits.float(), ctx.teacher_logits.float())
