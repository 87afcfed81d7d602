"""From a model file's ``arch`` back to a network: the one place a recorded architecture (its
``create_model`` arguments, wrappers among its options, and its quantization) is rebuilt. A model
file may also hold a compiled program instead of weights (a TorchScript archive or a
``torch.export`` program): a black-box teacher, run as it is, whose insides no hook can read."""
from __future__ import annotations

import io
import os
import warnings

import torch
from torch import nn

from dfkd.core.checkpoint import read_model_file
from dfkd.nets.models import create_model, is_code
from dfkd_base.errors import CheckpointError, ConfigError, first_line

PROGRAMS = ("torchscript", "torch.export")  # the arch names of black-box model files


class BlackBox(nn.Module):
    """A compiled program as a teacher: its outputs, and gradients through them, and nothing else
    (Python hooks cannot be put on a TorchScript archive's modules, and an exported program's module
    paths are its graph's, not the network's). ``kind`` is one of :data:`PROGRAMS`."""

    black_box = True

    def __init__(self, program: nn.Module, kind: str):
        super().__init__()
        self.program, self.kind = program, kind

    def train(self, mode: bool = True) -> "BlackBox":
        # a program runs as it was compiled (an exported one refuses train()/eval() altogether)
        self.training = mode
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)


def load_program(kind: str, data: bytes) -> BlackBox:
    """A program from its bytes (a TorchScript archive or a ``torch.export`` ``.pt2``): neither
    format unpickles Python objects."""
    with warnings.catch_warnings():  # torch marks TorchScript deprecated in favour of torch.export
        warnings.simplefilter("ignore", FutureWarning)
        if kind == "torchscript":
            program = torch.jit.load(io.BytesIO(data), map_location="cpu")
        else:
            program = torch.export.load(io.BytesIO(data)).module()
    for parameter in program.parameters():  # ScriptModule refuses the module-level requires_grad_
        parameter.requires_grad_(False)
    return BlackBox(program, kind)


def is_black_box(model: nn.Module) -> bool:
    return getattr(model, "black_box", False)


def model_from_arch(arch: dict, quantized: bool = True, allow_code: bool = False) -> nn.Module:
    """A freshly initialized network as ``arch`` records it (``name``, ``in_channels``,
    ``num_classes``, ``image_size``, ``kwargs``, and ``quant`` when it is quantized; ``quantized``
    False leaves the quantization out: the float network). A user's class (``module:Name``) is
    imported only when ``allow_code``."""
    arch = dict(arch)
    quant = arch.pop("quant", None)
    model = create_model(arch.pop("name"), **arch.pop("kwargs", None) or {}, **arch, allow_code=allow_code)
    if quant is not None and quantized:  # the same quantized layers; the weights and steps come after
        from dfkd.nets.quant import quantize

        try:
            quantize(model, quant, (arch["in_channels"], arch["image_size"], arch["image_size"]))
        except (ConfigError, KeyError, TypeError) as exc:
            raise CheckpointError(f"arch.quant does not rebuild a quantized model ({exc})") from None
    return model


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu", allow_unhashed: bool = False,
               allow_code: bool = False) -> tuple[nn.Module, dict]:
    """Rebuild a network from a model file. Returns (model in eval mode, the file's metadata). A
    file that names a user's class needs ``allow_code`` (a model file alone never imports code)."""
    ckpt = read_model_file(path, allow_unhashed)
    arch = ckpt["arch"]
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    if arch["name"] in PROGRAMS:
        program = ckpt["state_dict"].get("program")
        if program is None or program.dtype != torch.uint8:
            raise CheckpointError(f"{path}: a {arch['name']} model file holds its program as uint8 bytes")
        try:
            return load_program(arch["name"], program.numpy().tobytes()).to(device).eval(), meta
        except Exception as error:  # the program's own loader: one line, whatever went wrong
            raise CheckpointError(f"{path}: its {arch['name']} program does not load ({first_line(error)[:160]})") \
                from None
    if is_code(arch["name"]) and not allow_code:
        raise CheckpointError(f"{path} names code to import ({arch['name']}); loading it runs that code: give "
                              f"--allow-code (teacher.allow_code: true in a config) if you trust it")
    try:
        model = model_from_arch(arch, allow_code=allow_code)
    except CheckpointError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit architecture '{arch['name']}' "
                              f"({str(exc).splitlines()[0][:160]})") from None
    return model.to(device).eval(), meta
