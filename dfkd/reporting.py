"""What a run shows a researcher: losses and diagnostics averaged between logging steps,
learning rates and timers, what the teacher makes of synthetic batches, and image grids.

Everything goes through :class:`~dfkd.runs.MetricLogger` (``metrics.jsonl`` and TensorBoard)
against the global step, the iteration count.
"""
from __future__ import annotations

import sys
from typing import Callable

import torch
import torch.nn.functional as F

from .data import DatasetInfo, denormalize
from .errors import ConfigError
from .losses import bn_layer_distances
from .runs import MetricLogger, is_main_process
from .runtime import Runtime
from .taps import BNStatsTap
from .teachers import Teachers


class Reporter:
    def __init__(self, logger: MetricLogger, info: DatasetInfo, runtime: Runtime, teachers: Teachers,
                 modality: Callable | None = None):
        self.logger, self.info, self.runtime, self.teachers, self.modality = logger, info, runtime, teachers, modality
        # kept as device tensors until a flush: converting each would synchronize a GPU once per term and step
        self.pending: dict[str, list[torch.Tensor]] = {}

    def add(self, tag: str, value: torch.Tensor) -> None:
        """A scalar to average into the next flush."""
        self.pending.setdefault(tag, []).append(value)

    def picked(self, pick: int | None, teachers: int) -> None:
        """Which teacher a ``random`` ensemble picked (or ``drop_one`` dropped) this iteration."""
        if pick is not None:
            for i in range(teachers):
                self.add(f"teacher/picked_{i}", torch.tensor(float(i == pick)))

    def add_losses(self, phase: str, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            self.add(f"loss/{phase}/{k}", v.float())

    def flush(self, step: int, extra: dict[str, float], synthetic: torch.Tensor | None = None) -> None:
        """The averages since the last flush, ``extra`` scalars beside them, and what the teacher
        makes of the latest ``synthetic`` batch."""
        values = {k: float(torch.stack(v).mean()) for k, v in self.pending.items() if v}
        values.update(extra)
        if synthetic is not None and self.teachers.first is not None:
            values.update(self.inspect_synthetic(step, synthetic))
        self.logger.scalars(step, values)
        self.pending.clear()

    def warn(self, step: int, tag: str, message: str) -> None:
        """A problem worth a human's look that does not stop the run: stderr and TensorBoard."""
        if is_main_process():
            print(f"dfkd: warning: {message}", file=sys.stderr)
        self.logger.text(step, tag, message)

    @torch.no_grad()
    def inspect_synthetic(self, step: int, images: torch.Tensor) -> dict[str, float]:
        """What the teacher makes of a synthetic batch: class and confidence histograms (to
        TensorBoard) and the per-layer BN-statistics distance (returned as scalars)."""
        if self.logger.writer is None:
            return {}
        teacher, bn_taps = self.teachers.first, self.teachers.bn_taps
        try:
            tap = bn_taps[0] if bn_taps else BNStatsTap(teacher)
        except ConfigError:  # a teacher without BatchNorm: no distances to show
            tap = None
        if tap is not None:
            tap.enabled = True
        probs = F.softmax(self.runtime.forward(teacher, images).float(), dim=1)
        stats = list(tap.stats) if tap is not None else []
        if tap is not None and tap not in bn_taps:
            tap.remove()
        pred = probs.argmax(1)
        self.logger.histogram(step, "synthetic/teacher_class", pred, bins=self.info.num_classes)
        self.logger.histogram(step, "synthetic/teacher_confidence", probs.max(1).values)
        scalars = {f"bn_distance/{s.name}": float(d) for s, d in zip(stats, bn_layer_distances(stats))}
        counts = torch.bincount(pred, minlength=self.info.num_classes).float()
        scalars["synthetic/classes_present"] = float((counts > 0).sum())
        scalars["synthetic/teacher_confidence_mean"] = float(probs.max(1).values.mean())
        return scalars

    @torch.no_grad()
    def sample_grids(self, step: int, images: torch.Tensor) -> None:
        """Synthetic samples, all together and one row per class the teacher predicts."""
        if self.logger.writer is None:
            return
        pred = self.runtime.forward(self.teachers.first, images).argmax(1)
        shown = denormalize(images[:64].float(), self.info)
        self.logger.image_grid(step, "synthetic/samples", shown, nrow=8)
        per_class = []  # up to 8 samples per predicted class, one row each, blank where fewer
        blank = torch.ones_like(shown[0])
        for k in range(self.info.num_classes):
            picked = denormalize(images[pred == k][:8].float(), self.info)
            per_class += list(picked) + [blank] * (8 - len(picked))
        self.logger.image_grid(step, "synthetic/by_teacher_class", torch.stack(per_class), nrow=8)

    @torch.no_grad()
    def pair_grid(self, step: int, tag: str, images: torch.Tensor, paired: torch.Tensor | None = None) -> None:
        """Up to 8 samples: the teacher's modality on top, the students' (``paired``, or the
        built-in modality of ``images``; rescaled to [0, 1] per image, to the same size and
        channel count) below."""
        if self.logger.writer is None:
            return
        images = images[:8].float()
        a = denormalize(images, self.info)
        b = self.modality(images, self.info) if paired is None else paired[:8].float()
        low, high = b.amin(dim=(1, 2, 3), keepdim=True), b.amax(dim=(1, 2, 3), keepdim=True)
        b = (b - low) / (high - low).clamp_min(1e-6)
        b = F.interpolate(b, size=a.shape[2:], mode="bilinear", align_corners=False) if b.shape[2:] != a.shape[2:] else b
        channels = max(a.shape[1], b.shape[1])
        a, b = a.expand(-1, channels, -1, -1), b.expand(-1, channels, -1, -1)
        self.logger.image_grid(step, tag, torch.cat([a, b]), nrow=len(a))
