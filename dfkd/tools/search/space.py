"""A search's space and what a candidate costs: the options of a model family to sample
(:class:`Space`), and a candidate's parameters and FLOPs (computed on the meta device, nothing
allocated) and CPU latency, against the search's budget."""
from __future__ import annotations

import inspect
import itertools
import math
import random
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import nn

from dfkd.nets.models import MODELS, count_parameters, create_model
from dfkd_base.errors import ConfigError


@dataclass(frozen=True)
class Dimension:
    """One sampled number: an Optuna parameter ``name`` (``channels.2`` for a list's element)."""
    name: str
    choices: Optional[tuple] = None
    low: Optional[float] = None
    high: Optional[float] = None
    step: Optional[float] = None
    log: bool = False

    def suggest(self, trial) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if isinstance(self.low, int) and isinstance(self.high, int) and isinstance(self.step or 1, int):
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)

    def values(self) -> list | None:
        """Every value, when there are finitely many."""
        if self.choices is not None:
            return list(self.choices)
        if isinstance(self.low, int) and isinstance(self.high, int) and isinstance(self.step or 1, int):
            return list(range(self.low, self.high + 1, self.step or 1))
        return None

    def sample(self, rng: random.Random) -> Any:
        values = self.values()
        if values is not None:
            return rng.choice(values)
        if self.log:
            return math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        return rng.uniform(self.low, self.high)


class Space:
    """A family's search space: ``decode(params)`` turns sampled numbers into the model's options."""

    def __init__(self, family: str, space: dict, fixed: dict, where: str = "search"):
        if family not in MODELS:
            raise ConfigError(f"{where}: family '{family}' is not a registered model ({', '.join(MODELS.names())})")
        accepted = [p for p in inspect.signature(MODELS.get(family)).parameters
                    if p not in ("in_channels", "num_classes", "image_size")]
        for key in [*space, *fixed]:
            if key not in accepted:
                raise ConfigError(f"{where}: {family} has no option '{key}' (it has {', '.join(accepted)})")
        if not space:
            raise ConfigError(f"{where}: the space is empty; give {family}'s options to search ({', '.join(accepted)})")
        self.family, self.fixed = family, dict(fixed)
        self.dimensions: list[Dimension] = []
        self.shapes: dict[str, int | None] = {}  # option -> list length (None: a single value)
        for key, spec in space.items():
            if isinstance(spec, list) and spec and all(isinstance(s, (list, dict)) for s in spec):
                self.shapes[key] = len(spec)
                self.dimensions += [self._dimension(f"{key}.{i}", s, where) for i, s in enumerate(spec)]
            else:
                self.shapes[key] = None
                self.dimensions.append(self._dimension(key, spec, where))

    @staticmethod
    def _dimension(name: str, spec: Any, where: str) -> Dimension:
        if isinstance(spec, list) and spec and all(isinstance(v, (int, float, str, bool)) for v in spec):
            return Dimension(name, choices=tuple(spec))
        if isinstance(spec, dict) and {"low", "high"} <= set(spec) and set(spec) <= {"low", "high", "step", "log"}:
            if not spec["low"] <= spec["high"] or (spec.get("log") and spec["low"] <= 0):
                raise ConfigError(f"{where}: space.{name}: need low <= high (and low > 0 with log), got {spec}")
            return Dimension(name, low=spec["low"], high=spec["high"], step=spec.get("step"), log=bool(spec.get("log")))
        raise ConfigError(f"{where}: space.{name}: expected a list of choices or {{low, high[, step][, log]}}, "
                          f"got {spec!r}")

    def decode(self, params: dict[str, Any]) -> dict[str, Any]:
        options = dict(self.fixed)
        for key, length in self.shapes.items():
            options[key] = params[key] if length is None else [params[f"{key}.{i}"] for i in range(length)]
        return options

    def suggest(self, trial) -> dict[str, Any]:
        return self.decode({d.name: d.suggest(trial) for d in self.dimensions})

    def sample(self, rng: random.Random) -> dict[str, Any]:
        return {d.name: d.sample(rng) for d in self.dimensions}

    def grid(self, limit: int) -> list[dict[str, Any]] | None:
        """Every point of a finite space of at most ``limit`` points, else None."""
        values = [d.values() for d in self.dimensions]
        if any(v is None for v in values) or math.prod(len(v) for v in values) > limit:
            return None
        return [dict(zip((d.name for d in self.dimensions), point)) for point in itertools.product(*values)]


def describe(family: str, options: dict) -> str:
    inner = ", ".join(f"{k}={v}" for k, v in options.items())
    return f"{family}({inner})" if inner else family



def static_cost(name: str, options: dict, shape: tuple[int, int, int], num_classes: int) -> dict:
    """Parameters and FLOPs of one image, computed on the meta device (nothing is allocated)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        model = create_model(name, shape[0], num_classes, shape[1], **options).eval()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.zeros(1, *shape, device="meta"))
    return {"params": count_parameters(model), "flops": int(counter.get_total_flops())}


def cpu_latency_ms(model: nn.Module, shape: tuple[int, int, int], min_run_time: float = 0.2) -> float:
    """CPU time of one image through ``model`` on one thread, in milliseconds: the median over
    blocks of torch's benchmark timer (which warms up and sets the thread count)."""
    import logging

    # importing the timer loads torch's C++-extension helper, which warns that a CPU machine has no CUDA
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils.benchmark import Timer

    timer = Timer("with torch.no_grad(): model(x)", globals={"torch": torch, "model": model.cpu().eval(),
                                                             "x": torch.zeros(1, *shape)}, num_threads=1)
    return 1000.0 * timer.blocked_autorange(min_run_time=min_run_time).median


def over_budget(cost: dict, budget) -> list[str]:
    """What of ``cost`` the budget does not allow, in words (empty: within it)."""
    out = []
    for key in ("params", "flops", "latency_ms"):
        limit = getattr(budget, key)
        if limit is not None and key in cost and cost[key] > limit:
            out.append(f"{key} {cost[key]:g} > {limit:g}")
    return out
