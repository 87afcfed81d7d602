"""Contrastive terms with memories across steps: CMI's instance discrimination of synthetic
images in the teacher's feature space, and contrastive representation distillation (CRD)."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from kornia.augmentation import RandomResizedCrop

from dfkd.core.optim import build_optimizer
from dfkd.core.schema import OptimConfig
from dfkd.methods.losses.base import Feature, Term, register
from dfkd.methods.losses.relation import related
from dfkd.methods.ring_buffer import RingBuffer
from dfkd.nets.taps import BN_INPUT_MEANS, EMBEDDING
from dfkd_base.errors import ConfigError


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
        self.bank: RingBuffer | None = None      # rows of 2D raw features, made at the first kept batch
        self._step: torch.Tensor | None = None   # this inner step's raw [local, global] features
        self._kept: torch.Tensor | None = None   # those of the step whose batch is kept

    def taps(self) -> dict[str, list[str]]:
        return {"teacher": [BN_INPUT_MEANS], "student": []}

    def build(self, probe) -> None:
        self.build_head(probe(Feature("teacher", BN_INPUT_MEANS))[0])

    def build_head(self, feature_dim: int) -> None:
        self.head = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(), nn.Linear(feature_dim, self.dim))

    def make_optimizer(self, params, lr: float) -> torch.optim.Optimizer:
        return build_optimizer(params, OptimConfig(name="adam", lr=lr))

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
        if self.bank is not None and len(self.bank):
            rows = self.bank.rows("features", torch.randperm(len(self.bank), device=self.bank.device)[: self.negatives])
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
        if self.bank is None:
            self.bank = RingBuffer(self.bank_size, self._kept.device)
        self.bank.add(features=self._kept)
        self._step = self._kept = None

    def get_extra_state(self) -> dict:
        return {"bank": self.bank.state_dict() if self.bank is not None else None}

    def set_extra_state(self, state: dict) -> None:
        if state["bank"] is not None:
            self.bank = RingBuffer(self.bank_size, next(self.head.parameters()).device)
            self.bank.load_state_dict(state["bank"])




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
    0.5). Its embeddings train with the student: they join the student's optimizer (its rate,
    momentum, weight decay and schedule), as CRD's code and mdistiller put them in one optimizer. It
    needs the samples' indices: real-data batches."""

    trains_with_player = True

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
        student, teacher = related(ctx, "crd", self.layers)
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
