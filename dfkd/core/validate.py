"""Validation of raw config mappings into the schema's dataclasses, with one-line errors that name
the key and the file (or the command line) that set it, and the cross-field checks that types
alone can't express. Sections that name a registered kind are validated by that kind's options
dataclass (see :mod:`dfkd.core.schema`), and so are its own constraints (``check``)."""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Literal, Union

from dfkd.core.io import check_output_folder
from dfkd.core.registries import SYNTHESIZERS
from dfkd.core.schema import SYNTHESIZER, Config, OptimConfig, quant_problems
from dfkd_base.errors import ConfigError, DfkdError
from dfkd_base.registry import nearest

# batch sources that a synthesizer draws (its class lists those it can in ``draws``)
DRAWN_SOURCES = ("fresh", "fresh+ema", "regenerated")


def _kinds(has) -> str:
    """The registered synthesis kinds whose class satisfies ``has``, in words."""
    names = [name for name in SYNTHESIZERS.names() if has(SYNTHESIZERS.get(name))]
    return " or ".join(", ".join(names).rsplit(", ", 1)) if len(names) > 1 else f"'{names[0]}'" if names else "none"


def _spans(epochs: list[int]) -> str:
    """Sorted epochs as runs: [8, 9, 10, 12] -> '8-10, 12'."""
    runs: list[list[int]] = []
    for e in epochs:
        if runs and e == runs[-1][1] + 1:
            runs[-1][1] = e
        else:
            runs.append([e, e])
    return ", ".join(f"{a}-{b}" if b > a else f"{a}" for a, b in runs)


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
        cls = self.kind_class(cls, value, key)
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        for k in value:
            if k not in names:
                full = f"{key}.{k}" if key else str(k)
                close = nearest(str(k), names)
                hint = f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(names)})"
                self.fail(full, f"unknown key '{full}'{self.kinds_taking(cls, value, str(k)) or hint}")
        kwargs = {k: self.build(hints[k], v, f"{key}.{k}" if key else k) for k, v in value.items()}
        return cls(**kwargs)

    def kind_class(self, cls: type, value: dict, key: str) -> type:
        """The dataclass that validates a section: for one that names a registered kind
        (``__kinds__``), that kind's ``Options``; the section's own class for its default kind."""
        kinds = getattr(cls, "__kinds__", None)
        kind = value.get("kind", getattr(cls, "kind", None))
        if kinds is None or kind == cls.kind:
            return cls
        if not isinstance(kind, str) or kind not in kinds:
            known = ", ".join([cls.kind, *kinds.names()])
            self.fail(f"{key}.kind", f"'{key}.kind' must be one of {known}; got {kind!r}")
        return kinds.get(kind).Options

    @staticmethod
    def kinds_taking(cls: type, value: dict, option: str) -> str:
        """For a key the section's kind lacks: the kinds that take it, in words ('' when none does)."""
        kinds = getattr(cls, "__kinds__", None)
        if kinds is None:
            return ""
        taking = [k for k in kinds.names() if option in {f.name for f in dataclasses.fields(kinds.get(k).Options)}]
        kind = value.get("kind", cls.kind)
        return f" (an option of kind {', '.join(taking)}, not of '{kind}')" if taking else ""


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
    if not re.fullmatch(r"[\w+-][\w.+-]*", config.experiment) or len(config.experiment) > 200:
        v.fail("experiment", f"experiment must be a name (letters, digits, '.', '_', '+', '-'), not a path: "
                             f"{config.experiment!r}")
    syn = config.synthesis
    kind = SYNTHESIZERS.get(syn.kind) if syn.kind != "none" else None
    for i, phase in enumerate(config.phases):
        if phase.player == SYNTHESIZER:
            if kind is None or not kind.runs_as_phase:
                v.fail(f"phases.{i}.player", f"phases.{i}: the 'synthesizer' phase needs synthesis.kind "
                                             f"{_kinds(lambda k: k.runs_as_phase)} (it is '{syn.kind}')")
        elif phase.player not in config.players:
            v.fail(f"phases.{i}.player", f"phases.{i}.player '{phase.player}' is not a player "
                                         f"(players: {', '.join(config.players) or 'none'})")
        for key in ("also", "train_mode"):
            for other in getattr(phase, key):
                if other not in config.players or other == phase.player:
                    v.fail(f"phases.{i}.{key}", f"phases.{i}.{key}: '{other}' is not another player "
                                                f"(players: {', '.join(config.players) or 'none'})")
        if phase.steps < 1:
            v.fail(f"phases.{i}.steps", f"phases.{i}.steps must be >= 1, got {phase.steps}")
        if not phase.losses:
            v.fail(f"phases.{i}.losses", f"phases.{i} has no loss terms")
        if phase.batch == "same" and not any(p.batch != "same" for p in config.phases):
            v.fail(f"phases.{i}.batch", f"phases.{i}.batch 'same' needs another phase that draws a batch")
        if phase.batch in DRAWN_SOURCES and phase.player != SYNTHESIZER \
                and (kind is None or phase.batch not in kind.draws):
            v.fail(f"phases.{i}.batch", f"phases.{i}.batch '{phase.batch}' needs synthesis.kind "
                                        f"{_kinds(lambda k: phase.batch in k.draws)} (it is '{syn.kind}')")
        if phase.epochs is not None and (len(phase.epochs) != 2 or not 0 <= phase.epochs[0] < phase.epochs[1]):
            v.fail(f"phases.{i}.epochs", f"phases.{i}.epochs must be [first, last) with 0 <= first < last, "
                                         f"got {phase.epochs}")
        if phase.mixup < 0:
            v.fail(f"phases.{i}.mixup", f"phases.{i}.mixup must be >= 0 (a Beta(α, α) parameter), got {phase.mixup}")
        if phase.batch == "pool" and not syn.pool_size:
            v.fail(f"phases.{i}.batch", f"phases.{i}.batch 'pool' needs synthesis.pool_size > 0")
    idle = [e for e in range(config.train.epochs) if config.phases and all(
        p.epochs is not None and not p.epochs[0] <= e < p.epochs[1] for p in config.phases)]
    if idle:  # e.g. train.epochs raised without the stages' bounds: those epochs would train nothing
        v.fail("train.epochs", f"train.epochs is {config.train.epochs}, but no phase runs in epoch"
                               f"{'s' if len(idle) > 1 else ''} {_spans(idle)}: set the phases' epochs "
                               f"(phases.N.epochs) to cover them")
    if kind is not None:
        syn.check(config, v.fail)  # the kind's own constraints
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
        for key, message in quant_problems(dataclasses.asdict(player.quant))[:1]:
            v.fail(f"players.{name}.quant.{key}", f"players.{name}.quant.{key}: {message}")  # where it was set
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
        [(f"synthesis.{f.name}", getattr(config.synthesis, f.name)) for f in dataclasses.fields(config.synthesis)
         if isinstance(getattr(config.synthesis, f.name), OptimConfig)]
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
                 "data.batch_size": config.data.batch_size, "data.eval_batch_size": config.data.eval_batch_size,
                 "data.agreement_samples": config.data.agreement_samples}
    if config.train.iters_per_epoch is not None:
        intervals["train.iters_per_epoch"] = config.train.iters_per_epoch
    for key, value in intervals.items():
        if value < 1:
            v.fail(key, f"{key} must be >= 1, got {value}")
    if not 0 <= config.seed < 2 ** 63:
        v.fail("seed", f"seed must be >= 0 and below 2**63 (torch's generator takes 64 bits), got {config.seed}")
    if config.train.max_rollbacks < 0 or not config.train.max_weight_growth >= 0 \
            or config.train.max_weight_growth == float("inf"):
        v.fail("train", f"train.max_rollbacks and train.max_weight_growth must be >= 0 (and finite), got "
                        f"{config.train.max_rollbacks} and {config.train.max_weight_growth}")
    stop = config.train.stop_at
    if stop.teacher_share is not None and not 0 < stop.teacher_share <= 2:
        v.fail("train.stop_at.teacher_share", f"train.stop_at.teacher_share must be a share of the teacher's "
                                              f"accuracy in (0, 2], got {stop.teacher_share}")
    if stop.patience is not None and stop.patience < 1:
        v.fail("train.stop_at.patience", f"train.stop_at.patience must be >= 1 evaluations, got {stop.patience}")
    for key, value in (("data.batch_size", config.data.batch_size), ("synthesis.batch_size", config.synthesis.batch_size)):
        if value == 1:
            v.fail(key, f"{key} must be >= 2: BatchNorm normalizes a batch by its own statistics, which one sample "
                        f"does not have")
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", config.runtime.device):
        v.fail("runtime.device", f"runtime.device must be auto, cpu, cuda, cuda:N or mps; got {config.runtime.device!r}")
    if config.runtime.num_threads is not None and config.runtime.num_threads < 1:
        v.fail("runtime.num_threads", f"runtime.num_threads must be >= 1, got {config.runtime.num_threads}")
    if not 0 < config.runtime.rendezvous_timeout_s < float("inf"):
        v.fail("runtime.rendezvous_timeout_s", f"runtime.rendezvous_timeout_s must be a positive number of seconds, "
                                               f"got {config.runtime.rendezvous_timeout_s}")
    if not config.phases:
        v.fail("phases", "a config needs at least one phase (a player, a batch source and loss terms)")
    try:
        check_output_folder(config.output.root)
    except DfkdError as error:
        v.fail("output.root", f"output.root {error}")
