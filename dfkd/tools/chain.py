"""Chains of distillations: stages run in order, each stage's final model the next stage's teacher.

One chain config (``chain/…``) covers the schemes that close a capacity gap or repeat a
distillation: TAKD (teacher → assistant → student, each taught by the one before), DGKD (every
earlier model teaches the next, ``teachers: all``) and born-again networks (generations of the
teacher's architecture, each taught by the last, evaluated together as an ensemble at the end).
A stage is any run config (``teacher/…``, ``kd/…``, ``datafree/…``) with overrides. Each stage is
a run folder under the chain's folder; ``chain.json`` records the stages done, so a killed chain
resumes (``dfkd chain --resume CHAIN_DIR``) at the stage it was in, from that stage's last
checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

from dfkd.core.checkpoint import read_model_file
from dfkd.core.config import load_config, load_config_dict, resolve_config_path
from dfkd.core.io import atomic_write_text, check_output_folder
from dfkd.core.runs import new_run_dir
from dfkd.core.schema import Config
from dfkd.core.validate import dataclass_from_dict
from dfkd.data.datasets import dataset_info
from dfkd.data.loader import TensorLoader
from dfkd.loop.engine import Engine
from dfkd.loop.evaluation import evaluate, evaluation_split
from dfkd.loop.runtime import resolve_device
from dfkd.loop.teachers import Ensemble, describe_arch
from dfkd.nets.arch import load_model
from dfkd.tools.folders import read_folder_state
from dfkd_base.errors import ConfigError


@dataclass
class StageConfig:
    """One distillation of a chain: ``config`` (a run config) with ``set`` overrides, taught by the
    previous stage's model (``teachers: previous``; the chain's ``teacher`` for the first stage) or
    by every model before it as an ensemble (``teachers: all``, DGKD)."""

    name: str = ""
    config: str = ""
    set: list[str] = field(default_factory=list)
    teachers: Literal["previous", "all"] = "previous"


@dataclass
class ChainConfig:
    experiment: str = "chain"
    seed: int = 0                        # stage i runs with seed + i (born-again generations differ)
    root: str = "runs"                   # the chain's folder is <root>/<experiment>/<stamp>_s<seed>
    teacher: Optional[str] = None        # the first teacher's model file (in place of a first teacher/ stage)
    set: list[str] = field(default_factory=list)   # overrides for every stage (data, threads, budget)
    stages: list[StageConfig] = field(default_factory=list)
    ensemble: list[str] = field(default_factory=list)  # stages whose models are evaluated together at the end
    allow_code: bool = False             # model files naming a user's class may import it (--allow-code)


def load_chain(name: str, overrides: list[str] = ()) -> ChainConfig:
    """A chain config, every stage's run config loaded and checked before anything runs."""
    data, origin = load_config_dict(name, overrides)
    where = str(resolve_config_path(name))
    chain = dataclass_from_dict(ChainConfig, data, origin, where)
    names = [s.name for s in chain.stages]
    if not names:
        raise ConfigError(f"{where}: a chain needs at least one stage")
    if any(not n for n in names) or len(set(names)) != len(names):
        raise ConfigError(f"{where}: every stage needs a name of its own, got {names}")
    unknown = [n for n in chain.ensemble if n not in names]
    if unknown:
        raise ConfigError(f"{where}: ensemble names {', '.join(unknown)}, which are not stages ({', '.join(names)})")
    classes = None
    for i, stage in enumerate(chain.stages):
        config = stage_config(chain, stage, i)
        if i == 0 and config.task == "distill" and not chain.teacher:  # noqa: SIM102
            raise ConfigError(f"{where}: the first stage '{stage.name}' distils a teacher; set the chain's teacher "
                              f"(a model file) or begin with a teacher/ stage")
        if i > 0 and config.task != "distill":
            raise ConfigError(f"{where}: stage '{stage.name}' is a {config.task} config; after the first stage every "
                              f"stage distils the one before")
        n = dataset_info(config.data.name).num_classes
        if classes is not None and n != classes:
            raise ConfigError(f"{where}: stage '{stage.name}' trains on '{config.data.name}' ({n} classes), but the "
                              f"model before it predicts {classes}")
        classes = n
    return chain


def stage_config(chain: ChainConfig, stage: StageConfig, index: int = 0, teachers: list[str] | None = None) -> Config:
    """Stage ``index``'s run config: the chain's overrides, its seed, the stage's own, its teachers."""
    config = load_config(stage.config, [*chain.set, f"seed={chain.seed + index}", *stage.set])
    if config.task == "distill" and teachers:
        teacher = teachers[0] if len(teachers) == 1 else teachers
        config = dataclasses.replace(config, teacher=dataclasses.replace(config.teacher, checkpoint=teacher))
    if config.teacher is not None and chain.allow_code:
        config = dataclasses.replace(config, teacher=dataclasses.replace(config.teacher, allow_code=True))
    return config


class Chain:
    """A chain run: ``Chain(config)`` starts one in a new folder, ``Chain.resume(folder)`` goes on
    with the one there."""

    def __init__(self, config: ChainConfig, folder: str | Path | None = None, state: dict | None = None):
        self.config = config
        if not folder:  # input errors are found before the chain has a folder
            if config.teacher:
                read_model_file(config.teacher)
            check_output_folder(config.root)
        self.folder = Path(folder) if folder else new_run_dir(config.root, config.experiment, config.seed)
        self.state_path = self.folder / "chain.json"
        self.state = state or {"config": dataclasses.asdict(config), "stages": {}}
        # a chain that begins by training its teacher, given a teacher, uses it in that stage's place
        self.given_first = bool(config.teacher) and stage_config(config, config.stages[0]).task == "teacher"
        self._save()

    @classmethod
    def resume(cls, folder: str | Path) -> "Chain":
        state, config = read_folder_state(folder, "chain.json", ChainConfig)
        return cls(config, folder, state)

    def model_of(self, name: str) -> str:
        """Stage ``name``'s model file. Those the chain trained are recorded relative to its folder,
        so a copied or moved chain folder resumes from its own stages, not the original's."""
        model = Path(self.state["stages"][name]["model"])
        return str(model if model.is_absolute() or name == self._given_name else self.folder / model)

    def _recorded(self, model: str) -> str:
        """A model file as the chain's state records it: relative to the folder when inside it."""
        path = Path(model)
        return str(path.relative_to(self.folder)) if path.is_relative_to(self.folder) else model

    @property
    def _given_name(self) -> str | None:
        return self.config.stages[0].name if self.given_first else None

    def teachers_of(self, index: int) -> list[str]:
        made = [self.model_of(s.name) for s in self.config.stages[:index]]
        given = [self.config.teacher] if self.config.teacher and not self.given_first else []
        return given + made if self.config.stages[index].teachers == "all" else (given + made)[-1:]

    def run(self) -> dict:
        for index, stage in enumerate(self.config.stages):
            if stage.name in self.state["stages"]:
                continue
            if index == 0 and self.given_first:
                self.state["stages"][stage.name] = self._given(stage)
                continue
            stage_dir = self.folder / f"{index}-{stage.name}"
            config = stage_config(self.config, stage, index, self.teachers_of(index))
            last = stage_dir / "ckpt" / "last.pt"
            summary = Engine(config, run_dir=stage_dir, resume=last if last.exists() else None).fit()
            model = stage_dir / "ckpt" / "final.pt"
            arch = read_model_file(model)["arch"]
            self.state["stages"][stage.name] = {
                "config": stage.config, "set": stage.set, "teachers": [self._recorded(t) for t in self.teachers_of(index)],
                "model": str(model.relative_to(self.folder)),
                "arch": describe_arch(arch["name"], arch.get("kwargs") or {}), "summary": summary}
            self._save()
        if self.config.ensemble and "ensemble" not in self.state:
            models = [self.model_of(n) for n in self.config.ensemble]
            self.state["ensemble"] = {"stages": self.config.ensemble,
                                      **evaluate_ensemble(models, allow_code=self.config.allow_code)}
            self._save()
        atomic_write_text(self.folder / "chain.md", render(self.state))
        return self.state

    def _given(self, stage: StageConfig) -> dict:
        meta = read_model_file(self.config.teacher)
        acc = evaluate_ensemble([self.config.teacher], allow_code=self.config.allow_code)["acc"]
        return {"config": "given", "set": [], "teachers": [], "model": self.config.teacher,
                "arch": describe_arch(meta["arch"]["name"], meta["arch"].get("kwargs") or {}),
                "summary": {"final_acc": acc, "best_acc": acc, "time_total_s": 0.0}}

    def _save(self) -> None:
        atomic_write_text(self.state_path, json.dumps(self.state, indent=1))


def evaluate_ensemble(models: list[str], split: str = "test", allow_code: bool = False) -> dict:
    """Test accuracy of model files together: the mean of their softmax outputs."""
    device = resolve_device("auto")
    loaded = [load_model(m, device, allow_code=allow_code) for m in models]
    dataset = evaluation_split(loaded[0][1], models[0], None, split, None)
    ensemble = Ensemble([m.eval() for m, _ in loaded], "mean")
    scores = evaluate(ensemble, TensorLoader(dataset, 1000, device=device), student=False)
    return {"acc": scores["acc"], "n": scores["n"]}


def render(state: dict) -> str:
    lines = ["| stage | config | model | taught by | final | best | s |", "|" + "---|" * 7]
    stage_of = {stage["model"]: name for name, stage in state["stages"].items()}
    for name, stage in state["stages"].items():
        s = stage["summary"]
        taught = ", ".join(stage_of.get(t, t) for t in stage["teachers"]) or "labels"
        lines.append(f"| {name} | {stage['config']} {' '.join(stage['set'])} | {stage['arch']} | {taught} | "
                     f"{s['final_acc']:.2f} | {s['best_acc']:.2f} | {s['time_total_s']:.0f} |")
    if "ensemble" in state:
        e = state["ensemble"]
        lines.append(f"| ensemble of {', '.join(e['stages'])} | – | – | – | {e['acc']:.2f} | – | – |")
    return "\n".join(lines) + "\n"
