"""Data-free priors and objectives: what synthesis optimizes (BatchNorm statistics, image
priors, the teacher's confidence and class balance) and the generator's adversarial objectives,
which reward teacher-student disagreement."""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from dfkd.methods.losses.base import Term, choice, register
from dfkd.methods.losses.response import KL_REDUCTIONS, kl_per_sample, l1_logits
from dfkd.nets.taps import EMBEDDING
from dfkd_base.errors import ConfigError

_BN_DISTANCES = {"l2": lambda a, b: torch.linalg.vector_norm(a - b), "mse": F.mse_loss}


def bn_layer_distances(stats, norm: str = "l2") -> list[torch.Tensor]:
    """d(μ_l, μ̂_l) + d(σ²_l, σ̂²_l) of each layer of ``stats`` (one :class:`~dfkd.nets.taps.BNStats`
    per layer), d the L2 norm of the difference or the MSE."""
    distance = choice(_BN_DISTANCES, norm, "bn_stats.norm")
    # float32: under autocast the batch statistics may arrive in bf16, too coarse for these differences
    return [distance(s.mean.float(), s.running_mean.float()) + distance(s.var.float(), s.running_var.float())
            for s in stats]


def bn_stats_distance(stats, first_layer_weight: float = 1.0, norm: str = "l2", layers: str = "sum") -> torch.Tensor:
    """Σ_l w_l (d(μ_l, μ̂_l) + d(σ²_l, σ̂²_l)) over ``stats``, w_0 = ``first_layer_weight``, the
    others 1 (see :func:`bn_layer_distances`); ``layers="mean"`` divides by the number of layers."""
    total = sum((first_layer_weight if i == 0 else 1.0) * d for i, d in enumerate(bn_layer_distances(stats, norm)))
    return total / len(stats) if layers == "mean" else total


def bn_stats(ctx, first_layer_weight: float = 1.0, norm: str = "l2", layers: str = "sum") -> torch.Tensor:
    """Feature-distribution regularizer of DeepInversion (Yin et al. 2020):
    Σ_l w_l (‖μ_l − μ̂_l‖₂ + ‖σ²_l − σ̂²_l‖₂) over the teacher's BN layers, μ_l and σ²_l the batch
    mean and biased variance of layer l's input, μ̂_l and σ̂²_l its running statistics;
    w_0 = ``first_layer_weight``, the others 1. ``norm="mse"`` uses MSE(μ, μ̂) + MSE(σ², σ̂²)
    instead (GDFQ, Xu et al. 2020, which averages over layers where this sums).

    DeepInversion weights it 10 on CIFAR-10, and 0.01 with first_layer_weight 10 on ImageNet.
    ``layers="mean"`` divides the sum by the number of BN layers, so the term's scale does not grow
    with the teacher's depth (the papers sum, and tune their weight per teacher)."""
    return bn_stats_distance(ctx.teacher_bn, first_layer_weight, norm, layers)


@register("bn_stats", needs=("teacher", "teacher_bn"))
class BNStatistics(Term):
    """The ``bn_stats`` term (see :func:`bn_stats`), with Fast-DFKD's momentum (Fang et al. 2022,
    0.9 there): with ``momentum`` m > 0 each layer's batch statistics are blended with a running
    average over earlier batches, m·μ_prev + (1 − m)·μ (likewise σ²), before the comparison, so a
    batch is pushed to complete what earlier ones left unmatched. The average takes each batch's
    final statistics once the batch is done (``end_batch``) and is saved with the run."""

    def __init__(self, first_layer_weight: float = 1.0, norm: str = "l2", momentum: float = 0.0, layers: str = "sum"):
        super().__init__()
        choice(_BN_DISTANCES, norm, "bn_stats.norm")
        choice({"sum": 0, "mean": 0}, layers, "bn_stats.layers")
        self.layers = layers
        if not 0 <= momentum < 1:
            raise ConfigError(f"bn_stats.momentum must be in [0, 1), got {momentum}")
        self.first_layer_weight, self.norm, self.momentum = first_layer_weight, norm, momentum
        self.previous: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._current: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def forward(self, ctx) -> torch.Tensor:
        stats = ctx.teacher_bn
        if self.momentum:
            self._current = [(s.mean.detach().float(), s.var.detach().float()) for s in stats]
            if self.previous is not None:
                m = self.momentum
                stats = [s._replace(mean=m * pm + (1 - m) * s.mean.float(), var=m * pv + (1 - m) * s.var.float())
                         for s, (pm, pv) in zip(stats, self.previous)]
        return bn_stats_distance(stats, self.first_layer_weight, self.norm, self.layers)

    def end_batch(self) -> None:
        if not self.momentum or self._current is None:
            return
        m = self.momentum
        self.previous = self._current if self.previous is None else [
            (m * pm + (1 - m) * cm, m * pv + (1 - m) * cv) for (pm, pv), (cm, cv) in zip(self.previous, self._current)]
        self._current = None

    def get_extra_state(self) -> dict:
        return {"previous": [list(p) for p in self.previous] if self.previous is not None else None}

    def set_extra_state(self, state: dict) -> None:
        previous = state["previous"]
        self.previous = [tuple(p) for p in previous] if previous is not None else None


_TV_NORMS = {"l2": torch.linalg.vector_norm, "l1": lambda d: d.abs().mean()}


@register("tv")
def tv(ctx, norm: str = "l2") -> torch.Tensor:
    """Total variation prior of DeepInversion: Σ_d ‖Δ_d x‖₂ over the differences of neighbouring
    pixels in four directions (horizontal, vertical, both diagonals), each norm taken over the
    whole batch; ``norm="l1"`` sums their mean absolute values instead.

    DeepInversion weights the l2 form 2.5e-5 on CIFAR-10 (up to 1e-3 for smoother images) and
    1e-4 on ImageNet. Its l1 form also divides by 255; divide its weights by 255 for this one."""
    measure = choice(_TV_NORMS, norm, "tv.norm")
    x = ctx.teacher_images.float()
    differences = (x[:, :, :, :-1] - x[:, :, :, 1:], x[:, :, :-1, :] - x[:, :, 1:, :],
                   x[:, :, 1:, :-1] - x[:, :, :-1, 1:], x[:, :, :-1, :-1] - x[:, :, 1:, 1:])
    return sum(measure(d) for d in differences)


@register("l2_prior")
def l2_prior(ctx) -> torch.Tensor:
    """Mean over the batch of each image's L2 norm (DeepInversion; weight 1e-5 on ImageNet,
    around 3e-8 or off on CIFAR-10)."""
    return torch.linalg.vector_norm(ctx.teacher_images.float().flatten(1), dim=1).mean()


_ONEHOT_TARGETS = {"argmax": lambda ctx: ctx.teacher_logits.argmax(1), "labels": lambda ctx: ctx.labels}


@register("onehot_ce", needs=("teacher",))
def onehot_ce(ctx, target: str = "argmax") -> torch.Tensor:
    """Cross-entropy of the teacher's logits against target classes: the teacher's own argmax
    (``"argmax"``, DAFL's one-hot loss, Chen et al. 2019) or the classes synthesis sampled
    (``"labels"``: DeepInversion, CMI, Fast-DFKD, GDFQ; reads ``ctx.labels``, which may be the
    class weights of a superposed batch: Qimera's soft target). Weight 1 in DAFL
    on MNIST and in DeepInversion."""
    targets = choice(_ONEHOT_TARGETS, target, "onehot_ce.target")(ctx)
    return F.cross_entropy(ctx.teacher_logits.float(), targets)


def _layer_taps(params: dict[str, Any]) -> dict[str, list[str]]:
    return {"teacher": [params.get("layer") or EMBEDDING], "student": []}


@register("activation_norm", needs=("teacher",), taps=_layer_taps)
def activation_norm(ctx, layer: str | None = None) -> torch.Tensor:
    """−mean |f_T| of the teacher's features at ``layer`` (default: its penultimate embedding,
    the input of its last Linear layer): DAFL's activation loss, so a positive weight rewards
    strong activations. DAFL weights it 0.1 on MNIST, 0.01 on CIFAR."""
    features = ctx.teacher_features[layer] if layer else ctx.teacher_embedding
    return -features.float().abs().mean()


@register("class_balance", needs=("teacher",))
def class_balance(ctx) -> torch.Tensor:
    """KL(p̄ ‖ uniform) = Σ_k p̄_k ln p̄_k + ln K with p̄ the batch mean of the teacher's softmax:
    DAFL's information-entropy loss, ≥ 0 and zero when the batch's classes are balanced.
    DAFL's code uses log10, so its weight 5 corresponds to 5 / ln 10 ≈ 2.17 here."""
    logits = ctx.teacher_logits.float()
    # ln p̄ from log-probabilities stays finite where a class's mean probability underflows to 0.
    log_p_mean = torch.logsumexp(F.log_softmax(logits, dim=1), dim=0) - math.log(len(logits))
    return (log_p_mean.exp() * log_p_mean).sum() + math.log(logits.shape[1])




@register("adv_l1", needs=("teacher",))
def adv_l1(ctx) -> torch.Tensor:
    """−mean |z_S − z_T| over logits: DFAD's generator objective (Fang et al. 2019), weight 1."""
    return -l1_logits(ctx)


@register("adv_kl", needs=("teacher",))
def adv_kl(ctx, T: float = 1.0, agreement_mask: bool = False, reduction: str = "batchmean") -> torch.Tensor:
    """−KL(p_T ‖ p_S) at temperature T, batch mean, without the T² factor: ZSKT's generator
    objective (Micaelli & Storkey 2019). With ``agreement_mask`` only samples on which teacher
    and student predict the same class count (the mean still divides by the whole batch), as in
    CMI and Fast-DFKD: samples the student already gets wrong need no more pushing.
    ``reduction: mean`` also divides by the number of classes (ZSKT's ``F.kl_div`` default)."""
    reduce = choice(KL_REDUCTIONS, reduction, "adv_kl.reduction")
    kl = kl_per_sample(ctx.student_logits, ctx.teacher_logits, T)
    if agreement_mask:
        kl = kl * (ctx.student_logits.argmax(1) == ctx.teacher_logits.argmax(1))
    return -reduce(kl, ctx.student_logits.shape[1])


@register("competition", needs=("teacher",))
def competition(ctx, T: float = 3.0) -> torch.Tensor:
    """Adaptive DeepInversion's competition term (Yin et al. 2020) as its code computes it, which
    rewards images the student classifies differently from the teacher: P and Q the student's and
    the teacher's softmax at temperature T, M = (P + Q) / 2, all three clamped to [0.01, 0.99];
    JS = ½ KL(M ‖ P) + ½ KL(M ‖ Q), summed over classes and averaged over the batch; the term is
    1 − clamp(JS, 0, 1). This is not the textbook JS divergence (KL(P ‖ M), no clamp): the clamp
    bounds the gradient where a network is confident. The DataFree benchmark's DeepInversion uses
    the same divergence, negated. ADI weights it 0.2 on CIFAR-10."""
    p = F.softmax(ctx.student_logits.float() / T, dim=1)
    q = F.softmax(ctx.teacher_logits.float() / T, dim=1)
    m = (p + q) / 2  # before the clamp, as the code takes it
    p, q, m = (x.clamp(0.01, 0.99) for x in (p, q, m))
    log_m = m.log()
    js = 0.5 * (m * (log_m - p.log())).sum(1).mean() + 0.5 * (m * (log_m - q.log())).sum(1).mean()
    return 1 - js.clamp(0.0, 1.0)
