"""Students chosen by architecture search: an Optuna study over a model family, each trial a short
distillation run through the engine (any method, data-free ones included).

A search config (``search/…``) names a run config (the method), a family of the zoo (``lenet5``,
``resnet``, ``mobilenetv2``, or any registered model) with the options to search and their
choices, and a budget (parameters, FLOPs, CPU latency). ``dfkd search`` then:

1. optionally ranks random in-budget candidates by a zero-cost proxy (DisWOT's teacher–student
   similarity at initialization) and queues the best as the first trials (``proxy.keep``), or,
   with ``trials: 0``, lets the proxy alone choose;
2. runs ``trials`` short distillations, sampled by TPE, each evaluated every epoch on a held-out
   part of the training split (``trial.validation``), weak ones pruned at the median; candidates
   over the budget are rejected before training and do not count;
3. retrains the ``retrain.top_k`` best and the ``references`` (e.g. the hand-made student) at the
   full budget over ``retrain.seeds``, on the test split, and writes a Pareto table
   (``search.md``), a Pareto plot (``pareto.png``, also in TensorBoard) and ``search.json``.

The study lives in the search folder (``study.db``, Optuna's SQLite storage): a killed search
continues with ``dfkd search --resume DIR``, retrying the trial that was cut short from its last
checkpoint. ``--storage URL`` puts the study in any database Optuna accepts, so that several
machines work one study (each runs ``dfkd search --config … --storage URL --trials-only``, one of
them without ``--trials-only`` to retrain at the end).
"""
from __future__ import annotations

import dataclasses
import inspect
import itertools
import json
import math
import random
import statistics
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import atomic_write_text, load_model
from .config import Config, dataclass_from_dict, load_config, load_config_dict, resolve_config_path
from .data import dataset_info, hold_out, load_dataset
from .engine import Engine
from .errors import ConfigError, DfkdError
from .models import MODELS, count_parameters, create_model
from .runs import RunLock, new_run_dir

# ---------------------------------------------------------------- configuration


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


# ---------------------------------------------------------------- the search space


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


# ---------------------------------------------------------------- costs


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


def over_budget(cost: dict, budget: BudgetConfig) -> list[str]:
    """What of ``cost`` the budget does not allow, in words (empty: within it)."""
    out = []
    for key in ("params", "flops", "latency_ms"):
        limit = getattr(budget, key)
        if limit is not None and key in cost and cost[key] > limit:
            out.append(f"{key} {cost[key]:g} > {limit:g}")
    return out


# ---------------------------------------------------------------- the zero-cost proxy


def _last_feature_map(model: nn.Module, x: torch.Tensor) -> str:
    """The path of the last module (not a pooling) whose output is a 4-D feature map."""
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda m, i, o, p=p: order.append(p) if torch.is_tensor(o) and o.dim() == 4
                                     and not isinstance(m, (nn.AdaptiveAvgPool2d, nn.AvgPool2d)) else None)
             for p, m in model.named_modules() if p and not list(m.children())]
    try:
        with torch.no_grad():
            model(x[:2])
    finally:
        for h in hooks:
            h.remove()
    if not order:
        raise ConfigError(f"{type(model).__name__} has no 4-D feature map for the DisWOT proxy")
    return order[-1]


def _relations(model: nn.Module, x: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """DisWOT's two matrices of ``model`` on ``x``: the classes' Grad-CAM maps' correlation
    (classes × classes) and the samples' embedding correlation (batch × batch), rows L2-normalized."""
    from .taps import embedding_layer, resolve_module

    kept: dict[str, torch.Tensor] = {}
    feature = resolve_module(model, _last_feature_map(model, x))
    classifier = resolve_module(model, embedding_layer(model))
    h1 = feature.register_forward_hook(lambda m, i, o: kept.__setitem__("map", o))
    h2 = classifier.register_forward_hook(lambda m, i, o: kept.__setitem__("embedding", i[0]))
    try:
        logits = model(x)
    finally:
        h1.remove()
        h2.remove()
    maps = kept["map"]
    cams = []
    for c in range(num_classes):  # Grad-CAM: channel weights = the class score's mean gradient over the map
        grad, = torch.autograd.grad(logits[:, c].sum(), maps, retain_graph=True)
        cams.append(F.relu((grad.mean((2, 3), keepdim=True) * maps).sum(1)).flatten())
    semantic = torch.stack(cams)
    embedding = kept["embedding"].flatten(1)
    return (F.normalize(semantic @ semantic.T, dim=1).detach(), F.normalize(embedding @ embedding.T, dim=1).detach())


def diswot_score(teacher: nn.Module, student: nn.Module, x: torch.Tensor, num_classes: int,
                 teacher_relations: tuple[torch.Tensor, torch.Tensor] | None = None) -> float:
    """DisWOT (Dong et al., CVPR 2023): the negated distance between teacher and (untrained) student
    in class-semantic similarity and in sample relations, ``-(‖S_t − S_s‖ + ‖R_t − R_s‖)`` with
    Frobenius norms; higher ranks a student as the better one to distil into. The teacher runs in
    eval mode (its matrices on ``x`` may be given, computed once for many students); the student in
    train mode (its BatchNorm has no statistics yet)."""
    st, rt = teacher_relations or _relations(teacher.eval(), x, num_classes)
    student.train()
    ss, rs = _relations(student, x, num_classes)
    return -float(torch.linalg.norm(st - ss) + torch.linalg.norm(rt - rs))


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (None for fewer than 3 pairs or a constant side)."""
    from scipy.stats import spearmanr

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return float(spearmanr(a, b).statistic)


# ---------------------------------------------------------------- the search


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
    Space(search.family, search.space, search.fixed, where)  # checks the options
    for reference in search.references:
        if reference.name not in MODELS:
            raise ConfigError(f"{where}: reference '{reference.name}' is not a registered model")
    return search


class _TrialEngine(Engine):
    """A trial's run: reports each evaluation to Optuna, which may prune the trial there."""

    def __init__(self, trial, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.trial = trial

    def end_of_epoch(self, epoch: int) -> None:
        super().end_of_epoch(epoch)
        record = self.progress.history[-1] if self.progress.history else {}
        if "acc" in record and self.trial is not None:
            import optuna

            self.trial.report(record["acc"], epoch)
            if self.step < self.total_iters and self.trial.should_prune():  # a finished trial is kept
                raise optuna.TrialPruned(f"epoch {epoch}: {record['acc']:.2f}% is below the median of earlier trials")


class Search:
    """A search run: ``Search(config)`` starts one in a new folder, ``Search.resume(folder)`` goes
    on with the one there. ``storage``: an Optuna database URL (default: ``study.db`` in the folder)."""

    def __init__(self, config: SearchConfig, folder: str | Path | None = None, state: dict | None = None,
                 storage: str | None = None, study_name: str | None = None):
        self.config = config
        if storage and not folder:  # a storage that can't be opened stops a new search before it has a folder
            open_storage(storage)
        self.folder = Path(folder) if folder else new_run_dir(config.root, config.experiment, config.seed)
        self.state = state or {"config": dataclasses.asdict(config), "retrain": {}}
        self.state.setdefault("storage", storage or f"sqlite:///{(self.folder / 'study.db').resolve()}")
        self.state.setdefault("study_name", study_name or config.experiment)
        self.lock = RunLock(self.folder)
        self.space = Space(config.family, config.space, config.fixed)
        probe = self.run_config(self.config.trial.set, self.space.decode(self.space.sample(random.Random(0))), 0)
        self.info, self.data_root = dataset_info(probe.data.name), probe.data.root
        self.data_free = not {p.batch for p in probe.phases} & {"real", "labeled"}
        self._teacher: nn.Module | None = None
        self._teacher_relations: tuple | None = None   # (the proxy batch, the teacher's DisWOT matrices on it)
        self._save()

    @classmethod
    def resume(cls, folder: str | Path) -> "Search":
        from .chain import read_folder_state

        state, config = read_folder_state(folder, "search.json", SearchConfig)
        return cls(config, folder, state)

    # ---------------------------------------------------------------- parts
    def run_config(self, extra: list[str], options: dict, seed: int, name: str | None = None,
                   validation: float = 0.0) -> Config:
        c = self.config
        teacher = [f"teacher.checkpoint={c.teacher}"] if c.teacher else []
        probe = load_config(c.config, [*c.set, *teacher])
        player = _student_player(probe)
        net = json.dumps({"name": name or c.family, "kwargs": options})
        return load_config(c.config, [*c.set, *teacher, *extra, f"seed={seed}", f"data.validation={validation}",
                                      f"players.{player}.net={net}"])

    def cost(self, name: str, options: dict, latency: bool = False) -> dict:
        shape = tuple(self.info.shape)
        cost = static_cost(name, options, shape, self.info.num_classes)
        if latency:
            cost["latency_ms"] = round(cpu_latency_ms(create_model(name, shape[0], self.info.num_classes, shape[1],
                                                                   **options), shape), 4)
        return cost

    def teacher(self) -> nn.Module:
        if self._teacher is None:
            if not self.config.teacher:
                raise ConfigError("the proxy needs the teacher: give the search's teacher (--teacher CKPT)")
            self._teacher = load_model(self.config.teacher, "cpu")[0]
        return self._teacher

    def proxy_batch(self) -> torch.Tensor:
        """The images the proxy compares on: real ones from the search's training part, or noise
        (a data-free method's searches read no training image)."""
        pc, generator = self.config.proxy, torch.Generator().manual_seed(self.config.seed)
        if pc.batch == "noise" or (pc.batch == "auto" and self.data_free):
            return torch.randn(pc.batch_size, *self.info.shape, generator=generator)
        train, _ = hold_out(load_dataset(self.info.name, "train", self.data_root), self.config.trial.validation or 0.1)
        index = torch.randperm(len(train), generator=generator)[: pc.batch_size]
        return train.normalize(train.images[index].float())

    def proxy(self, options: dict, batch: torch.Tensor) -> float:
        torch.manual_seed(self.config.seed)  # the same initialization for a candidate, whoever scores it
        shape = tuple(self.info.shape)
        student = create_model(self.config.family, shape[0], self.info.num_classes, shape[1], **options)
        if self._teacher_relations is None or self._teacher_relations[0] is not batch:
            # the teacher's side is the same for every candidate scored on this batch
            self._teacher_relations = batch, _relations(self.teacher().eval(), batch, self.info.num_classes)
        return diswot_score(self.teacher(), student, batch, self.info.num_classes, self._teacher_relations[1])

    # ---------------------------------------------------------------- the study
    def study(self):
        import optuna

        storage = open_storage(self.state["storage"])
        c = self.config
        # epochs count from 1: a trial may be pruned from epoch warmup_epochs + 1 on
        pruner = optuna.pruners.MedianPruner(n_startup_trials=c.pruner.startup_trials,
                                             n_warmup_steps=c.pruner.warmup_epochs + 1) \
            if c.pruner.name == "median" else optuna.pruners.NopPruner()
        # the budget reaches TPE as constraints (Trial.set_constraint), so it learns where the space is feasible
        sampler = optuna.samplers.TPESampler(seed=c.seed, n_startup_trials=c.startup_trials)
        return optuna.create_study(storage=storage, study_name=self.state["study_name"], direction="maximize",
                                   sampler=sampler, pruner=pruner, load_if_exists=True)

    def check_budget(self) -> None:
        """A space with no architecture inside the budget is an error before anything trains."""
        points = self.space.grid(4096) or [self.space.sample(random.Random(i)) for i in range(2000)]
        cheapest, best = None, None
        for params in points:
            cost = self.cost(self.config.family, self.space.decode(params))
            if not over_budget(cost, dataclasses.replace(self.config.budget, latency_ms=None)):
                if self.config.budget.latency_ms is None:
                    return
                if cheapest is None or cost["flops"] < cheapest[1]["flops"]:
                    cheapest = (params, cost)
            elif best is None or cost["params"] < best["params"]:
                best = cost
        if cheapest is not None:  # latency is measured, so only on the cheapest candidate by FLOPs
            cost = self.cost(self.config.family, self.space.decode(cheapest[0]), latency=True)
            if not over_budget(cost, self.config.budget):
                return
            best = cost
        raise ConfigError(f"search: no architecture of the space fits the budget "
                          f"({', '.join(over_budget(best, self.config.budget))} for the smallest of {len(points)} "
                          f"looked at)")

    def objective(self, trial) -> float:
        import optuna
        from optuna.trial import TrialState

        options = self.space.suggest(trial)
        cost = self.cost(self.config.family, options, latency=self.config.budget.latency_ms is not None)
        excess = over_budget(cost, self.config.budget)
        trial.set_user_attr("options", options)
        trial.set_user_attr("cost", cost)
        with warnings.catch_warnings():  # a retried trial has its constraints already
            warnings.simplefilter("ignore")
            for key, value in cost.items():
                limit = getattr(self.config.budget, key, None)
                if limit is not None:
                    trial.set_constraint(key, value / limit - 1.0)
        if excess:
            trial.set_user_attr("over_budget", ", ".join(excess))
            raise optuna.TrialPruned(f"over the budget: {', '.join(excess)}")
        # TPE may propose an architecture it has seen: its run would repeat the earlier one exactly
        # (same options, seed and data), so the earlier result is returned and the trial does not count
        earlier = next((t for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                        if t.user_attrs.get("options") == options and "duplicate_of" not in t.user_attrs), None)
        if earlier is not None:
            trial.set_user_attr("duplicate_of", earlier.number)
            return earlier.value
        if self.config.proxy.name == "diswot" and self.config.teacher:
            trial.set_user_attr("proxy", self.proxy(options, self._proxy_batch()))
        # a retried trial (a copy of one cut short, user attributes included) goes on in that one's folder
        folder = trial.user_attrs.get("folder") or str(trial.number)
        trial.set_user_attr("folder", folder)
        run_dir = self.folder / "trials" / folder
        last = run_dir / "ckpt" / "last.pt"
        config = self.run_config(self.config.trial.set, options, self.config.seed,
                                 validation=self.config.trial.validation)
        summary = _TrialEngine(trial, config, run_dir=run_dir, resume=last if last.exists() else None).fit()
        trial.set_user_attr("summary", {k: summary[k] for k in ("final_acc", "best_acc", "time_total_s")})
        return summary["final_acc"]

    def _proxy_batch(self) -> torch.Tensor:
        if not hasattr(self, "_batch"):
            self._batch = self.proxy_batch()
        return self._batch

    def prefilter(self, study) -> None:
        """Rank ``proxy.candidates`` random in-budget architectures by the proxy; queue the best
        ``proxy.keep`` as the first trials. Done once per study (recorded in it)."""
        pc = self.config.proxy
        if pc.name == "none" or pc.candidates <= 0 or "proxy_ranking" in study.user_attrs:
            return
        rng, ranked, seen = random.Random(self.config.seed), [], set()
        budget = dataclasses.replace(self.config.budget, latency_ms=None)
        for _ in range(50 * pc.candidates):
            if len(ranked) >= pc.candidates:
                break
            params = self.space.sample(rng)
            key = json.dumps(params, sort_keys=True)
            options = self.space.decode(params)
            if key in seen:
                continue
            seen.add(key)
            cost = self.cost(self.config.family, options, latency=self.config.budget.latency_ms is not None)
            if not over_budget(cost, self.config.budget if "latency_ms" in cost else budget):
                ranked.append({"params": params, "options": options, "cost": cost,
                               "proxy": self.proxy(options, self._proxy_batch())})
        ranked.sort(key=lambda r: -r["proxy"])
        for r in ranked[: pc.keep]:
            study.enqueue_trial(r["params"], user_attrs={"queued_by": "proxy"})
        study.set_user_attr("proxy_ranking", ranked)

    def run(self, trials_only: bool = False) -> dict:
        t0 = time.perf_counter()
        study = self.study()
        if not study.trials:
            self.check_budget()
        if self.state["storage"].endswith(str((self.folder / "study.db").resolve())):
            _retry_cut_short(study)  # this folder's lock is ours: any trial still 'running' was killed
        self.prefilter(study)
        n = self.config.trials

        def enough(study, trial) -> None:
            trials = study.get_trials(deepcopy=False)
            # candidates over the budget and repeats cost milliseconds, but a small or mostly infeasible
            # space could make them endless: past this many, the space is taken as exhausted
            unproductive = sum("over_budget" in t.user_attrs or "duplicate_of" in t.user_attrs for t in trials)
            if sum(_trained(t) for t in trials) >= n or unproductive > 20 * n + 50:
                study.stop()

        if n > 0 and sum(_trained(t) for t in study.get_trials(deepcopy=False)) < n:
            study.optimize(self.objective, callbacks=[enough], catch=(DfkdError,))
        self.state["search_s"] = self.state.get("search_s", 0.0) + time.perf_counter() - t0
        self.state["trials"] = _trial_table(study)
        self.state["proxy_ranking"] = study.user_attrs.get("proxy_ranking", [])
        self.state["rank_correlation"] = _rank_correlations(self.state["trials"])
        self._save()
        if not trials_only:
            self.retrain(self.top(study))
            self.report()
        self.lock.release()
        return self.state

    def top(self, study) -> list[dict]:
        """The best distinct architectures: by final validation accuracy, or by the proxy alone."""
        if self.config.trials == 0:
            rows = [{"options": r["options"], "score": r["proxy"]} for r in study.user_attrs.get("proxy_ranking", [])]
        else:
            rows = sorted(({"options": t["options"], "score": t["value"]} for t in self.state["trials"]
                           if t["state"] == "COMPLETE"), key=lambda r: -r["score"])
        chosen, seen = [], set()
        for row in rows:
            key = json.dumps(row["options"], sort_keys=True)
            if key not in seen:
                seen.add(key)
                chosen.append(row)
        return chosen[: self.config.retrain.top_k]

    # ---------------------------------------------------------------- retraining and the table
    def retrain(self, chosen: list[dict]) -> None:
        rc = self.config.retrain
        candidates = [(f"searched-{i + 1}", self.config.family, row["options"]) for i, row in enumerate(chosen)]
        candidates += [(f"reference-{r.name}", r.name, dict(r.kwargs)) for r in self.config.references]
        for label, name, options in candidates:
            entry = self.state["retrain"].setdefault(label, {"model": name, "options": options, "runs": {}})
            if "cost" not in entry:
                entry["cost"] = self.cost(name, options, latency=True)
                self._save()
            for seed in rc.seeds:
                if str(seed) in entry["runs"]:
                    continue
                run_dir = self.folder / "retrain" / f"{label}-s{seed}"
                last = run_dir / "ckpt" / "last.pt"
                config = self.run_config(rc.set, options, seed, name=name)
                summary = Engine(config, run_dir=run_dir, resume=last if last.exists() else None).fit()
                entry["runs"][str(seed)] = {k: summary[k] for k in ("final_acc", "best_acc", "time_total_s")}
                self._save()

    def report(self) -> None:
        rows = pareto_rows(self.state)
        atomic_write_text(self.folder / "search.md", render(self.state, rows))
        if rows:
            image = pareto_plot(rows)
            image.save(self.folder / "pareto.png")
            try:
                from torch.utils.tensorboard import SummaryWriter

                import numpy as np

                with SummaryWriter(str(self.folder)) as writer:
                    writer.add_image("search/pareto", np.asarray(image), dataformats="HWC")
                    for t in self.state["trials"]:
                        if t["value"] is not None and t.get("duplicate_of") is None:
                            writer.add_scalar("search/trial_acc", t["value"], t["number"])
            except ImportError:
                pass

    def _save(self) -> None:
        atomic_write_text(self.folder / "search.json", json.dumps(self.state, indent=1))


def open_storage(url: str):
    """Optuna's database at ``url``, with heartbeats that re-queue a dead worker's trial."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # heartbeats and their retry callback are marked experimental; they are what resumes shared studies
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    try:
        return optuna.storages.RDBStorage(
            url, heartbeat_interval=60, grace_period=180,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3))
    except Exception as error:  # sqlalchemy's and the driver's errors have no common base
        raise DfkdError(f"--storage {url}: cannot open it ({_first_line(error)})") from None


def _student_player(config: Config) -> str:
    from .build import eval_player_name

    return eval_player_name(config)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _trained(trial) -> bool:
    from optuna.trial import TrialState

    if "duplicate_of" in trial.user_attrs or "over_budget" in trial.user_attrs:
        return False
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED)


def _retry_cut_short(study) -> None:
    """Fail the trials a killed search left 'running' and queue each again, to continue in its folder."""
    import optuna
    from optuna.trial import TrialState

    retry = optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=3)
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study._storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        retry(study, study._storage.get_trial(trial._trial_id))


def _trial_table(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if "options" not in t.user_attrs:
            continue
        rows.append({"number": t.number, "state": t.state.name, "value": t.value, "options": t.user_attrs["options"],
                     "cost": t.user_attrs["cost"], "proxy": t.user_attrs.get("proxy"),
                     "over_budget": t.user_attrs.get("over_budget"), "duplicate_of": t.user_attrs.get("duplicate_of"),
                     "epochs": len(t.intermediate_values), "queued_by": t.user_attrs.get("queued_by"),
                     "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
                     if t.datetime_complete and t.datetime_start else None})
    return rows


def _rank_correlations(trials: list[dict]) -> dict:
    """How well the proxy (and, for comparison, the parameter count) ranks the finished trials."""
    done = [t for t in trials if t["state"] == "COMPLETE" and t["proxy"] is not None and t.get("duplicate_of") is None]
    accuracy = [t["value"] for t in done]
    return {"n": len(done), "proxy": spearman([t["proxy"] for t in done], accuracy),
            "params": spearman([t["cost"]["params"] for t in done], accuracy)}


def pareto_rows(state: dict) -> list[dict]:
    rows = []
    for label, entry in state["retrain"].items():
        runs = list(entry["runs"].values())
        if not runs:
            continue
        final = [r["final_acc"] for r in runs]
        rows.append({"label": label, "arch": describe(entry["model"], entry["options"]), **entry["cost"],
                     "final": statistics.mean(final), "std": statistics.stdev(final) if len(final) > 1 else 0.0,
                     "best": statistics.mean(r["best_acc"] for r in runs), "seeds": len(runs),
                     "seconds": statistics.mean(r["time_total_s"] for r in runs)})
    for row in rows:  # Pareto-optimal: no other row has at most its parameters and a higher accuracy
        row["pareto"] = not any(o is not row and o["params"] <= row["params"] and o["final"] > row["final"]
                                for o in rows)
    return sorted(rows, key=lambda r: r["params"])


def render(state: dict, rows: list[dict]) -> str:
    trials = state.get("trials", [])
    trained = [t for t in trials if t["state"] in ("COMPLETE", "PRUNED") and not t["over_budget"]
               and t.get("duplicate_of") is None]
    lines = [f"# Search {state['config']['experiment']}", "",
             f"{len(trained)} trials trained ({sum(t['state'] == 'PRUNED' for t in trained)} pruned), "
             f"{sum(bool(t['over_budget']) for t in trials)} candidates over the budget rejected, "
             f"{sum(t.get('duplicate_of') is not None for t in trials)} repeated architectures answered from "
             f"earlier trials, "
             f"{state.get('search_s', 0):.0f} s of search.", ""]
    rc = state.get("rank_correlation") or {}
    if rc.get("n"):
        def fmt(v):
            return "–" if v is None else f"{v:.2f}"
        lines += [f"Spearman ρ with the trials' final validation accuracy over {rc['n']} finished trials: "
                  f"proxy {fmt(rc['proxy'])}, parameter count {fmt(rc['params'])}.", ""]
    lines += ["| student | params | FLOPs | CPU ms | final acc (mean ± std) | best | seeds | Pareto |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']}: {r['arch']} | {r['params']:,} | {r['flops'] / 1e6:.2f} M | "
                     f"{r.get('latency_ms', float('nan')):.3f} | {r['final']:.2f} ± {r['std']:.2f} | {r['best']:.2f} | "
                     f"{r['seeds']} | {'✓' if r['pareto'] else ''} |")
    lines += ["", "| trial | state | options | params | proxy | val acc | epochs |", "|---|---|---|---|---|---|---|"]
    for t in trials:
        if t["over_budget"] or t.get("duplicate_of") is not None:
            continue
        value = "–" if t["value"] is None else f"{t['value']:.2f}"
        proxy = "–" if t["proxy"] is None else f"{t['proxy']:.3f}"
        lines.append(f"| {t['number']} | {t['state'].lower()} | {json.dumps(t['options'])} | {t['cost']['params']:,} | "
                     f"{proxy} | {value} | {t['epochs']} |")
    return "\n".join(lines) + "\n"


def pareto_plot(rows: list[dict], size: tuple[int, int] = (720, 480)):
    """Accuracy against parameters (log scale), the Pareto front joined, each point labeled."""
    from PIL import Image, ImageDraw

    width, height = size
    left, right, top, bottom = 70, 20, 30, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    xs = [math.log10(r["params"]) for r in rows]
    ys = [r["final"] for r in rows]
    x0, x1 = min(xs) - 0.1, max(xs) + 0.1
    y0, y1 = min(y - r["std"] for y, r in zip(ys, rows)) - 0.5, max(y + r["std"] for y, r in zip(ys, rows)) + 0.5

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(5):  # axis ticks
        y = y0 + (y1 - y0) * i / 4
        draw.text((5, at(x0, y)[1] - 6), f"{y:.1f}%", fill="black")
        x = x0 + (x1 - x0) * i / 4
        draw.text((at(x, y0)[0] - 15, height - bottom + 5), f"{10 ** x:,.0f}", fill="black")
    draw.text((width // 2 - 60, height - 20), "parameters (log scale)", fill="black")
    draw.text((left, 8), "final test accuracy, mean ± std over seeds", fill="black")
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["params"])
    draw.line([at(math.log10(r["params"]), r["final"]) for r in front], fill="green", width=2)
    for r in rows:
        px, py = at(math.log10(r["params"]), r["final"])
        _, lo = at(0, r["final"] - r["std"])
        _, hi = at(0, r["final"] + r["std"])
        draw.line([(px, lo), (px, hi)], fill="gray")
        color = "blue" if r["label"].startswith("searched") else "red"
        draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=color)
        draw.text((px + 6, py - 12), r["label"], fill=color)
    return image
