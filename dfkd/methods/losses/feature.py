"""Feature-based terms: the student's intermediate maps against the teacher's (attention
transfer, SpaceshipNet's activation-region constraint, supervision transfer / FitNets' hint)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from dfkd.methods.losses.base import Feature, PlayerUse, Term, choice, register
from dfkd.nets.saliency import grad_cam as grad_cam_maps
from dfkd.nets.taps import embedding_layer
from dfkd_base.errors import ShapeError


def _attention_taps(params: dict[str, Any]) -> dict[str, list[str]]:
    return {"student": [s for s, _ in params["pairs"]], "teacher": [t for _, t in params["pairs"]]}


def _spatial_pairs(term: str, pairs, maps_s, maps_t) -> None:
    for (student_path, teacher_path), f_s, f_t in zip(pairs, maps_s, maps_t):
        if f_s.shape[2:] != f_t.shape[2:]:
            raise ShapeError(f"{term}: student '{student_path}' has spatial size {tuple(f_s.shape[2:])}, "
                             f"teacher '{teacher_path}' has {tuple(f_t.shape[2:])}; pair layers of equal resolution")


@register("attention", taps=_attention_taps)
def attention(ctx, pairs: list[list[str]], p: float = 2) -> torch.Tensor:
    """Attention transfer (Zagoruyko & Komodakis 2017): Σ_pairs mean((a_S − a_T)²), where
    a(f) = mean_c |f|^p over channels, flattened to (N, H·W) and L2-normalized per sample.
    ``pairs`` lists ``[student_path, teacher_path]``; the two maps of a pair must have the same
    spatial size. ZSKT weights it β = 250."""

    def attention_map(f: torch.Tensor) -> torch.Tensor:
        return F.normalize(f.float().abs().pow(p).mean(1).flatten(1), dim=1)

    maps_s = [ctx.student_features[s] for s, _ in pairs]
    maps_t = [ctx.teacher_features[t] for _, t in pairs]
    _spatial_pairs("attention", pairs, maps_s, maps_t)
    return sum(F.mse_loss(attention_map(f_s), attention_map(f_t)) for f_s, f_t in zip(maps_s, maps_t))


@register("grad_cam", needs=("teacher",), taps=_attention_taps)
def grad_cam(ctx, pairs: list[list[str]]) -> torch.Tensor:
    """The Grad-CAM half of SpaceshipNet's multi-scale activation-region constraint (mSARC, Yu
    et al. 2023): Σ_pairs MSE(g(A_S), g(A_T)) over ``[student_path, teacher_path]`` pairs, where
    g(A) = Σ_c w_c A_c and w_c is the spatial mean of ∂y_k/∂A_c, y_k the network's logit of the
    class the teacher predicts. As in the paper's code the weights w are constants (no
    second-order gradient) and the teacher's maps are targets; SpaceshipNet weights it 1 over the
    four stage outputs of its ResNets."""
    images = ctx.teacher_images.detach().requires_grad_(True)  # a teacher pass with a graph to its maps
    teacher_logits, teacher_features = ctx.teacher_view(images)
    maps_t = [teacher_features[t] for _, t in pairs]
    maps_s = [ctx.student_features[s] for s, _ in pairs]
    _spatial_pairs("grad_cam", pairs, maps_s, maps_t)
    target = teacher_logits.detach().argmax(1, keepdim=True)
    teacher_cams = [c.detach() for c in grad_cam_maps(teacher_logits.gather(1, target).sum(), maps_t)]
    student_cams = grad_cam_maps(ctx.student_logits.gather(1, target).sum(), maps_s, retain_graph=True)
    return sum(F.mse_loss(s, t) for s, t in zip(student_cams, teacher_cams))


@register("class_activation", needs=("teacher",), taps=lambda p: {"student": [p["pair"][0]], "teacher": [p["pair"][1]]})
def class_activation(ctx, pair: list[str]) -> torch.Tensor:
    """The CAM half of SpaceshipNet's mSARC: MSE between the student's and the teacher's class
    activation maps, CAM_k = Σ_c W_kc A_c for every class k, where A is the feature map (at
    ``[student_path, teacher_path]``) that global average pooling turns into the input of the
    network's last Linear layer, and W that layer's weight (a constant here, as in the paper's
    code). SpaceshipNet weights it 1."""
    maps = []
    for network, path in zip(("student", "teacher"), pair):
        a = ctx.features_of(network)[path].float()
        model = ctx.network(network)
        weight = model.get_submodule(embedding_layer(model)).weight.detach().float()
        if a.dim() != 4 or a.shape[1] != weight.shape[1]:
            raise ShapeError(f"class_activation: the {network}'s '{path}' is {tuple(a.shape[1:])} and its classifier "
                             f"takes {weight.shape[1]} features; CAMs need the map that global pooling feeds the "
                             f"classifier")
        maps.append(torch.einsum("bchw,kc->bkhw", a, weight))
    _spatial_pairs("class_activation", [pair], maps[:1], maps[1:])
    return F.mse_loss(maps[0], maps[1].detach())




_FEATURE_DISTANCES = {
    "l2": lambda s, t: F.mse_loss(s, t),
    "cosine": lambda s, t: (1 - F.cosine_similarity(s.flatten(1), t.flatten(1), dim=1)).mean(),
}


@register("feature_match", needs=("teacher",))
class FeatureMatch(Term):
    """Supervision transfer (Gupta, Hoffman & Malik 2016): the student's features at
    ``student_layer`` (default: the same path as ``layer``), mapped by the ``adapter`` player when
    the shapes differ, regress the teacher's features at ``layer`` on the paired sample.
    ``distance``: ``l2`` (mean squared error, the paper's) or ``cosine`` (1 − cosine similarity
    per sample)."""

    def __init__(self, layer: str, student_layer: str | None = None, adapter: str | None = None,
                 distance: str = "l2"):
        super().__init__()
        self.distance = choice(_FEATURE_DISTANCES, distance, "feature_match.distance")
        self.layer, self.student_layer, self.adapter = layer, student_layer or layer, adapter

    def taps(self) -> dict[str, list[str]]:
        return {"teacher": [self.layer], "student": [self.student_layer]}

    def player_uses(self) -> dict[str, PlayerUse]:
        if not self.adapter:
            return {}
        return {self.adapter: PlayerUse("adapter", Feature("student", self.student_layer), Feature("teacher", self.layer))}

    def forward(self, ctx) -> torch.Tensor:
        student = ctx.student_features[self.student_layer].float()
        if self.adapter:
            student = ctx.module(self.adapter)(student)
        teacher = ctx.teacher_features[self.layer].float().detach()
        if student.shape != teacher.shape:
            raise ShapeError(f"feature_match: the student's {self.student_layer} {tuple(student.shape[1:])} and "
                             f"the teacher's {self.layer} {tuple(teacher.shape[1:])} differ; give the term an "
                             f"'adapter' player")
        return self.distance(student, teacher)
