"""Parts of a split: the stratified labeled subset a few-label run may use, the held-out part
model selection evaluates on, and the canaries a privacy audit looks for. Each is a function of
its seed alone, so every run draws the same samples."""
from __future__ import annotations

import math

import torch

from dfkd.data.datasets import ImageTensorDataset
from dfkd.data.loader import epoch_seed
from dfkd_base.errors import ConfigError


def plant_canaries(dataset: ImageTensorDataset, n: int, seed: int) -> tuple[ImageTensorDataset, dict]:
    """``dataset`` with ``n`` samples (a permutation that depends on ``seed`` only) relabeled to
    another class drawn at random: canaries a membership attack should find in a model trained on
    them. Returns the dataset and ``{"index", "label"}`` (the planted labels) to record."""
    if n > len(dataset):
        raise ConfigError(f"data.canaries={n}, and {dataset.info.name}/{dataset.split} has {len(dataset)} samples")
    generator = torch.Generator().manual_seed(epoch_seed(seed, 1 << 21))
    index = torch.randperm(len(dataset), generator=generator)[:n]
    shift = torch.randint(1, dataset.info.num_classes, (n,), generator=generator)
    labels = dataset.labels.clone()
    labels[index] = (labels[index] + shift) % dataset.info.num_classes
    planted = ImageTensorDataset(dataset.images, labels, dataset.info, dataset.split, dataset.paired)
    return planted, {"index": index, "label": labels[index].clone()}


def _stratified_index(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Sorted indices of ceil(fraction × n_c) samples of each class c, drawn by a permutation that
    depends on ``seed`` only."""
    generator = torch.Generator().manual_seed(epoch_seed(seed, 1 << 20))
    order = torch.randperm(len(labels), generator=generator)
    keep = []
    for c in labels.unique().tolist():
        members = order[labels[order] == c]
        keep.append(members[: math.ceil(fraction * len(members))])
    return torch.cat(keep).sort().values


def _subset(dataset: ImageTensorDataset, index: torch.Tensor, split: str) -> ImageTensorDataset:
    return ImageTensorDataset(dataset.images[index], dataset.labels[index], dataset.info, split,
                              paired=None if dataset.paired is None else dataset.paired[index])


def labeled_subset(dataset: ImageTensorDataset, fraction: float, seed: int) -> ImageTensorDataset:
    """A stratified ``fraction`` of ``dataset``: ceil(fraction × n_c) samples of each class c,
    drawn by a permutation that depends on ``seed`` only (the few labels a run may use)."""
    if bool((dataset.labels < 0).any()):
        raise ConfigError(f"'labeled' batches need labels, and {dataset.split} has unlabeled samples")
    if fraction >= 1:
        return dataset
    return _subset(dataset, _stratified_index(dataset.labels, fraction, seed), f"{dataset.split}[{fraction:g} labeled]")


# The held-out part's permutation seed: no run's seed, so every run holds out the same samples.
HOLD_OUT_SEED = 1 << 30


def hold_out(dataset: ImageTensorDataset, fraction: float) -> tuple[ImageTensorDataset, ImageTensorDataset]:
    """``dataset`` split into (the rest, a stratified ``fraction`` of it, the same in every run):
    model selection's training and validation sets (``data.validation``)."""
    held = _stratified_index(dataset.labels, fraction, HOLD_OUT_SEED)
    rest = torch.ones(len(dataset), dtype=torch.bool)
    rest[held] = False
    return (_subset(dataset, torch.nonzero(rest).squeeze(1), f"{dataset.split}[rest of {fraction:g}]"),
            _subset(dataset, held, f"{dataset.split}[{fraction:g} held out]"))
