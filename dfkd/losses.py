"""Loss terms.

A term is a registered :class:`Term`, or a function ``term(ctx, **params) -> scalar tensor``
registered as one. It reads what it needs from the step's :class:`~dfkd.context.StepContext`
(images, labels, teacher and student logits, BN statistics, tapped features); the context
computes each of those on first use only. A phase's loss is ``Σ weight × term`` over the terms
its config names::

    losses:
      kd_kl: {weight: 1.0, T: 4}
      ce: 0.1

What a term needs, which layers it taps and which players it drives it declares (see
:class:`Term`), so that a config asking for something a run lacks fails at start-up, not after
an hour. A term with state across steps (a memory bank, a trainable head) is a :class:`Term`
subclass: its config params go to ``__init__``.
"""
from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from kornia.augmentation import RandomResizedCrop

from .checkpoint import unwrap as ckpt_unwrap
from .errors import ConfigError, ShapeError
from .registry import Registry, nearest
from .taps import BN_INPUT_MEANS, EMBEDDING, embedding_layer

LOSSES: Registry[type["Term"]] = Registry("loss term")


@dataclass(frozen=True)
class Feature:
    """What a network shows a term: its logits (``layer`` None) or the output of its module at
    path ``layer``. ``network``: ``teacher``, ``student`` (the phase's student) or a model player."""

    network: str
    layer: str | None = None

    def __str__(self) -> str:
        return f"{self.network}'s {self.layer or 'logits'}"


@dataclass(frozen=True)
class PlayerUse:
    """A player that a term drives, and what it sees: a ``discriminator`` is sized by ``source``
    (and, when ``target`` is set, must see the same shape there); an ``adapter`` maps
    ``source`` to ``target``'s shape."""

    kind: str
    source: Feature
    target: Feature | None = None


Probe = Callable[[Feature], tuple[int, ...]]  # the shape, without the batch, of a feature


def no_taps(params: dict[str, Any]) -> dict[str, list[str]]:
    return {"teacher": [], "student": []}


class Term(nn.Module):
    """A loss term: ``forward(ctx)`` returns a scalar from the step's
    :class:`~dfkd.context.StepContext`. What a run must provide for it is declared, not
    discovered:

    - ``needs``: what it reads that a run might lack (⊂ {"teacher", "teacher_bn", "labels"}), so
      a config that cannot provide it fails at start-up;
    - ``taps()``: the module paths it reads, per network (``teacher``, ``student`` or a player);
    - ``player_uses()``: the discriminator and adapter players it drives, which are sized from
      what they see;
    - ``build(probe)``: called once the networks exist, to size its own layers;
    - ``end_batch()``: called when a batch is done, for terms with statistics across batches.

    Its state (buffers, parameters, extra state) is saved with the run; parameters that take
    gradients get an optimizer of their own, stepped with the term's phase.
    """

    needs: tuple[str, ...] = ()

    @classmethod
    def parameters_of(cls) -> dict[str, inspect.Parameter]:
        """The config parameters it takes (its ``__init__``'s)."""
        return dict(inspect.signature(cls).parameters)

    def taps(self) -> dict[str, list[str]]:
        return no_taps({})

    def player_uses(self) -> dict[str, PlayerUse]:
        return {}

    def build(self, probe: Probe) -> None:
        """Size the term's own layers: ``probe(feature)`` is a feature's shape without the batch;
        ``probe.train_labels`` the labels of the real training split (None when the run reads none)."""

    def end_batch(self) -> None:
        pass

    def keep_step(self) -> None:
        """Per-batch synthesis: the inner step just taken made the batch that will be kept (so far)."""

    def make_optimizer(self, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        """The optimizer of its trainable parameters, at its phase's learning rate."""
        return torch.optim.Adam(params, lr=lr, betas=(0.5, 0.999))


class FunctionTerm(Term):
    """A stateless term written as ``fn(ctx, **params)``, bound to its params."""

    fn: Callable = staticmethod(lambda ctx: None)
    taps_of: Callable[[dict], dict[str, list[str]]] = staticmethod(no_taps)

    def __init__(self, **params):
        super().__init__()
        self.params = params

    @classmethod
    def parameters_of(cls) -> dict[str, inspect.Parameter]:
        return {n: p for n, p in inspect.signature(cls.fn).parameters.items() if n != "ctx"}

    def taps(self) -> dict[str, list[str]]:
        return self.taps_of(self.params)

    def forward(self, ctx) -> torch.Tensor:
        return self.fn(ctx, **self.params)


def register(name: str, needs: tuple[str, ...] = (), taps: Callable[[dict], dict[str, list[str]]] = no_taps):
    """Register a loss term: a :class:`Term` subclass, or a function ``fn(ctx, **params)`` (kept
    callable as it is, and registered as a :class:`FunctionTerm`). ``needs`` and ``taps(params)``
    declare what a function term reads; a class declares them itself (``needs`` here is its
    default)."""

    def decorator(term):
        if inspect.isclass(term):
            if not issubclass(term, Term):
                raise TypeError(f"loss term '{name}': a class term must subclass dfkd.losses.Term")
            term.needs = term.__dict__.get("needs", needs)
            LOSSES.register(name)(term)
            return term
        term.needs, term.taps = needs, taps  # also on the function, for reading
        LOSSES.register(name)(type(f"{name}_term", (FunctionTerm,), {
            "fn": staticmethod(term), "taps_of": staticmethod(taps), "needs": needs, "__doc__": term.__doc__}))
        return term

    return decorator


def _option(options: dict[str, Any], value: str, where: str):
    """``options[value]``, or a ConfigError listing the valid values."""
    if value not in options:
        raise ConfigError(f"{where} must be one of {', '.join(options)}, got {value!r}")
    return options[value]


# --------------------------------------------------------------------------------------
# Building a phase's weighted sum from config
# --------------------------------------------------------------------------------------
@dataclass
class WeightedTerm:
    """A term as a phase uses it: its config key, weight and params, the epoch from which it
    counts (``from_epoch``; Fast-DFKD's adversarial term waits for the warm-up to end), the built
    term and, when the term has trainable parameters, their optimizer."""

    name: str
    weight: float
    term: Term
    params: dict[str, Any]
    optimizer: torch.optim.Optimizer | None = None
    from_epoch: int = 0

    def __call__(self, ctx) -> torch.Tensor:
        return self.term(ctx)


def build_terms(spec: dict[str, Any], where: str) -> list[WeightedTerm]:
    """``{name: weight}`` or ``{name: {weight: w, from_epoch: k, **params}}`` → terms, parameters
    checked against each term's signature so a misspelt or missing parameter fails here, naming
    its key."""
    terms = []
    for name, value in spec.items():
        base = name.split("@")[0]  # "kd_kl@soft" lets one phase use a term twice with other params
        term = LOSSES.get(base)
        params = dict(value) if isinstance(value, dict) else {"weight": value}
        weight = params.pop("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise ConfigError(f"{where}.{name}.weight must be a number, got {weight!r}")
        from_epoch = params.pop("from_epoch", 0)
        if not isinstance(from_epoch, int) or isinstance(from_epoch, bool) or from_epoch < 0:
            raise ConfigError(f"{where}.{name}.from_epoch must be an epoch number >= 0, got {from_epoch!r}")
        signature = term.parameters_of()
        for key in params:
            if key not in signature:
                close = nearest(key, signature)
                hint = f"; did you mean '{close[0]}'?" if close else f"; it takes {', '.join(signature) or 'none'}"
                raise ConfigError(f"{where}.{name}: loss term '{base}' has no parameter '{key}'{hint}")
        missing = [n for n, p in signature.items() if p.default is p.empty and n not in params]
        if missing:
            raise ConfigError(f"{where}.{name}: loss term '{base}' needs parameter {', '.join(missing)}")
        terms.append(WeightedTerm(name, float(weight), term(**params), params, from_epoch=from_epoch))
    return terms


# --------------------------------------------------------------------------------------
# Supervised and response-based KD terms
# --------------------------------------------------------------------------------------
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


_KL_REDUCTIONS = {"batchmean": lambda kl, classes: kl.mean(), "mean": lambda kl, classes: kl.mean() / classes}


def kd_kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, T: float,
                     reduction: str = "batchmean") -> torch.Tensor:
    """KL(p_T ‖ p_S) at temperature T, times T² so that gradients keep their scale as T changes
    (Hinton et al. 2015). ``batchmean``: the mean over the batch of each sample's KL;
    ``mean``: divided by batch × classes as well, as ``F.kl_div``'s default reduction does."""
    reduce = _option(_KL_REDUCTIONS, reduction, "kd_kl.reduction")
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


# --------------------------------------------------------------------------------------
# Feature-based KD terms
# --------------------------------------------------------------------------------------
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

    def cams(logits: torch.Tensor, maps: list[torch.Tensor], retain: bool) -> list[torch.Tensor]:
        grads = torch.autograd.grad(logits.gather(1, target).sum(), maps, retain_graph=retain)
        return [(g.float().mean((2, 3), keepdim=True) * a.float()).sum(1) for g, a in zip(grads, maps)]

    teacher_cams = [c.detach() for c in cams(teacher_logits, maps_t, retain=False)]
    student_cams = cams(ctx.student_logits, maps_s, retain=True)
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


# --------------------------------------------------------------------------------------
# Relation-based and decoupled KD terms
# --------------------------------------------------------------------------------------
def _layer_pair_taps(params: dict[str, Any]) -> dict[str, list[str]]:
    student, teacher = params.get("layers", [EMBEDDING, EMBEDDING])
    return {"student": [student], "teacher": [teacher]}


def _related(ctx, term: str, layers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
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
    student, teacher = _related(ctx, "rkd_distance", list(layers))

    def normalized(e: torch.Tensor) -> torch.Tensor:
        d = pairwise_distances(e)
        return d / d[d > 0].mean() if bool((d > 0).any()) else d  # all coinciding: nothing to normalize

    return F.smooth_l1_loss(normalized(student), normalized(teacher))


@register("rkd_angle", needs=("teacher",), taps=_layer_pair_taps)
def rkd_angle(ctx, layers: list[str] = (EMBEDDING, EMBEDDING)) -> torch.Tensor:
    """RKD's angle-wise term: smooth-L1 between the cosines of the angles that every triplet of
    samples (i, j, k) makes at j, cos∠(e_i − e_j, e_k − e_j), of the student and of the teacher.
    Weight 50 in the authors' code."""
    student, teacher = _related(ctx, "rkd_angle", list(layers))

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
    student, teacher = _related(ctx, "sp", list(layers))
    g_s, g_t = F.normalize(student @ student.t(), dim=1), F.normalize(teacher @ teacher.t(), dim=1)
    return (g_s - g_t).pow(2).sum() / len(student) ** 2


@register("pkt", needs=("teacher",), taps=_layer_pair_taps)
def pkt(ctx, layers: list[str] = (EMBEDDING, EMBEDDING), eps: float = 1e-7) -> torch.Tensor:
    """Probabilistic knowledge transfer (Passalis & Tefas 2018): each sample's cosine similarities
    to the batch, mapped to [0, 1] by (s + 1) / 2 and normalized to sum to 1 over the batch, are a
    distribution; the term is KL(teacher ‖ student) of these, averaged over all b² entries as the
    authors' code does (so its weight, 30000 there, is on that scale)."""
    student, teacher = _related(ctx, "pkt", list(layers))

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


def nce_loss(scores: torch.Tensor, n_data: int, eps: float = 1e-7) -> torch.Tensor:
    """NCE of CRD's code: ``scores`` (B, 1 + K) are the positive's and K noise samples'
    exp(similarity / T) / Z; the noise distribution is uniform over ``n_data`` samples."""
    k, noise = scores.shape[1] - 1, 1.0 / n_data
    log_d1 = torch.log(scores[:, 0] / (scores[:, 0] + k * noise + eps))
    log_d0 = torch.log(k * noise / (scores[:, 1:] + k * noise + eps))
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


@register("crd", needs=("teacher",))
class ContrastiveRepresentation(Term):
    """Contrastive representation distillation (Tian et al. 2020). Student and teacher features at
    ``layers`` (default: the penultimate embeddings) are embedded by a Linear layer each to ``dim``
    and L2-normalized. A memory of every training sample's embedding is kept per network. Each
    student embedding is scored against the teacher memory's rows of its own sample (the positive)
    and of ``negatives`` samples of other classes (CRD's "exact" sampling), exp(v·m / T) / Z with Z
    fixed at the first step; likewise each teacher embedding against the student memory; the loss
    is the NCE of both. Then each sample's memory rows move to its new embeddings (momentum
    ``momentum``, L2-normalized). CRD weights it 0.8 (dim 128, 16384 negatives, T 0.07, momentum
    0.5). Its embeddings train with SGD (momentum 0.9, weight decay 5e-4) at the phase's learning
    rate, as CRD trains them with the student. It needs the samples' indices: real-data batches."""

    def __init__(self, layers: list[str] = (EMBEDDING, EMBEDDING), dim: int = 128, negatives: int = 16384,
                 T: float = 0.07, momentum: float = 0.5):
        super().__init__()
        if len(layers) != 2:
            raise ConfigError(f"crd.layers must be [student_path, teacher_path], got {list(layers)}")
        if T <= 0 or negatives < 1 or not 0 <= momentum < 1:
            raise ConfigError(f"crd: T must be positive, negatives >= 1 and momentum in [0, 1); got T={T}, "
                              f"negatives={negatives}, momentum={momentum}")
        self.layers, self.dim, self.negatives, self.T, self.momentum = list(layers), dim, negatives, T, momentum
        self.embed_student: nn.Linear | None = None
        self.embed_teacher: nn.Linear | None = None
        for name in ("memory_student", "memory_teacher", "labels"):
            self.register_buffer(name, torch.zeros(0))
        self.register_buffer("z", torch.full((2,), -1.0))  # Z of the student's and the teacher's scores
        self._others: dict[int, torch.Tensor] | None = None  # per class, the indices of the other classes

    def taps(self) -> dict[str, list[str]]:
        return {"student": [self.layers[0]], "teacher": [self.layers[1]]}

    def build(self, probe) -> None:
        if probe.train_labels is None:
            raise ConfigError("crd needs real training batches (their sample indices); this run reads none")
        self.build_memory(math.prod(probe(Feature("student", self.layers[0]))),
                          math.prod(probe(Feature("teacher", self.layers[1]))), probe.train_labels)

    def build_memory(self, student_dim: int, teacher_dim: int, labels: torch.Tensor) -> None:
        device = self.z.device
        self.embed_student = nn.Linear(student_dim, self.dim).to(device)
        self.embed_teacher = nn.Linear(teacher_dim, self.dim).to(device)
        bound = 1.0 / math.sqrt(self.dim / 3)  # CRD's uniform initialization of the memory
        self.memory_student = (torch.rand(len(labels), self.dim, device=device) * 2 - 1) * bound
        self.memory_teacher = (torch.rand(len(labels), self.dim, device=device) * 2 - 1) * bound
        self.labels, self._others = labels.to(device), None

    def make_optimizer(self, params, lr: float) -> torch.optim.Optimizer:
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=5e-4)

    def sample_negatives(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, negatives) indices of training samples of other classes than each row's, uniformly."""
        if self._others is None:  # computed once, after any restore of the labels
            self._others = {int(c): (self.labels != c).nonzero().squeeze(1) for c in self.labels.unique()}
        out = torch.empty(len(labels), self.negatives, dtype=torch.long, device=labels.device)
        for c in labels.unique():
            others = self._others[int(c)]
            rows = (labels == c).nonzero().squeeze(1)
            out[rows] = others[torch.randint(len(others), (len(rows), self.negatives), device=labels.device)]
        return out

    def forward(self, ctx) -> torch.Tensor:
        index = ctx.batch.index
        if index is None:
            raise ConfigError(f"crd needs each sample's index in the training split; '{ctx.batch.source}' batches "
                              f"carry none (use it on real batches, without mixup)")
        student, teacher = _related(ctx, "crd", self.layers)
        v_s = F.normalize(self.embed_student(student), dim=1)
        v_t = F.normalize(self.embed_teacher(teacher), dim=1)
        rows = torch.cat([index[:, None], self.sample_negatives(self.labels[index])], dim=1)  # positive first
        n = len(self.labels)
        # scored against every row, then the drawn ones picked: cheaper than gathering B x (1 + K) rows
        scores_s = torch.exp((v_s @ self.memory_teacher.t()).gather(1, rows) / self.T)
        scores_t = torch.exp((v_t @ self.memory_student.t()).gather(1, rows) / self.T)
        with torch.no_grad():
            if self.z[0] < 0:  # CRD fixes each normalizer at its first batch's mean score x n
                self.z.copy_(torch.stack([scores_s.mean() * n, scores_t.mean() * n]))
            # out of place: the scores' backward still needs the memories as they were
            for name, v in (("memory_student", v_s), ("memory_teacher", v_t)):
                memory = getattr(self, name)
                moved = F.normalize(self.momentum * memory[index] + (1 - self.momentum) * v.detach(), dim=1)
                setattr(self, name, memory.index_put((index,), moved))
        return nce_loss(scores_s / self.z[0], n) + nce_loss(scores_t / self.z[1], n)


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


# --------------------------------------------------------------------------------------
# Image priors and teacher-driven synthesis terms
# --------------------------------------------------------------------------------------
_BN_DISTANCES = {"l2": lambda a, b: torch.linalg.vector_norm(a - b), "mse": F.mse_loss}


def bn_layer_distances(stats, norm: str = "l2") -> list[torch.Tensor]:
    """d(μ_l, μ̂_l) + d(σ²_l, σ̂²_l) of each layer of ``stats`` (one :class:`~dfkd.taps.BNStats`
    per layer), d the L2 norm of the difference or the MSE."""
    distance = _option(_BN_DISTANCES, norm, "bn_stats.norm")
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
        _option(_BN_DISTANCES, norm, "bn_stats.norm")
        _option({"sum": 0, "mean": 0}, layers, "bn_stats.layers")
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
    measure = _option(_TV_NORMS, norm, "tv.norm")
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
    targets = _option(_ONEHOT_TARGETS, target, "onehot_ce.target")(ctx)
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


# --------------------------------------------------------------------------------------
# Adversarial generator objectives (minimized by the generator, so they reward disagreement)
# --------------------------------------------------------------------------------------
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
    reduce = _option(_KL_REDUCTIONS, reduction, "adv_kl.reduction")
    kl = kl_per_sample(ctx.student_logits, ctx.teacher_logits, T)
    if agreement_mask:
        kl = kl * (ctx.student_logits.argmax(1) == ctx.teacher_logits.argmax(1))
    return -reduce(kl, ctx.student_logits.shape[1])


@register("competition", needs=("teacher",))
def competition(ctx, T: float = 3.0) -> torch.Tensor:
    """1 − JS(p_T, p_S) at temperature T, natural log, batch mean: Adaptive DeepInversion's
    competition term (Yin et al. 2020), which rewards images the student classifies differently
    from the teacher. ADI weights it 0.2 on CIFAR-10. (ADI's code clamps the probabilities and
    uses KL(M ‖ P) for KL(P ‖ M); this is the textbook JS divergence, ≤ ln 2.)"""
    log_p_s = F.log_softmax(ctx.student_logits.float() / T, dim=1)
    log_p_t = F.log_softmax(ctx.teacher_logits.float() / T, dim=1)
    log_m = torch.logaddexp(log_p_s, log_p_t) - math.log(2)
    js = 0.5 * (F.kl_div(log_m, log_p_t, reduction="none", log_target=True)
                + F.kl_div(log_m, log_p_s, reduction="none", log_target=True)).sum(1)
    return 1 - js.mean()


# --------------------------------------------------------------------------------------
# Contrastive model inversion (stateful)
# --------------------------------------------------------------------------------------
def cmi_info_nce(anchors: torch.Tensor, keys: torch.Tensor, n: int, T: float) -> torch.Tensor:
    """CMI's InfoNCE: row i of ``anchors`` (local views) has row i of ``keys`` (global views,
    detached) as its positive and every other row of ``keys`` as a negative; rows past ``n`` come
    from the memory bank. Inputs are L2-normalized; the loss is the mean over the batch's anchors
    plus, when there are bank rows, the mean over those."""
    logits = anchors @ keys.detach().T / T
    losses = F.cross_entropy(logits, torch.arange(len(anchors), device=anchors.device), reduction="none")
    return losses[:n].mean() + losses[n:].mean() if len(anchors) > n else losses.mean()


@register("contrastive", needs=("teacher",))
class Contrastive(Term):
    """Contrastive model inversion (CMI, Fang et al. 2021): makes synthetic images
    distinguishable from each other, and from earlier batches, in the teacher's feature space.

    An image's features are the per-sample channel means of the input of every BatchNorm2d of the
    teacher, concatenated (D values). They are taken of the batch as the teacher sees it (the
    synthesis augmentation: the global view) and of a random resized crop of the un-augmented
    images (``local_scale`` of the area; flipped at random with ``flip``: the local view). A head
    (D → D → ``dim``, ReLU between) projects both, L2-normalized; each local view's positive is its
    own global view, detached, and every other global view is a negative (InfoNCE at temperature
    T). The memory bank keeps the *raw* features of both views of every kept sample: once per
    batch, the features of the inner step whose batch synthesis keeps; each step draws
    ``negatives`` of its rows, projected by the current head. CMI weights it 0.8 (T 0.2, bank
    40960, 4096 negatives, head 256). The head has its own Adam optimizer (default betas).
    """

    def __init__(self, T: float = 0.2, bank_size: int = 40960, negatives: int = 4096, dim: int = 256,
                 local_scale: tuple[float, float] = (0.25, 1.0), flip: bool = False):
        super().__init__()
        if T <= 0:
            raise ConfigError(f"contrastive.T must be positive, got {T}")
        if bank_size < 1 or negatives < 1:
            raise ConfigError(f"contrastive.bank_size and negatives must be at least 1, got {bank_size}, {negatives}")
        self.T, self.dim, self.local_scale, self.flip = T, dim, tuple(local_scale), flip
        self.bank_size, self.negatives = bank_size, negatives
        self.head: nn.Sequential | None = None
        self.register_buffer("bank", torch.zeros(0))                 # (bank_size, 2D) once built
        self.register_buffer("bank_ptr", torch.zeros((), dtype=torch.long))   # next row to overwrite
        self.register_buffer("bank_filled", torch.zeros((), dtype=torch.long))
        self._step: torch.Tensor | None = None   # this inner step's raw [local, global] features
        self._kept: torch.Tensor | None = None   # those of the step whose batch is kept

    def taps(self) -> dict[str, list[str]]:
        return {"teacher": [BN_INPUT_MEANS], "student": []}

    def build(self, probe) -> None:
        self.build_head(probe(Feature("teacher", BN_INPUT_MEANS))[0])

    def build_head(self, feature_dim: int) -> None:
        device = self.bank.device
        self.head = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(),
                                  nn.Linear(feature_dim, self.dim)).to(device)
        self.bank = torch.zeros(self.bank_size, 2 * feature_dim, device=device)

    def make_optimizer(self, params, lr: float) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=lr)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(features.float()).float(), dim=1)

    def local_view(self, images: torch.Tensor) -> torch.Tensor:
        view = RandomResizedCrop(size=tuple(images.shape[-2:]), scale=self.local_scale)(images)
        if self.flip:
            from kornia.augmentation import RandomHorizontalFlip

            view = RandomHorizontalFlip()(view)
        return view

    def forward(self, ctx) -> torch.Tensor:
        if self.head is None:
            raise RuntimeError("contrastive: call build(probe) or build_head(feature_dim) before the first step")
        plain = ctx.batch.plain if ctx.batch.plain is not None else ctx.teacher_images
        global_features = ctx.teacher_features[BN_INPUT_MEANS].float()
        local_features = ctx.teacher_view(self.local_view(plain))[1][BN_INPUT_MEANS].float()
        n = len(global_features)
        local, glob = [local_features], [global_features]
        filled = int(self.bank_filled)
        if filled:
            rows = self.bank[torch.randperm(filled, device=self.bank.device)[: self.negatives]]
            cached_local, cached_global = rows.chunk(2, dim=1)
            local.append(cached_local)
            glob.append(cached_global)
        loss = cmi_info_nce(self.project(torch.cat(local)), self.project(torch.cat(glob)), n, self.T)
        self._step = torch.cat([local_features, global_features], dim=1).detach()
        return loss

    def keep_step(self) -> None:
        self._kept = self._step

    def end_batch(self) -> None:
        """The kept step's raw features enter the bank (FIFO), once per synthesized batch."""
        if self._kept is None:
            return
        with torch.no_grad():
            rows = self._kept[-self.bank_size:]
            index = (self.bank_ptr + torch.arange(len(rows), device=rows.device)) % self.bank_size
            self.bank[index] = rows.to(self.bank.dtype)
            self.bank_ptr.copy_((self.bank_ptr + len(rows)) % self.bank_size)
            self.bank_filled.copy_((self.bank_filled + len(rows)).clamp(max=self.bank_size))
        self._step = self._kept = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # the bank's width is known once built: take the saved one's shape before loading into it
        key = prefix + "bank"
        if key in state_dict and state_dict[key].shape != self.bank.shape:
            self.bank = torch.zeros_like(state_dict[key], device=self.bank.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


# --------------------------------------------------------------------------------------
# Online (peer) and adversarial distillation
# --------------------------------------------------------------------------------------
@register("dml")
def dml(ctx, peers: str | list[str], T: float = 1.0) -> torch.Tensor:
    """Deep mutual learning (Zhang et al. 2018): mean over ``peers`` (model players, detached in
    this phase since only its own player trains) of KL(p_peer ‖ p_student) at temperature T, ×T²."""
    peers = [peers] if isinstance(peers, str) else list(peers)
    return sum(kd_kl_divergence(ctx.student_logits, ctx.logits_of(p).detach(), T) for p in peers) / len(peers)


@register("adversarial")
class Adversarial(Term):
    """A discriminator's verdict as a distillation loss. The discriminator player tells the
    ``real`` network's view of a batch (the teacher's by default, or a peer's) from the
    ``fake`` one's (by default "student": the phase's student; in a discriminator's phase, the
    evaluated student, so name the peer there in online distillation). One term, two phases:

    - in the discriminator's phase it is the objective's discriminator loss (plus ``gp`` × the
      gradient penalty for ``wgan-gp``); the discriminator's ``steps`` are its n_critic;
    - in the student's phase it is the objective's generator loss; with ``reverse: true`` it is
      instead the discriminator loss through a gradient-reversal layer, so that one backward
      trains both (MEAL): put the discriminator in that phase's ``also``.

    What is compared: logits (``layer`` unset; ``probs: true`` compares softmax(logits / T)),
    or the feature maps at ``layer`` (real side) and ``student_layer`` (default: the same path),
    the student's passed through ``adapter`` (an adapter player) when shapes differ.
    ``labels`` feeds a projection discriminator: ``batch`` (the batch's labels) or ``teacher``
    (the real side's argmax).

    Logged beside the loss: the discriminator's accuracy on real and fake, and the gradient
    penalty; a discriminator that classifies every sample right for ``patience`` consecutive
    steps is reported (log and TensorBoard), since the student then gets no useful gradient."""

    def __init__(self, discriminator: str, objective: str = "nonsaturating", real: str = "teacher",
                 fake: str = "student", layer: str | None = None, student_layer: str | None = None, adapter: str | None = None,
                 probs: bool = False, T: float = 1.0, labels: str = "none", gp: float = 10.0,
                 reverse: bool = False, patience: int = 200):
        super().__init__()
        from .discriminators import OBJECTIVES

        self.objective = _option(OBJECTIVES, objective, "adversarial.objective")
        _option({"none": 0, "batch": 0, "teacher": 0}, labels, "adversarial.labels")
        if probs and layer:
            raise ConfigError("adversarial: 'probs' applies to logits; it cannot be combined with 'layer'")
        if real == fake:
            raise ConfigError(f"adversarial: the real and the fake side are both '{real}'")
        self.discriminator, self.real, self.fake, self.adapter = discriminator, real, fake, adapter
        self.layer, self.student_layer = layer, student_layer or layer
        self.probs, self.T, self.labels, self.gp, self.reverse = probs, T, labels, gp, reverse
        self.patience, self.won_for, self.reported = patience, 0, False
        self.needs = ("teacher",) if real == "teacher" else ()

    def taps(self) -> dict[str, list[str]]:
        return {self.real: [self.layer] if self.layer else [],
                self.fake: [self.student_layer] if self.student_layer else []}

    def player_uses(self) -> dict[str, PlayerUse]:
        real, fake = Feature(self.real, self.layer), Feature(self.fake, self.student_layer)
        # a discriminator is sized by the real side; without an adapter the fake side must match it
        uses = {self.discriminator: PlayerUse("discriminator", real, None if self.adapter else fake)}
        if self.adapter:
            uses[self.adapter] = PlayerUse("adapter", fake, real)
        return uses

    def _view(self, ctx, network: str, layer: str | None) -> torch.Tensor:
        if layer is None:
            x = ctx.logits_of(network).float()
            return F.softmax(x / self.T, dim=1) if self.probs else x
        return ctx.features_of(network)[layer].float()

    def forward(self, ctx) -> torch.Tensor:
        disc = ctx.module(self.discriminator)
        real = self._view(ctx, self.real, self.layer).detach()
        fake = self._view(ctx, self.fake, self.student_layer)
        if self.adapter:
            fake = ctx.module(self.adapter)(fake)
        if fake.shape != real.shape:
            raise ShapeError(f"adversarial: the student's {self.student_layer or 'logits'} {tuple(fake.shape[1:])} "
                             f"and the {self.real}'s {self.layer or 'logits'} {tuple(real.shape[1:])} differ; "
                             f"give the term an 'adapter' player")
        labels = None
        if self.labels == "batch":
            labels = ctx.labels
        elif self.labels == "teacher":
            labels = ctx.logits_of(self.real).argmax(1)
        if ctx.phase.player == self.discriminator:  # the discriminator's own phase
            return self._discriminator_loss(ctx, disc, real, fake.detach(), labels)
        if self.reverse:
            from .discriminators import grad_reverse

            return self._discriminator_loss(ctx, disc, real, grad_reverse(fake), labels)
        return self.objective.g_loss(disc(fake, labels))

    def _discriminator_loss(self, ctx, disc, real, fake, labels) -> torch.Tensor:
        from .discriminators import gradient_penalty

        # one call on both halves: a DDP-wrapped discriminator must see one forward per backward
        both = disc(torch.cat([real, fake]), None if labels is None else torch.cat([labels, labels]))
        real_scores, fake_scores = both[: len(real)], both[len(real):]
        loss = self.objective.d_loss(real_scores, fake_scores)
        tag = f"adv/{self.discriminator}"
        if self.objective.gradient_penalty:
            penalty = gradient_penalty(ckpt_unwrap(disc), real, fake, labels)
            ctx.record(f"{tag}/gradient_penalty", penalty)
            loss = loss + self.gp * penalty
        with torch.no_grad():
            cut = self.objective.threshold
            acc_real, acc_fake = (real_scores > cut).float().mean(), (fake_scores <= cut).float().mean()
        ctx.record(f"{tag}/acc_real", acc_real)
        ctx.record(f"{tag}/acc_fake", acc_fake)
        self._watch(ctx, bool(acc_real == 1 and acc_fake == 1))
        return loss

    def _watch(self, ctx, won: bool) -> None:
        self.won_for = self.won_for + 1 if won else 0
        if self.won_for >= self.patience and not self.reported:
            ctx.warn(f"adv/{self.discriminator}/wins",
                     f"iteration {ctx.step}: discriminator '{self.discriminator}' has classified "
                     f"every sample right for {self.won_for} steps; the student gets little gradient "
                     f"(lower its learning rate or steps, or use spectral_norm / a softer objective)")
            self.reported = True
        elif not won:
            self.reported = False


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
        self.distance = _option(_FEATURE_DISTANCES, distance, "feature_match.distance")
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
