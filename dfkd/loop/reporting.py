"""What a run shows a researcher: losses and diagnostics averaged between logging steps,
learning rates and timers, what the teacher makes of synthetic batches, the evaluation with the
teacher's accuracy as a reference line, the pictures of :mod:`dfkd.loop.views`, and the run's
HParams session (:mod:`dfkd.loop.hparams`).

Everything goes through :class:`~dfkd.core.runs.MetricLogger` (``metrics.jsonl`` and TensorBoard)
against the global step, the iteration count. Two runs beside the run's own hold what another
axis needs: ``teacher-reference/`` the teacher's accuracy (the same tags, so that its line is on
the student's charts) and ``samples-seen/`` the evaluation against the samples the evaluated
model has trained on (iterations of different runs are not comparable; samples are).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from dfkd.core.config import config_to_dict
from dfkd.core.runs import MetricLogger, is_main_process, world_size
from dfkd.core.schema import SYNTHESIZER
from dfkd.data.datasets import denormalize
from dfkd.loop import hparams
from dfkd.loop.evaluation import evaluate, exit_scalars
from dfkd.loop.quality import SampleQuality
from dfkd.loop.views import Views
from dfkd.methods.losses.datafree import bn_layer_distances
from dfkd.nets.quant import is_quantized, quant_inspection
from dfkd.nets.taps import BNStatsTap, embed, has_embedding
from dfkd_base.errors import ConfigError

ACC_ABOUT = ("Top-1 accuracy (%) of the evaluated model on the evaluation split, against iterations (an "
             "iteration runs every phase once, so iterations of different methods are not comparable: "
             "eval/acc_vs_samples_seen is the same curve against samples trained on). The teacher-reference "
             "run draws the teacher's accuracy.")
DESCRIPTIONS = {
    "eval/acc": ACC_ABOUT,
    "eval/acc_vs_samples_seen": "Top-1 accuracy (%) of the evaluated model on the evaluation split, against the "
                                "number of samples it has trained on (its phases' steps times their batch sizes, "
                                "over all ranks). The teacher-reference run draws the teacher's accuracy.",
    "eval/gap_to_teacher": "The teacher's accuracy minus the evaluated model's, in points.",
    "eval/agreement": "How often (%) the evaluated model predicts the class the teacher predicts, on the "
                      "evaluation split.",
    "synthetic/class_balance": "The entropy of the teacher's classes over the newest synthetic batch, over "
                               "log(classes): 1 when every class is equally present, 0 when one class is.",
}


def averages(pending: dict[str, list[torch.Tensor]]) -> dict[str, float]:
    """The mean of each tag's values, read from each device in one transfer (one wait for it)."""
    by_device: dict[torch.device, list[str]] = {}
    for tag, values in pending.items():
        if values:
            by_device.setdefault(values[0].device, []).append(tag)
    out = {}
    for tags in by_device.values():
        means = torch.stack([torch.stack(pending[tag]).float().mean() for tag in tags]).tolist()
        out.update(zip(tags, means))
    return {tag: out[tag] for tag in pending if tag in out}


class Reporter:
    def __init__(self, run, logger: MetricLogger):
        self.logger, self.info, self.runtime, self.teachers, self.modality = \
            logger, run.info, run.runtime, run.teachers, run.modality
        self.config, self.test_loader, self.student = run.config, run.test_loader, run.student
        self.iters_per_epoch, self.total_iters = run.iters_per_epoch, run.total_iters
        self.phases, self.real = run.phases, run.real
        self.recent: torch.Tensor | None = None   # the newest synthetic samples, for the quality measures
        self._seen: torch.Tensor | None = None
        self._quality = None
        self._real: tuple[torch.Tensor, torch.Tensor] | None = None  # evaluation samples the measures compare with
        self._teacher_predicted: torch.Tensor | None = None  # the teacher's classes on the evaluation split
        self.agreement_now: float | None = None
        # kept as device tensors until a flush: converting each would synchronize a GPU once per term and step
        self.pending: dict[str, list[torch.Tensor]] = {}
        self.views = Views(run, logger) if logger.writer is not None else None
        self._beside: dict[str, object] = {}  # the writers of the runs beside this one, by folder name
        logger.descriptions.update(DESCRIPTIONS)
        if logger.writer is None:
            return
        logger.writer.add_custom_scalars({  # the student's accuracy with the teacher's as a line beside it
            "accuracy": {"student and teacher": ["Multiline", ["eval/acc", "eval/teacher_acc"]]},
            "synthetic": {"diversity, synthetic and real": ["Multiline", ["quality/diversity",
                                                                          "quality/diversity_real"]]}})
        self.log_root = self._log_root()
        hparams.session_start(logger.writer, hparams.run_hparams(config_to_dict(self.config)),
                              group=str(logger.run_dir.resolve().relative_to(self.log_root)))
        hparams.write_experiment(self.log_root)

    def _log_root(self) -> Path:
        """The folder whose runs share one HParams experiment: ``output.root`` when the run is
        inside it, else the folder that holds the run's experiment folder."""
        root, run_dir = Path(self.config.output.root).resolve(), self.logger.run_dir.resolve()
        return root if run_dir.is_relative_to(root) else run_dir.parent.parent

    def _writer_beside(self, name: str, purge_step: int | None = None):
        if name not in self._beside:
            from torch.utils.tensorboard import SummaryWriter

            self._beside[name] = SummaryWriter(str(self.logger.run_dir / name), purge_step=purge_step)
        return self._beside[name]

    # ---------------------------------------------------------------- the samples-seen axis
    def samples_per_iteration(self, epoch: int) -> int:
        """Samples the evaluated model trains on in one iteration of ``epoch``: its phases' steps
        times the batch size of their sources, over all ranks."""
        warming = epoch < self.config.synthesis.warmup_epochs
        real = self.real.loader.batch_size if self.real is not None else self.config.data.batch_size
        total, last = 0, 0
        for phase in self.phases:
            if not phase.runs_in(epoch) or (warming and phase.player != SYNTHESIZER):
                continue
            size = last if phase.batch == "same" else real if phase.batch in ("real", "labeled") \
                else self.config.synthesis.batch_size
            last = size
            if phase.player == self.student.name:
                total += phase.steps * size
        return total * world_size()

    def samples_seen(self, step: int) -> int:
        epochs, rest = divmod(step, self.iters_per_epoch)
        return sum(self.iters_per_epoch * self.samples_per_iteration(e) for e in range(epochs)) + \
            rest * self.samples_per_iteration(epochs)

    # ---------------------------------------------------------------- evaluation
    def evaluation(self, step: int, epoch: int, result: dict, best: float, teacher_acc: float | None,
                   extra: dict[str, float]) -> None:
        """An evaluation's scalars (against iterations, and against samples seen beside), the
        teacher's accuracy in the reference run, and the per-class pictures."""
        teacher = {"eval/teacher_acc": teacher_acc} if teacher_acc is not None else {}
        gap = {"eval/gap_to_teacher": teacher_acc - result["acc"]} if teacher_acc is not None else {}
        self.agreement_now = self._per_class(step, result)
        agreement = {"eval/agreement": self.agreement_now} if self.agreement_now is not None else {}
        self.logger.scalars(step, {"eval/acc": result["acc"], "eval/loss": result["loss"], "epoch": epoch,
                                   "eval/best_acc": best, **teacher, **gap, **agreement, **extra,
                                   **exit_scalars(result)})
        if self.logger.writer is None:
            return
        seen = self.samples_seen(step)
        purge = self.logger.purge_step
        writer = self._writer_beside("samples-seen", self.samples_seen(purge - 1) + 1 if purge else None)
        self.logger.scalars_to(writer, seen, {"eval/acc_vs_samples_seen": result["acc"]})
        if teacher_acc is not None:  # from the first step on, so that the line spans the chart
            new = "teacher-reference" not in self._beside
            reference = self._writer_beside("teacher-reference")
            for at, samples in ([(0, 0)] if new else []) + [(step, seen)]:
                self.logger.scalars_to(reference, at, {"eval/acc": teacher_acc})
                self.logger.scalars_to(reference, samples, {"eval/acc_vs_samples_seen": teacher_acc})

    def _per_class(self, step: int, result: dict) -> float | None:
        """The per-class pictures of an evaluation; returns the student's agreement with the teacher."""
        if self.views is None or "predicted" not in result:
            return None
        teacher = self.teachers.first
        if teacher is not None and self._teacher_predicted is None:
            self._teacher_predicted = evaluate(self.teachers.evaluation_model(), self.test_loader,
                                               self.runtime.forward, self.modality, self.info, student=False,
                                               predictions=True)["predicted"]
        return self.views.evaluation(step, result["labels"], result["predicted"], self._teacher_predicted)

    def agreement(self, step: int, epoch: int, value: float | None) -> None:
        """A run without labeled images: the student's agreement with the teacher on held-out
        synthetic samples, its progress measure."""
        if value is not None:
            self.logger.scalars(step, {"eval/teacher_agreement": value, "epoch": epoch})

    # ---------------------------------------------------------------- pictures of an epoch
    def epoch_images(self, step: int, synthetic: torch.Tensor | None) -> None:
        """The epoch's pictures: synthetic samples (captioned, by the class the teacher predicts,
        and what the teacher responds to in them), an evaluation batch by label (unless
        ``output.show_real`` is off), paired modalities."""
        self.sample_quality(step, synthetic)
        if self.views is None:  # no TensorBoard here (turned off, or not rank 0)
            return
        self.quantization(step, synthetic)
        show_real = self.config.output.show_real and self.test_loader is not None and self.modality is None \
            and not self.config.data.pairs
        real = next(iter(self.test_loader))[:2] if show_real else None
        teacher = self.teachers.first
        if synthetic is not None and teacher is not None:
            self.views.synthetic(step, teacher, synthetic)
            self.views.evidence(step, teacher, synthetic, real)
            if self.modality is not None:
                self.views.pairs(step, "crossmodal/synthetic_pairs", synthetic, self.modality(synthetic, self.info),
                                 self.config.data.modality)
        if self.test_loader is None:
            return
        if self.modality is not None or self.config.data.pairs:
            images, _, *paired = next(iter(self.test_loader))
            students = paired[0] if paired else self.modality(images, self.info)
            self.views.pairs(step, "crossmodal/real_pairs", images, students,
                             self.config.data.modality or "paired modality B")
        elif real is not None and synthetic is not None:
            self.views.by_class(step, "real/by_class", *real, "a batch of the evaluation split, one row per true class")

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
        if self._quality is None and not has_embedding(teacher):  # a black box: no space to measure in
            self.logger.caption("quality/about", "no sample-quality measures: the teacher has no embedding (no "
                                                 "Linear layer whose input to read; a black-box program)")
            self._quality = False
        if self._quality is False:
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
        """The run's time as a metric of its HParams session, the session's end and the
        experiment's columns with this run's; then close."""
        if self.logger.writer is not None:
            self.logger.scalars(summary["steps"], {"time/total_s": summary["time_total_s"]})
            hparams.session_end(self.logger.writer, ok=True)
            hparams.write_experiment(self.log_root)
        for writer in self._beside.values():
            writer.close()
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
        values = averages(self.pending)
        values.update(extra)
        self.remember(synthetic)
        if synthetic is not None and self.teachers.first is not None:
            values.update(self.inspect_synthetic(step, synthetic))
        self.logger.scalars(step, values)
        self.pending.clear()

    def note(self, step: int, tag: str, message: str) -> None:
        """What the run did on its own (it stopped early): stderr and TensorBoard."""
        if is_main_process():
            print(f"dfkd: {message}", file=sys.stderr)
        self.logger.text(step, tag, message)

    def warn(self, step: int, tag: str, message: str) -> None:
        """A problem worth a human's look that does not stop the run: stderr and TensorBoard."""
        if is_main_process():
            print(f"dfkd: warning: {message}", file=sys.stderr)
        self.logger.text(step, tag, message)

    @torch.no_grad()
    def inspect_synthetic(self, step: int, images: torch.Tensor) -> dict[str, float]:
        """What the teacher makes of a synthetic batch: its confidence histogram and class counts
        (to TensorBoard), the class balance and the per-layer BN-statistics distance (returned as
        scalars)."""
        if self.views is None:
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
        scalars["synthetic/class_balance"] = self.views.class_counts(step, pred)
        scalars["synthetic/teacher_confidence_mean"] = float(probs.max(1).values.mean())
        return scalars
