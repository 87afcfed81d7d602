"""Datasets held in memory as uint8 tensors: what a dataset is (:class:`DatasetInfo`: shape,
classes, statistics), the registry of named datasets and their readers, and one split in memory
(:class:`ImageTensorDataset`).

On a small CPU a per-sample ``torch.utils.data.DataLoader`` costs more than a LeNet step, so
every dataset is read once into a ``(N, C, H, W)`` uint8 tensor and the loader
(:mod:`dfkd.data.loader`) slices, normalizes and augments whole batches at a time.

The registered datasets are read by :mod:`dfkd.data.readers`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch

from dfkd_base.errors import ConfigError, ShapeError
from dfkd_base.registry import Registry

SPLITS = ("train", "test")
# What a dataset's standard training augmentation is (DatasetInfo.augment; see dfkd.data.loader).
AUGMENTATIONS = ("none", "crop", "crop_flip")


@dataclass(frozen=True)
class DatasetInfo:
    """What models and reports need to know about a dataset, without loading it."""

    name: str
    shape: tuple[int, int, int]  # C, H, W of one image as models see it
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]  # per channel, in [0, 1] pixel units
    std: tuple[float, ...]
    augment: str  # one of AUGMENTATIONS; what TensorLoader(augment=True) applies
    # (H, W) the pictures were taken at, when the pipeline resizes them to ``shape`` (None: taken at it)
    native_size: tuple[int, int] | None = None


def normalize(x: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """Map uint8 pixels (or floats already in [0, 1]) to ``(x - mean) / std`` per channel."""
    if x.dtype == torch.uint8:
        x = x.float() / 255
    mean = torch.tensor(info.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.tensor(info.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - mean) / std


def denormalize(x: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """Inverse of :func:`normalize`, clamped to [0, 1] so the result can be saved as an image."""
    mean = torch.tensor(info.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    std = torch.tensor(info.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x * std + mean).clamp(0, 1)


class ImageTensorDataset:
    """One split of a dataset: ``images`` uint8 ``(N, C, H, W)``, ``labels`` int64 ``(N,)``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, info: DatasetInfo, split: str,
                 paired: torch.Tensor | None = None):
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != info.shape:
            raise ShapeError(
                f"{info.name}/{split}: expected uint8 images of shape (N, {', '.join(map(str, info.shape))}), "
                f"got {images.dtype} {tuple(images.shape)}"
            )
        if labels.dtype != torch.int64 or labels.shape != images.shape[:1]:
            raise ShapeError(
                f"{info.name}/{split}: expected {len(images)} int64 labels, got {labels.dtype} {tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels
        self.info = info
        self.split = split
        # cross-modal pairs: the same samples in a second modality (uint8 or float), what students see
        self.paired = paired

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.normalize(self.images[index]), int(self.labels[index])

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        return normalize(images, self.info)

    def __repr__(self) -> str:
        return f"ImageTensorDataset({self.info.name!r}, split={self.split!r}, n={len(self)})"


# --- registry: the datasets themselves are read by dfkd.data.readers --------------------

Reader = Callable[[DatasetInfo, str, str | None, bool], ImageTensorDataset]


@dataclass(frozen=True)
class _DatasetEntry:
    info: DatasetInfo | None  # None: the user's own images, shaped and classed by a teacher's input card
    read: Reader  # (info, split, root, download) -> dataset


DATASETS: Registry[_DatasetEntry] = Registry("dataset", locations=("dfkd.data.readers", "dfkd.data.user"))


def register_dataset(info: DatasetInfo, *aliases: str) -> Callable[[Reader], Reader]:
    """Register ``read(info, split, root, download)`` as the reader of dataset ``info.name``."""
    def decorator(read: Reader) -> Reader:
        DATASETS.register(info.name, *aliases)(_DatasetEntry(info, read))
        return read

    return decorator


def register_user_dataset(name: str) -> Callable[[Reader], Reader]:
    """Register the reader of a user's own images: ``read(card_info, split, root, download)``
    converts them to the shape, classes and statistics of a teacher's input card."""
    def decorator(read: Reader) -> Reader:
        DATASETS.register(name)(_DatasetEntry(None, read))
        return read

    return decorator


def dataset_info(name: str) -> DatasetInfo:
    """Shape, classes and statistics of a registered dataset, without reading its files."""
    info = DATASETS.get(name).info
    if info is None:
        raise ConfigError(f"dataset '{name}' is your own images: their shape, classes and statistics are the "
                          f"input card of a teacher's model file, which this needs")
    return info


def load_dataset(name: str, split: str, root: str | None = None, download: bool = False,
                 card: DatasetInfo | None = None) -> ImageTensorDataset:
    """Read one split of a registered dataset into memory.

    ``root`` is where its files are (torchvision's layout, or bare IDX files for the
    MNIST family); ``download`` lets torchvision fetch missing files into it. ``card``: a teacher's
    input card (as a :class:`DatasetInfo`): the split is read as the card says, normalized with
    its statistics; the user's own images (``folder``, ``arrays``) are converted to it.
    """
    entry = DATASETS.get(name)
    if split not in SPLITS:
        raise ConfigError(f"unknown split '{split}' for dataset '{name}' (expected 'train' or 'test')")
    if entry.info is None:
        if card is None:
            dataset_info(name)  # the one-line error: a user's images need a card
        return entry.read(replace(card, name=name), split, root, download)
    info = agreeing(entry.info, card, "the teacher") if card is not None else None  # before reading any file
    dataset = entry.read(entry.info, split, root, download)
    if info is None:
        return dataset
    return ImageTensorDataset(dataset.images, dataset.labels, info, split, paired=dataset.paired)


def describe(info: DatasetInfo) -> str:
    return f"{'x'.join(map(str, info.shape))} images of {info.num_classes} classes"


def agreeing(dataset: DatasetInfo, card: DatasetInfo, source: str) -> DatasetInfo:
    """What a run reads real images as: ``dataset``'s images (name, augmentation), normalized and
    classed as the ``card`` (from ``source``) says; a ShapeError naming both when they disagree."""
    if tuple(dataset.shape) != tuple(card.shape) or dataset.num_classes != card.num_classes:
        raise ShapeError(f"dataset '{dataset.name}' gives {describe(dataset)}; the input card of {source} takes "
                         f"{describe(card)}: evaluate on images it takes (your own: folder or arrays) or, in a "
                         f"run, on none (data.eval=false)")
    return replace(card, name=dataset.name, augment=dataset.augment)
