"""The zero-cost proxy that can rank candidates before any trains: DisWOT's teacher-student
similarity at initialization, from the teacher's and the untrained student's Grad-CAM class maps
and sample relations."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.nets.saliency import grad_cam
from dfkd.nets.taps import EMBEDDING, FeatureTap
from dfkd_base.errors import ConfigError


def _last_feature_map(model: nn.Module, x: torch.Tensor) -> str:
    """The path of the last module (not a pooling) whose output is a 4-D feature map."""
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda m, i, o, p=p: order.append(p) if torch.is_tensor(o) and o.dim() == 4
                                     and not isinstance(m, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)) else None)
             for p, m in model.named_modules() if p and not list(m.children())]
    try:
        with torch.no_grad():
            model(x[:2])
    finally:
        for h in hooks:
            h.remove()
    if not order:
        raise ConfigError(f"{type(model).__name__} has no 4-D feature map for the DisWOT proxy")
    return order[-1]


def relations(model: nn.Module, x: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DisWOT's two matrices of ``model`` on ``x``: the classes' Grad-CAM maps' correlation
    (classes × classes) and the samples' embedding correlation (batch × batch), rows L2-normalized."""
    path = _last_feature_map(model, x)
    with FeatureTap(model, [path, EMBEDDING]) as tap:
        logits = model(x)
    maps = tap.features[path]
    semantic = torch.stack([F.relu(grad_cam(logits[:, c].sum(), [maps], retain_graph=True)[0]).flatten()
                            for c in range(num_classes)])
    embedding = tap.features[EMBEDDING].flatten(1)
    return (F.normalize(semantic @ semantic.T, dim=1).detach(), F.normalize(embedding @ embedding.T, dim=1).detach())


def diswot_score(teacher: nn.Module, student: nn.Module, x: torch.Tensor, num_classes: int,
                 teacher_relations: tuple[torch.Tensor, torch.Tensor] | None = None) -> float:
    """DisWOT (Dong et al., CVPR 2023): the negated distance between teacher and (untrained) student
    in class-semantic similarity and in sample relations, ``-(‖S_t − S_s‖ + ‖R_t − R_s‖)`` with
    Frobenius norms; higher ranks a student as the better one to distil into. The teacher runs in
    eval mode (its matrices on ``x`` may be given, computed once for many students); the student in
    train mode (its BatchNorm has no statistics yet)."""
    st, rt = teacher_relations or relations(teacher.eval(), x, num_classes)
    student.train()
    ss, rs = relations(student, x, num_classes)
    return -float(torch.linalg.norm(st - ss) + torch.linalg.norm(rt - rs))
