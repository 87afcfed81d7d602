"""Relation-based terms: how samples relate to each other (RKD's distances and angles,
similarity-preserving KD, PKT) and how layers relate to each other (FSP), teacher against
student."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from dfkd.methods.losses.base import register
from dfkd.nets.taps import EMBEDDING
from dfkd_base.errors import ConfigError, ShapeError


def _layer_pair_taps(params: dict[str, Any]) -> dict[str, list[str]]:
    student, teacher = params.get("layers", [EMBEDDING, EMBEDDING])
    return {"student": [student], "teacher": [teacher]}


def related(ctx, term: str, layers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's and the teacher's features at ``layers`` as (N, D) rows, the teacher's
    detached; a relation compares samples pairwise, so both must hold the same samples."""
    if len(layers) != 2:
        raise ConfigError(f"{term}.layers must be [student_path, teacher_path], got {layers}")
    student, teacher = ctx.student_features[layers[0]], ctx.teacher_features[layers[1]]
    if student.shape[0] != teacher.shape[0]:
        raise ShapeError(f"{term}: the student's '{layers[0]}' holds {student.shape[0]} samples and the teacher's "
                         f"'{layers[1]}' {teacher.shape[0]}; relations between samples need the same batch")
    return student.float().flatten(1), teacher.detach().float().flatten(1)


# Below this, two embeddings count as the same point: a distance of 0 and no direction between them.
# RKD's code takes sqrt and normalizes there too (eps 1e-12), so coinciding embeddings (dead ReLUs in
# a thin student) get gradients of ~1/eps that wreck it in a few steps; here they get none. Nothing
# changes between distinct points.
_COINCIDE = 1e-6


def pairwise_distances(e: torch.Tensor) -> torch.Tensor:
    """Euclidean distances between the rows of ``e``; 0, without gradient, between coinciding rows
    (the diagonal included)."""
    squared = e.pow(2).sum(1)
    d2 = squared[:, None] + squared[None, :] - 2 * e @ e.t()
    apart = (d2 > _COINCIDE ** 2) & ~torch.eye(len(e), dtype=torch.bool, device=e.device)
    return torch.where(apart, d2.clamp_min(_COINCIDE ** 2).sqrt(), torch.zeros_like(d2))


@register("rkd_distance", needs=("teacher",), taps=_layer_pair_taps)
def rkd_distance(ctx, layers: list[str] = (EMBEDDING, EMBEDDING)) -> torch.Tensor:
    """RKD's distance-wise term (Park et al. 2019): smooth-L1 between the student's and the
    teacher's pairwise distances, each divided by its mean non-zero distance. ``layers``:
    ``[student_path, teacher_path]``, by default both penultimate embeddings; weight 25 in the
    authors' code."""
    student, teacher = related(ctx, "rkd_distance", list(layers))

    def normalized(e: torch.Tensor) -> torch.Tensor:
        d = pairwise_distances(e)
        return d / d[d > 0].mean() if bool((d > 0).any()) else d  # all coinciding: nothing to normalize

    return F.smooth_l1_loss(normalized(student), normalized(teacher))


@register("rkd_angle", needs=("teacher",), taps=_layer_pair_taps)
def rkd_angle(ctx, layers: list[str] = (EMBEDDING, EMBEDDING)) -> torch.Tensor:
    """RKD's angle-wise term: smooth-L1 between the cosines of the angles that every triplet of
    samples (i, j, k) makes at j, cos∠(e_i − e_j, e_k − e_j), of the student and of the teacher.
    Weight 50 in the authors' code."""
    student, teacher = related(ctx, "rkd_angle", list(layers))

    def angles(e: torch.Tensor) -> torch.Tensor:
        differences = e[None, :, :] - e[:, None, :]
        norms = differences.norm(dim=2, keepdim=True)
        # coinciding points have no direction between them: 0, without gradient (see _COINCIDE)
        directions = torch.where(norms > _COINCIDE, differences / norms.clamp_min(_COINCIDE),
                                 torch.zeros_like(differences))
        return torch.bmm(directions, directions.transpose(1, 2)).flatten()

    return F.smooth_l1_loss(angles(student), angles(teacher))


@register("sp", needs=("teacher",), taps=_layer_pair_taps)
def similarity_preserving(ctx, layers: list[str] = (EMBEDDING, EMBEDDING)) -> torch.Tensor:
    """Similarity-preserving KD (Tung & Mori 2019): ‖G_S − G_T‖²_F / b², G the batch's Gram
    matrix of flattened features with each row L2-normalized. Its code reads the last stage's
    feature map (pass its paths as ``layers``) and weights it 3000."""
    student, teacher = related(ctx, "sp", list(layers))
    g_s, g_t = F.normalize(student @ student.t(), dim=1), F.normalize(teacher @ teacher.t(), dim=1)
    return (g_s - g_t).pow(2).sum() / len(student) ** 2


@register("pkt", needs=("teacher",), taps=_layer_pair_taps)
def pkt(ctx, layers: list[str] = (EMBEDDING, EMBEDDING), eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas 2018): each sample's cosine similarities
    to the batch, mapped to [0, 1] by (s + 1) / 2 and normalized to sum to 1 over the batch, are a
    distribution; the term is KL(teacher ‖ student) of these, averaged over all b² entries as the
    authors' code does (so its weight, 30000 there, is on that scale)."""
    student, teacher = related(ctx, "pkt", list(layers))

    def conditional(e: torch.Tensor) -> torch.Tensor:
        e = e / (e.norm(dim=1, keepdim=True) + eps)
        similarity = (e @ e.t() + 1) / 2
        return similarity / similarity.sum(1, keepdim=True)

    p_s, p_t = conditional(student), conditional(teacher)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def _fsp_taps(params: dict[str, Any]) -> dict[str, list[str]]:
    return {"student": list(params["student"]), "teacher": list(params["teacher"])}


def fsp_matrices(maps: list[torch.Tensor]) -> list[torch.Tensor]:
    """FSP matrices of consecutive feature maps: (N, C_i, C_{i+1}) = Σ_hw F_i F_{i+1} / (h·w), the
    larger map average-pooled to the smaller's size first."""
    out = []
    for a, b in zip(maps, maps[1:]):
        a, b = a.float(), b.float()
        if a.shape[2:] != b.shape[2:]:
            a = F.adaptive_avg_pool2d(a, b.shape[2:])
        out.append(torch.bmm(a.flatten(2), b.flatten(2).transpose(1, 2)) / a[0, 0].numel())
    return out


@register("fsp", needs=("teacher",), taps=_fsp_taps)
def fsp(ctx, student: list[str], teacher: list[str]) -> torch.Tensor:
    """Flow of solution procedure (Yim et al. 2017), relation between layers: Σ_pairs
    MSE(FSP_S, FSP_T) of the FSP matrices of consecutive layers in ``student`` and ``teacher``
    (equal-length lists of paths whose channel counts agree layer by layer). Its authors train it
    as a first stage, then the task (``phases.N.epochs``); weight 50 in RepDistiller."""
    if len(student) != len(teacher) or len(student) < 2:
        raise ConfigError(f"fsp: student and teacher need equally many layers, at least 2; got {len(student)} "
                          f"and {len(teacher)}")
    total = 0.0
    pairs = zip(fsp_matrices([ctx.student_features[p] for p in student]),
                fsp_matrices([ctx.teacher_features[p].detach() for p in teacher]))
    for i, (g_s, g_t) in enumerate(pairs):
        if g_s.shape != g_t.shape:
            raise ShapeError(f"fsp: between '{student[i]}' and '{student[i + 1]}' the student's FSP matrix is "
                             f"{tuple(g_s.shape[1:])}, the teacher's {tuple(g_t.shape[1:])}; pair layers with "
                             f"equal channels")
        total = total + F.mse_loss(g_s, g_t)
    return total
