"""Run state: what a checkpoint holds, and how a run saves, checks and resumes it.

``ckpt/last.pt`` is the full training state (every player with its optimizer, schedule and EMA,
the AMP scaler, data-stream positions, the synthesizer with its pool, stateful loss terms and
their optimizers, RNG states, progress); ``final.pt`` and ``best.pt`` are model files of the
evaluated student. A resumed run must share the checkpoint's config in everything but the
length of the run, the runtime and the output settings.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dfkd.core import checkpoint as ckpt_io
from dfkd.core.config import config_to_dict, dump_config, flatten, load_config
from dfkd.core.io import atomic_save, atomic_write_text
from dfkd.core.runs import RunLock, check_run_folder, new_run_dir
from dfkd.core.schema import Config
from dfkd.data.card import card_from_info
from dfkd.data.datasets import DATASETS
from dfkd.loop.runtime import rng_state, set_rng_state
from dfkd.nets.quant import model_bytes, quant_summary
from dfkd_base.errors import CheckpointError, DfkdError, first_line

if TYPE_CHECKING:
    from dfkd.loop.build import Run


@dataclasses.dataclass
class Progress:
    """Where a run is: the iteration, the best and teacher accuracies, the per-epoch history and
    the timers (training, synthesis, evaluation)."""

    step: int = 0
    good_step: int | None = None          # the iteration of the last state that passed the health check
    good_norms: dict[str, float] = dataclasses.field(default_factory=dict)  # its players' weight norms
    best_acc: float = -1.0
    teacher_acc: float | None = None
    rollbacks: int = 0                    # rollbacks so far (train.max_rollbacks bounds them over resumes too)
    history: list[dict] = dataclasses.field(default_factory=list)
    timers: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"train": 0.0, "synthesis": 0.0, "eval": 0.0})
    stopped: str | None = None            # why train.stop_at ended the run, once it has
    wall_before: float = 0.0              # wall time of the sessions before this one (a resumed run)
    session_start: float = dataclasses.field(default_factory=time.perf_counter)

    def wall(self) -> float:
        """The run's wall time over all its sessions, up to now."""
        return self.wall_before + time.perf_counter() - self.session_start

    def set_wall(self, seconds: float) -> None:
        self.wall_before, self.session_start = seconds, time.perf_counter()

    def summary(self) -> dict:
        """Final and best accuracy, the wall time over every session of the run, and the time
        (training, evaluation excluded) to the first evaluation at >= 99% of the teacher."""
        wall = self.wall()
        final = next((h for h in reversed(self.history) if "acc" in h), {})
        agreements = [h["agreement"] for h in self.history if h.get("agreement") is not None]
        teacher_acc = self.teacher_acc
        reached = next((h for h in self.history if teacher_acc and h.get("acc", -1) >= 0.99 * teacher_acc), {})
        return {"steps": self.step, "final_acc": final.get("acc"),
                **({"final_acc_live": final["acc_live"]} if "acc_live" in final else {}),
                **({"final_exits": final["exits"], "final_exit_ensemble": final["exit_ensemble"]}
                   if "exits" in final else {}),
                "best_acc": self.best_acc if self.best_acc >= 0 else None,
                "teacher_acc": teacher_acc, "time_to_99pct_teacher_s": reached.get("time_train_s"),
                **({"final_agreement": agreements[-1], "best_agreement": max(agreements)} if agreements else {}),
                **({"stopped": self.stopped} if self.stopped else {}),
                "time_total_s": round(wall, 2), "time_train_s": round(self.timers["train"], 2),
                "time_synthesis_s": round(self.timers["synthesis"], 2), "time_eval_s": round(self.timers["eval"], 2)}


def weight_norms(run: "Run") -> dict[str, float]:
    """Each player's L2 norm over all its parameters."""
    return {name: float(torch.sqrt(sum((p.detach().float() ** 2).sum() for p in player.module.parameters())))
            for name, player in run.players.items()}


def health_problem(norms: dict[str, float], progress: Progress, eval_loss: float | None, growth: float) -> str | None:
    """What makes the current state unfit to be the last good one, or None: weights that are not
    finite, a non-finite evaluation loss, or a player's weight norm more than ``growth`` times
    that of the last good state (0: no limit)."""
    bad = [name for name, norm in norms.items() if not math.isfinite(norm)]
    if bad:
        return f"the weights of {', '.join(bad)} are not finite"
    if eval_loss is not None and not math.isfinite(eval_loss):
        return f"the evaluation loss is {eval_loss}"
    grown = [f"{name} ({progress.good_norms[name]:.3g} -> {norm:.3g})" for name, norm in norms.items()
             if growth and progress.good_norms.get(name) and norm > growth * progress.good_norms[name]]
    if grown:
        return f"the weight norm of {', '.join(grown)} grew more than {growth:g}x since the last good state"
    return None


def resume_from(path: Path, run: "Run", progress: Progress, scaler: torch.amp.GradScaler,
                given: str | Path | None) -> tuple[dict, Path]:
    """The state at ``path`` read, checked to belong to ``run`` and restored into it, before
    anything of a run folder is written; and the folder the resumed run writes to."""
    state = read_resume(path, run.config, run.total_iters, run.teachers.hashes)
    run_dir = resume_run_dir(path, state, given)
    restore(run, progress, scaler, state, path)
    check_resumable(run, path)
    return state, run_dir


def check_resumable(run: "Run", path: Path) -> None:
    """A state whose weights are not finite is refused: resuming it would only diverge again."""
    bad = [name for name, norm in weight_norms(run).items() if not math.isfinite(norm)]
    if bad:
        raise CheckpointError(f"{path}: the weights of {', '.join(bad)} in this state are not finite; it cannot be "
                              f"resumed (start the run again, or resume an earlier copy of the state)")


def last_good_state(run_dir: Path | None, progress: Progress) -> str:
    """Where a diverged run's last good state is, for its error message."""
    last = run_dir / "ckpt" / "last.pt" if run_dir else None
    if last is not None and last.exists() and progress.good_step is not None:
        return f"; the last good state is {last}, iteration {progress.good_step} (resume with --resume)"
    return "; no good state was saved before it"


def identity(config: Config) -> dict:
    """The parts of the config a resumed run must share with the checkpoint: all but the
    length of the run, the runtime and the output settings."""
    d = config_to_dict(config)
    for key in ("runtime", "output"):
        d.pop(key)
    d["train"] = {k: v for k, v in d["train"].items() if k not in ("epochs", "eval_every", "log_every",
                                                                    "max_weight_growth", "stop_at")}
    return d


def read_resume(path: Path, config: Config, total_iters: int, teacher_sha256: list[str] | None = None) -> dict:
    """The training state at ``path``, checked to belong to ``config`` (and to the same teachers'
    weights, not only the same paths) and to fit in its run."""
    state = ckpt_io.safe_load(path)
    if state.get("format") != ckpt_io.STATE_FORMAT:
        raise CheckpointError(f"{path}: not a training state ({state.get('format')}); resume from ckpt/last.pt")
    recorded = state.get("teacher_sha256")
    if recorded is not None and teacher_sha256 is not None and recorded != teacher_sha256:
        raise CheckpointError(f"{path}: the teacher's weights changed since this state was saved (SHA-256 "
                              f"{', '.join(h[:12] for h in recorded if h)} then, "
                              f"{', '.join(h[:12] for h in teacher_sha256 if h)} now)")
    if not isinstance(state.get("step"), int) or state["step"] < 0:
        raise CheckpointError(f"{path}: its iteration {state.get('step')!r} is not a step count")
    mine, theirs = flatten(identity(config)), flatten(state["identity"])
    if recorded is not None and teacher_sha256 is not None:  # the same teachers' weights, wherever they are now
        # (a moved or copied chain folder): the paths are not compared
        mine, theirs = ({k: v for k, v in side.items() if not k.startswith("teacher.checkpoint")}
                        for side in (mine, theirs))
    differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
    if differ:
        shown = ", ".join(f"{k} ({theirs.get(k)!r} there, {mine.get(k)!r} here)" for k in differ[:3])
        raise CheckpointError(f"{path}: checkpoint is from another config; differs in {shown}"
                              + (f" and {len(differ) - 3} more" if len(differ) > 3 else ""))
    if state["step"] > total_iters:
        raise CheckpointError(f"{path}: checkpoint is at iteration {state['step']}, past this run's {total_iters}")
    return state


def _term_key(phase, term) -> str:
    return f"{phase.index}.{term.name}"


def capture(run: "Run", progress: Progress, scaler: torch.amp.GradScaler) -> dict:
    """The full training state of ``run``."""
    ident = identity(run.config)
    terms = [(p, t) for p in run.phases for t in p.terms]
    term_states = {_term_key(p, t): t.term.state_dict() for p, t in terms}
    return {"format": ckpt_io.STATE_FORMAT, "identity": ident,
            "identity_sha256": hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest(),
            "step": progress.step, "best_acc": progress.best_acc, "teacher_acc": progress.teacher_acc,
            "good_step": progress.good_step, "good_norms": progress.good_norms, "rollbacks": progress.rollbacks,
            "teacher_sha256": run.teachers.hashes,
            "history": progress.history, "timers": progress.timers, "wall_s": progress.wall(), "stopped": progress.stopped,
            "players": {n: p.state_dict() for n, p in run.players.items()},
            "scaler": scaler.state_dict(), "rng": rng_state(),
            "real": run.real.state_dict() if run.real else None,
            "labeled": run.labeled.state_dict() if run.labeled else None,
            "synthesis": run.synth.state_dict() if run.synth else None,
            "terms": {key: state for key, state in term_states.items() if state},
            "term_optimizers": {_term_key(p, t): t.optimizer.state_dict() for p, t in terms if t.optimizer}}


def restore(run: "Run", progress: Progress, scaler: torch.amp.GradScaler, state: dict,
            path: Path | str = "the state") -> None:
    """Put ``run`` and ``progress`` back where ``state`` (from :func:`capture`, read from ``path``)
    was; a state of another shape (damaged, or edited) is a one-line error."""
    try:
        _restore(run, progress, scaler, state)
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError) as error:
        detail = first_line(error)[:160] if not isinstance(error, KeyError) else f"no {error}"
        raise CheckpointError(f"{path}: not a training state of this run's shape ({type(error).__name__}: "
                              f"{detail})") from None


def _restore(run: "Run", progress: Progress, scaler: torch.amp.GradScaler, state: dict) -> None:
    for name, player in run.players.items():
        player.load_state_dict(state["players"][name])
    scaler.load_state_dict(state["scaler"])
    if run.real is not None:
        run.real.load_state_dict(state["real"])
    if run.labeled is not None:
        run.labeled.load_state_dict(state["labeled"])
    if run.synth is not None:
        run.synth.load_state_dict(state["synthesis"])
    for phase in run.phases:
        for t in phase.terms:
            if t.term.state_dict():
                t.term.load_state_dict(state["terms"][_term_key(phase, t)])
            if t.optimizer is not None:
                t.optimizer.load_state_dict(state["term_optimizers"][_term_key(phase, t)])
    progress.step, progress.best_acc, progress.teacher_acc = state["step"], state["best_acc"], state["teacher_acc"]
    progress.good_step, progress.good_norms = state.get("good_step", state["step"]), dict(state.get("good_norms", {}))
    progress.history, progress.timers = list(state["history"]), dict(state["timers"])
    progress.set_wall(float(state.get("wall_s", sum(progress.timers.values()))))
    progress.stopped = state.get("stopped")
    # a rollback restores a state saved before it: the count kept is the larger one
    progress.rollbacks = max(progress.rollbacks, state.get("rollbacks", 0))
    set_rng_state(state["rng"])


def save_state(run: "Run", progress: Progress, scaler: torch.amp.GradScaler, run_dir: Path) -> Path:
    state = {**capture(run, progress, scaler), "run_dir": str(run_dir.resolve())}
    return atomic_save(state, run_dir / "ckpt" / "last.pt")


def claim_run_folder(config: Config, run_dir: str | Path | None) -> tuple[Path, RunLock]:
    """The run's folder (``run_dir``, else a new one under ``output.root``), checked to hold no
    planted link, locked for this process before anything in it is written, with the resolved
    ``config.yaml`` in it."""
    folder = Path(run_dir) if run_dir else new_run_dir(config.output.root, config.experiment, config.seed)
    check_run_folder(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = RunLock(folder)
    atomic_write_text(folder / "config.yaml", dump_config(config))
    return folder, lock


def resume_run_dir(path: Path, state: dict, given: str | Path | None) -> Path:
    """The run folder a resumed run writes to: ``given`` (``--run-dir``), else the one the state
    was saved in, which must be where the state lies (``<run>/ckpt/last.pt``): a state copied
    elsewhere never makes a run write into whatever folder happens to hold it."""
    if given is not None:
        folder = Path(given)
        _check_own_folder(folder, state)
        return folder
    here = path.resolve().parent.parent
    recorded = state.get("run_dir")
    if (recorded and Path(recorded).resolve() == here) or (not recorded and path.resolve().parent.name == "ckpt"):
        return here
    where = f"was saved in {recorded}" if recorded else "is not in a run's ckpt/ folder"
    raise CheckpointError(f"{path} {where}; to continue that run elsewhere, name its folder with --run-dir DIR")


def _check_own_folder(folder: Path, state: dict) -> None:
    """``--run-dir``: a folder that holds another run's files is refused, never written over."""
    config_file = folder / "config.yaml"
    if config_file.is_file():
        try:
            theirs = identity(load_config(str(config_file)))
        except DfkdError:
            theirs = None
        if theirs != state["identity"]:
            raise CheckpointError(f"--run-dir {folder} holds another run's config.yaml; continue in the run's own "
                                  f"folder or an empty one")
    elif any((folder / name).exists() for name in ("metrics.jsonl", "summary.json")):
        raise CheckpointError(f"--run-dir {folder} holds another run's files (metrics.jsonl or summary.json without "
                              f"config.yaml); continue in the run's own folder or an empty one")


def save_student(run: "Run", run_dir: Path, filename: str, accuracy: float | None, epoch: int, step: int) -> Path:
    """The evaluated student (its EMA when it has one) as a model file in ``ckpt/``."""
    extra = {"canaries": run.canaries} if run.canaries is not None else {}
    if run.modality is None and not run.config.data.pairs:  # a student of another modality takes other input
        extra["card"] = card_from_info(run.info)
    dataset = run.info.name if run.info.name in DATASETS and DATASETS.get(run.info.name).info is not None else None
    return ckpt_io.save_model(run_dir / "ckpt" / filename, run.student.eval_module, run.student_arch(),
                              dataset=dataset, accuracy=accuracy, epoch=epoch, step=step,
                              experiment=run.config.experiment, config=config_to_dict(run.config), **extra)


def run_summary(run: "Run", progress: Progress, run_dir: Path | None) -> dict:
    """What a finished run reports (``summary.json``): its accuracies and times, and the evaluated
    student's precision and size at its bit widths beside its size in float32."""
    model = run.student.eval_module
    size, float_size = model_bytes(model)
    return {"experiment": run.config.experiment, "seed": run.config.seed, **progress.summary(),
            "precision": quant_summary(getattr(model, "quant", None)), "model_bytes": size, "float_bytes": float_size,
            "run_dir": str(run_dir) if run_dir else None}
