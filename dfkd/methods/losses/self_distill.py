"""Self-distillation terms: a network taught by itself (Be Your Own Teacher's exits, class-wise
self-knowledge distillation)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dfkd.methods.losses.base import register
from dfkd.methods.losses.response import kd_kl_divergence
from dfkd_base.errors import ConfigError


@register("cs_kd", needs=("labels",))
def cs_kd(ctx, T: float = 4.0) -> torch.Tensor:
    """Class-wise self-knowledge distillation (Yun et al. 2020): KL(p(x′) ‖ p(x)) at temperature T,
    batchmean, times T², where x′ is another sample of x's class (``data.class_pairs: true``) and
    the network's own prediction on it, without gradient, is the target. The authors weight it 1
    at T = 4 beside cross-entropy."""
    partners = ctx.batch.partners
    if partners is None:
        raise ConfigError(f"cs_kd needs another sample of each one's class: set data.class_pairs: true "
                          f"(real batches; '{ctx.batch.source}' batches have none)")
    logits = ctx.student_logits
    with torch.no_grad():
        target = ctx.logits_on("student", partners)
    return kd_kl_divergence(logits, target, T)


def soft_cross_entropy(logits: torch.Tensor, target_logits: torch.Tensor, T: float) -> torch.Tensor:
    """−Σ softmax(t/T) · log_softmax(s/T), the mean over the batch (no T² factor)."""
    return -(F.softmax(target_logits.float() / T, 1) * F.log_softmax(logits.float() / T, 1)).sum(1).mean()


@register("self_distill", needs=("labels",))
def self_distill(ctx, T: float = 3.0, alpha: float = 0.3, feature_weight: float = 0.03) -> torch.Tensor:
    """Be Your Own Teacher (Zhang et al. 2019), on a student built with exits (``net.kwargs: {exits:
    ...}``): the deepest classifier teaches every exit, Σ_exits (1 − α)·CE(exit, labels) +
    α·soft-CE(exit, deepest at T), plus, for every exit but the shallowest, ``feature_weight`` ×
    ‖adapter(exit feature) − deepest feature‖₂ over the batch (the authors' code: T 3, α 0.3,
    0.03). The deepest classifier's own cross-entropy is the ``ce`` term beside it."""
    net = ctx.network("student")
    logits = ctx.student_logits  # the forward that fills the exits
    if not hasattr(net, "exit_logits"):
        raise ConfigError(f"self_distill needs a student with exits (net.kwargs: {{exits: {{layers: [...]}}}}); "
                          f"{type(net).__name__} has none")
    deep, deep_feature = logits.detach(), net.deep_feature.detach().float()
    total = 0.0
    for i, (z, f) in enumerate(zip(net.exit_logits, net.exit_features)):
        total = total + (1 - alpha) * F.cross_entropy(z.float(), ctx.labels) + alpha * soft_cross_entropy(z, deep, T)
        if i > 0:
            total = total + feature_weight * torch.dist(net.adapters[i](f).float(), deep_feature)
    return total
