"""From a model file's ``arch`` back to a network: the one place a recorded architecture (its
``create_model`` arguments, wrappers among its options, and its quantization) is rebuilt."""
from __future__ import annotations

import os

import torch
from torch import nn

from dfkd.core.checkpoint import read_model_file
from dfkd.nets.models import create_model
from dfkd_base.errors import CheckpointError, ConfigError


def model_from_arch(arch: dict, quantized: bool = True) -> nn.Module:
    """A freshly initialized network as ``arch`` records it (``name``, ``in_channels``,
    ``num_classes``, ``image_size``, ``kwargs``, and ``quant`` when it is quantized; ``quantized``
    False leaves the quantization out: the float network)."""
    arch = dict(arch)
    quant = arch.pop("quant", None)
    model = create_model(arch.pop("name"), **arch.pop("kwargs", None) or {}, **arch)
    if quant is not None and quantized:  # the same quantized layers; the weights and steps come after
        from dfkd.nets.quant import quantize

        try:
            quantize(model, quant, (arch["in_channels"], arch["image_size"], arch["image_size"]))
        except (ConfigError, KeyError, TypeError) as exc:
            raise CheckpointError(f"arch.quant does not rebuild a quantized model ({exc})") from None
    return model


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu",
               allow_unhashed: bool = False) -> tuple[nn.Module, dict]:
    """Rebuild a network from a model file. Returns (model in eval mode, the file's metadata)."""
    ckpt = read_model_file(path, allow_unhashed)
    try:
        model = model_from_arch(ckpt["arch"])
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit architecture '{ckpt['arch']['name']}' "
                              f"({str(exc).splitlines()[0][:160]})") from None
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model.to(device).eval(), meta
