"""What a phase trains on: a batch of images with whatever its source knows about them."""
from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor | None = None      # real labels, or the classes a conditional generator was asked for
    source: str = "real"
    teacher_images: torch.Tensor | None = None  # cross-modal: what the teacher sees (None: ``images``)
    plain: torch.Tensor | None = None           # per-batch synthesis: the images before augmentation
    index: torch.Tensor | None = None           # real batches: the samples' indices in the training split
    partners: torch.Tensor | None = None        # data.class_pairs: another sample of each one's class
