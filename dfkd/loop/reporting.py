"""What a run shows a researcher: losses and diagnostics averaged between logging steps,
learning rates and timers, what the teacher makes of synthetic batches, and image grids.

Everything goes through :class:`~dfkd.core.runs.MetricLogger` (``metrics.jsonl`` and TensorBoard)
against the global step, the iteration count.
"""
from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F

from dfkd.core.config import config_to_dict, flatten
from dfkd.core.runs import MetricLogger, is_main_process
from dfkd.data.datasets import denormalize
from dfkd.loop.evaluation import exit_scalars
from dfkd.loop.quality import SampleQuality
from dfkd.methods.losses.datafree import bn_layer_distances
from dfkd.nets.quant import is_quantized, quant_inspection
from dfkd.nets.taps import BNStatsTap, embed
from dfkd_base.errors import ConfigError

GRID_CELL = 96   # pixels a grid cell is shown at (nearest-neighbour upscaling): legible in TensorBoard's cards


LABEL_MARGIN = 240  # pixels of a labeled grid's left margin, for a row's title and note


def _font(size: int):
    """Pillow's built-in scalable font at ``size`` px (its bitmap font where FreeType is missing):
    labels stay readable when TensorBoard scales a grid down into its card."""
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def labeled_class_grid(rows: list[torch.Tensor], names: list[str], counts: list[int], per_row: int = 8,
                       cell: int = GRID_CELL) -> torch.Tensor:
    """One row per class: up to ``per_row`` images (C, H, W in [0, 1]) upscaled to ``cell`` px,
    the class's index, name and count written in a 240 px margin on the left in a scalable font, empty cells dark gray (so a
    short row reads as empty, not as white images). Returns (3, H, W) in [0, 1]."""
    return labeled_grid(rows, [f"{k}: {name}" for k, name in enumerate(names)],
                        [f"{count} in the batch" for count in counts], per_row, cell)


def labeled_grid(rows: list[torch.Tensor], titles: list[str], notes: list[str], per_row: int = 8,
                 cell: int = GRID_CELL) -> torch.Tensor:
    """Rows of up to ``per_row`` images upscaled to ``cell`` px, each row's title and a note in a
    margin on the left, empty cells dark gray. Returns (3, H, W) in [0, 1]."""
    from PIL import Image, ImageDraw

    margin, pad = LABEL_MARGIN, 2
    width, height = margin + per_row * (cell + pad), len(rows) * (cell + pad)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    title_font, note_font = _font(max(10, cell // 4)), _font(max(8, cell // 6))
    for k, (images, title, note) in enumerate(zip(rows, titles, notes)):
        top = k * (cell + pad)
        draw.text((4, top + cell // 2 - cell // 4 - 2), title, fill=(0, 0, 0), font=title_font)
        draw.text((4, top + cell // 2 + 4), note, fill=(90, 90, 90), font=note_font)
        for j in range(per_row):
            left = margin + j * (cell + pad)
            if j < len(images):
                x = F.interpolate(images[j:j + 1].float().clamp(0, 1), size=(cell, cell), mode="nearest")[0]
                x = (x.expand(3, -1, -1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
                canvas.paste(Image.fromarray(x), (left, top))
            else:
                draw.rectangle([left, top, left + cell - 1, top + cell - 1], fill=(64, 64, 64))
    return torch.from_numpy(np.array(canvas)).permute(2, 0, 1).float() / 255


class Reporter:
    def __init__(self, run, logger: MetricLogger):
        self.logger, self.info, self.runtime, self.teachers, self.modality = \
            logger, run.info, run.runtime, run.teachers, run.modality
        self.config, self.test_loader, self.student = run.config, run.test_loader, run.student
        self.iters_per_epoch, self.total_iters = run.iters_per_epoch, run.total_iters
        self.recent: torch.Tensor | None = None   # the newest synthetic samples, for the quality measures
        self._seen: torch.Tensor | None = None
        self._quality = None
        self._real: tuple[torch.Tensor, torch.Tensor] | None = None  # evaluation samples the measures compare with
        # kept as device tensors until a flush: converting each would synchronize a GPU once per term and step
        self.pending: dict[str, list[torch.Tensor]] = {}
        if logger.writer is not None:  # the student's accuracy with the teacher's as a line beside it
            counts = [f"synthetic/count/{k}_{name}" for k, name in enumerate(self.info.class_names)]
            logger.writer.add_custom_scalars({
                "accuracy": {"student and teacher": ["Multiline", ["eval/acc", "eval/teacher_acc"]]},
                "synthetic": {"samples per class the teacher predicts": ["Multiline", counts],
                              "diversity, synthetic and real": ["Multiline", ["quality/diversity",
                                                                              "quality/diversity_real"]]}})

    def evaluation(self, step: int, epoch: int, result: dict, best: float, teacher_acc: float | None,
                   extra: dict[str, float]) -> None:
        """An evaluation's scalars; the teacher's accuracy again, so its line spans the chart."""
        teacher = {"eval/teacher_acc": teacher_acc} if teacher_acc is not None else {}
        self.logger.scalars(step, {"eval/acc": result["acc"], "eval/loss": result["loss"], "epoch": epoch,
                                   "eval/best_acc": best, **teacher, **extra, **exit_scalars(result)})

    def agreement(self, step: int, epoch: int, value: float | None) -> None:
        """A run without labeled images: the student's agreement with the teacher on held-out
        synthetic samples, its progress measure."""
        if value is not None:
            self.logger.scalars(step, {"eval/teacher_agreement": value, "epoch": epoch})

    def epoch_images(self, step: int, synthetic: torch.Tensor | None) -> None:
        """The epoch's grids: synthetic samples (all, and by the class the teacher predicts), an
        evaluation batch by label (unless ``output.show_real`` is off), paired modalities."""
        self.sample_quality(step, synthetic)
        if self.logger.writer is None:  # no TensorBoard here (turned off, or not rank 0)
            return
        self.quantization(step, synthetic)
        if synthetic is not None and self.teachers.first is not None:
            self.sample_grids(step, synthetic)
            if self.modality is not None:
                self.pair_grid(step, "crossmodal/synthetic_pairs", synthetic)
        if self.test_loader is None:
            return
        if self.modality is not None or self.config.data.pairs:
            self.pair_grid(step, "crossmodal/real_pairs", *next(iter(self.test_loader))[::2])
        elif self.config.output.show_real and synthetic is not None:
            images, labels = next(iter(self.test_loader))[:2]
            self.class_grid(step, "real/by_class", images, labels,
                            "a batch of the evaluation split, one row per true class")

    def remember(self, synthetic: torch.Tensor | None) -> None:
        """Keep the newest ``output.quality_samples`` synthetic samples (each batch once)."""
        n = self.config.output.quality_samples
        if synthetic is None or not n or synthetic is self._seen or not self.logger.enabled:
            return
        self._seen = synthetic
        joined = synthetic.detach() if self.recent is None else torch.cat([self.recent, synthetic.detach()])
        self.recent = joined[-n:]

    @torch.no_grad()
    def sample_quality(self, step: int, synthetic: torch.Tensor | None) -> None:
        """Teacher-FID, precision/recall/density/coverage and diversity of the newest synthetic
        samples (once there are ``output.quality_samples`` of them) against as many evaluation-split
        samples; a projector snapshot of both at its epochs."""
        self.remember(synthetic)
        n, teacher = self.config.output.quality_samples, self.teachers.first
        if self.recent is None or len(self.recent) < n or teacher is None:
            return
        if self._quality is None:
            self._real = self._real_samples(n)
            self._quality = SampleQuality(lambda x: embed(teacher, x, self.runtime.forward),
                                          self._real[0] if self._real else None)
        features, logits = self._quality.embed(self.recent)  # one teacher pass serves both
        self.logger.scalars(step, self._quality.measure(features))
        every, epoch = self.config.output.projector_every, step // self.iters_per_epoch
        due = step == self.total_iters if every is None else bool(every) and epoch % every == 0
        if due and self.logger.writer is not None:
            self.projector(step, features, logits.argmax(1))

    def _real_samples(self, n: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The first ``n`` evaluation-split samples the teacher takes and their labels (None: the
        run reads none, or fewer)."""
        if self.test_loader is None or len(self.test_loader.dataset) < n:
            return None
        images, labels = [], []
        for batch in self.test_loader:
            images.append(batch[0])
            labels.append(batch[1])
            if sum(len(x) for x in images) >= n:
                break
        return torch.cat(images)[:n], torch.cat(labels)[:n]

    def projector(self, step: int, features: torch.Tensor, predicted: torch.Tensor) -> None:
        """Synthetic (labeled with the teacher's class) and real samples (their true class) in the
        teacher's feature space, with their images unless ``output.show_real`` is off."""
        names = self.info.class_names
        real = self._quality.real
        features, metadata = [features], [["synthetic", names[k]] for k in predicted.tolist()]
        images = [denormalize(self.recent.float(), self.info)]
        if real is not None:
            features.append(real)
            metadata += [["real", names[k]] for k in self._real[1].tolist()]
            images.append(denormalize(self._real[0].float(), self.info))
        show = real is None or self.config.output.show_real
        self.logger.writer.add_embedding(torch.cat(features).cpu(), metadata=metadata, global_step=step,
                                         label_img=torch.cat(images).clamp(0, 1).cpu() if show else None,
                                         tag="teacher_features", metadata_header=["source", "class"])

    def quantization(self, step: int, synthetic: torch.Tensor | None) -> None:
        """A quantized student's steps, clip values and clipped fractions per layer, and its
        weight and input quantization errors, on the batch it trains on (synthetic, or else an
        evaluation batch)."""
        model = self.student.eval_module
        if not is_quantized(model):
            return
        if synthetic is not None:
            x = synthetic if self.modality is None else self.modality(synthetic, self.info)
        elif self.test_loader is not None:
            x = next(iter(self.test_loader))[0 if not self.config.data.pairs else 2]
        else:
            return
        with torch.no_grad():
            scalars, histograms = quant_inspection(model, x.to(self.runtime.device)[:256])
        self.logger.scalars(step, scalars)
        for tag, values in histograms.items():
            self.logger.histogram(step, tag, values)

    def finish(self, summary: dict) -> None:
        """The run's resolved config and final numbers in TensorBoard's HParams table; then close."""
        if self.logger.writer is not None:
            hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v)
                       for k, v in flatten(config_to_dict(self.config)).items()}
            metrics = {f"hparam/{k}": float(summary[k]) for k in ("final_acc", "best_acc") if summary.get(k) is not None}
            self.logger.writer.add_hparams(hparams, metrics, run_name=".")
        self.logger.close()

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
        self.remember(synthetic)
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
        self.logger.histogram(step, "synthetic/teacher_confidence", probs.max(1).values)
        scalars = {f"bn_distance/{s.name}": float(d) for s, d in zip(stats, bn_layer_distances(stats))}
        counts = torch.bincount(pred, minlength=self.info.num_classes).tolist()
        scalars.update({f"synthetic/count/{k}_{name}": float(c)
                        for k, (name, c) in enumerate(zip(self.info.class_names, counts))})
        scalars["synthetic/teacher_confidence_mean"] = float(probs.max(1).values.mean())
        return scalars

    @torch.no_grad()
    def sample_grids(self, step: int, images: torch.Tensor) -> None:
        """Synthetic samples, all together and one row per class the teacher predicts."""
        if self.logger.writer is None:
            return
        pred = self.runtime.forward(self.teachers.first, images).argmax(1)
        shown = denormalize(images[:64].float(), self.info)
        scale = max(1, GRID_CELL // shown.shape[-1])  # nearest-neighbour, to a legible size
        self.logger.image_grid(step, "synthetic/samples", F.interpolate(shown, scale_factor=scale), nrow=8)
        self.class_grid(step, "synthetic/by_teacher_class", images, pred,
                        "synthetic samples, one row per class the teacher predicts for them")

    def class_grid(self, step: int, tag: str, images: torch.Tensor, classes: torch.Tensor, what: str) -> None:
        """Up to 8 of ``images`` per class, labeled with the dataset's class names and counts."""
        rows = [denormalize(images[classes == k][:8].float(), self.info) for k in range(self.info.num_classes)]
        counts = torch.bincount(classes, minlength=self.info.num_classes).tolist()
        self.logger.writer.add_image(tag, labeled_class_grid(rows, list(self.info.class_names), counts), step)
        self.logger.text(step, f"{tag}/about", what)

    @torch.no_grad()
    def pair_grid(self, step: int, tag: str, images: torch.Tensor, paired: torch.Tensor | None = None) -> None:
        """Up to 8 samples, two labeled rows: the teacher's modality on top, the students'
        (``paired``, or the built-in modality of ``images``; rescaled to [0, 1] per image, to the
        same size and channel count) below."""
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
        student = self.config.data.modality or "paired modality B"
        grid = labeled_grid([a, b], ["teacher sees", "students see"],
                            ["the images" if not self.config.data.pairs else "modality A", student])
        self.logger.writer.add_image(tag, grid, step)
        self.logger.text(step, f"{tag}/about", f"the same {len(a)} samples: the teacher's input on top, the "
                                               f"students' ({student}) below")
