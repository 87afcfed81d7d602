"""Evaluation on a labeled split, shared by training runs and ``dfkd eval``."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from .data import DatasetInfo


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
             modality: Callable | None = None, info: DatasetInfo | None = None, student: bool = True) -> dict:
    """Top-1 accuracy (%), mean cross-entropy and count over ``loader``'s (images, labels[, paired])
    batches, in eval mode (the model's mode is restored). A ``student`` of another modality is
    evaluated on it: the stored ``paired`` images of a user's pairs, or ``modality(images, info)``
    of the built-in ones; a teacher (``student=False``) sees the images themselves. ``forward(model, images)`` runs the model (the run's AMP and memory
    format); by default it is called directly."""
    forward = forward or (lambda m, x: m(x))
    was_training = model.training
    model.eval()
    correct, loss_sum, n = 0, 0.0, 0
    for images, labels, *paired in loader:
        if student and paired:  # a user's pairs: the student's modality is stored
            images = paired[0]
        elif student and modality is not None:
            images = modality(images, info)
        logits = forward(model, images).float()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(1) == labels).sum())
        n += labels.numel()
    model.train(was_training)
    return {"acc": 100.0 * correct / n, "loss": loss_sum / n, "n": n}
