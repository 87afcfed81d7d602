"""Datasets held in memory as uint8 tensors: what a dataset is (:class:`DatasetInfo`: shape,
classes, statistics), the registry of named datasets and their readers, and one split in memory
(:class:`ImageTensorDataset`).

On a small CPU a per-sample ``torch.utils.data.DataLoader`` costs more than a LeNet step, so
every dataset is read once into a ``(N, C, H, W)`` uint8 tensor and the loader
(:mod:`dfkd.data.loader`) slices, normalizes and augments whole batches at a time.

The registered datasets are read by :mod:`dfkd.data.readers`.
"""
from __future__ import annotations

from dataclasses import dataclass
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
    info: DatasetInfo
    read: Reader  # (info, split, root, download) -> dataset


DATASETS: Registry[_DatasetEntry] = Registry("dataset", locations=("dfkd.data.readers",))


def register_dataset(info: DatasetInfo, *aliases: str) -> Callable[[Reader], Reader]:
    """Register ``read(info, split, root, download)`` as the reader of dataset ``info.name``."""
    def decorator(read: Reader) -> Reader:
        DATASETS.register(info.name, *aliases)(_DatasetEntry(info, read))
        return read

    return decorator


def dataset_info(name: str) -> DatasetInfo:
    """Shape, classes and statistics of a registered dataset, without reading its files."""
    return DATASETS.get(name).info


def load_dataset(name: str, split: str, root: str | None = None, download: bool = False) -> ImageTensorDataset:
    """Read one split of a registered dataset into memory.

    ``root`` is where its files are (torchvision's layout, or bare IDX files for the
    MNIST family); ``download`` lets torchvision fetch missing files into it.
    """
    entry = DATASETS.get(name)
    if split not in SPLITS:
        raise ConfigError(f"unknown split '{split}' for dataset '{entry.info.name}' (expected 'train' or 'test')")
    return entry.read(entry.info, split, root, download)
