"""The frozen teachers of a run: loading, running, ensembles and the hooks that read them.

A run has one teacher or an ensemble (``teacher.checkpoint`` a list). An ensemble's logits are
combined into one soft target (``mean``, ``confidence``-weighted, or one teacher ``random``ly
picked per iteration, as MEAL does). BN statistics and tapped features are read with the hooks
of :mod:`dfkd.nets.taps`, installed only when some loss term asks for them.
"""
from __future__ import annotations

import sys
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.core.runs import is_main_process
from dfkd.core.schema import Config
from dfkd.data.card import card_of, check_card
from dfkd.data.datasets import DatasetInfo
from dfkd.loop.runtime import Runtime
from dfkd.nets.arch import load_model
from dfkd.nets.quant import quant_summary
from dfkd.nets.taps import BNStats, BNStatsTap, FeatureTap, probe
from dfkd_base.errors import ConfigError, ShapeError


def describe_arch(name: str, kwargs: dict) -> str:
    return name + (f" ({', '.join(f'{k}={v}' for k, v in kwargs.items())})" if kwargs else "")


def expected_arch_warning(arch: dict, expected, path: str, experiment: str) -> str | None:
    """The one-line warning for a teacher other than the one a recipe was written for, or None."""
    if expected is None:
        return None
    kwargs = arch.get("kwargs") or {}
    if arch["name"] == expected.name and all(kwargs.get(k) == v for k, v in expected.kwargs.items()):
        return None
    return (f"{experiment} was written for a {describe_arch(expected.name, expected.kwargs)} teacher; "
            f"{path} is a {describe_arch(arch['name'], kwargs)}; running it anyway")


def load_teacher(path: str, runtime: Runtime, allow_code: bool = False) -> tuple[nn.Module, dict]:
    """A teacher model file, frozen, on the run's device, in eval mode; and the file's metadata
    (``arch``, ``card``, ``dataset``, ``sha256`` ...). A file that names a user's class needs
    ``allow_code``."""
    teacher, meta = load_model(path, runtime.device, allow_code=allow_code)
    arch = meta["arch"]
    if arch.get("quant"):
        raise ConfigError(f"teacher {path} is a quantized model ({quant_summary(arch['quant'])}); a teacher must be "
                          f"full precision")
    teacher.requires_grad_(False)
    return runtime.prepare(teacher).eval(), meta


def check_teacher(teacher: nn.Module, meta: dict, path: str, info: DatasetInfo, runtime: Runtime) -> None:
    """The teacher takes the run's input (``info``: its card, or the dataset's) and predicts its classes."""
    arch = meta["arch"]
    try:
        probe(teacher, torch.zeros((2, *info.shape), device=runtime.device))
    except RuntimeError:
        raise ShapeError(f"teacher {path} ({arch['name']}, {arch.get('image_size')} px, trained on "
                         f"{meta.get('dataset')}) does not take dataset '{info.name}' images of shape "
                         f"{tuple(info.shape)}") from None
    if arch["num_classes"] != info.num_classes or arch["in_channels"] != info.shape[0]:
        raise ConfigError(f"teacher {path} takes {arch['in_channels']} channels and predicts "
                          f"{arch['num_classes']} classes; dataset '{info.name}' has "
                          f"{info.shape[0]} and {info.num_classes}")


def teacher_card(meta: dict, path: str) -> dict | None:
    """The input card a teacher's model file records (or its dataset's), checked."""
    card = card_of(meta)
    return None if card is None else check_card(card, f"teacher {path}")


def load_teachers(config: Config, runtime: Runtime) -> tuple[list[nn.Module], list[dict]]:
    """The teachers and their model files' metadata."""
    tc = config.teacher
    if tc is None:
        return [], []
    if not tc.checkpoints:
        raise ConfigError("teacher.checkpoint is not set: pass --teacher PATH (a model file from `dfkd teacher` or "
                          "`dfkd import`)")
    loaded = [load_teacher(path, runtime, tc.allow_code) for path in tc.checkpoints]
    return [t for t, _ in loaded], [m for _, m in loaded]


def ensemble_card(config: Config, metas: list[dict]) -> dict | None:
    """The first teacher's input card; an ensemble's teachers must take the same input."""
    cards = [teacher_card(meta, path) for meta, path in zip(metas, config.teacher.checkpoints if metas else [])]
    for path, other in zip(config.teacher.checkpoints[1:] if metas else [], cards[1:]):
        if other is not None and cards[0] is not None and \
                {k: other[k] for k in ("shape", "mean", "std", "classes")} != \
                {k: cards[0][k] for k in ("shape", "mean", "std", "classes")}:
            raise ConfigError(f"the ensemble's teachers take different inputs: {path} is not normalized or shaped as "
                              f"{config.teacher.checkpoints[0]} (their input cards differ)")
    return cards[0] if cards else None


def check_teachers(config: Config, teachers: list[nn.Module], metas: list[dict], info: DatasetInfo,
                    runtime: Runtime) -> None:
    """Each teacher takes the run's input; a one-line warning for a teacher other than the recipe's,
    or trained on another dataset than the run's."""
    for teacher, meta, path in zip(teachers, metas, config.teacher.checkpoints if teachers else []):
        check_teacher(teacher, meta, path, info, runtime)
        warnings = [expected_arch_warning(meta["arch"], config.teacher.expected, path, config.experiment)]
        if meta.get("dataset") not in (None, info.name) and info.name != "card":
            warnings.append(f"teacher {path} was trained on '{meta['dataset']}'; this run's data is '{info.name}'")
        for warning in filter(None, warnings):
            if is_main_process():
                print(f"dfkd: warning: {warning}", file=sys.stderr)


def combine_logits(logits: list[torch.Tensor], ensemble: str) -> torch.Tensor:
    """One teacher's logits as they are; an ensemble's as the log of its (weighted) mean
    probabilities, so that softmax(result) is the averaged soft target."""
    if len(logits) == 1:
        return logits[0]
    probs = torch.stack([F.softmax(z.float(), dim=1) for z in logits])  # (teachers, N, classes)
    if ensemble == "confidence":
        weights = probs.max(dim=2).values                               # each teacher's top-class probability
        weights = (weights / weights.sum(0, keepdim=True)).unsqueeze(2)
    else:
        weights = torch.full_like(probs[:, :, :1], 1.0 / len(logits))
    return torch.log((weights * probs).sum(0).clamp_min(1e-12))


class TeacherPass(NamedTuple):
    logits: torch.Tensor                # combined over the running teachers
    bn: list[BNStats]                   # of every running teacher, when asked for
    features: dict[str, torch.Tensor]   # tapped paths of the first running teacher
    each: list[torch.Tensor]            # every running teacher's own logits


class Teachers(Sequence[nn.Module]):
    """The run's teachers (a sequence of frozen modules), how an ensemble combines them, and the
    hooks on them."""

    def __init__(self, modules: list[nn.Module], ensemble: str, runtime: Runtime, hashes: list[str] | None = None):
        self.modules, self.ensemble, self.runtime = list(modules), ensemble, runtime
        self.hashes = list(hashes or [])  # each teacher's weight SHA-256, which a resumed run must match
        self.pick = 0  # ensemble 'random': this iteration's teacher
        self.bn_taps: list[BNStatsTap] = []
        self.feature_taps: list[FeatureTap] = []

    def __getitem__(self, i):
        return self.modules[i]

    def __len__(self) -> int:
        return len(self.modules)

    def __eq__(self, other) -> bool:
        return list(self.modules) == list(other) if isinstance(other, (list, tuple, Teachers)) else NotImplemented

    __hash__ = object.__hash__

    @property
    def first(self) -> nn.Module | None:
        """The teacher that shows synthetic samples and sizes what is sized by a teacher."""
        return self.modules[0] if self.modules else None

    def install_taps(self, bn: bool, paths: list[str]) -> None:
        """BN-statistics hooks on every teacher (``bn``) and feature hooks at ``paths``."""
        if bn:
            self.bn_taps = [BNStatsTap(t) for t in self.modules]
        if paths:
            self.feature_taps = [FeatureTap(t, paths) for t in self.modules]

    def draw(self) -> int | None:
        """For a ``random`` ensemble, pick this iteration's teacher; for ``drop_one``, the one left
        out (None otherwise)."""
        if len(self.modules) > 1 and self.ensemble in ("random", "drop_one"):
            self.pick = int(torch.randint(len(self.modules), ()))
            return self.pick
        return None

    def running(self) -> list[int]:
        """The teachers that run on a batch this iteration: all, the one picked, or all but the one dropped."""
        everyone = list(range(len(self.modules)))
        if len(everyone) > 1 and self.ensemble == "drop_one":
            return [i for i in everyone if i != self.pick]
        return [self.pick] if self.ensemble == "random" else everyone

    def run(self, images: torch.Tensor, bn: bool = False) -> TeacherPass:
        """The running teachers' forward on ``images``; gradients flow through the frozen
        teachers only when the images themselves are being trained. ``bn``: compute and return
        the BN statistics of this pass."""
        running = self.running()
        logits = []
        with torch.set_grad_enabled(images.requires_grad):
            for i in running:
                if self.bn_taps:
                    self.bn_taps[i].enabled = bn
                logits.append(self.runtime.forward(self.modules[i], images))
        stats = [s for i in running for s in self.bn_taps[i].stats] if bn and self.bn_taps else []
        features = dict(self.feature_taps[running[0]].features) if self.feature_taps else {}
        return TeacherPass(combine_logits(logits, self.ensemble), stats, features, logits)

    def shapes(self, images: torch.Tensor) -> tuple[tuple[int, ...], dict[str, tuple[int, ...]]]:
        """The first teacher's logit shape and tapped feature shapes on a dummy batch like ``images``."""
        logits, features = probe(self.modules[0], images, self.runtime.forward,
                                 self.feature_taps[0] if self.feature_taps else None)
        return tuple(logits.shape[1:]), features

    def evaluation_model(self) -> nn.Module:
        """One module to evaluate: the teacher, or the ensemble combined as in training (``random``
        evaluated as the mean)."""
        return self.modules[0] if len(self.modules) == 1 else Ensemble(self.modules, self.ensemble)


class Ensemble(nn.Module):
    """Teachers evaluated as one model: their logits combined as in training."""

    def __init__(self, teachers: list[nn.Module], ensemble: str):
        super().__init__()
        # a plain list, not a ModuleList: evaluating this wrapper must not switch the teachers'
        # train/eval mode
        self.teachers, self.ensemble = teachers, ensemble

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return combine_logits([t(images) for t in self.teachers], self.ensemble)
