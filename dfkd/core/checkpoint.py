"""Checkpoints: model files and training states, safe reads, content hashes.

Two kinds of file:

* a **model file** (``format: dfkd.model/1``): one network's weights plus what is needed to
  rebuild and trust it: architecture, the input card (what it takes: shape, normalization,
  classes), dataset, accuracy, the resolved config or the imported file's provenance, a
  SHA-256 of the weights (``sha256``, the weights' identity) and one over the architecture,
  card, dataset and weights together (``description_sha256``). Teachers are model files;
  ``dfkd eval`` reads them, ``dfkd import`` writes them from weights trained anywhere.
* a **training state** (``format: dfkd.state/1``): everything a run needs to continue exactly:
  every player's weights, optimizers, schedulers, the AMP scaler, the image pool, RNG states
  and the step. ``--resume`` reads it.

Every read uses ``torch.load(weights_only=True)``: a checkpoint can hold tensors and plain
containers, never objects whose unpickling runs code. Every write is atomic (:mod:`dfkd.core.io`).
Rebuilding a network from a model file is the networks layer's (:func:`dfkd.nets.arch.load_model`).
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dfkd.core.io import atomic_save
from dfkd_base.errors import CheckpointError

MODEL_FORMAT = "dfkd.model/1"
STATE_FORMAT = "dfkd.state/1"


def safe_load(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with ``weights_only=True``; every failure is a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives; anything else is damaged or foreign
        raise CheckpointError(f"{path}: not a readable checkpoint (not a torch.save archive; truncated or foreign)")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        # weights_only refuses globals such as classes or functions: the file could run code
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(f"{path}: refused to load: it holds Python objects beyond tensors and plain "
                              f"containers{what}, whose unpickling could run code") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({msg[:160]})") from None
    if not isinstance(obj, dict) or "format" not in obj:
        raise CheckpointError(f"{path}: not a dfkd checkpoint (no 'format' field)")
    return obj


def state_hash(state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 over parameter names, dtypes, shapes and bytes: the identity of a set of weights."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def description_hash(ckpt: dict) -> str:
    """SHA-256 over what a model file says its network is and takes (architecture, input card,
    dataset) and its weights' hash: an edited ``arch`` or card fails the check as edited weights do."""
    described = {"arch": ckpt.get("arch"), "card": ckpt.get("card"), "dataset": ckpt.get("dataset"),
                 "sha256": ckpt.get("sha256")}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=repr).encode()).hexdigest()


def save_model(path: str | os.PathLike, model: nn.Module, arch: dict, **meta: Any) -> Path:
    """Write a model file of ``model``'s weights. ``arch`` holds the ``create_model`` arguments
    (name, in_channels, num_classes, image_size, kwargs); ``meta`` anything plain (card, dataset,
    accuracy, config ...)."""
    return save_weights(path, unwrap(model).state_dict(), arch, **meta)


def save_weights(path: str | os.PathLike, state: dict[str, torch.Tensor], arch: dict, **meta: Any) -> Path:
    """Write a model file of the weights ``state`` (see :func:`save_model`)."""
    state = {k: v.detach().cpu() for k, v in state.items()}
    ckpt = {"format": MODEL_FORMAT, "arch": arch, "state_dict": state, "sha256": state_hash(state), **meta}
    return atomic_save({**ckpt, "description_sha256": description_hash(ckpt)}, path)


_ARCH_FIELDS = {"name": str, "in_channels": int, "num_classes": int, "image_size": int}


def read_model_file(path: str | os.PathLike, allow_unhashed: bool = False) -> dict:
    """A model file's contents, checked: its fields and their types, the weights against their
    recorded SHA-256 (a file without one is refused unless ``allow_unhashed``), and no option
    that would make rebuilding it download anything."""
    ckpt = safe_load(path)
    if ckpt.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path}: a {ckpt.get('format')} file, expected a model file ({MODEL_FORMAT}); "
                              f"training states live in ckpt/last.pt, models in ckpt/final.pt or ckpt/best.pt")
    arch, state = ckpt.get("arch"), ckpt.get("state_dict")
    if not isinstance(arch, dict) or not isinstance(state, dict):
        raise CheckpointError(f"{path}: a model file needs 'arch' and 'state_dict' mappings")
    for name, kind in _ARCH_FIELDS.items():
        if not isinstance(arch.get(name), kind) or isinstance(arch.get(name), bool):
            raise CheckpointError(f"{path}: arch.{name} must be {kind.__name__}, got {arch.get(name)!r}")
    if not isinstance(arch.get("quant") or {}, dict):
        raise CheckpointError(f"{path}: arch.quant must be a mapping of quantization settings")
    if not isinstance(arch.get("kwargs", {}), dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: arch.kwargs must be a mapping and state_dict hold tensors")
    if not isinstance(ckpt.get("card") or {}, dict) or not isinstance(ckpt.get("provenance") or {}, dict):
        raise CheckpointError(f"{path}: card and provenance must be mappings")
    if (arch.get("kwargs") or {}).get("weights") is not None:
        raise CheckpointError(f"{path}: records weights={arch['kwargs']['weights']!r}; rebuilding a model file "
                              f"never downloads anything, and its own weights are all it needs")
    expected = ckpt.get("sha256")
    if expected is None and not allow_unhashed:
        raise CheckpointError(f"{path}: records no SHA-256 of its weights, so they cannot be checked; "
                              f"load it only if you trust it (--allow-unhashed)")
    if expected is not None and state_hash(state) != expected:
        raise CheckpointError(f"{path}: weights do not match the recorded SHA-256 (file corrupt or edited)")
    described = ckpt.get("description_sha256")  # absent from files written before it was recorded
    if described is not None and expected is not None and description_hash(ckpt) != described:
        raise CheckpointError(f"{path}: its architecture, input card or dataset do not match the recorded SHA-256 "
                              f"(file edited); rebuild it with dfkd import")
    return ckpt


def unwrap(model: nn.Module) -> nn.Module:
    """The network inside a DDP / torch.compile wrapper."""
    while True:
        inner = getattr(model, "module", None) or getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner
