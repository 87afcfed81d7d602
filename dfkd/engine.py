"""The training loop: players, phases, weighted loss terms, one optimizer step at a time.

An *iteration* runs the config's phases in order; a phase takes ``steps`` optimizer steps of one
*player* (student, generator, discriminator, ...) on a batch from one *source* (real data, a
fresh synthetic batch, the previous phase's batch, or the image pool), with the loss
``Σ weight × term``. Teacher training, real-data KD and every data-free method are configs of
this one loop (see ``dfkd/configs``).

The global step that every metric is logged against is the iteration count.
"""
from __future__ import annotations

import atexit
import contextlib
import dataclasses
import hashlib
import json
import math
import os
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
from .config import (Config, NetConfig, OptimConfig, PhaseConfig, PlayerConfig, SchedConfig, config_to_dict,
                     dump_config)
from .data import TensorLoader, dataset_info, denormalize, load_dataset
from .errors import CheckpointError, ConfigError, DfkdError, ShapeError
from .losses import WeightedTerm, build_terms
from .models import create_model
from .runs import MetricLogger, is_main_process, new_run_dir, rank, world_size
from .synthesis import SYNTHESIZER, Synthesizer
from .taps import BNStatsTap, FeatureTap


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
        self.ddp: nn.Module | None = None  # the DistributedDataParallel wrapper under torchrun
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

    def step(self, loss: torch.Tensor, scaler: torch.amp.GradScaler) -> torch.Tensor | None:
        """Backward, optional clipping, optimizer step, schedule advance. Returns the gradient
        norm before clipping when clipping is on."""
        self.optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        grad_norm = None
        if self.cfg.optim.grad_clip is not None:
            scaler.unscale_(self.optimizer)
            grad_norm = nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.optim.grad_clip)
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
        return self.engine.forward(self.engine.module_of(self.engine.student), self.images)

    @cached_property
    def teacher_logits(self) -> torch.Tensor:
        logits, self._teacher_embedding = self._teacher_pass(self.images, record=True)
        return logits

    def _teacher_pass(self, images: torch.Tensor, record: bool = False):
        """One teacher forward; gradients flow through the frozen teacher only when the images
        themselves are being trained. ``record``: keep this pass's BN statistics and taps."""
        engine = self.engine
        if engine.bn_tap is not None:
            engine.bn_tap.enabled = record and self.engine.phase_needs_bn(self.phase)
        with torch.set_grad_enabled(images.requires_grad):
            logits = engine.forward(engine.teacher, images)
        embedding = engine.teacher_embedding.pop("x", None)
        if record:
            self._teacher_bn = list(engine.bn_tap.stats) if engine.bn_tap and engine.bn_tap.enabled else []
            self._teacher_features = dict(engine.teacher_taps.features) if engine.teacher_taps else {}
        return logits, embedding

    @property
    def teacher_bn(self) -> list:
        self.teacher_logits
        return self._teacher_bn

    @property
    def teacher_embedding(self) -> torch.Tensor:
        self.teacher_logits
        return self._teacher_embedding

    @property
    def teacher_features(self) -> dict[str, torch.Tensor]:
        self.teacher_logits
        return self._teacher_features

    @property
    def student_features(self) -> dict[str, torch.Tensor]:
        self.student_logits
        return dict(self.engine.student_taps.features) if self.engine.student_taps else {}

    def teacher_embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher logits and penultimate features of other images (e.g. augmented views)."""
        self.teacher_logits  # the batch's own pass first, so its recorded statistics stay its own
        return self._teacher_pass(images)


# --------------------------------------------------------------------------------------
# Engine
# --------------------------------------------------------------------------------------
class Engine:
    def __init__(self, config: Config, run_dir: str | Path | None = None, resume: str | Path | None = None,
                 write: bool = True):
        self.config = config
        rt = config.runtime
        self.device = resolve_device(rt.device)
        self.owns_process_group = self._init_distributed()
        if rt.num_threads:
            torch.set_num_threads(rt.num_threads)
        if rt.deterministic:
            torch.use_deterministic_algorithms(True)
        self.amp_dtype = amp_dtype(rt.amp, self.device)
        # channels_last: on CUDA, and on CPU for synthesis, where the generator's upsampling convs run
        # 2-4x faster in it (measured with oneDNN); plain LeNet training gains nothing on CPU
        self.channels_last = (self.device.type == "cuda" or config.synthesis.kind != "none") \
            if rt.channels_last == "auto" else rt.channels_last
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        seed_everything(config.seed + rank())  # per-rank seeds: ranks must not draw identical batches

        self.info = dataset_info(config.data.name)
        self.teacher = self._build_teacher()
        self.phases = _named_phases(config.phases)
        self.terms: dict[int, list[WeightedTerm]] = {
            i: build_terms(p.losses, f"phases.{i}.losses") for i, p in enumerate(self.phases)}
        self._check_needs()
        self._install_taps()

        # Real data: the training split is read only if some phase trains on it. A data-free
        # config never touches it; the test split is read for evaluation only, and not at all
        # when data.eval is false.
        uses_real = any(p.batch == "real" and p.player != SYNTHESIZER for p in self.phases)
        self.real = RealStream(TensorLoader(
            load_dataset(config.data.name, "train", config.data.root, config.data.download),
            config.data.batch_size, shuffle=True, augment=config.data.augment, drop_last=True,
            device=self.device, seed=config.seed, shard=(rank(), world_size()))) if uses_real else None
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
        self._wrap_for_ddp()
        self.active: str | None = None  # the player of the phase being run
        self.synth = Synthesizer(config.synthesis, self) if config.synthesis.kind != "none" else None
        self.term_optimizers = self._build_term_modules()
        if self.student_taps_paths:
            self.student_taps = FeatureTap(self.players[self._student_name()].module, self.student_taps_paths)
        eval_name = self._student_name()
        if eval_name not in self.players or self.players[eval_name].kind != "model":
            raise ConfigError(f"train.eval_player '{eval_name}' is not a model player")
        self.student = self.players[eval_name]

        self.step = 0
        self.best_acc = -1.0
        self.teacher_acc: float | None = None
        self.rollbacks = 0
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
        self.shared_run_dir = self._broadcast_run_dir()
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
        try:
            with torch.no_grad():
                teacher(torch.zeros((2, *self.info.shape), device=self.device))
        except RuntimeError:
            raise ShapeError(f"teacher {tc.checkpoint} ({arch['name']}, {arch.get('image_size')} px, trained on "
                             f"{meta.get('dataset')}) does not take dataset '{self.info.name}' images of shape "
                             f"{tuple(self.info.shape)}") from None
        if arch["num_classes"] != self.info.num_classes or arch["in_channels"] != self.info.shape[0]:
            raise ConfigError(f"teacher {tc.checkpoint} takes {arch['in_channels']} channels and predicts "
                              f"{arch['num_classes']} classes; dataset '{self.info.name}' has "
                              f"{self.info.shape[0]} and {self.info.num_classes}")
        teacher.requires_grad_(False)
        return self._prepare(teacher).eval()

    def _init_distributed(self) -> bool:
        """Join the process group that torchrun describes in the environment (WORLD_SIZE,
        RANK, LOCAL_RANK, MASTER_ADDR/PORT); one GPU per process, gloo on CPU."""
        if world_size() == 1 or torch.distributed.is_initialized():
            return False
        if self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self.device)
        torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
        # one group for the life of the process: a second engine in the same job (teacher, then
        # student) reuses it, since re-creating a group against torchrun's store hangs
        atexit.register(torch.distributed.destroy_process_group)
        return True

    def _wrap_for_ddp(self) -> None:
        """Under torchrun every trained player gets a DistributedDataParallel wrapper (which also
        broadcasts rank 0's initial weights). Only the active player of a phase is called through
        it: the others run unwrapped, since their parameters take no gradients in that phase."""
        if world_size() == 1:
            return
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.device.index] if self.device.type == "cuda" else None
        for player in self.players.values():
            player.ddp = DistributedDataParallel(player.module, device_ids=ids)

    def module_of(self, player: Player) -> nn.Module:
        return player.ddp if player.ddp is not None and player.name == self.active else player.module

    def _broadcast_run_dir(self) -> Path | None:
        """Every rank learns rank 0's run folder (to read ckpt/last.pt on a rollback); only rank
        0 writes to it."""
        if world_size() == 1:
            return self.run_dir
        shared = [str(self.run_dir) if self.run_dir else None]
        torch.distributed.broadcast_object_list(shared, src=0)
        return Path(shared[0]) if shared[0] else None

    def _prepare(self, module: nn.Module) -> nn.Module:
        module = module.to(self.device)
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def _build_player(self, name: str, pc: PlayerConfig) -> Player:
        steps = self.total_iters * sum(p.steps for p in self.phases if p.player == name)
        if pc.kind == "model":
            module = self._build_model(pc)
        elif pc.kind == "generator":
            module = self.build_generator(pc.net)
        else:
            raise ConfigError(f"players.{name}.kind '{pc.kind}' is not available in this build")
        return Player(name, pc, self._prepare(module), steps)

    def build_generator(self, net: NetConfig) -> nn.Module:
        from generators import create_generator

        kwargs = {"nz": 256, **net.kwargs}
        try:
            generator = create_generator(net.name, img_shape=self.info.shape, num_classes=self.info.num_classes,
                                         **kwargs)
        except ShapeError as exc:
            raise ShapeError(f"generator '{net.name}' cannot make dataset '{self.info.name}' images: {exc}") from None
        with torch.no_grad():  # a generator must make what the teacher takes
            y = torch.zeros(2, dtype=torch.long) if getattr(generator, "conditional", False) else None
            shape = tuple(generator(torch.randn(2, generator.nz), y).shape[1:])
        if shape != tuple(self.info.shape):
            raise ShapeError(f"generator '{net.name}' makes {shape} images; the teacher and dataset "
                             f"'{self.info.name}' take {tuple(self.info.shape)}")
        return generator.to(self.device)

    def _student_name(self) -> str:
        tc = self.config.train
        return tc.eval_player or ("student" if "student" in self.config.players else next(
            (n for n, p in self.config.players.items() if p.kind == "model"), ""))

    def _install_taps(self) -> None:
        """Hooks on the teacher: BN statistics (when a term needs them), the input of its last
        linear layer (its embedding), and the feature paths terms ask for."""
        self.bn_tap = self.teacher_taps = self.student_taps = None
        self._bn_phases = {p.name for i, p in enumerate(self.phases)
                           if any("teacher_bn" in getattr(t.fn, "needs", ()) for t in self.terms[i])}
        self.teacher_embedding: dict[str, torch.Tensor] = {}
        self.student_taps_paths: list[str] = []
        if self.teacher is None:
            return
        if any(self.phase_needs_bn(p) for p in self.phases):
            self.bn_tap = BNStatsTap(self.teacher)
        last_linear = [m for m in self.teacher.modules() if isinstance(m, nn.Linear)]
        if last_linear:
            last_linear[-1].register_forward_pre_hook(lambda m, inp: self.teacher_embedding.__setitem__("x", inp[0]))
        teacher_paths, student_paths = [], []
        for terms in self.terms.values():
            for term in terms:
                taps = getattr(term.fn, "taps", None)
                wanted = taps(term.params) if taps else {}
                teacher_paths += [p for p in wanted.get("teacher", []) if p not in teacher_paths]
                student_paths += [p for p in wanted.get("student", []) if p not in student_paths]
        if teacher_paths:
            self.teacher_taps = FeatureTap(self.teacher, teacher_paths)
        self.student_taps_paths = student_paths

    def phase_needs_bn(self, phase: PhaseConfig) -> bool:
        return phase.name in self._bn_phases

    def _build_term_modules(self) -> dict[str, torch.optim.Optimizer]:
        """Stateful terms (nn.Module) live on the device; those with parameters (e.g. the
        contrastive projection head) get an Adam optimizer of their own, stepped with their phase."""
        optimizers = {}
        for i, terms in self.terms.items():
            for term in terms:
                if isinstance(term.fn, nn.Module):
                    term.fn.to(self.device)
                    if hasattr(term.fn, "build") and self.teacher is not None:
                        with torch.no_grad():
                            self.forward(self.teacher, torch.zeros((2, *self.info.shape), device=self.device))
                        term.fn.build(self.teacher_embedding.pop("x").shape[1])
                        term.fn.to(self.device)
                    params = [p for p in term.fn.parameters() if p.requires_grad]
                    if params:
                        lr = (self.config.synthesis.inner.lr if self.phases[i].player == SYNTHESIZER
                              else self.config.players[self.phases[i].player].optim.lr)
                        optimizers[f"{i}.{term.name}"] = torch.optim.Adam(params, lr=lr, betas=(0.5, 0.999))
        return optimizers

    def _build_model(self, pc: PlayerConfig) -> nn.Module:
        C, H, _ = self.info.shape
        if pc.net.checkpoint:  # start from trained weights (fine-tuning, a pre-trained peer)
            model, _ = ckpt_io.load_model(pc.net.checkpoint)
            return model.train()
        return create_model(pc.net.name, in_channels=C, num_classes=self.info.num_classes, image_size=H,
                            **pc.net.kwargs)

    def _check_needs(self) -> None:
        syn = self.config.synthesis
        for i, phase in enumerate(self.phases):
            for term in self.terms[i]:
                needs = getattr(term.fn, "needs", ())
                if ({"teacher", "teacher_bn"} & set(needs)) and self.config.teacher is None:
                    raise ConfigError(f"phases.{i}.losses.{term.name} needs a teacher, and the config has none")
                has_labels = (phase.batch == "real" and phase.player != SYNTHESIZER) or syn.labels != "none"
                if "labels" in needs and not has_labels:
                    raise ConfigError(f"phases.{i}.losses.{term.name} needs labels, and '{phase.batch}' batches "
                                      f"have none (set synthesis.labels to random or balanced)")

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
        if phase.batch == "pool":
            return self.synth.replay()
        if phase.batch == "same":
            return self.synth.same()
        gen_name = self.config.synthesis.generator
        return self.synth.fresh(self.module_of(self.players[gen_name]), train_generator=phase.player == gen_name)

    def phase_loss(self, index: int, phase: PhaseConfig, batch: Batch) -> torch.Tensor:
        """Σ weight × term on ``batch``, with a NaN guard; records the terms for logging."""
        ctx = StepContext(self, phase, batch)
        values = {t.name: t(ctx) for t in self.terms[index]}
        total = sum(t.weight * values[t.name] for t in self.terms[index])
        finite = torch.isfinite(total.detach()).float()
        if world_size() > 1:  # every rank must take the same branch, or the next collective hangs
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        if not finite:
            bad = [k for k, v in values.items() if not torch.isfinite(v)]
            last = self.run_dir / "ckpt" / "last.pt" if self.run_dir else None
            hint = f"; the last good state is {last} (resume with --resume)" if last and last.exists() else ""
            raise DivergenceError(f"iteration {self.step}, phase '{phase.name}': loss "
                                  f"{', '.join(bad) or 'total'} is {float(total.detach())}{hint}")
        self._record(phase.name, {**{k: v.detach() for k, v in values.items()}, "total": total.detach()})
        return total

    def _step_term_optimizers(self, index: int, before: bool) -> None:
        for key, opt in self.term_optimizers.items():
            if key.split(".", 1)[0] == str(index):
                opt.zero_grad(set_to_none=True) if before else opt.step()

    def run_phase(self, index: int, phase: PhaseConfig) -> None:
        """All of a phase's steps in this iteration."""
        self.active = phase.player
        if phase.player == SYNTHESIZER:
            t0 = time.perf_counter()
            with only_trainable(self.players, SYNTHESIZER):
                def inner_step(batch: Batch) -> torch.Tensor:
                    self._step_term_optimizers(index, before=True)
                    return self.phase_loss(index, phase, batch)

                self.synth.synthesize(inner_step, phase.steps, after_backward=lambda: self._step_term_optimizers(
                    index, before=False))
            self.timers["synthesis"] += time.perf_counter() - t0
            return
        player = self.players[phase.player]
        t0 = time.perf_counter()
        for _ in range(phase.steps):
            with only_trainable(self.players, phase.player):
                self._step_term_optimizers(index, before=True)
                total = self.phase_loss(index, phase, self.next_batch(phase))
                grad_norm = player.step(total, self.scaler)
                if grad_norm is not None:
                    self._accum.setdefault(f"grad_norm/{phase.name}", []).append(grad_norm.detach().float())
                self._step_term_optimizers(index, before=False)
        if player.kind == "generator":  # training the generator is synthesis time
            self.timers["synthesis"] += time.perf_counter() - t0

    def _record(self, phase: str, values: dict[str, torch.Tensor]) -> None:
        # kept as device tensors: converting here would synchronize a GPU once per term and step
        for k, v in values.items():
            self._accum.setdefault(f"loss/{phase}/{k}", []).append(v.float())

    # ---------------------------------------------------------------- loop
    def fit(self) -> dict:
        tc = self.config.train
        show = sys.stderr.isatty() and "CI" not in os.environ if self.config.runtime.progress == "auto" \
            else bool(self.config.runtime.progress)
        from tqdm import tqdm

        bar = tqdm(total=self.total_iters, initial=self.step, disable=not (show and is_main_process()),
                   desc=self.config.experiment, dynamic_ncols=True, leave=False)
        if self.teacher is not None and self.test_loader is not None and self.teacher_acc is None:
            self.teacher_acc = self.evaluate(self.teacher)["acc"]
            self.logger.scalars(0, {"eval/teacher_acc": self.teacher_acc})
        t_start = time.perf_counter()
        try:
            while self.step < self.total_iters:
                t0 = time.perf_counter()
                warming_up = self.step < self.config.synthesis.warmup_epochs * self.iters_per_epoch
                try:
                    for i, phase in enumerate(self.phases):
                        if not warming_up or phase.player == SYNTHESIZER:
                            self.run_phase(i, phase)
                except DivergenceError as exc:
                    self._roll_back(exc)
                    continue
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
        if world_size() > 1:  # no rank goes on (e.g. to load ckpt/final.pt) before rank 0 has written it
            torch.distributed.barrier()
        return summary

    def _roll_back(self, exc: DivergenceError) -> None:
        """With ``train.on_nan: rollback``, return to the last checkpoint and continue with other
        random draws; otherwise (or when out of rollbacks, or with no checkpoint) re-raise."""
        last = self.shared_run_dir / "ckpt" / "last.pt" if self.shared_run_dir else None
        tc = self.config.train
        if tc.on_nan != "rollback" or not (last and last.exists()) or self.rollbacks >= tc.max_rollbacks:
            raise exc
        self.rollbacks += 1
        self._load_state(ckpt_io.safe_load(last, map_location=self.device))
        seed_everything(self.config.seed + rank() + 1000 * self.rollbacks)  # the same draws would diverge again
        self._accum.clear()
        self.logger.scalars(self.step, {"nan/rollbacks": self.rollbacks})
        self.logger.text(self.step, "nan/rollback", f"{exc}; rolled back to iteration {self.step}")
        print(f"dfkd: {exc}; rolled back to iteration {self.step} ({self.rollbacks}/{tc.max_rollbacks})",
              file=sys.stderr)

    def _flush_losses(self) -> None:
        values = {k: float(torch.stack(v).mean()) for k, v in self._accum.items() if v}
        values.update({f"lr/{name}": p.lr for name, p in self.players.items()})
        values.update({f"time/{k}_s": v for k, v in self.timers.items()})
        if self.synth is not None and self.synth.last is not None and self.teacher is not None:
            values.update(self.inspect_synthetic(self.synth.last.images))
        self.logger.scalars(self.step, values)
        self._accum.clear()

    @torch.no_grad()
    def inspect_synthetic(self, images: torch.Tensor) -> dict[str, float]:
        """What the teacher makes of a synthetic batch: class and confidence histograms (to
        TensorBoard) and the per-layer BN-statistics distance (returned as scalars)."""
        if self.logger.writer is None:
            return {}
        try:
            tap = self.bn_tap or BNStatsTap(self.teacher)
        except ConfigError:  # a teacher without BatchNorm: no distances to show
            tap = None
        if tap is not None:
            tap.enabled = True
        probs = F.softmax(self.forward(self.teacher, images).float(), dim=1)
        stats = list(tap.stats) if tap is not None else []
        if tap is not None and tap is not self.bn_tap:
            tap.remove()
        pred = probs.argmax(1)
        self.logger.histogram(self.step, "synthetic/teacher_class", pred, bins=self.info.num_classes)
        self.logger.histogram(self.step, "synthetic/teacher_confidence", probs.max(1).values)
        scalars = {f"bn_distance/{s.name}": float((s.mean - s.running_mean).norm() + (s.var - s.running_var).norm())
                   for s in stats}
        counts = torch.bincount(pred, minlength=self.info.num_classes).float()
        scalars["synthetic/classes_present"] = float((counts > 0).sum())
        scalars["synthetic/teacher_confidence_mean"] = float(probs.max(1).values.mean())
        return scalars

    @torch.no_grad()
    def log_sample_grids(self, images: torch.Tensor) -> None:
        """Synthetic samples, all together and one row per class the teacher predicts."""
        if self.logger.writer is None:
            return
        pred = self.forward(self.teacher, images).argmax(1)
        shown = denormalize(images[:64].float(), self.info)
        self.logger.image_grid(self.step, "synthetic/samples", shown, nrow=8)
        per_class = []  # up to 8 samples per predicted class, one row each, blank where fewer
        blank = torch.ones_like(shown[0])
        for k in range(self.info.num_classes):
            picked = denormalize(images[pred == k][:8].float(), self.info)
            per_class += list(picked) + [blank] * (8 - len(picked))
        self.logger.image_grid(self.step, "synthetic/by_teacher_class", torch.stack(per_class), nrow=8)

    def end_of_epoch(self, epoch: int) -> None:
        tc, oc = self.config.train, self.config.output
        last_epoch = self.step == self.total_iters
        record = {"epoch": epoch, "step": self.step}
        if self.test_loader is not None and (epoch % tc.eval_every == 0 or last_epoch):
            t0 = time.perf_counter()
            result = self.evaluate(self.student.module)
            self.timers["eval"] += time.perf_counter() - t0
            record.update(acc=result["acc"], loss=result["loss"], time_train_s=round(self.timers["train"], 2))
            improved = result["acc"] > self.best_acc
            self.best_acc = max(self.best_acc, result["acc"])
            self.logger.scalars(self.step, {"eval/acc": result["acc"], "eval/loss": result["loss"],
                                            "eval/best_acc": self.best_acc, "epoch": epoch})
            if improved and self.run_dir is not None:
                self.save_model("best.pt", result["acc"], epoch)
        if self.synth is not None and self.synth.last is not None and self.teacher is not None \
                and (epoch % oc.image_every == 0 or last_epoch):
            self.log_sample_grids(self.synth.last.images)
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
        # time (training, evaluation excluded) to the first evaluation at >= 99% of the teacher
        reached = next((h for h in self.history if self.teacher_acc and h.get("acc", -1) >= 0.99 * self.teacher_acc),
                       {})
        return {"experiment": self.config.experiment, "seed": self.config.seed, "steps": self.step,
                "final_acc": final.get("acc"), "best_acc": self.best_acc if self.best_acc >= 0 else None,
                "teacher_acc": self.teacher_acc, "time_to_99pct_teacher_s": reached.get("time_train_s"),
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
                "step": self.step, "best_acc": self.best_acc, "teacher_acc": self.teacher_acc,
                "history": self.history, "timers": self.timers,
                "players": {n: p.state_dict() for n, p in self.players.items()},
                "scaler": self.scaler.state_dict(), "rng": rng_state(),
                "real": self.real.state_dict() if self.real else None,
                "synthesis": self.synth.state_dict() if self.synth else None,
                "terms": {f"{i}.{t.name}": t.fn.state_dict() for i, ts in self.terms.items() for t in ts
                          if isinstance(t.fn, nn.Module)},
                "term_optimizers": {k: o.state_dict() for k, o in self.term_optimizers.items()}}

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
        if self.synth is not None:
            self.synth.load_state_dict(state["synthesis"])
        for i, terms in self.terms.items():
            for t in terms:
                if isinstance(t.fn, nn.Module):
                    t.fn.load_state_dict(state["terms"][f"{i}.{t.name}"])
        for key, opt in self.term_optimizers.items():
            opt.load_state_dict(state["term_optimizers"][key])
        self.step, self.best_acc, self.teacher_acc = state["step"], state["best_acc"], state["teacher_acc"]
        self.history, self.timers = list(state["history"]), dict(state["timers"])
        set_rng_state(state["rng"])


def _named_phases(phases: list[PhaseConfig]) -> list[PhaseConfig]:
    """Phases named after their player unless named in the config; a second phase of the same
    player becomes ``<player>.2`` so that its losses are logged apart."""
    named, seen = [], {}
    for p in phases:
        base = p.name or p.player
        seen[base] = seen.get(base, 0) + 1
        named.append(dataclasses.replace(p, name=base if seen[base] == 1 else f"{base}.{seen[base]}"))
    if len({p.name for p in named}) != len(named):
        raise ConfigError(f"phase names must be unique, got {', '.join(p.name for p in named)}")
    return named


def _flatten_dict(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out = {}
        for k, v in d.items():
            out.update(_flatten_dict(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: d}
