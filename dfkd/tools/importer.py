"""``dfkd import``: a teacher trained anywhere, as a dfkd model file with an input card.

Weights come as a state_dict (``.pt``/``.pth``, read with ``weights_only``; nested under
``state_dict``, ``model``, ``model_state_dict`` or ``net`` as training scripts save them, with
DDP's ``module.`` or ``torch.compile``'s ``_orig_mod.`` prefixes) or a ``.safetensors`` file, for an
architecture named as ``create_model`` names them (``tv:``, ``timm:``, the zoo, or the user's own
``module:Name``, imported only with consent). A TorchScript archive or a ``torch.export`` program
without an architecture is a black-box teacher: the model file holds the program itself.

Nothing is written until the weights load strictly and a forward pass of the card's shape gives
``(N, classes)`` logits; every failure is one line naming what is wrong.
"""
from __future__ import annotations

import hashlib
import pickle
import warnings
import zipfile
from pathlib import Path

import torch
from torch import nn

from dfkd.core.checkpoint import save_weights
from dfkd.data.card import check_card
from dfkd.nets.arch import PROGRAMS, load_program
from dfkd.nets.models import count_parameters, create_model
from dfkd_base.errors import CheckpointError, ConfigError, ShapeError, first_line
from dfkd_base.registry import nearest

NESTINGS = ("state_dict", "model", "model_state_dict", "net")   # where training scripts put the weights
PREFIXES = ("module.", "_orig_mod.")                           # DDP's and torch.compile's


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def program_kind(path: Path) -> str | None:
    """``torchscript`` or ``torch.export`` for a compiled program, else None (read from the zip's
    entry names: nothing is loaded)."""
    if not zipfile.is_zipfile(path):
        return None
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    if any(n.endswith("constants.pkl") for n in names) and any("/code/" in n for n in names):
        return "torchscript"
    if any(n.endswith("archive_format") for n in names) and any("/models/" in n or n.startswith("models/")
                                                                 for n in names):
        return "torch.export"
    return None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The weights a file holds, as a flat name → tensor mapping, without running any of its code."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{path}: not a readable safetensors file ({first_line(error)[:120]})") from None
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path}: not a torch.save archive nor a .safetensors file (truncated or foreign)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(f"{path}: it holds Python objects beyond tensors (a whole pickled model, as "
                              f"torch.save(model) writes), and is never unpickled, since that could run code: save "
                              f"model.state_dict() instead, or a TorchScript archive") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        raise CheckpointError(f"{path}: not a readable checkpoint ({first_line(error)[:120]})") from None
    return find_weights(obj, path)


def find_weights(obj, path: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``obj``: itself, or under one of the keys training scripts use."""
    def tensors(x) -> bool:
        return isinstance(x, dict) and bool(x) and all(isinstance(v, torch.Tensor) for v in x.values())

    state = obj if tensors(obj) else next((obj[k] for k in NESTINGS if isinstance(obj, dict) and tensors(obj.get(k))),
                                          None)
    if state is None:
        keys = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: no state_dict in it (a mapping of names to tensors, itself or under "
                              f"{', '.join(NESTINGS)}); it holds: {keys}")
    for prefix in PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return dict(state)


def strict_load(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Load ``state`` into ``model`` only if every name and shape agree; else a one-line error
    naming the first keys that differ and the closest names on the other side."""
    mine = model.state_dict()
    missing = [k for k in mine if k not in state]
    unexpected = [k for k in state if k not in mine]
    if missing or unexpected:
        parts = [f"missing {k}" + (f" (closest in the file: {', '.join(nearest(k, unexpected, 1))})"
                                   if nearest(k, unexpected, 1) else "") for k in missing[:3]]
        parts += [f"unexpected {k}" + (f" (closest in the architecture: {', '.join(nearest(k, missing, 1))})"
                                       if nearest(k, missing, 1) else "") for k in unexpected[:3]]
        more = len(missing) + len(unexpected) - len(parts)
        raise CheckpointError(f"{what}: the weights do not fit: {'; '.join(parts)}" + (f"; and {more} more" if more
                                                                                    else ""))
    for k, v in state.items():
        if tuple(v.shape) != tuple(mine[k].shape):
            raise CheckpointError(f"{what}: the weights do not fit: {k} is {tuple(v.shape)} in the file and "
                                  f"{tuple(mine[k].shape)} in the architecture")
    model.load_state_dict(state, strict=True)


@torch.no_grad()
def check_forward(model: nn.Module, card: dict, what: str) -> None:
    """A forward pass of the card's shape (two batch sizes) gives ``(N, classes)`` logits."""
    model.eval()
    for n in (2, 3):
        x = torch.zeros(n, *card["shape"])
        try:
            out = model(x)
        except Exception as error:  # the network's own failure, whatever its kind: one line
            raise ShapeError(f"{what} does not take the card's input {tuple(x.shape)}: {first_line(error)[:160]}") \
                from None
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != (n, card["classes"]):
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ShapeError(f"{what} gives {got} for the card's input {tuple(x.shape)}; expected ({n}, "
                             f"{card['classes']}) logits (--classes {card['classes']})")


def import_teacher(weights: str, out: str, card: dict, arch: str | None = None, kwargs: dict | None = None,
                   allow_code: bool = False, force: bool = False) -> dict:
    """Write a model file at ``out`` from ``weights`` (see the module docstring); returns a summary."""
    source, target = Path(weights), Path(out)
    card = check_card(card, "the card")
    if not source.is_file():
        raise CheckpointError(f"{weights}: no such file")
    if target.exists() and not force:
        raise ConfigError(f"--out {out} exists; give --force to replace it")
    if target.is_dir() or (target.exists() and not target.is_file()):
        raise ConfigError(f"--out {out} is not a file")
    kind = program_kind(source)
    what = f"{weights} ({arch or kind or 'no architecture'})"
    if arch is None:
        if kind is None:
            raise ConfigError(f"{weights} is not a TorchScript archive or a torch.export program; weights need "
                              f"--arch (tv:NAME, timm:NAME, a zoo name, or module:Name)")
        data = source.read_bytes()
        try:
            model = load_program(kind, data)
        except Exception as error:  # the program's own loader
            raise CheckpointError(f"{weights}: the {kind} program does not load ({first_line(error)[:160]})") from None
        check_forward(model, card, what)
        state = {"program": torch.frombuffer(bytearray(data), dtype=torch.uint8)}
        spec = {"name": kind, "kwargs": {}}
    else:
        if kind is not None:
            raise ConfigError(f"{weights} is a {kind} program, which holds its own architecture: import it "
                              f"without --arch")
        if arch in PROGRAMS:
            raise ConfigError(f"--arch {arch} names a program format; give the program's file without --arch")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = create_model(arch, card["shape"][0], card["classes"], card["shape"][1], allow_code=allow_code,
                                 **(kwargs or {}))
        strict_load(model, read_state_dict(source), what)
        check_forward(model, card, what)
        state = model.state_dict()
        spec = {"name": arch, "kwargs": dict(kwargs or {})}
    arch_record = {**spec, "in_channels": card["shape"][0], "num_classes": card["classes"],
                   "image_size": card["shape"][1]}
    provenance = {"source": str(source.resolve()), "source_sha256": file_sha256(source), "imported_by": "dfkd import"}
    save_weights(target, state, arch_record, card=card, provenance=provenance, dataset=None)
    return {"model_file": str(target), "arch": spec["name"], "black_box": arch is None,
            "params": None if arch is None else count_parameters(model), "card": card,
            "source_sha256": provenance["source_sha256"]}


def parse_numbers(text: str, what: str, kind=float) -> list:
    try:
        return [kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"{what} must be comma-separated numbers, got {text!r}") from None


def card_from_args(shape: str, mean: str, std: str, classes: int, class_names: str | None,
                   native_size: str | None) -> dict:
    """The card from ``dfkd import``'s options; one mean or std value stands for every channel."""
    dims = parse_numbers(shape, "--input", int)
    means, stds = parse_numbers(mean, "--mean"), parse_numbers(std, "--std")
    if len(dims) == 3:
        means = means * dims[0] if len(means) == 1 else means
        stds = stds * dims[0] if len(stds) == 1 else stds
    return {"shape": dims, "mean": means, "std": stds, "classes": classes,
            "class_names": [n.strip() for n in class_names.split(",")] if class_names else None,
            "native_size": parse_numbers(native_size, "--native-size", int) if native_size else None}


def describe_import(result: dict) -> str:
    card = result["card"]
    size = "x".join(map(str, card["shape"]))
    what = "a black-box program" if result["black_box"] else f"{result['arch']}, {result['params']:,} parameters"
    return f"{result['model_file']}: {what}; takes {size}, {card['classes']} classes"
