"""The input card: what a teacher takes, recorded in its model file. Its input's shape, the mean and
std it was normalized with, its classes and their names, and the resolution its pictures were
taken at. A data-free run knows the world through it: synthesis renders the card's shape, the
student is built for it, and real images (for evaluation only) are normalized with its statistics,
not a dataset's. A dataset that disagrees with the card is refused, naming both."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

from dfkd.data.datasets import DATASETS, DatasetInfo, agreeing, dataset_info
from dfkd_base.errors import ConfigError


def card_from_info(info: DatasetInfo) -> dict:
    """The card of a network trained on ``info``'s images as the dataset gives them."""
    return {"shape": list(info.shape), "mean": list(info.mean), "std": list(info.std), "classes": info.num_classes,
            "class_names": list(info.class_names), "native_size": list(info.native_size) if info.native_size else None}


def check_card(card: Any, where: str) -> dict:
    """``card`` checked field by field: a one-line error naming the first that is wrong."""
    if not isinstance(card, dict):
        raise ConfigError(f"{where}: the input card must be a mapping, got {type(card).__name__}")
    shape, classes = card.get("shape"), card.get("classes")
    if not (isinstance(shape, (list, tuple)) and len(shape) == 3 and all(isinstance(v, int) and v > 0 for v in shape)):
        raise ConfigError(f"{where}: the input shape must be three positive integers C,H,W, got {shape!r}")
    if not isinstance(classes, int) or isinstance(classes, bool) or classes < 2:
        raise ConfigError(f"{where}: classes must be an integer >= 2, got {classes!r}")
    for key in ("mean", "std"):
        values = card.get(key)
        if not (isinstance(values, (list, tuple)) and len(values) == shape[0]
                and all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)):
            raise ConfigError(f"{where}: {key} must give one number per input channel ({shape[0]}), got {values!r}")
    if any(s <= 0 for s in card["std"]):
        raise ConfigError(f"{where}: std must be positive, got {card['std']}")
    names = card.get("class_names")
    if names is not None and (not isinstance(names, (list, tuple)) or len(names) != classes
                              or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names)):
        raise ConfigError(f"{where}: class names must be {classes} distinct names (one per class), got {names!r}")
    native = card.get("native_size")
    if native is not None and not (isinstance(native, (list, tuple)) and len(native) == 2 and all(
            isinstance(n, int) and 0 < n <= m for n, m in zip(native, shape[1:]))):
        raise ConfigError(f"{where}: native size must be H,W within the input's {shape[1]}x{shape[2]}, got {native!r}")
    return {"shape": list(shape), "mean": [float(v) for v in card["mean"]], "std": [float(v) for v in card["std"]],
            "classes": classes, "class_names": list(names) if names is not None else None,
            "native_size": list(native) if native is not None else None}


def info_from_card(card: dict, name: str = "card") -> DatasetInfo:
    """The card as a :class:`DatasetInfo` (what every part of a run reads), named ``name``."""
    names = card.get("class_names") or [str(k) for k in range(card["classes"])]
    return DatasetInfo(name=name, shape=tuple(card["shape"]), num_classes=card["classes"], class_names=tuple(names),
                       mean=tuple(card["mean"]), std=tuple(card["std"]), augment="none",
                       native_size=tuple(card["native_size"]) if card.get("native_size") else None)


def card_of(meta: dict) -> dict | None:
    """A model file's card: the one it records, else its registered dataset's when its architecture
    takes that dataset's input (model files of ``dfkd teacher`` runs made before cards were
    recorded), else None."""
    if meta.get("card") is not None:
        return meta["card"]
    dataset, arch = meta.get("dataset"), meta.get("arch") or {}
    entry = DATASETS.get(dataset) if isinstance(dataset, str) and dataset in DATASETS else None
    if entry is None or entry.info is None:
        return None
    info = entry.info
    fits = (arch.get("in_channels"), arch.get("image_size"), arch.get("num_classes")) == \
        (info.shape[0], info.shape[1], info.num_classes)
    return card_from_info(info) if fits else None


def run_info(data_name: str, card: dict | None, source: str, reads_data: bool) -> DatasetInfo:
    """What a run's images are: a teacher's ``card`` (from ``source``) when it has one, named after
    the run's dataset when the two agree; the dataset's own description for a run without a card
    (teacher training). A dataset that disagrees with the card is an error when the run reads it,
    and ignored when it does not (a run with ``data.eval: false`` on a teacher of its own shape)."""
    entry = DATASETS.get(data_name)
    if card is None:
        return dataset_info(data_name)
    info = info_from_card(card, name="card")
    if entry.info is None:  # the user's own images, converted to the card
        return replace(info, name=data_name)
    agrees = tuple(entry.info.shape) == tuple(info.shape) and entry.info.num_classes == info.num_classes
    if agrees or reads_data:
        return agreeing(entry.info, info, source)
    return info
