"""A search config (``search/…``): the method every trial runs, the family and its space, the
budget, the trials' and the retraining's budgets, the pruner and the proxy."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Optional

from dfkd.core.config import load_config, load_config_dict, resolve_config_path
from dfkd.core.validate import dataclass_from_dict
from dfkd.nets.models import MODELS
from dfkd.tools.search.space import Space
from dfkd_base.errors import ConfigError


@dataclass
class BudgetConfig:
    params: Optional[int] = None         # parameters
    flops: Optional[float] = None        # FLOPs of one image (2 per multiply-add, torch's FlopCounterMode)
    latency_ms: Optional[float] = None   # CPU latency of one image, one thread (measured per candidate)


@dataclass
class ProxyConfig:
    name: Literal["diswot", "none"] = "diswot"
    candidates: int = 0                  # random in-budget candidates ranked before the search (0: none)
    keep: int = 0                        # the best of them queued as the first trials
    batch: Literal["auto", "real", "noise"] = "auto"   # auto: noise for data-free methods, else real images
    batch_size: int = 64


@dataclass
class TrialConfig:
    set: list[str] = field(default_factory=list)   # the short budget of a trial (train.epochs=2 ...)
    validation: float = 0.1                        # share of the training split trials are evaluated on


@dataclass
class PrunerConfig:
    name: Literal["median", "none"] = "median"
    startup_trials: int = 3              # trials finished before any is pruned
    warmup_epochs: int = 1               # epochs of a trial before it may be pruned


@dataclass
class RetrainConfig:
    top_k: int = 3
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    set: list[str] = field(default_factory=list)   # the full budget (none: the run config's own)


@dataclass
class ReferenceConfig:
    name: str = ""                       # a model name (lenet5_half ...)
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class SearchConfig:
    experiment: str = "search"
    seed: int = 0
    root: str = "runs"
    config: str = ""                     # the run config of every trial and retraining (the method)
    teacher: Optional[str] = None        # the teacher's model file
    allow_code: bool = False             # the teacher's file may import the user's class it names (--allow-code)
    family: str = ""                     # the searched model (a registered name)
    fixed: dict[str, Any] = field(default_factory=dict)   # family options held fixed
    # option -> choices: [a, b, c] (categorical), {low, high[, step][, log]} (a range), or a list
    # of such specs, one per element of a list option (channels: [[2, 4], [8, 16], ...])
    space: dict[str, Any] = field(default_factory=dict)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    trials: int = 20                     # trained trials (0: the proxy alone chooses)
    startup_trials: int = 5              # TPE's random trials before it models the space
    set: list[str] = field(default_factory=list)   # overrides for every run (threads, data)
    trial: TrialConfig = field(default_factory=TrialConfig)
    pruner: PrunerConfig = field(default_factory=PrunerConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    retrain: RetrainConfig = field(default_factory=RetrainConfig)
    references: list[ReferenceConfig] = field(default_factory=list)



def load_search(name: str, overrides: list[str] = ()) -> SearchConfig:
    data, origin = load_config_dict(name, overrides)
    where = str(resolve_config_path(name))
    search = dataclass_from_dict(SearchConfig, data, origin, where)
    if not search.config:
        raise ConfigError(f"{where}: 'config' must name the run config (the method) every trial uses")
    if search.trials < 0 or search.retrain.top_k < 0 or not search.retrain.seeds and search.retrain.top_k:
        raise ConfigError(f"{where}: trials and retrain.top_k must be >= 0, and retraining needs seeds")
    if search.trials == 0 and not (search.proxy.name != "none" and search.proxy.candidates > 0):
        raise ConfigError(f"{where}: trials: 0 lets the proxy choose alone; give proxy.candidates > 0")
    method = load_config(search.config, search.set)
    if method.task != "distill":
        raise ConfigError(f"{where}: config '{search.config}' is a {method.task} config (it trains on labels); a "
                          f"search distils the teacher into each candidate: name a distill config")
    Space(search.family, search.space, search.fixed, where)  # checks the options
    for reference in search.references:
        if reference.name not in MODELS:
            raise ConfigError(f"{where}: reference '{reference.name}' is not a registered model")
    return search
