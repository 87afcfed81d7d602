"""Experiment configs: YAML files with ``_base_`` inheritance, dotted command-line overrides,
and validation into typed dataclasses.

Every key is traced back to the file (or the command line) that set it, so a validation
error names both the key and where it came from::

    dfkd: error: teacher/lenet5-fmnist.yaml: unknown key 'optim.lrr' (did you mean 'lr'?)

Named configs ship inside the package (``dfkd/configs/<group>/<name>.yaml``) so that
``--config teacher/lenet5-fmnist`` works after a pip install.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .errors import ConfigError
from .quant import check_quant
from .registry import nearest

CONFIG_DIR = Path(__file__).parent / "configs"
COMMAND_LINE = "command line"


# --------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    name: str = "digits"
    root: Optional[str] = None          # where the dataset's files are; None: the dataset's default places
    download: bool = False              # let torchvision download a missing dataset (needs internet)
    batch_size: int = 128               # batch of real data (teacher training, real-data KD)
    eval_batch_size: int = 1000
    augment: bool = True                # the dataset's standard train augmentation, if it has one
    eval: bool = True                   # evaluate on the test split; False: the run reads no real data at all
    # Cross-modal: the students see this built-in modality of the images (dfkd/modalities.py),
    # the teacher the images themselves; evaluation is on the test split's modality.
    modality: Optional[str] = None
    labeled_fraction: float = 1.0       # the share of the training split (stratified, per seed) 'labeled' batches draw
    # model selection (dfkd search): this share of the training split, stratified and the same in every
    # run, is held out; training reads the rest and evaluation reads it in place of the test split
    validation: float = 0.0
    class_pairs: bool = False           # real batches also carry another sample of each one's class (CS-KD)
    # privacy-audit canaries: this many training samples (drawn by seed) relabeled to another class at
    # random; their indices and planted labels are recorded in the trained model's file (dfkd audit)
    canaries: int = 0
    # Cross-modal with a user's own pairs: one .npz/.pt file (arrays a, b[, y]) or two folders whose
    # files pair by name; pairs_test: labeled pairs to evaluate students on (see dfkd.data.load_pairs)
    pairs: Optional[list[str]] = None
    pairs_test: Optional[list[str]] = None


@dataclass
class OptimConfig:
    name: Literal["sgd", "adam", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    nesterov: bool = False
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: Optional[float] = None   # max global gradient norm, None: no clipping


@dataclass
class SchedConfig:
    name: Literal["constant", "cosine", "multistep"] = "cosine"
    warmup_steps: int = 0               # linear warm-up, in optimizer steps of this player
    milestones: list[float] = field(default_factory=list)  # multistep: fractions of the run, e.g. [0.5, 0.75]
    gamma: float = 0.1
    min_lr: float = 0.0                 # cosine floor


@dataclass
class NetConfig:
    """A network: a registered architecture, or a checkpoint that records its own architecture."""

    name: Optional[str] = None
    checkpoint: Optional[str] = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TeacherConfig:
    """The frozen teacher, or an ensemble of them. ``checkpoint`` is one model file or a list;
    an ensemble's output is, per ``ensemble``: ``mean`` (the averaged soft targets), ``random``
    (one teacher picked per iteration, as in MEAL), ``confidence`` (each sample's soft targets
    averaged with weights ∝ each teacher's top-class probability) or ``drop_one`` (the mean of all
    but one teacher, dropped at random per iteration: DGKD's stochastic guidance)."""

    checkpoint: Union[str, list[str], None] = None
    ensemble: Literal["mean", "random", "confidence", "drop_one"] = "mean"
    # the teacher a paper's recipe was written for (name and kwargs); another gets a one-line warning
    expected: Optional[NetConfig] = None

    @property
    def checkpoints(self) -> list[str]:
        c = self.checkpoint
        return [] if c is None else [c] if isinstance(c, str) else list(c)


@dataclass
class QuantConfig:
    """A quantized model player (see :mod:`dfkd.quant`): bit widths of weights and of the
    activations entering each weighted layer, the quantizer, and where its weights start."""

    weights: int = 8
    acts: int = 8
    quantizer: Literal["lsq", "pact", "minmax"] = "lsq"
    per_channel: bool = True            # a weight step per output channel
    keep_first_last: Optional[int] = None  # bits of the first and last weighted layers (None: as the rest)
    init: Literal["scratch", "teacher"] = "scratch"  # teacher: a quantized copy of the (first) teacher
    fold_bn: bool = False               # fold each conv's BatchNorm into it before quantizing
    freeze_bn: bool = False             # BatchNorm layers normalize with their running statistics while training
    stats_steps: int = 30               # training batches whose activation ranges initialize lsq/minmax steps
    clip_init: float = 10.0             # pact: the initial clip value α (PACT's paper: 10)
    calibrate: int = 0                  # batches of the run's real data that set activation ranges before training


@dataclass
class PlayerConfig:
    """A trained participant of the loop: its network, optimizer and schedule. Discriminators
    and adapters get their input shapes from the loss terms that use them."""

    kind: Literal["model", "generator", "discriminator", "adapter"] = "model"
    net: NetConfig = field(default_factory=NetConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    sched: SchedConfig = field(default_factory=SchedConfig)
    # decay of an exponential moving average of the weights (timm's model EMA; e.g. 0.999): a model's
    # average is what is evaluated and exported, the raw weights keep training; a generator's average
    # makes the 'fresh+ema' batches (MAD)
    ema: Optional[float] = None
    quant: Optional[QuantConfig] = None  # a quantized model (model players only)


@dataclass
class PhaseConfig:
    """One step type of an iteration: which player is updated, on which batch, with which losses.

    ``batch``: ``real`` (the training split; never used by data-free methods), ``labeled`` (its
    ``data.labeled_fraction`` subset, for few-label fine-tuning and baselines), ``fresh`` (a new
    synthetic batch each step), ``same`` (the batch an earlier phase drew last; synthetic ones
    detached and without the generator's augmentation), ``regenerated`` (the latents of the latest
    ``fresh`` batch through the generator as it is now, after its update: ZSKT), ``fresh+ema`` (a
    fresh batch of the generator and one of its weight average, with their own latents, as one:
    MAD) or ``pool`` (replay of the image pool).
    ``losses``: term name → weight, or term name → {weight: w, <term parameters>}.
    ``augment`` and ``mixup`` transform the batch before this phase's networks see it (e.g. the
    student's view of synthetic or replayed images); the generator's own augmentation is
    ``synthesis.augment``.
    """

    player: str = "student"
    steps: int = 1
    batch: Literal["real", "labeled", "fresh", "fresh+ema", "same", "regenerated", "pool"] = "real"
    losses: dict[str, Any] = field(default_factory=dict)
    name: Optional[str] = None          # defaults to the player's name; used in log tags
    also: list[str] = field(default_factory=list)  # more players updated by this phase's loss, in one backward
    epochs: Optional[list[int]] = None  # [first, last) epochs in which the phase runs (stages); None: all
    augment: Optional[AugmentConfig] = None
    mixup: float = 0.0                  # Beta(α, α) mixing of each image with another of the batch; 0: off


@dataclass
class AugmentConfig:
    """Differentiable augmentation of synthetic batches before the teacher sees them."""

    crop_padding: int = 0               # random crop after zero padding by this many pixels
    flip: bool = False                  # random horizontal flip
    jitter: int = 0                     # random roll by up to this many pixels (DeepInversion)
    brightness: float = 0.0             # random shift of each image by up to this much (normalized units)
    contrast: float = 0.0               # random scaling of each image around its mean by 1 ± this


@dataclass
class SynthesisConfig:
    """Where data-free batches come from (see dfkd/synthesis.py)."""

    kind: Literal["none", "generator", "inversion", "reinit", "meta", "nayer", "spaceship"] = "none"
    generator: str = "generator"        # kind=generator: the player that generates
    net: NetConfig = field(default_factory=lambda: NetConfig(name="dcgan", kwargs={"nz": 256}))  # per-batch kinds
    batch_size: int = 256               # synthetic batch, and replay batch from the pool
    labels: Literal["none", "random", "balanced"] = "none"  # classes to ask for (conditional G, onehot_ce)
    mix_prob: float = 0.0               # Qimera: probability that a batch asks for superposed classes (soft labels)
    mix_classes: int = 2                # Qimera: classes superposed per sample
    inner: OptimConfig = field(default_factory=lambda: OptimConfig(name="adam", lr=0.1, betas=[0.5, 0.999]))
    latent_lr: Optional[float] = None   # reinit / meta: learning rate of the latents (default: inner.lr)
    outer: OptimConfig = field(default_factory=lambda: OptimConfig(name="adam", lr=1e-3, betas=[0.5, 0.999]))
    meta: Literal["reptile", "fomaml"] = "reptile"
    keep: Literal["last", "best"] = "last"   # which batch of the inner loop enters the pool
    clamp: bool = False                 # inversion: keep pixels in the dataset's valid range after each step
    init: Literal["default", "dcgan"] = "default"  # reinit: PyTorch's init, or N(0, 0.02) weights (CMI's)
    reset_every: int = 0                # nayer: re-initialize the whole generator every this many batches; 0: never
    levels: list[int] = field(default_factory=lambda: [0, 1, 2])  # spaceship: generator levels to regenerate from
    exchange_p: float = 0.7             # spaceship: probability that a replayed batch's channels are exchanged
    pool_size: int = 0                  # synthetic images kept for replay; 0: no pool
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    warmup_epochs: int = 0              # epochs of synthesis alone before the other phases start


@dataclass
class TrainConfig:
    epochs: int = 10
    iters_per_epoch: Optional[int] = None   # None: one pass over the real training split
    eval_every: int = 1                     # epochs
    log_every: int = 50                     # iterations
    eval_player: Optional[str] = None       # None: "student" if present, else the first model player
    on_nan: Literal["stop", "rollback"] = "stop"   # rollback: reload ckpt/last.pt, reseed, go on
    max_rollbacks: int = 3
    # an epoch's state is kept as ckpt/last.pt only if its weights and evaluation loss are finite and
    # no player's weight norm grew more than this factor since the last kept state (0: no limit)
    max_weight_growth: float = 100.0


@dataclass
class RuntimeConfig:
    device: str = "auto"                    # auto | cpu | cuda | cuda:N
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"   # auto: bf16 on CUDA, off on CPU
    channels_last: Union[bool, Literal["auto"]] = "auto"   # auto: on for CUDA and for synthesis
    num_threads: Optional[int] = None       # torch intra-op threads on CPU; None: torch's default
    progress: Union[bool, Literal["auto"]] = "auto"        # auto: a bar only on an interactive terminal
    deterministic: bool = False


@dataclass
class OutputConfig:
    root: str = "runs"
    save_every: int = 1                     # epochs between full-state checkpoints
    tensorboard: bool = True
    image_every: int = 1                    # epochs between synthetic sample grids
    show_real: bool = True                  # also show a labeled grid of the evaluation split (off: never display real data)
    # sample quality (dfkd.quality: teacher-FID, precision/recall/density/coverage, diversity) at image
    # epochs, on the newest this-many synthetic samples against as many of the evaluation split (0: off)
    quality_samples: int = 256
    # epochs between embedding-projector snapshots (synthetic and real samples in the teacher's feature
    # space, at image epochs); None: the last epoch only; 0: never
    projector_every: Optional[int] = None


@dataclass
class Config:
    experiment: str = "default"
    task: Literal["teacher", "distill"] = "teacher"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    teacher: Optional[TeacherConfig] = None
    players: dict[str, PlayerConfig] = field(default_factory=dict)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    phases: list[PhaseConfig] = field(default_factory=list)
    train: TrainConfig = field(default_factory=TrainConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    output: OutputConfig = field(default_factory=OutputConfig)


# --------------------------------------------------------------------------------------
# Loading: files, _base_, overrides
# --------------------------------------------------------------------------------------
def named_configs() -> list[str]:
    """Names of the configs shipped with the package, e.g. ``teacher/lenet5-fmnist``."""
    return sorted(
        p.relative_to(CONFIG_DIR).with_suffix("").as_posix()
        for p in CONFIG_DIR.rglob("*.yaml")
        if not p.name.startswith("_") and not any(part.startswith("_") for part in p.relative_to(CONFIG_DIR).parts)
    )


def resolve_config_path(name: str, relative_to: Path | None = None) -> Path:
    """A config file path from a path or a shipped name (with or without ``.yaml``)."""
    candidates = []
    if relative_to is not None:
        candidates.append(relative_to / name)
    candidates += [Path(name), CONFIG_DIR / name]
    for base in list(candidates):
        candidates.append(base.with_name(base.name + ".yaml"))
    for path in candidates:
        if path.is_file():
            return path
    close = nearest(name, named_configs())
    hint = f"; did you mean {', '.join(close)}?" if close else f"; shipped configs: {', '.join(named_configs())}"
    raise ConfigError(f"config '{name}' not found (neither a file nor a shipped config){hint}")


def _display(path: Path) -> str:
    try:
        return path.resolve().relative_to(CONFIG_DIR.resolve()).as_posix()
    except ValueError:
        return str(path)


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{_display(path)}:{where} invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{_display(path)}: a config must be a mapping at the top level, got {type(data).__name__}")
    return data


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key → leaf value; list items are addressed by index (``phases.0.steps``)."""
    out: dict[str, Any] = {}
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else None
    if items is None or not data:
        return {prefix: data} if prefix else {}
    for key, value in items:
        out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return out


def _merge(base: dict, child: dict) -> dict:
    """Deep merge; the child wins. Lists are replaced, not merged (a phase list is a unit)."""
    out = copy.deepcopy(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and not value.pop("_replace_", False):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _load_file(path: Path, origin: dict[str, str], chain: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in chain:
        raise ConfigError(f"{_display(path)}: _base_ cycle: {' -> '.join(_display(p) for p in (*chain, path))}")
    data = _read_yaml(path)
    bases = data.pop("_base_", [])
    bases = [bases] if isinstance(bases, str) else bases
    merged: dict = {}
    for base in bases:
        merged = _merge(merged, _load_file(resolve_config_path(base, path.parent), origin, (*chain, path)))
    for key in flatten(data):
        origin[key] = _display(path)
    return _merge(merged, data)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``optim.lr=0.05`` → (["optim", "lr"], 0.05); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override '{text}' is not of the form key.path=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw  # a plain string that YAML can't read, e.g. "a: b"
    return key.strip().split("."), value


def _set_dotted(data: dict, keys: list[str], value: Any, text: str) -> None:
    node: Any = data
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"override '{text}': '{'.'.join(keys[:i])}' has {len(node)} items, no index {key}")
            key = int(key)
        elif not isinstance(node, dict):
            raise ConfigError(f"override '{text}': '{'.'.join(keys[:i])}' is not a mapping")
        if last:
            node[key] = value
        else:
            if isinstance(node, dict) and node.get(key) is None:
                node[key] = {}
            node = node[key]


def load_config_dict(name: str, overrides: list[str] = ()) -> tuple[dict, dict[str, str]]:
    """The merged raw config and the origin (file or command line) of every dotted key."""
    origin: dict[str, str] = {}
    data = _load_file(resolve_config_path(name), origin)
    for text in overrides:
        keys, value = parse_override(text)
        _set_dotted(data, keys, value, text)
        for key in flatten(value, ".".join(keys)) or {".".join(keys): None}:
            origin[key] = COMMAND_LINE
    return data, origin


def load_config(name: str, overrides: list[str] = ()) -> Config:
    data, origin = load_config_dict(name, overrides)
    return config_from_dict(data, origin, default_origin=_display(resolve_config_path(name)))


# --------------------------------------------------------------------------------------
# Validation into dataclasses
# --------------------------------------------------------------------------------------
class _Validator:
    def __init__(self, origin: dict[str, str], default_origin: str):
        self.origin = origin
        self.default_origin = default_origin

    def where(self, key: str) -> str:
        # the origin of the key itself, else of the first key below it (a whole section set in one file)
        if key in self.origin:
            return self.origin[key]
        for k, v in self.origin.items():
            if k.startswith(key + "."):
                return v
        return self.default_origin

    def fail(self, key: str, message: str) -> typing.NoReturn:
        raise ConfigError(f"{self.where(key)}: {message}")

    def build(self, tp: Any, value: Any, key: str) -> Any:
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if tp is Any:
            return value
        if dataclasses.is_dataclass(tp):
            return self.build_dataclass(tp, value, key)
        if origin in (Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            errors = []
            for arg in (a for a in args if a is not type(None)):
                try:
                    return self.build(arg, value, key)
                except ConfigError as exc:
                    errors.append(exc)
            raise errors[0]
        if origin is Literal:
            if isinstance(value, bool) and ("on" if value else "off") in args:
                value = "on" if value else "off"  # YAML 1.1 reads a bare off/on as a boolean
            if value not in args:
                self.fail(key, f"'{key}' must be one of {', '.join(map(str, args))}; got {value!r}")
            return value
        if origin is list:
            if not isinstance(value, list):
                self.fail(key, f"'{key}' must be a list, got {type(value).__name__} {value!r}")
            return [self.build(args[0], v, f"{key}.{i}") for i, v in enumerate(value)]
        if origin is dict:
            if not isinstance(value, dict):
                self.fail(key, f"'{key}' must be a mapping, got {type(value).__name__} {value!r}")
            # a section mapped to null removes what a base config put there (``players: {generator: null}``)
            drop = dataclasses.is_dataclass(args[1])
            return {str(k): self.build(args[1], v, f"{key}.{k}") for k, v in value.items()
                    if not (drop and v is None)}
        if tp is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if tp is float and isinstance(value, str):  # YAML 1.1 reads "5e-4" as a string
            try:
                return float(value)
            except ValueError:
                pass
        if tp in (int, float, str, bool):
            if isinstance(value, tp) and not (tp is int and isinstance(value, bool)):
                return value
            self.fail(key, f"'{key}' must be {tp.__name__}, got {type(value).__name__} {value!r}")
        raise TypeError(f"unsupported config type {tp} at {key}")

    def build_dataclass(self, cls: type, value: Any, key: str) -> Any:
        if value is None:
            value = {}
        if not isinstance(value, dict):
            self.fail(key, f"'{key}' must be a mapping, got {type(value).__name__} {value!r}")
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        for k in value:
            if k not in names:
                full = f"{key}.{k}" if key else str(k)
                close = nearest(str(k), names)
                hint = f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(names)})"
                self.fail(full, f"unknown key '{full}'{hint}")
        kwargs = {k: self.build(hints[k], v, f"{key}.{k}" if key else k) for k, v in value.items()}
        return cls(**kwargs)


def dataclass_from_dict(cls: type, data: dict, origin: dict[str, str] | None = None, default_origin: str = "config"):
    """Any config dataclass (a run's, a chain's) from its raw mapping, with the same one-line errors."""
    return _Validator(origin or {}, default_origin).build_dataclass(cls, data, "")


def config_from_dict(data: dict, origin: dict[str, str] | None = None, default_origin: str = "config") -> Config:
    validator = _Validator(origin or {}, default_origin)
    config = validator.build_dataclass(Config, data, "")
    check_config(config, validator)
    return config


def check_config(config: Config, validator: _Validator | None = None) -> None:
    """Cross-field checks that types alone can't express."""
    v = validator or _Validator({}, "config")
    if not re.fullmatch(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*", config.experiment):
        v.fail("experiment", f"experiment must be a name (letters, digits, '.', '_', '+', '-'), not a path: "
                             f"{config.experiment!r}")
    syn = config.synthesis
    per_batch = syn.kind in ("inversion", "reinit", "meta", "nayer", "spaceship")
    for i, phase in enumerate(config.phases):
        if phase.player == "synthesizer":
            if not per_batch:
                v.fail(f"phases.{i}.player", f"phases.{i}: the 'synthesizer' phase needs synthesis.kind inversion, "
                                             f"reinit, meta, nayer or spaceship (it is '{syn.kind}')")
        elif phase.player not in config.players:
            v.fail(f"phases.{i}.player", f"phases.{i}.player '{phase.player}' is not a player "
                                         f"(players: {', '.join(config.players) or 'none'})")
        for other in phase.also:
            if other not in config.players or other == phase.player:
                v.fail(f"phases.{i}.also", f"phases.{i}.also: '{other}' is not another player "
                                           f"(players: {', '.join(config.players) or 'none'})")
        if phase.steps < 1:
            v.fail(f"phases.{i}.steps", f"phases.{i}.steps must be >= 1, got {phase.steps}")
        if not phase.losses:
            v.fail(f"phases.{i}.losses", f"phases.{i} has no loss terms")
        if phase.batch == "same" and not any(p.batch != "same" for p in config.phases):
            v.fail(f"phases.{i}.batch", f"phases.{i}.batch 'same' needs another phase that draws a batch")
        if phase.batch == "fresh+ema" and config.players.get(syn.generator, PlayerConfig()).ema is None:
            v.fail(f"phases.{i}.batch", f"phases.{i}.batch 'fresh+ema' needs players.{syn.generator}.ema "
                                        f"(the generator's weight average)")
        if phase.batch in ("fresh", "fresh+ema", "regenerated") and phase.player != "synthesizer" \
                and syn.kind != "generator":
            v.fail(f"phases.{i}.batch", f"phases.{i}.batch '{phase.batch}' needs synthesis.kind 'generator' "
                                        f"(it is '{syn.kind}')")
        if phase.epochs is not None and (len(phase.epochs) != 2 or not 0 <= phase.epochs[0] < phase.epochs[1]):
            v.fail(f"phases.{i}.epochs", f"phases.{i}.epochs must be [first, last) with 0 <= first < last, "
                                         f"got {phase.epochs}")
        if phase.mixup < 0:
            v.fail(f"phases.{i}.mixup", f"phases.{i}.mixup must be >= 0 (a Beta(α, α) parameter), got {phase.mixup}")
        if phase.batch == "pool" and not syn.pool_size:
            v.fail(f"phases.{i}.batch", f"phases.{i}.batch 'pool' needs synthesis.pool_size > 0")
    if syn.kind == "generator" and config.players.get(syn.generator, PlayerConfig()).kind != "generator":
        v.fail("synthesis.generator", f"synthesis.generator '{syn.generator}' is not a generator player")
    if not 0 <= syn.mix_prob <= 1 or syn.mix_classes < 2:
        v.fail("synthesis.mix_prob", f"synthesis.mix_prob must be in [0, 1] and mix_classes >= 2, got "
                                     f"{syn.mix_prob} and {syn.mix_classes}")
    if syn.mix_prob and syn.labels == "none":
        v.fail("synthesis.mix_prob", "synthesis.mix_prob superposes the classes asked for: set synthesis.labels")
    if syn.pool_size < 0 or syn.batch_size < 1:
        v.fail("synthesis", "synthesis.pool_size must be >= 0 and synthesis.batch_size >= 1")
    for name, player in config.players.items():
        copies_teacher = player.quant is not None and player.quant.init == "teacher"
        if player.kind != "adapter" and player.net.name is None and player.net.checkpoint is None \
                and not copies_teacher:
            v.fail(f"players.{name}.net", f"players.{name}.net needs a name or a checkpoint")
        if player.ema is not None and (player.kind not in ("model", "generator") or not 0 < player.ema < 1):
            v.fail(f"players.{name}.ema", f"players.{name}.ema must be a decay in (0, 1) on a model or generator "
                                          f"player, got {player.ema} on a {player.kind}")
    if config.data.pairs and config.data.modality:
        v.fail("data.pairs", "data.pairs and data.modality both give students their modality; set one")
    if config.data.pairs and config.synthesis.kind != "none":
        v.fail("data.pairs", "data-free cross-modal synthesis needs a built-in data.modality (a known differentiable "
                             "function of the images); a user's pairs are not one")
    if config.data.pairs and config.data.eval and not config.data.pairs_test:
        v.fail("data.pairs_test", "students on a user's pairs are evaluated on data.pairs_test (labeled pairs); "
                                  "set it, or data.eval=false")
    if config.data.canaries < 0:
        v.fail("data.canaries", f"data.canaries must be >= 0, got {config.data.canaries}")
    if not 0 < config.data.labeled_fraction <= 1:
        v.fail("data.labeled_fraction", f"data.labeled_fraction must be in (0, 1], got {config.data.labeled_fraction}")
    if config.output.quality_samples and config.output.quality_samples <= 6:
        v.fail("output.quality_samples", f"output.quality_samples must be 0 (off) or more than 6 (the measures' "
                                         f"5 nearest neighbours), got {config.output.quality_samples}")
    if (config.output.projector_every or 0) < 0:
        v.fail("output.projector_every", f"output.projector_every must be >= 0 (0: never), got "
                                         f"{config.output.projector_every}")
    if not 0 <= config.data.validation < 1:
        v.fail("data.validation", f"data.validation must be in [0, 1), got {config.data.validation}")
    if config.data.validation and (config.data.pairs or config.data.pairs_test):
        v.fail("data.validation", "data.validation holds out part of a registered dataset's training split; "
                                  "with data.pairs, give the held-out pairs as data.pairs_test")
    for name, player in config.players.items():
        if player.quant is None:
            continue
        if player.kind != "model":
            v.fail(f"players.{name}.quant", f"players.{name}.quant: only model players can be quantized "
                                            f"('{name}' is a {player.kind})")
        try:
            check_quant(dataclasses.asdict(player.quant), f"players.{name}.quant")
        except ConfigError as exc:
            v.fail(f"players.{name}.quant", str(exc))
        if player.quant.init == "teacher" and config.teacher is None:
            v.fail(f"players.{name}.quant.init", f"players.{name}.quant.init 'teacher' needs a teacher")
    calibration_only = any(p.quant is not None and p.quant.calibrate > 0 for p in config.players.values())
    if config.train.epochs < (0 if calibration_only else 1):
        v.fail("train.epochs", f"train.epochs must be >= 1 (0 only for post-training calibration, "
                               f"quant.calibrate > 0), got {config.train.epochs}")
    _check_values(config, v)


def _check_values(config: Config, v: _Validator) -> None:
    """Values torch or the loop would reject only after work has started, checked up front."""
    optims = [(f"players.{n}.optim", p.optim) for n, p in config.players.items()] + \
        [("synthesis.inner", config.synthesis.inner), ("synthesis.outer", config.synthesis.outer)]
    for key, o in optims:
        for field_name, low in (("lr", 0.0), ("momentum", 0.0), ("weight_decay", 0.0)):
            if getattr(o, field_name) < low:
                v.fail(f"{key}.{field_name}", f"{key}.{field_name} must be >= 0, got {getattr(o, field_name)}")
        if len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas):
            v.fail(f"{key}.betas", f"{key}.betas must be two numbers in [0, 1), got {o.betas}")
        if o.grad_clip is not None and o.grad_clip <= 0:
            v.fail(f"{key}.grad_clip", f"{key}.grad_clip must be > 0 (or null for none), got {o.grad_clip}")
    for n, p in config.players.items():
        sc, key = p.sched, f"players.{n}.sched"
        if sc.warmup_steps < 0 or sc.min_lr < 0 or sc.gamma <= 0 or any(not 0 < m < 1 for m in sc.milestones):
            v.fail(key, f"{key}: warmup_steps and min_lr must be >= 0, gamma > 0 and milestones fractions in (0, 1); "
                        f"got {sc.warmup_steps}, {sc.min_lr}, {sc.gamma}, {sc.milestones}")
    intervals = {"train.eval_every": config.train.eval_every, "train.log_every": config.train.log_every,
                 "output.save_every": config.output.save_every, "output.image_every": config.output.image_every,
                 "data.batch_size": config.data.batch_size, "data.eval_batch_size": config.data.eval_batch_size}
    if config.train.iters_per_epoch is not None:
        intervals["train.iters_per_epoch"] = config.train.iters_per_epoch
    for key, value in intervals.items():
        if value < 1:
            v.fail(key, f"{key} must be >= 1, got {value}")
    if config.seed < 0:
        v.fail("seed", f"seed must be >= 0, got {config.seed}")
    if config.train.max_rollbacks < 0 or config.train.max_weight_growth < 0:
        v.fail("train", "train.max_rollbacks and train.max_weight_growth must be >= 0")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", config.runtime.device):
        v.fail("runtime.device", f"runtime.device must be auto, cpu, cuda, cuda:N or mps; got {config.runtime.device!r}")
    if config.runtime.num_threads is not None and config.runtime.num_threads < 1:
        v.fail("runtime.num_threads", f"runtime.num_threads must be >= 1, got {config.runtime.num_threads}")
    if not config.phases:
        v.fail("phases", "a config needs at least one phase (a player, a batch source and loss terms)")
    root = Path(config.output.root)
    existing = next((p for p in (root, *root.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        v.fail("output.root", f"output.root {root}: {existing} is a file, not a folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        v.fail("output.root", f"output.root {root}: {existing} is not writable")


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)
