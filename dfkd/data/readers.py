"""The registered datasets and their readers: scikit-learn's digits (the embedded default),
the MNIST family from IDX files (Fashion-MNIST from Debian's ``dataset-fashion-mnist`` too), and
torchvision's CIFAR-10/100 and SVHN. Each reads one split into an
:class:`~dfkd.data.datasets.ImageTensorDataset`. scikit-learn and torchvision are imported inside
the readers that need them: each takes about a second to import, which the other datasets should
not pay."""
from __future__ import annotations

import functools
import gzip
import math
import os
import struct
from dataclasses import replace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from dfkd.data.datasets import DatasetInfo, ImageTensorDataset, register_dataset
from dfkd_base.errors import DatasetNotFoundError, DfkdError, first_line

# Where torchvision-backed datasets live (and are downloaded to) when no root is given.
DEFAULT_ROOT = "data"
# Debian's `dataset-fashion-mnist` package installs the gzipped IDX files here.
FASHION_MNIST_SYSTEM_DIR = "/usr/share/datasets/fashion-mnist"


_GET_FILES_HINT = ("name the folder that holds them (data.root=DIR; for dfkd eval, --root DIR), or set "
                   "data.download=true on a machine with internet")


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


@register_dataset(_DIGITS_INFO)
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
        raise DfkdError(f"cannot read IDX file {path}: {first_line(error)}") from None
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
                f"{info.name}: download into {os.path.abspath(base)} failed: {first_line(error)}"
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


@register_dataset(_FASHION_MNIST_INFO, "fmnist", "fashion_mnist")
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


@register_dataset(_MNIST_INFO)
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
        reason = f" and the download failed ({first_line(error)})"
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
register_dataset(_CIFAR10_INFO)(functools.partial(_read_cifar, "CIFAR10"))
register_dataset(_CIFAR100_INFO)(functools.partial(_read_cifar, "CIFAR100"))

_SVHN_INFO = DatasetInfo(
    name="svhn",
    shape=(3, 32, 32),
    num_classes=10,
    class_names=tuple(str(d) for d in range(10)),
    mean=(0.4377, 0.4438, 0.4728),
    std=(0.1980, 0.2010, 0.1970),
    augment="crop",  # a mirrored house number is not a digit, so no flip
)


@register_dataset(_SVHN_INFO)
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
