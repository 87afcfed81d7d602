"""The pictures a run shows in TensorBoard, each saved beside it too (``figures/<tag>.png``, the
latest): synthetic samples captioned with the teacher's class and confidence, samples by class,
what the teacher responds to in synthetic and real samples, per-class accuracy and agreement,
the confusion matrix, class counts of synthetic batches, and paired modalities. Drawn by
:mod:`dfkd.loop.figures`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from dfkd.core.io import atomic_write
from dfkd.core.runs import MetricLogger
from dfkd.data.datasets import denormalize
from dfkd.loop import figures

SHOWN_CLASSES = 10    # rows of a per-class picture at most (the most frequent, or the worst, classes)
CHART_CLASSES = 20    # classes of a per-class chart or confusion matrix at most (the worst)


def input_evidence(model, images: torch.Tensor, classes: torch.Tensor, copies: int = 16, noise: float = 0.15
                   ) -> torch.Tensor:
    """What in each image raises the model's score of its class: SmoothGrad (Smilkov et al. 2017),
    |∂ logit / ∂ input| averaged over ``copies`` copies with Gaussian noise of ``noise`` times the
    image's range (raw gradients are speckled), the largest over channels, scaled to [0, 1] per
    image by its 99th percentile. (N, H, W). The noise has its own generator: the run's random
    draws are untouched."""
    x = images.detach().float()
    draws = torch.Generator(device=x.device).manual_seed(0)
    spread = noise * (x.flatten(1).amax(1) - x.flatten(1).amin(1)).view(-1, 1, 1, 1)
    noisy = (x.unsqueeze(0) + spread * torch.randn((copies, *x.shape), generator=draws, device=x.device,
                                                   dtype=x.dtype)).flatten(0, 1).requires_grad_(True)
    was_training = model.training
    model.eval()
    with torch.enable_grad():
        logits = model(noisy).float()
        grad, = torch.autograd.grad(logits.gather(1, classes.repeat(copies).view(-1, 1)).sum(), noisy)
    model.train(was_training)
    maps = grad.abs().view(copies, *x.shape).mean(0).amax(1)
    top = maps.flatten(1).quantile(0.99, dim=1).clamp_min(1e-12).view(-1, 1, 1)
    return (maps / top).clamp(0, 1)


class Views:
    """Logs figures for one run: to TensorBoard and, the latest of each tag, as PNG files."""

    def __init__(self, run, logger: MetricLogger):
        self.logger, self.info, self.runtime, self.config = logger, run.info, run.runtime, run.config
        self.names = [str(n) for n in self.info.class_names]
        # what a row or caption calls class c: its index and name, or the name alone when it is the index
        self.label = [name if name == str(c) else f"{c}: {figures.short(name, 10)}"
                      for c, name in enumerate(self.names)]

    # ---------------------------------------------------------------- logging a figure
    def log(self, step: int, tag: str, figure, caption: str | None = None) -> None:
        """Render ``figure`` once; log it under ``tag`` and write ``figures/<tag>.png``."""
        import numpy as np
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from PIL import Image

        canvas = FigureCanvasAgg(figure)
        canvas.draw()
        pixels = np.asarray(canvas.buffer_rgba())[..., :3]
        self.logger.writer.add_image(tag, pixels, step, dataformats="HWC")
        if caption:
            self.logger.caption(f"{tag}/about", caption)
        if self.logger.run_dir is not None:
            folder = self.logger.run_dir / "figures"
            folder.mkdir(exist_ok=True)
            atomic_write(folder / f"{tag.replace('/', '.')}.png",
                         lambda f: Image.fromarray(pixels).save(f, format="png"))

    # ---------------------------------------------------------------- synthetic batches
    def class_counts(self, step: int, predicted: torch.Tensor) -> float:
        """The batch's count per class the teacher predicts, as a bar chart; returns the class
        balance: the entropy of those counts over its largest value (1: every class equally)."""
        k = self.info.num_classes
        counts = torch.bincount(predicted.cpu(), minlength=k).float()
        shares = counts / counts.sum()
        balance = float(-(shares[shares > 0] * shares[shares > 0].log()).sum() / torch.log(torch.tensor(float(k))))
        self.log(step, "synthetic/class_counts", figures.class_counts(
            counts.long().tolist(), self.names, f"a synthetic batch by the teacher's class (iteration {step})"),
                 "how many samples of the newest synthetic batch the teacher assigns to each class; "
                 "synthetic/class_balance is their entropy over log(classes)")
        return balance

    @torch.no_grad()
    def synthetic(self, step: int, teacher, images: torch.Tensor) -> None:
        """Synthetic samples captioned with the teacher's class and confidence, and one row per
        class the teacher predicts."""
        probs = F.softmax(self.runtime.forward(teacher, images).float(), 1)
        confidence, predicted = probs.max(1)
        shown = denormalize(images[:15].float(), self.info)
        captions = [f"{figures.short(self.names[c], 8)}\n{100 * float(p):.0f}%"
                    for c, p in zip(predicted[:15].tolist(), confidence[:15])]
        self.log(step, "synthetic/samples", figures.sample_grid(
            shown, captions, f"synthetic samples, the teacher's class and confidence (iteration {step})"),
                 "the newest synthetic batch; under each sample, the class the teacher predicts and its softmax "
                 "probability")
        self.by_class(step, "synthetic/by_teacher_class", images, predicted,
                      "synthetic samples, one row per class the teacher predicts for them")

    def by_class(self, step: int, tag: str, images: torch.Tensor, classes: torch.Tensor, what: str) -> None:
        """Up to 5 of ``images`` per class (the most frequent classes when there are many)."""
        counts = torch.bincount(classes.cpu(), minlength=self.info.num_classes)
        shown = sorted(range(len(counts)), key=lambda c: -int(counts[c]))[:SHOWN_CLASSES] \
            if len(counts) > SHOWN_CLASSES else range(len(counts))
        classes = classes.cpu()
        rows = [denormalize(images[(classes == c).to(images.device)][:5].float(), self.info) for c in shown]
        labels = [f"{self.label[c]} ({int(counts[c])})" for c in shown]
        self.log(step, tag, figures.class_rows(rows, labels, f"{what} (iteration {step})"),
                 f"{what}; beside each class, how many of the batch it holds")

    def evidence(self, step: int, teacher, synthetic: torch.Tensor, real: tuple[torch.Tensor, torch.Tensor] | None
                 ) -> None:
        """Per class, the synthetic sample the teacher is surest of and what in it raises the
        teacher's score of the class, beside a real sample of the class and its map (when the run
        shows real images)."""
        with torch.no_grad():
            probs = F.softmax(self.runtime.forward(teacher, synthetic).float(), 1)
        confidence, predicted = probs.max(1)
        counts = torch.bincount(predicted.cpu(), minlength=self.info.num_classes)
        classes = [c for c in sorted(range(len(counts)), key=lambda c: -int(counts[c])) if counts[c]][:SHOWN_CLASSES]
        classes.sort()
        picks = [int(torch.where(predicted == c, confidence, torch.full_like(confidence, -1)).argmax()) for c in classes]
        chosen = synthetic[picks]
        maps = input_evidence(teacher, chosen, torch.tensor(classes, device=chosen.device))
        rows = [[denormalize(chosen[i:i + 1].float(), self.info)[0], maps[i]] for i in range(len(classes))]
        columns = ["synthetic", "evidence"]
        if real is not None:
            images, labels = real
            labels = labels.to(images.device)
            for i, c in enumerate(classes):
                found = (labels == c).nonzero()
                if len(found):
                    sample = images[found[0]]
                    rows[i] += [denormalize(sample.float(), self.info)[0],
                                input_evidence(teacher, sample, torch.tensor([c], device=sample.device))[0]]
                else:
                    rows[i] += [None, None]
            columns += ["real", "evidence"]
        self.log(step, "synthetic/what_the_teacher_sees", figures.evidence(
            rows, [self.label[c] for c in classes], columns,
            f"what raises the teacher's class score (iteration {step})"),
                 "per class: the synthetic sample the teacher is surest of, and |d logit / d input| (bright: "
                 "pixels whose change moves the class score most)" +
                 (", beside a real sample of the class and its map" if real is not None else ""))

    # ---------------------------------------------------------------- evaluation
    def evaluation(self, step: int, labels: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor | None
                   ) -> float | None:
        """Per class of the evaluation split: the student's accuracy and its agreement with the
        teacher, and its confusion matrix. Returns the overall agreement (%), None without a teacher."""
        k = self.info.num_classes
        labels, student = labels.cpu(), student.cpu()
        per_class = torch.bincount(labels, minlength=k).clamp_min(1).float()
        accuracy = 100 * torch.bincount(labels[student == labels], minlength=k).float() / per_class
        agree = None
        if teacher is not None:
            teacher = teacher.cpu()
            agree = 100 * torch.bincount(labels[student == teacher], minlength=k).float() / per_class
        classes = sorted(range(k), key=lambda c: float(accuracy[c]))[:CHART_CLASSES] if k > CHART_CLASSES \
            else list(range(k))
        names = [self.names[c] for c in classes]
        worst = " (the worst classes)" if k > CHART_CLASSES else ""
        self.log(step, "eval/per_class", figures.per_class_scores(
            accuracy[classes].tolist(), agree[classes].tolist() if agree is not None else None, names,
            f"per class of the evaluation split{worst} (iteration {step})"),
                 "per true class of the evaluation split: the student's accuracy and how often it predicts the "
                 "class the teacher predicts")
        matrix = torch.zeros(k, k, dtype=torch.long)
        matrix.index_put_((labels, student), torch.ones_like(labels), accumulate=True)
        index = torch.tensor(classes)
        self.log(step, "eval/confusion_matrix", figures.confusion(
            matrix[index][:, index], names, f"student on the evaluation split{worst} (iteration {step})"),
                 "rows: true class, columns: the student's prediction, each row in % of its class")
        return None if teacher is None else float(100 * (student == teacher).float().mean())

    # ---------------------------------------------------------------- modalities
    def pairs(self, step: int, tag: str, images: torch.Tensor, students: torch.Tensor, student: str) -> None:
        """The same samples as the teacher sees them (top) and as the students do (below)."""
        a = denormalize(images[:5].float(), self.info)
        b = students[:5].float()
        low, high = b.amin(dim=(1, 2, 3), keepdim=True), b.amax(dim=(1, 2, 3), keepdim=True)
        b = (b - low) / (high - low).clamp_min(1e-6)
        self.log(step, tag, figures.class_rows([a, b], ["teacher sees", "students see"],
                                               f"the same {len(a)} samples (iteration {step})"),
                 f"the same samples: the teacher's input on top, the students' ({student}) below")
