"""A user's paired samples of two modalities (cross-modal distillation): a ``.npz``/``.pt`` file of
arrays or two folders of files paired by name, read into one dataset whose ``paired`` tensor is
what students see."""
from __future__ import annotations

import os

import numpy as np
import torch

from dfkd.data.datasets import DatasetInfo, ImageTensorDataset
from dfkd_base.errors import ConfigError, DatasetNotFoundError, ShapeError, first_line


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
        raise ConfigError(f"pairs file {path}: not readable ({first_line(exc)[:120]})") from None
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
            raise ConfigError(f"pairs: {path} is not a readable image or array ({first_line(exc)[:120]})") from None
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
    if len(a) == 0:
        raise ConfigError(f"pairs {where}: no samples (0 pairs)")
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
    if split == "test" and (labels < 0).any():  # accuracy is measured on labels
        raise ConfigError(f"pairs {where}: {int((labels < 0).sum())} of {len(labels)} test pairs have no label; "
                          f"data.pairs_test needs labeled pairs (an array 'y' of classes)")
    return ImageTensorDataset(a, labels, info, f"pairs:{split}", paired=b)
