"""Datasets held in memory as uint8 tensors, and a batch loader that works on whole tensors.

On a small CPU a per-sample ``torch.utils.data.DataLoader`` costs more than a LeNet
step, so every dataset is read once into a ``(N, C, H, W)`` uint8 tensor and
:class:`TensorLoader` slices, normalizes and augments whole batches at a time.

scikit-learn and torchvision are imported inside the readers that need them: each
takes about a second to import, which the other datasets should not pay.
"""
from __future__ import annotations

import functools
import gzip
import math
import os
import struct
from dataclasses import dataclass, replace
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .errors import ConfigError, DatasetNotFoundError, DfkdError, ShapeError
from .registry import Registry

SPLITS = ("train", "test")
# Where torchvision-backed datasets live (and are downloaded to) when no root is given.
DEFAULT_ROOT = "data"
# Debian's `dataset-fashion-mnist` package installs the gzipped IDX files here.
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"
# Padding of the CIFAR-style random crop, in pixels on each side.
CROP_PADDING = 4

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


def augment_batch(x: torch.Tensor, policy: str, generator: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding) and/or horizontal flip, drawn independently per image.

    ``x`` holds [0, 1] pixels, so the padding is black as in torchvision's
    ``RandomCrop(padding=4)``. Random numbers come from the CPU ``generator`` so that
    runs reproduce whatever device the batch is on.
    """
    if policy == "none":
        return x
    if policy not in AUGMENTATIONS:
        raise ConfigError(f"unknown augmentation '{policy}' (known: {', '.join(AUGMENTATIONS)})")
    n, channels, height, width = x.shape
    padded = F.pad(x, (CROP_PADDING,) * 4)
    # Offsets of each crop's top-left corner in the padded image; gathering with
    # broadcast index tensors crops every image of the batch in one operation.
    top = torch.randint(0, 2 * CROP_PADDING + 1, (n,), generator=generator).to(x.device)
    left = torch.randint(0, 2 * CROP_PADDING + 1, (n,), generator=generator).to(x.device)
    rows = (top[:, None] + torch.arange(height, device=x.device))[:, None, :, None]
    cols = (left[:, None] + torch.arange(width, device=x.device))[:, None, None, :]
    batch_index = torch.arange(n, device=x.device)[:, None, None, None]
    channel_index = torch.arange(channels, device=x.device)[None, :, None, None]
    x = padded[batch_index, channel_index, rows, cols]
    if policy == "crop_flip":
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


def _epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 32-bit seed for one epoch of one run.

    ``seed + epoch`` would make run 1's epoch 0 replay run 0's epoch 1, and packing the
    seed into high bits does not help because torch's CPU generator keeps only the low
    32 bits of a seed; SeedSequence hashes the pair instead.
    """
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class TensorLoader:
    """Batches of ``(normalized images, labels)`` on ``device`` from an :class:`ImageTensorDataset`.

    ``last_index``: the dataset indices of the batch yielded last (CRD's memory is per sample);
    with ``class_pairs``, ``last_partners``: for each of its samples another of the same class,
    augmented and normalized alike (CS-KD).

    Each pass over the loader is one epoch. With ``shuffle`` or ``augment``, the
    randomness of epoch ``e`` is a function of ``(seed, e)`` only, so a run
    reproduces even when an epoch is abandoned half-way. Assign ``epoch`` to resume.

    ``shard=(rank, world_size)``: every process draws the same permutation (same seed) and
    takes every world_size-th sample of it, as torch's DistributedSampler does; the tail that
    does not divide evenly is dropped so that all ranks run the same number of batches.
    """

    def __init__(
        self,
        dataset: ImageTensorDataset,
        batch_size: int,
        shuffle: bool = False,
        augment: bool = False,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        seed: int = 0,
        shard: tuple[int, int] = (0, 1),
        class_pairs: bool = False,
    ):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        if seed < 0:
            raise ConfigError(f"seed must be non-negative, got {seed}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.seed = seed
        self.rank, self.world_size = shard
        self.epoch = 0
        self.last_index: torch.Tensor | None = None
        self.class_pairs = class_pairs
        self.last_partners: torch.Tensor | None = None
        self.last_partner_index: torch.Tensor | None = None
        self._by_class: list[torch.Tensor] | None = None

    def _partners(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """For each sample, another sample of its class drawn at random (CS-KD's pair sampler)."""
        labels = self.dataset.labels
        if self._by_class is None:
            self._by_class = [(labels == c).nonzero().squeeze(1) for c in range(int(labels.max()) + 1)]
        pool = [self._by_class[int(y)] for y in labels[index]]
        picks = torch.randint(2**62, (len(index),), generator=generator)
        return torch.stack([members[int(p % len(members))] for members, p in zip(pool, picks)])

    def _samples(self) -> int:
        return len(self.dataset) // self.world_size if self.world_size > 1 else len(self.dataset)

    def __len__(self) -> int:
        round_ = math.floor if self.drop_last else math.ceil
        return round_(self._samples() / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        self.epoch += 1
        n = len(self.dataset)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        order = order[self.rank :: self.world_size][: self._samples()]
        # pairs of two modalities get no augmentation: one crop cannot be drawn for both shapes
        policy = self.dataset.info.augment if self.augment and self.dataset.paired is None else "none"
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = self.last_index = order[start : start + self.batch_size]
            images = self.dataset.images[index].to(self.device).float() / 255
            images = augment_batch(images, policy, generator)
            labels = self.dataset.labels[index].to(self.device)
            if self.class_pairs:
                self.last_partner_index = self._partners(index, generator)
                self.last_partners = self.dataset.normalize(augment_batch(
                    self.dataset.images[self.last_partner_index].to(self.device).float() / 255, policy, generator))
            if self.dataset.paired is None:
                yield self.dataset.normalize(images), labels
            else:
                yield self.dataset.normalize(images), labels, standardize(self.dataset.paired[index].to(self.device))

    def infinite(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Loop over epochs forever, for training counted in iterations rather than epochs."""
        if len(self) == 0:
            raise ConfigError(
                f"{self.dataset.info.name}/{self.dataset.split}: {len(self.dataset)} samples make no batch "
                f"of {self.batch_size} with drop_last=True"
            )
        while True:
            yield from self


def standardize(x: torch.Tensor) -> torch.Tensor:
    """Zero mean, unit variance per sample: how a second modality is normalized, with no
    statistics of any data set (uint8 is read as [0, 1] first)."""
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    x = x - x.mean(dim=tuple(range(1, x.dim())), keepdim=True)
    return x / (x.pow(2).mean(dim=tuple(range(1, x.dim())), keepdim=True) + 1e-6).sqrt()


_PAIR_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _read_pair_file(path: str) -> dict[str, torch.Tensor]:
    if not path.endswith((".npz", ".pt")):
        raise ConfigError(f"pairs file {path}: expected a .npz or .pt file, or two folders")
    if not os.path.isfile(path):
        raise DatasetNotFoundError(f"pairs file {path} does not exist")
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as arrays:
                data = {k: torch.from_numpy(arrays[k]) for k in arrays.files}
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, foreign, or holding objects: never run, one line
        raise ConfigError(f"pairs file {path}: not readable ({_first_line(exc)[:120]})") from None
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ConfigError(f"pairs file {path}: expected arrays a, b[, y], got {type(data).__name__}")
    for key, x in data.items():
        if key in ("a", "b") and (x.dtype == torch.bool or x.is_complex() or x.dim() not in (3, 4)):
            raise ConfigError(f"pairs file {path}: '{key}' must be images, (N, H, W) or (N, C, H, W) numbers; "
                              f"got {x.dtype} {tuple(x.shape)}")
        if key == "y" and (x.is_floating_point() or x.dim() != 1):
            raise ConfigError(f"pairs file {path}: 'y' must be (N,) integer labels, got {x.dtype} {tuple(x.shape)}")
    return data


def _read_pair_folder(folder: str, stems: list[str], names: dict[str, str]) -> torch.Tensor:
    from PIL import Image

    samples, shape = [], None
    for stem in stems:
        path = os.path.join(folder, names[stem])
        try:
            if path.endswith(".npy"):
                x = torch.from_numpy(np.load(path, allow_pickle=False))
                x = x.unsqueeze(0) if x.dim() == 2 else x
            else:
                with Image.open(path) as image:
                    x = torch.from_numpy(np.array(image))
                x = x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)  # HWC -> CHW
        except Exception as exc:  # a damaged image or array: name the file
            raise ConfigError(f"pairs: {path} is not a readable image or array ({_first_line(exc)[:120]})") from None
        if x.dim() != 3 or x.dtype == torch.bool:
            raise ShapeError(f"pairs: {path} is {x.dtype} {tuple(x.shape)}, not an image")
        if shape is not None and tuple(x.shape) != shape:
            raise ShapeError(f"{path} is {tuple(x.shape)}; the files before it are {shape}")
        shape = tuple(x.shape)
        samples.append(x)
    return torch.stack(samples)


def load_pairs(paths: list[str], info: DatasetInfo, split: str = "train") -> ImageTensorDataset:
    """A user's paired samples as a dataset whose ``images`` are modality A (what the teacher of
    dataset ``info`` takes, normalized like it) and ``paired`` modality B (what students see).

    ``paths`` is one ``.npz`` / ``.pt`` file holding arrays ``a``, ``b`` and optionally ``y``
    (int labels), or two folders whose files (``.png``/``.jpg``, or ``.npy`` arrays) pair up by
    name without extension. Modality A is uint8, or floats in [0, 1]."""
    labels = None
    if len(paths) == 1:
        arrays = _read_pair_file(paths[0])
        for key in ("a", "b"):
            if key not in arrays:
                raise ConfigError(f"pairs file {paths[0]} has no array '{key}' (it has: {', '.join(arrays) or 'none'})")
        a, b, labels = arrays["a"], arrays["b"], arrays.get("y")
        for key, x in (("b", b), ("y", labels)):
            if x is not None and len(x) != len(a):
                raise ShapeError(f"pairs file {paths[0]}: 'a' has {len(a)} samples, '{key}' has {len(x)}")
        where = paths[0]
    elif len(paths) == 2:
        listing = []
        for folder in paths:
            if not os.path.isdir(folder):
                raise DatasetNotFoundError(f"pairs folder {folder} does not exist")
            files = sorted(f for f in os.listdir(folder) if f.lower().endswith((*_PAIR_IMAGE_SUFFIXES, ".npy")))
            listing.append({os.path.splitext(f)[0]: f for f in files})
        first, second = listing
        for stem in sorted(first.keys() ^ second.keys()):
            inside, other = (paths[0], paths[1]) if stem in first else (paths[1], paths[0])
            name = (first if stem in first else second)[stem]
            raise ConfigError(f"pairs: {os.path.join(inside, name)} has no counterpart named '{stem}.*' in {other}")
        stems = sorted(first)
        if not stems:
            raise DatasetNotFoundError(f"pairs folders {paths[0]} and {paths[1]} hold no .png, .jpg or .npy files")
        a, b = _read_pair_folder(paths[0], stems, first), _read_pair_folder(paths[1], stems, second)
        where = f"{paths[0]} and {paths[1]}"
    else:
        raise ConfigError(f"data.pairs takes one file or two folders, got {len(paths)} paths")
    if a.dim() == 3:  # (N, H, W): one channel
        a = a.unsqueeze(1)
    if b.dim() == 3:
        b = b.unsqueeze(1)
    if a.dtype != torch.uint8:  # [0, 1] floats, stored as pixels like every dataset here
        a = (a.float().clamp(0, 1) * 255).round().to(torch.uint8)
    if tuple(a.shape[1:]) != tuple(info.shape):
        raise ShapeError(f"pairs {where}: modality-A samples are {tuple(a.shape[1:])}; the teacher's dataset "
                         f"'{info.name}' takes {tuple(info.shape)}")
    labels = torch.full((len(a),), -1, dtype=torch.long) if labels is None else labels.long()
    bad = labels[(labels < -1) | (labels >= info.num_classes)]
    if len(bad):
        raise ConfigError(f"pairs {where}: labels must be classes 0..{info.num_classes - 1} of '{info.name}' "
                          f"(or -1 for none); found {bad[0].item()}")
    return ImageTensorDataset(a, labels, info, f"pairs:{split}", paired=b)


def plant_canaries(dataset: ImageTensorDataset, n: int, seed: int) -> tuple[ImageTensorDataset, dict]:
    """``dataset`` with ``n`` samples (a permutation that depends on ``seed`` only) relabeled to
    another class drawn at random: canaries a membership attack should find in a model trained on
    them. Returns the dataset and ``{"index", "label"}`` (the planted labels) to record."""
    if n > len(dataset):
        raise ConfigError(f"data.canaries={n}, and {dataset.info.name}/{dataset.split} has {len(dataset)} samples")
    generator = torch.Generator().manual_seed(_epoch_seed(seed, 1 << 21))
    index = torch.randperm(len(dataset), generator=generator)[:n]
    shift = torch.randint(1, dataset.info.num_classes, (n,), generator=generator)
    labels = dataset.labels.clone()
    labels[index] = (labels[index] + shift) % dataset.info.num_classes
    planted = ImageTensorDataset(dataset.images, labels, dataset.info, dataset.split, dataset.paired)
    return planted, {"index": index, "label": labels[index].clone()}


def _stratified_index(labels: torch.Tensor, fraction: float, seed: int) -> torch.Tensor:
    """Sorted indices of ceil(fraction × n_c) samples of each class c, drawn by a permutation that
    depends on ``seed`` only."""
    generator = torch.Generator().manual_seed(_epoch_seed(seed, 1 << 20))
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


# --- registry --------------------------------------------------------------------------

Reader = Callable[[DatasetInfo, str, str | None, bool], ImageTensorDataset]


@dataclass(frozen=True)
class _DatasetEntry:
    info: DatasetInfo
    read: Reader  # (info, split, root, download) -> dataset


DATASETS: Registry[_DatasetEntry] = Registry("dataset")


def _register(info: DatasetInfo, *aliases: str) -> Callable[[Reader], Reader]:
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


_GET_FILES_HINT = ("name the folder that holds them (data.root=DIR; for dfkd eval, --root DIR), or set "
                   "data.download=true on a machine with internet")


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# --- digits: scikit-learn's bundled 8x8 digits, the dataset that needs no files ---------

_DIGITS_INFO = DatasetInfo(
    name="digits",
    shape=(1, 32, 32),
    num_classes=10,
    class_names=tuple(str(d) for d in range(10)),
    # Pixel statistics of the train split after upsampling; tests recompute them.
    mean=(0.3053,),
    std=(0.3234,),
    augment="crop",  # small random shifts; flips would turn digits into other glyphs
    native_size=(8, 8),  # scanned at 8x8, upsampled bilinearly (see _digits_arrays)
)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """All 1797 digits upsampled to 32x32 uint8, their labels, and the fixed split indices."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = torch.from_numpy(np.round(digits.data * 255 / 16)).float().view(-1, 1, 8, 8)
    # 32x32 lets the MNIST-style LeNet-5 teacher/student pair run on digits unchanged.
    upsampled = F.interpolate(pixels, size=(32, 32), mode="bilinear", align_corners=False)
    images = upsampled.round().clamp(0, 255).to(torch.uint8)
    labels = torch.from_numpy(digits.target).long()
    # A fixed random_state: the split is part of the dataset's definition, not of a run.
    train, test = train_test_split(np.arange(len(labels)), test_size=0.25, stratify=digits.target, random_state=0)
    return images, labels, {"train": torch.from_numpy(train), "test": torch.from_numpy(test)}


@_register(_DIGITS_INFO)
def _read_digits(info: DatasetInfo, split: str, root: str | None, download: bool) -> ImageTensorDataset:
    images, labels, split_index = _digits_arrays()
    index = split_index[split]
    # Indexing copies, so callers cannot modify the cached tensors.
    return ImageTensorDataset(images[index], labels[index], info, split)


# --- MNIST family: IDX files ------------------------------------------------------------

_IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension


def read_idx(path: str, expected_magic: int) -> torch.Tensor:
    """Read an IDX file (plain or gzipped) of unsigned bytes: ``(N, H, W)`` images or ``(N,)`` labels."""
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = bytearray(f.read())
    except (OSError, EOFError) as error:  # gzip.BadGzipFile is an OSError
        raise DfkdError(f"cannot read IDX file {path}: {_first_line(error)}") from None
    ndim = expected_magic & 0xFF
    header_size = 4 * (1 + ndim)
    if len(data) < header_size:
        raise DfkdError(f"corrupt IDX file {path}: {len(data)} bytes is shorter than its header")
    magic, *dims = struct.unpack(f">{1 + ndim}I", data[:header_size])
    if magic != expected_magic:
        raise DfkdError(f"corrupt IDX file {path}: magic number {magic:#010x}, expected {expected_magic:#010x}")
    if len(data) - header_size != math.prod(dims):
        raise DfkdError(
            f"corrupt IDX file {path}: header says {'x'.join(map(str, dims))} bytes of data, "
            f"found {len(data) - header_size}"
        )
    return torch.from_numpy(np.frombuffer(data, dtype=np.uint8, offset=header_size)).view(*dims)


def _existing_file(directory: str, stem: str) -> str | None:
    """``directory/stem``, or its gzipped version, whichever exists first."""
    candidates = (os.path.join(directory, stem), os.path.join(directory, stem + ".gz"))
    return next((path for path in candidates if os.path.isfile(path)), None)


def _find_idx_pair(split: str, directories: list[str]) -> tuple[str, str] | None:
    """Paths of the split's image and label files in the first directory that has both."""
    prefix = "train" if split == "train" else "t10k"
    for directory in directories:
        images = _existing_file(directory, f"{prefix}-images-idx3-ubyte")
        labels = _existing_file(directory, f"{prefix}-labels-idx1-ubyte")
        if images and labels:
            return images, labels
    return None


def _read_idx_dataset(
    info: DatasetInfo,
    split: str,
    root: str | None,
    download: bool,
    torchvision_class: str,
    system_dirs: tuple[str, ...],
    install_hint: str | None,
) -> ImageTensorDataset:
    """Read an MNIST-style dataset from IDX files, downloading them with torchvision if allowed."""
    base = root or DEFAULT_ROOT
    # Bare files in root, then torchvision's layout (where download=True puts them); the system-wide
    # copy only when no root was given: a root the user names is the one read, or the error says so.
    directories = [base, os.path.join(base, torchvision_class, "raw"), *(system_dirs if root is None else ())]
    paths = _find_idx_pair(split, directories)
    if paths is None and download:
        import torchvision.datasets

        try:
            getattr(torchvision.datasets, torchvision_class)(base, train=split == "train", download=True)
        except (RuntimeError, OSError) as error:  # no network surfaces as URLError, an OSError
            raise DatasetNotFoundError(
                f"{info.name}: download into {os.path.abspath(base)} failed: {_first_line(error)}"
            ) from None
        paths = _find_idx_pair(split, directories)
    if paths is None:
        looked = ", ".join(os.path.abspath(d) for d in directories)
        hint = f"{install_hint}, {_GET_FILES_HINT}" if install_hint else _GET_FILES_HINT
        raise DatasetNotFoundError(f"{info.name}: no {split} IDX files found (looked in {looked}); {hint}")
    image_path, label_path = paths
    images = read_idx(image_path, _IDX_IMAGES_MAGIC)
    labels = read_idx(label_path, _IDX_LABELS_MAGIC).long()
    if len(images) != len(labels):
        raise DfkdError(f"{info.name}: {image_path} has {len(images)} images but {label_path} has {len(labels)} labels")
    if len(labels) and int(labels.max()) >= info.num_classes:
        raise DfkdError(f"{info.name}: {label_path} has label {int(labels.max())}, expected < {info.num_classes}")
    return ImageTensorDataset(images.unsqueeze(1), labels, info, split)


_FASHION_MNIST_INFO = DatasetInfo(
    name="fashion-mnist",
    shape=(1, 28, 28),
    num_classes=10,
    class_names=(
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"
    ),
    mean=(0.2860,),
    std=(0.3530,),
    augment="none",
)


@_register(_FASHION_MNIST_INFO, "fmnist", "fashion_mnist")
def _read_fashion_mnist(info: DatasetInfo, split: str, root: str | None, download: bool) -> ImageTensorDataset:
    return _read_idx_dataset(
        info,
        split,
        root,
        download,
        torchvision_class="FashionMNIST",
        system_dirs=(FASHION_MNIST_SYSTEM_DIR,),
        install_hint="install them with `apt-get install dataset-fashion-mnist`",
    )


_MNIST_INFO = DatasetInfo(
    name="mnist",
    shape=(1, 28, 28),
    num_classes=10,
    class_names=tuple(str(d) for d in range(10)),
    mean=(0.1307,),
    std=(0.3081,),
    augment="none",
)


@_register(_MNIST_INFO)
def _read_mnist(info: DatasetInfo, split: str, root: str | None, download: bool) -> ImageTensorDataset:
    return _read_idx_dataset(
        info, split, root, download, torchvision_class="MNIST", system_dirs=(), install_hint=None
    )


# --- torchvision-format datasets: CIFAR, SVHN -------------------------------------------


def _torchvision_dataset(info: DatasetInfo, make: Callable[[], object], looked_in: str):
    """Call a torchvision dataset constructor, turning its missing-file errors into one line."""
    try:
        return make()
    except RuntimeError:  # "Dataset not found or corrupted" (missing file or md5 mismatch)
        reason = ""
    except OSError as error:  # download=True without network: urllib's URLError
        reason = f" and the download failed ({_first_line(error)})"
    raise DatasetNotFoundError(
        f"{info.name}: files not found or corrupt in {os.path.abspath(looked_in)}{reason}; {_GET_FILES_HINT}"
    )


def _read_cifar(
    torchvision_class: str, info: DatasetInfo, split: str, root: str | None, download: bool
) -> ImageTensorDataset:
    import torchvision.datasets

    cls = getattr(torchvision.datasets, torchvision_class)
    base = root or DEFAULT_ROOT
    dataset = _torchvision_dataset(
        info, lambda: cls(base, train=split == "train", download=download), os.path.join(base, cls.base_folder)
    )
    class_names = tuple(dataset.classes)
    if len(class_names) != info.num_classes:
        raise DfkdError(f"{info.name}: metadata lists {len(class_names)} classes, expected {info.num_classes}")
    images = torch.from_numpy(dataset.data).permute(0, 3, 1, 2).contiguous()  # torchvision keeps HWC
    labels = torch.tensor(dataset.targets, dtype=torch.int64)
    return ImageTensorDataset(images, labels, replace(info, class_names=class_names), split)


_CIFAR10_INFO = DatasetInfo(
    name="cifar10",
    shape=(3, 32, 32),
    num_classes=10,
    class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
    augment="crop_flip",
)
_CIFAR100_INFO = DatasetInfo(
    name="cifar100",
    shape=(3, 32, 32),
    num_classes=100,
    class_names=tuple(
        """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
        camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup
        dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower
        leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid
        otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road
        rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower
        sweet_pepper table tank telephone television tiger tractor train trout tulip turtle wardrobe whale
        willow_tree wolf woman worm""".split()
    ),
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
    augment="crop_flip",
)
_register(_CIFAR10_INFO)(functools.partial(_read_cifar, "CIFAR10"))
_register(_CIFAR100_INFO)(functools.partial(_read_cifar, "CIFAR100"))

_SVHN_INFO = DatasetInfo(
    name="svhn",
    shape=(3, 32, 32),
    num_classes=10,
    class_names=tuple(str(d) for d in range(10)),
    mean=(0.4377, 0.4438, 0.4728),
    std=(0.1980, 0.2010, 0.1970),
    augment="crop",  # a mirrored house number is not a digit, so no flip
)


@_register(_SVHN_INFO)
def _read_svhn(info: DatasetInfo, split: str, root: str | None, download: bool) -> ImageTensorDataset:
    import torchvision.datasets

    base = root or DEFAULT_ROOT
    dataset = _torchvision_dataset(
        info,
        lambda: torchvision.datasets.SVHN(base, split=split, download=download),
        os.path.join(base, f"{split}_32x32.mat"),
    )
    # torchvision already maps SVHN's label 10 to digit 0 and transposes to (N, C, H, W).
    images = torch.from_numpy(np.ascontiguousarray(dataset.data))
    return ImageTensorDataset(images, torch.from_numpy(dataset.labels).long(), info, split)
