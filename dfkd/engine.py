"""The training loop: players, phases, weighted loss terms, one optimizer step at a time.

An *iteration* runs the config's phases in order; a phase takes ``steps`` optimizer steps of one
*player* (student, generator, discriminator, ...) on a batch from one *source* (real data, a
fresh synthetic batch, the previous phase's batch, or the image pool), with the loss
``Σ weight × term``. Teacher training, real-data KD and every data-free method are configs of
this one loop (see ``dfkd/configs``).

The global step that every metric is logged against is the iteration count.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import random
import sys
import time
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from . import checkpoint as ckpt_io
from .config import Config, OptimConfig, PhaseConfig, PlayerConfig, SchedConfig, config_to_dict, dump_config
from .data import TensorLoader, dataset_info, load_dataset
from .errors import CheckpointError, ConfigError, DfkdError
from .losses import WeightedTerm, build_terms
from .models import create_model
from .runs import MetricLogger, is_main_process, new_run_dir, rank


class DivergenceError(DfkdError):
    """A loss became NaN or infinite."""


# --------------------------------------------------------------------------------------
# Runtime helpers
# --------------------------------------------------------------------------------------
def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device '{spec}' asked for, but CUDA is not available on this machine")
    return device


def amp_dtype(spec: str, device: torch.device) -> torch.dtype | None:
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[spec]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0)
    cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)


def lr_factor(cfg: SchedConfig, step: int, total: int, base_lr: float) -> float:
    """The learning-rate multiplier after ``step`` of ``total`` optimizer steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    if cfg.name == "cosine":
        floor = cfg.min_lr / base_lr if base_lr else 0.0
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.name == "multistep":
        return cfg.gamma ** sum(progress >= m for m in cfg.milestones)
    return 1.0


class Player:
    """A trained network with its optimizer and learning-rate schedule."""

    def __init__(self, name: str, cfg: PlayerConfig, module: nn.Module, total_steps: int):
        self.name, self.cfg, self.module = name, cfg, module
        self.kind = cfg.kind
        self.optimizer = build_optimizer([p for p in module.parameters() if p.requires_grad], cfg.optim)
        self.total_steps = max(1, total_steps)
        self.steps = 0
        self._apply_lr()

    def _apply_lr(self) -> None:
        factor = lr_factor(self.cfg.sched, self.steps, self.total_steps, self.cfg.optim.lr)
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.optim.lr * factor

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self, loss: torch.Tensor, scaler: torch.amp.GradScaler) -> float | None:
        """Backward, optional clipping, optimizer step, schedule advance. Returns the grad norm."""
        self.optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        grad_norm = None
        if self.cfg.optim.grad_clip is not None:
            scaler.unscale_(self.optimizer)
            grad_norm = float(nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.optim.grad_clip))
        scaler.step(self.optimizer)
        scaler.update()
        self.steps += 1
        self._apply_lr()
        return grad_norm

    def state_dict(self) -> dict:
        return {"model": ckpt_io.unwrap(self.module).state_dict(), "optim": self.optimizer.state_dict(),
                "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        ckpt_io.unwrap(self.module).load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optim"])
        self.steps = state["steps"]
        self._apply_lr()


@contextlib.contextmanager
def only_trainable(players: dict[str, "Player"], active: str):
    """During a phase only the active player's parameters take gradients (saving the backward
    work for the others) and only it is in train mode; generators always stay in train mode
    because their last BatchNorm normalizes with batch statistics by design."""
    saved = {}
    for name, player in players.items():
        is_active = name == active
        for p in player.module.parameters():
            saved[p] = p.requires_grad
            p.requires_grad_(is_active and saved[p])
        player.module.train(is_active or player.kind == "generator")
    try:
        yield
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)


# --------------------------------------------------------------------------------------
# Batches and step context
# --------------------------------------------------------------------------------------
@dataclasses.dataclass
class Batch:
    images: torch.Tensor
    labels: torch.Tensor | None = None      # real labels, or the classes a conditional generator was asked for
    source: str = "real"


class RealStream:
    """An endless, resumable stream of real training batches: position = (epoch, batch index)."""

    def __init__(self, loader: TensorLoader):
        self.loader = loader
        self.epoch, self.index = 0, 0
        self._it: Iterator | None = None

    def next(self) -> Batch:
        if self._it is None:
            self.loader.epoch = self.epoch  # the loader's shuffle and augmentation are a function of (seed, epoch)
            self._it = iter(self.loader)
            for _ in range(self.index):
                next(self._it)
        try:
            images, labels = next(self._it)
        except StopIteration:
            self.epoch, self.index, self._it = self.epoch + 1, 0, None
            return self.next()
        self.index += 1
        return Batch(images, labels, "real")

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index, self._it = state["epoch"], state["index"], None


class StepContext:
    """What the loss terms of one optimizer step read. Each network output is computed on first
    use and cached, so a phase pays only for what its terms need."""

    def __init__(self, engine: "Engine", phase: PhaseConfig, batch: Batch):
        self.engine, self.phase, self.batch = engine, phase, batch

    @property
    def images(self) -> torch.Tensor:
        return self.batch.images

    @property
    def labels(self) -> torch.Tensor:
        if self.batch.labels is None:
            raise ConfigError(f"phase '{self.phase.name}': a loss term needs labels, and '{self.batch.source}' "
                              f"batches have none")
        return self.batch.labels

    @cached_property
    def student_logits(self) -> torch.Tensor:
        return self.engine.forward(self.engine.student.module, self.images)

    @cached_property
    def teacher_logits(self) -> torch.Tensor:
        # gradients flow through the frozen teacher only when the images themselves are trained
        with torch.set_grad_enabled(self.images.requires_grad):
            return self.engine.forward(self.engine.teacher, self.images)


# --------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------
class Engine:
    def __init__(self, config: Config, run_dir: str | Path | None = None, resume: str | Path | None = None,
                 write: bool = True):
        self.config = config
        rt = config.runtime
        self.device = resolve_device(rt.device)
        if rt.num_threads:
            torch.set_num_threads(rt.num_threads)
        if rt.deterministic:
            torch.use_deterministic_algorithms(True)
        self.amp_dtype = amp_dtype(rt.amp, self.device)
        self.channels_last = self.device.type == "cuda" if rt.channels_last == "auto" else rt.channels_last
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        seed_everything(config.seed + rank())  # per-rank seeds: ranks must not draw identical batches

        self.info = dataset_info(config.data.name)
        self.teacher = self._build_teacher()
        self.phases = [dataclasses.replace(p, name=p.name or p.player) for p in config.phases]
        self.terms: dict[int, list[WeightedTerm]] = {
            i: build_terms(p.losses, f"phases.{i}.losses") for i, p in enumerate(self.phases)}
        self._check_needs()

        # Real data: the training split is read only if some phase trains on it. A data-free
        # config never touches it; the test split is read for evaluation only, and not at all
        # when data.eval is false.
        uses_real = any(p.batch == "real" for p in self.phases)
        self.real = RealStream(TensorLoader(
            load_dataset(config.data.name, "train", config.data.root, config.data.download),
            config.data.batch_size, shuffle=True, augment=config.data.augment, drop_last=True,
            device=self.device, seed=config.seed + rank())) if uses_real else None
        self.test_loader = TensorLoader(
            load_dataset(config.data.name, "test", config.data.root, config.data.download),
            config.data.eval_batch_size, device=self.device) if config.data.eval else None

        tc = config.train
        if tc.iters_per_epoch is None:
            if self.real is None:
                raise ConfigError("train.iters_per_epoch must be set when no phase trains on real data")
            self.iters_per_epoch = len(self.real.loader)
        else:
            self.iters_per_epoch = tc.iters_per_epoch
        self.total_iters = tc.epochs * self.iters_per_epoch

        self.players = {name: self._build_player(name, pc) for name, pc in config.players.items()}
        eval_name = tc.eval_player or ("student" if "student" in self.players else next(
            (n for n, p in self.players.items() if p.kind == "model"), None))
        if eval_name not in self.players or self.players[eval_name].kind != "model":
            raise ConfigError(f"train.eval_player '{eval_name}' is not a model player")
        self.student = self.players[eval_name]

        self.step = 0
        self.best_acc = -1.0
        self.history: list[dict] = []
        self.timers = {"train": 0.0, "synthesis": 0.0, "eval": 0.0}
        self._accum: dict[str, list[float]] = {}

        resume_state = None
        if resume is not None:
            resume_state = self._read_resume(Path(resume))
            run_dir = run_dir or Path(resume).resolve().parent.parent
        if write and is_main_process():
            self.run_dir = Path(run_dir) if run_dir else new_run_dir(config.output.root, config.experiment, config.seed)
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(dump_config(config))
        else:
            self.run_dir = None
        if resume_state is not None:
            self._load_state(resume_state)
        self.logger = MetricLogger(self.run_dir, config.output.tensorboard,
                                   purge_step=self.step + 1 if resume_state else None)

    # ---------------------------------------------------------------- construction
    def _build_teacher(self) -> nn.Module | None:
        tc = self.config.teacher
        if tc is None:
            return None
        if tc.checkpoint is None:
            raise ConfigError("teacher.checkpoint is not set: pass --teacher PATH (a model file from `dfkd teacher`)")
        teacher, meta = ckpt_io.load_model(tc.checkpoint, self.device)
        arch = meta["arch"]
        if arch["num_classes"] != self.info.num_classes or arch["in_channels"] != self.info.shape[0]:
            raise ConfigError(f"teacher {tc.checkpoint} takes {arch['in_channels']} channels and predicts "
                              f"{arch['num_classes']} classes; dataset '{self.info.name}' has "
                              f"{self.info.shape[0]} and {self.info.num_classes}")
        self.teacher_meta = meta
        teacher.requires_grad_(False)
        return self._prepare(teacher).eval()

    def _prepare(self, module: nn.Module) -> nn.Module:
        module = module.to(self.device)
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def _build_player(self, name: str, pc: PlayerConfig) -> Player:
        steps = self.total_iters * sum(p.steps for p in self.phases if p.player == name)
        if pc.kind == "model":
            module = self._build_model(pc)
        else:
            raise ConfigError(f"players.{name}.kind '{pc.kind}' is not available in this build")
        return Player(name, pc, self._prepare(module), steps)

    def _build_model(self, pc: PlayerConfig) -> nn.Module:
        C, H, _ = self.info.shape
        if pc.net.checkpoint:  # start from trained weights (fine-tuning, a pre-trained peer)
            model, _ = ckpt_io.load_model(pc.net.checkpoint)
            return model.train()
        return create_model(pc.net.name, in_channels=C, num_classes=self.info.num_classes, image_size=H,
                            **pc.net.kwargs)

    def _check_needs(self) -> None:
        for i, phase in enumerate(self.phases):
            for term in self.terms[i]:
                if "teacher" in term.fn.needs and self.config.teacher is None:
                    raise ConfigError(f"phases.{i}.losses.{term.name} needs a teacher, and the config has none")
                if "labels" in term.fn.needs and phase.batch != "real":
                    raise ConfigError(f"phases.{i}.losses.{term.name} needs labels, and '{phase.batch}' "
                                      f"batches have none")

    # ---------------------------------------------------------------- forward passes
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def forward(self, module: nn.Module, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            return module(images)

    # ---------------------------------------------------------------- one step
    def next_batch(self, phase: PhaseConfig) -> Batch:
        if phase.batch == "real":
            return self.real.next()
        raise ConfigError(f"phase '{phase.name}': batch source '{phase.batch}' needs a synthesizer")

    def run_phase_step(self, index: int, phase: PhaseConfig) -> None:
        player = self.players[phase.player]
        with only_trainable(self.players, phase.player):
            batch = self.next_batch(phase)
            ctx = StepContext(self, phase, batch)
            values = {t.name: t(ctx) for t in self.terms[index]}
            total = sum(t.weight * values[t.name] for t in self.terms[index])
            if not torch.isfinite(total):
                bad = [k for k, v in values.items() if not torch.isfinite(v)]
                last = self.run_dir / "ckpt" / "last.pt" if self.run_dir else None
                hint = f"; the last good state is {last} (resume with --resume)" if last and last.exists() else ""
                raise DivergenceError(f"iteration {self.step}, phase '{phase.name}': loss "
                                      f"{', '.join(bad) or 'total'} is {float(total)}{hint}")
            player.step(total, self.scaler)
        self._record(phase.name, {**{k: v.detach() for k, v in values.items()}, "total": total.detach()})

    def _record(self, phase: str, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            self._accum.setdefault(f"loss/{phase}/{k}", []).append(float(v))

    # ---------------------------------------------------------------- loop
    def fit(self) -> dict:
        tc = self.config.train
        show = sys.stderr.isatty() and "CI" not in __import__("os").environ if self.config.runtime.progress == "auto" \
            else bool(self.config.runtime.progress)
        from tqdm import tqdm

        bar = tqdm(total=self.total_iters, initial=self.step, disable=not (show and is_main_process()),
                   desc=self.config.experiment, dynamic_ncols=True, leave=False)
        if self.step == 0 and self.teacher is not None and self.test_loader is not None:
            acc = self.evaluate(self.teacher)["acc"]
            self.logger.scalars(0, {"eval/teacher_acc": acc})
        t_start = time.perf_counter()
        try:
            while self.step < self.total_iters:
                t0 = time.perf_counter()
                for i, phase in enumerate(self.phases):
                    for _ in range(phase.steps):
                        self.run_phase_step(i, phase)
                self.step += 1
                self.timers["train"] += time.perf_counter() - t0
                bar.update(1)
                if self.step % tc.log_every == 0 or self.step == self.total_iters:
                    self._flush_losses()
                if self.step % self.iters_per_epoch == 0:
                    self.end_of_epoch(self.step // self.iters_per_epoch)
        finally:
            bar.close()
            self.logger.flush()
        summary = self.summary(time.perf_counter() - t_start)
        if self.run_dir is not None:
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.logger.close()
        return summary

    def _flush_losses(self) -> None:
        values = {k: sum(v) / len(v) for k, v in self._accum.items() if v}
        values.update({f"lr/{name}": p.lr for name, p in self.players.items()})
        self.logger.scalars(self.step, values)
        self._accum.clear()

    def end_of_epoch(self, epoch: int) -> None:
        tc, oc = self.config.train, self.config.output
        last_epoch = self.step == self.total_iters
        record = {"epoch": epoch, "step": self.step}
        if self.test_loader is not None and (epoch % tc.eval_every == 0 or last_epoch):
            t0 = time.perf_counter()
            result = self.evaluate(self.student.module)
            self.timers["eval"] += time.perf_counter() - t0
            record.update(acc=result["acc"], loss=result["loss"])
            improved = result["acc"] > self.best_acc
            self.best_acc = max(self.best_acc, result["acc"])
            self.logger.scalars(self.step, {"eval/acc": result["acc"], "eval/loss": result["loss"],
                                            "eval/best_acc": self.best_acc, "epoch": epoch})
            if improved and self.run_dir is not None:
                self.save_model("best.pt", result["acc"], epoch)
        self.history.append(record)
        if self.run_dir is not None:
            if last_epoch:
                self.save_model("final.pt", record.get("acc"), epoch)
            if epoch % oc.save_every == 0 or last_epoch:
                self.save_state()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: TensorLoader | None = None) -> dict:
        loader = loader or self.test_loader
        was_training = model.training
        model.eval()
        correct, loss_sum, n = 0, 0.0, 0
        for images, labels in loader:
            logits = self.forward(model, images).float()
            loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
            correct += int((logits.argmax(1) == labels).sum())
            n += labels.numel()
        model.train(was_training)
        return {"acc": 100.0 * correct / n, "loss": loss_sum / n}

    def summary(self, wall: float) -> dict:
        final = next((h for h in reversed(self.history) if "acc" in h), {})
        return {"experiment": self.config.experiment, "seed": self.config.seed, "steps": self.step,
                "final_acc": final.get("acc"), "best_acc": self.best_acc if self.best_acc >= 0 else None,
                "teacher_acc": getattr(self, "teacher_meta", {}).get("accuracy"),
                "time_total_s": round(wall, 2), "time_train_s": round(self.timers["train"], 2),
                "time_synthesis_s": round(self.timers["synthesis"], 2), "time_eval_s": round(self.timers["eval"], 2),
                "run_dir": str(self.run_dir) if self.run_dir else None}

    # ---------------------------------------------------------------- checkpoints
    def arch(self) -> dict:
        C, H, _ = self.info.shape
        net = self.student.cfg.net
        if net.checkpoint:
            return ckpt_io.read_model_file(net.checkpoint)["arch"]
        return {"name": net.name, "in_channels": C, "num_classes": self.info.num_classes, "image_size": H,
                "kwargs": dict(net.kwargs)}

    def save_model(self, filename: str, accuracy: float | None, epoch: int) -> Path:
        return ckpt_io.save_model(self.run_dir / "ckpt" / filename, self.student.module, self.arch(),
                                  dataset=self.info.name, accuracy=accuracy, epoch=epoch, step=self.step,
                                  experiment=self.config.experiment, config=config_to_dict(self.config))

    def identity(self) -> dict:
        """The parts of the config a resumed run must share with the checkpoint: all but the
        length of the run, the runtime and the output settings."""
        d = config_to_dict(self.config)
        for key in ("runtime", "output"):
            d.pop(key)
        d["train"] = {k: v for k, v in d["train"].items() if k not in ("epochs", "eval_every", "log_every")}
        return d

    def state_dict(self) -> dict:
        return {"format": ckpt_io.STATE_FORMAT, "identity": self.identity(),
                "identity_sha256": hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest(),
                "step": self.step, "best_acc": self.best_acc, "history": self.history, "timers": self.timers,
                "players": {n: p.state_dict() for n, p in self.players.items()},
                "scaler": self.scaler.state_dict(), "rng": rng_state(),
                "real": self.real.state_dict() if self.real else None}

    def save_state(self) -> Path:
        return ckpt_io.atomic_save(self.state_dict(), self.run_dir / "ckpt" / "last.pt")

    def _read_resume(self, path: Path) -> dict:
        state = ckpt_io.safe_load(path)
        if state.get("format") != ckpt_io.STATE_FORMAT:
            raise CheckpointError(f"{path}: not a training state ({state.get('format')}); resume from ckpt/last.pt")
        mine = _flatten_dict(self.identity())
        theirs = _flatten_dict(state["identity"])
        differ = sorted(k for k in mine.keys() | theirs.keys() if mine.get(k) != theirs.get(k))
        if differ:
            shown = ", ".join(f"{k} ({theirs.get(k)!r} there, {mine.get(k)!r} here)" for k in differ[:3])
            raise CheckpointError(f"{path}: checkpoint is from another config; differs in {shown}"
                                  + (f" and {len(differ) - 3} more" if len(differ) > 3 else ""))
        if state["step"] > self.total_iters:
            raise CheckpointError(f"{path}: checkpoint is at iteration {state['step']}, past this run's "
                                  f"{self.total_iters}")
        return state

    def _load_state(self, state: dict) -> None:
        for name, player in self.players.items():
            player.load_state_dict(state["players"][name])
        self.scaler.load_state_dict(state["scaler"])
        if self.real is not None:
            self.real.load_state_dict(state["real"])
        self.step, self.best_acc = state["step"], state["best_acc"]
        self.history, self.timers = list(state["history"]), dict(state["timers"])
        set_rng_state(state["rng"])


def _flatten_dict(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten_dict(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: d}
