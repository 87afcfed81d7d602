"""Response-based terms: the student's logits against labels or the teacher's (Hinton's soft
targets, DFAD's L1, decoupled KD)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dfkd.methods.losses.base import choice, register


@register("ce", needs=("labels",))
def ce(ctx, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of the student's logits against the batch's labels (class indices, or the
    class weights of a superposed synthetic batch: Qimera's soft cross-entropy)."""
    return F.cross_entropy(ctx.student_logits, ctx.labels, label_smoothing=label_smoothing)


def kl_per_sample(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float) -> torch.Tensor:
    """KL(p_T ‖ p_S) of each sample at temperature T, shape (N,), in float32."""
    log_p_s = F.log_softmax(student_logits.float() / T, dim=1)
    log_p_t = F.log_softmax(teacher_logits.float() / T, dim=1)
    return F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(1)


KL_REDUCTIONS = {"batchmean": lambda kl, classes: kl.mean(), "mean": lambda kl, classes: kl.mean() / classes}


def kd_kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float,
                     reduction: str = "batchmean") -> torch.Tensor:
    """KL(p_T ‖ p_S) at temperature T, times T² so that gradients keep their scale as T changes
    (Hinton et al. 2015). ``batchmean``: the mean over the batch of each sample's KL;
    ``mean``: divided by batch × classes as well, as ``F.kl_div``'s default reduction does."""
    reduce = choice(KL_REDUCTIONS, reduction, "kd_kl.reduction")
    return reduce(kl_per_sample(student_logits, teacher_logits, T), student_logits.shape[1]) * T * T


@register("kd_kl", needs=("teacher",))
def kd_kl(ctx, T: float = 1.0, reduction: str = "batchmean", per_teacher: bool = False) -> torch.Tensor:
    """Soft-target distillation: KL(teacher ‖ student) at temperature T, with the T² factor.
    ``reduction: mean`` divides by the number of classes too: ZSKT's code calls ``F.kl_div`` with
    its default reduction, so its KL (and the weight of attention transfer beside it) is on that
    scale. ``per_teacher``: with an ensemble, the sum of one KL per running teacher instead of one
    KL to their combined soft target (DGKD's code)."""
    if per_teacher:
        return sum(kd_kl_divergence(ctx.student_logits, t, T, reduction) for t in ctx.each_teacher_logits)
    return kd_kl_divergence(ctx.student_logits, ctx.teacher_logits, T, reduction)


@register("l1_logits", needs=("teacher",))
def l1_logits(ctx) -> torch.Tensor:
    """Mean absolute difference of logits (DFAD's student loss)."""
    return F.l1_loss(ctx.student_logits.float(), ctx.teacher_logits.float())


@register("mse_logits", needs=("teacher",))
def mse_logits(ctx) -> torch.Tensor:
    return F.mse_loss(ctx.student_logits.float(), ctx.teacher_logits.float())




@register("dkd", needs=("teacher", "labels"))
def dkd(ctx, alpha: float = 1.0, beta: float = 8.0, T: float = 4.0, warmup: int = 20) -> torch.Tensor:
    """Decoupled KD (Zhao et al. 2022): α·TCKD + β·NCKD, scaled by min((epoch + 1) / warmup, 1).
    TCKD is the KL between the binary distributions (target class, all others) of teacher and
    student; NCKD the KL between their distributions over the non-target classes alone; both at
    temperature T, batchmean, times T²."""
    s, t, y = ctx.student_logits.float() / T, ctx.teacher_logits.float() / T, ctx.labels
    target = F.one_hot(y, s.shape[1]).bool()
    p_s, p_t = s.softmax(1), t.softmax(1)
    binary_s = torch.stack([p_s[target], p_s.masked_fill(target, 0).sum(1)], 1)
    binary_t = torch.stack([p_t[target], p_t.masked_fill(target, 0).sum(1)], 1)
    tckd = F.kl_div(binary_s.clamp_min(1e-12).log(), binary_t, reduction="batchmean")
    # the target class masked out of both: distributions over the other classes
    nckd = F.kl_div(s.masked_fill(target, -1e4).log_softmax(1), t.masked_fill(target, -1e4).softmax(1),
                    reduction="batchmean")
    return min((ctx.epoch + 1) / warmup, 1.0) * (alpha * tckd + beta * nckd) * T * T
