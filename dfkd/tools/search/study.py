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
import json
import random
import secrets
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from dfkd.core.checkpoint import read_model_file
from dfkd.core.config import load_config
from dfkd.core.io import atomic_write, atomic_write_text, check_output_folder
from dfkd.core.runs import RunLock, new_run_dir
from dfkd.core.schema import Config
from dfkd.data.card import info_from_card
from dfkd.data.datasets import dataset_info, load_dataset
from dfkd.data.splits import hold_out
from dfkd.loop.build import eval_player_name
from dfkd.loop.callbacks import Callback
from dfkd.loop.engine import Engine
from dfkd.loop.figures import figure_to_png
from dfkd.loop.teachers import teacher_card
from dfkd.nets.arch import load_model
from dfkd.nets.models import create_model
from dfkd.tools.folders import read_folder_state
from dfkd.tools.search.config import SearchConfig
from dfkd.tools.search.proxy import diswot_score, relations
from dfkd.tools.search.report import pareto_plot, pareto_rows, rank_correlations, render, trial_table
from dfkd.tools.search.space import Space, cpu_latency_ms, over_budget, static_cost
from dfkd.tools.search.storage import open_storage, retry_cut_short
from dfkd_base.errors import ConfigError, DfkdError


class _Pruning(Callback):
    """Reports each evaluation of a trial's run to Optuna, which may prune the trial there."""

    def __init__(self, trial):
        self.trial = trial

    def on_epoch_end(self, engine, epoch: int, record: dict) -> None:
        if "acc" in record:
            import optuna

            self.trial.report(record["acc"], epoch)
            if engine.step < engine.total_iters and self.trial.should_prune():  # a finished trial is kept
                raise optuna.TrialPruned(f"epoch {epoch}: {record['acc']:.2f}% is below the median of earlier trials")


class Search:
    """A search run: ``Search(config)`` starts one in a new folder, ``Search.resume(folder)`` goes
    on with the one there. ``storage``: an Optuna database URL (default: ``study.db`` in the folder)."""

    def __init__(self, config: SearchConfig, folder: str | Path | None = None, state: dict | None = None,
                 storage: str | None = None, study_name: str | None = None):
        self.config = config
        # everything that can be wrong with the input is found before the search has a folder
        if storage and not folder:
            open_storage(storage)
        self.space = Space(config.family, config.space, config.fixed)
        probe = self.run_config(self.config.trial.set, self.space.decode(self.space.sample(random.Random(0))), 0)
        card = teacher_card(read_model_file(config.teacher), config.teacher) if config.teacher else None
        # what a candidate takes: the teacher's input card, or the dataset's images
        self.info = info_from_card(card, probe.data.name) if card else dataset_info(probe.data.name)
        self.card, self.data_root = card, probe.data.root
        self.data_free = not {p.batch for p in probe.phases} & {"real", "labeled"}
        if not folder:
            check_output_folder(config.root)
        self.folder = Path(folder) if folder else new_run_dir(config.root, config.experiment, config.seed)
        self.state = state or {"config": dataclasses.asdict(config), "retrain": {}}
        self.state.setdefault("storage", storage or f"sqlite:///{(self.folder / 'study.db').resolve()}")
        self.state.setdefault("study_name", study_name or config.experiment)
        self.lock = RunLock(self.folder)
        self._teacher: nn.Module | None = None
        self.sampler_seed: int | None = None  # TPE's, drawn once per worker (see study())
        self._teacher_relations: tuple | None = None   # (the proxy batch, the teacher's DisWOT matrices on it)
        self._save()

    @classmethod
    def resume(cls, folder: str | Path) -> "Search":
        state, config = read_folder_state(folder, "search.json", SearchConfig)
        return cls(config, folder, state)

    @property
    def own_storage(self) -> bool:
        """Whether the study is the folder's own ``study.db`` (not one shared through --storage)."""
        return self.state["storage"].endswith(str((self.folder / "study.db").resolve()))

    # ---------------------------------------------------------------- parts
    def run_config(self, extra: list[str], options: dict, seed: int, name: str | None = None,
                   validation: float = 0.0) -> Config:
        c = self.config
        teacher = [f"teacher.checkpoint={c.teacher}"] if c.teacher else []
        teacher += ["teacher.allow_code=true"] if c.allow_code else []
        probe = load_config(c.config, [*c.set, *teacher])
        player = eval_player_name(probe)
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
            self._teacher = load_model(self.config.teacher, "cpu", allow_code=self.config.allow_code)[0]
        return self._teacher

    def proxy_batch(self) -> torch.Tensor:
        """The images the proxy compares on: real ones from the search's training part, or noise
        (a data-free method's searches read no training image)."""
        pc, generator = self.config.proxy, torch.Generator().manual_seed(self.config.seed)
        if pc.batch == "noise" or (pc.batch == "auto" and self.data_free):
            return torch.randn(pc.batch_size, *self.info.shape, generator=generator)
        train = load_dataset(self.info.name, "train", self.data_root, card=self.info if self.card else None)
        train, _ = hold_out(train, self.config.trial.validation or 0.1)
        index = torch.randperm(len(train), generator=generator)[: pc.batch_size]
        return train.normalize(train.images[index].float())

    def proxy(self, options: dict, batch: torch.Tensor) -> float:
        torch.manual_seed(self.config.seed)  # the same initialization for a candidate, whoever scores it
        shape = tuple(self.info.shape)
        student = create_model(self.config.family, shape[0], self.info.num_classes, shape[1], **options)
        if self._teacher_relations is None or self._teacher_relations[0] is not batch:
            # the teacher's side is the same for every candidate scored on this batch
            self._teacher_relations = batch, relations(self.teacher().eval(), batch, self.info.num_classes)
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
        # the budget reaches TPE as constraints (Trial.set_constraint), so it learns where the space is feasible.
        # Workers sharing a study each draw their own samples: with one seed they would all propose the same
        # architectures; the folder's own study keeps the config's seed (one worker, reproducible).
        if self.sampler_seed is None:
            self.sampler_seed = (c.seed + (0 if self.own_storage else secrets.randbelow(2**32))) % 2**32
        sampler = optuna.samplers.TPESampler(seed=self.sampler_seed, n_startup_trials=c.startup_trials)
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
        # workers sharing the study stop at its trial count: one about to train counts those trained
        # and those training now (which have a folder)
        busy = [t for t in trial.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                if t.number != trial.number and "folder" in t.user_attrs]
        if sum(_trained(t) for t in trial.study.get_trials(deepcopy=False)) + len(busy) >= self.config.trials:
            trial.set_user_attr("surplus", True)
            trial.study.stop()
            raise optuna.TrialPruned(f"the study has its {self.config.trials} trials")
        if self.config.proxy.name == "diswot" and self.config.teacher:
            trial.set_user_attr("proxy", self.proxy(options, self._proxy_batch()))
        # a retried trial (a copy of one cut short, user attributes included) goes on in that one's folder
        folder = trial.user_attrs.get("folder") or str(trial.number)
        trial.set_user_attr("folder", folder)
        run_dir = self.folder / "trials" / folder
        last = run_dir / "ckpt" / "last.pt"
        config = self.run_config(self.config.trial.set, options, self.config.seed,
                                 validation=self.config.trial.validation)
        summary = Engine(config, run_dir=run_dir, resume=last if last.exists() else None,
                         callbacks=[_Pruning(trial)]).fit()
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
        if self.own_storage:
            retry_cut_short(study)  # this folder's lock is ours: any trial still 'running' was killed
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
        self.state["trials"] = trial_table(study)
        self.state["proxy_ranking"] = study.user_attrs.get("proxy_ranking", [])
        self.state["rank_correlation"] = rank_correlations(self.state["trials"])
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
            figure = pareto_plot(rows)
            atomic_write(self.folder / "pareto.png", lambda f: f.write(figure_to_png(figure)))
            from torch.utils.tensorboard import SummaryWriter

            with SummaryWriter(str(self.folder)) as writer:
                writer.add_figure("search/pareto", figure, close=False)
                for t in self.state["trials"]:
                    if t["value"] is not None and t.get("duplicate_of") is None:
                        writer.add_scalar("search/trial_acc", t["value"], t["number"])

    def _save(self) -> None:
        atomic_write_text(self.folder / "search.json", json.dumps(self.state, indent=1))


def _trained(trial) -> bool:
    from optuna.trial import TrialState

    if {"duplicate_of", "over_budget", "surplus"} & trial.user_attrs.keys():
        return False
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED)
