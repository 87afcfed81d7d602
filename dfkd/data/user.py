"""The user's own labeled images, for evaluation (never for training, in a data-free run):

``folder``  an ImageFolder tree (``torchvision.datasets.ImageFolder``'s layout): one sub-folder per
            class; the class is the folder's name, matched to the card's class names when it has
            them (sorted names give the label order otherwise, as ImageFolder's do).
``arrays``  an ``.npz`` with ``x`` (uint8 pixels, N×H×W, N×H×W×C or N×C×H×W) and ``y`` (classes).

``data.root`` names the folder or file; a root holding ``train`` and ``test`` (``train/`` and
``test/`` sub-folders, ``train.npz`` and ``test.npz``) gives both splits, any other root is the test
split alone. Images are converted to the card's channels (gray ↔ RGB, alpha dropped) and resized
to its size, as the pictures the teacher was trained on were.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dfkd.data.datasets import DatasetInfo, ImageTensorDataset, register_user_dataset
from dfkd_base.errors import ConfigError, DatasetNotFoundError, first_line

# what torchvision's ImageFolder reads (torchvision.datasets.folder.IMG_EXTENSIONS)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def to_card(images: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
    """uint8 (N, C, H, W) pixels in the card's channels (gray repeated to RGB; RGB to gray by ITU-R
    601 luma, as PIL's ``L``; an alpha channel dropped) and size (bilinear, antialiased)."""
    channels, height, width = info.shape
    if images.shape[1] == 4:
        images = images[:, :3]
    if images.shape[1] != channels:
        if images.shape[1] == 1:
            images = images.expand(-1, channels, -1, -1)
        elif images.shape[1] == 3 and channels == 1:
            luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images = (images.float() * luma).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)
        else:
            raise ConfigError(f"images of {images.shape[1]} channels cannot be read as the card's {channels}")
    if tuple(images.shape[2:]) != (height, width):
        resized = F.interpolate(images.float(), size=(height, width), mode="bilinear", align_corners=False,
                                antialias=True)
        images = resized.round().clamp(0, 255).to(torch.uint8)
    return images.contiguous()


def _split_root(root: str | None, split: str, name: str, child: str) -> Path:
    if not root:
        raise ConfigError(f"data.name={name} needs data.root: the {'folder' if name == 'folder' else '.npz file'} "
                          f"of your labeled images (for dfkd eval and audit: --root)")
    base = Path(root)
    if not base.exists():
        raise DatasetNotFoundError(f"{name}: {root} does not exist")
    if (base / child).exists():
        return base / child
    if split == "test":
        return base
    raise DatasetNotFoundError(f"{name}: {root} holds no {split} split (a '{child}' beside a 'test' one); "
                               f"{root} itself is read as the test split")


def _labels(names: list[str], info: DatasetInfo, where: str) -> dict[str, int]:
    """Each class name's label: its index among the card's names, or in sorted order without them."""
    known = list(info.class_names)
    if all(n == str(k) for k, n in enumerate(known)) and not all(n in known for n in names):
        if len(names) > info.num_classes:  # a card without names: ImageFolder's sorted order
            raise ConfigError(f"{where} has {len(names)} classes; the card has {info.num_classes}")
        return {n: k for k, n in enumerate(sorted(names))}
    unknown = [n for n in names if n not in known]
    if unknown:
        shown = ", ".join(known[:20]) + (" ..." if len(known) > 20 else "")
        raise ConfigError(f"{where} has class '{unknown[0]}', which the card does not know (its classes: {shown})")
    return {n: known.index(n) for n in names}


@register_user_dataset("folder")
def read_folder(info: DatasetInfo, split: str, root: str | None, download: bool) -> ImageTensorDataset:
    from PIL import Image

    folder = _split_root(root, split, "folder", split)
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir()) if folder.is_dir() else []
    if not classes:
        raise ConfigError(f"folder {folder} holds no class sub-folders (an ImageFolder tree: one per class)")
    labels = _labels(classes, info, f"folder {folder}")
    mode = {1: "L", 3: "RGB"}.get(info.shape[0])
    if mode is None:
        raise ConfigError(f"folder: images are read as gray or RGB; the card takes {info.shape[0]} channels")
    images, targets = [], []
    for name in classes:
        files = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise ConfigError(f"folder {folder / name} holds no image ({', '.join(IMAGE_SUFFIXES)})")
        for path in files:
            try:
                with Image.open(path) as picture:
                    pixels = torch.from_numpy(np.array(picture.convert(mode)))
            except Exception as error:  # a damaged or foreign file: name it
                raise ConfigError(f"folder: {path} is not a readable image ({first_line(error)[:100]})") from None
            pixels = pixels.unsqueeze(0) if pixels.dim() == 2 else pixels.permute(2, 0, 1)
            images.append(to_card(pixels.unsqueeze(0), info))
            targets.append(labels[name])
    return ImageTensorDataset(torch.cat(images), torch.tensor(targets, dtype=torch.int64), info, split)


@register_user_dataset("arrays")
def read_arrays(info: DatasetInfo, split: str, root: str | None, download: bool) -> ImageTensorDataset:
    path = _split_root(root, split, "arrays", f"{split}.npz")
    if path.is_dir() or path.suffix != ".npz":
        raise ConfigError(f"arrays: {path} is not an .npz file (nor a folder of train.npz and test.npz)")
    try:
        with np.load(path, allow_pickle=False) as arrays:
            data = {k: arrays[k] for k in arrays.files}
    except Exception as error:  # truncated, foreign, or holding objects (never unpickled)
        raise ConfigError(f"arrays: {path} is not a readable .npz ({first_line(error)[:100]})") from None
    missing = [k for k in ("x", "y") if k not in data]
    if missing:
        raise ConfigError(f"arrays: {path} has no '{missing[0]}' (it has: {', '.join(data) or 'nothing'})")
    x, y = data["x"], data["y"]
    if x.dtype != np.uint8 or x.ndim not in (3, 4):
        raise ConfigError(f"arrays: {path}: x must be uint8 pixels N×H×W[×C] or N×C×H×W, got {x.dtype} {x.shape}")
    if not len(x):
        raise ConfigError(f"arrays: {path} holds no sample")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(f"arrays: {path}: y must be {len(x)} integer classes, got {y.dtype} {y.shape}")
    bad = y[(y < 0) | (y >= info.num_classes)]
    if len(bad):
        raise ConfigError(f"arrays: {path}: class {int(bad[0])} is not one of the card's 0..{info.num_classes - 1}")
    images = torch.from_numpy(np.ascontiguousarray(x))
    if images.dim() == 3:
        images = images.unsqueeze(1)
    elif images.shape[1] not in (1, 3, 4) or (images.shape[-1] in (1, 3, 4) and images.shape[1] != info.shape[0]):
        images = images.permute(0, 3, 1, 2)  # N×H×W×C
    return ImageTensorDataset(to_card(images, info), torch.from_numpy(y.astype(np.int64)), info, split)
