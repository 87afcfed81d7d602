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
import copy
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
from .data import TensorLoader, dataset_info, denormalize, labeled_subset, load_dataset, load_pairs
from .errors import CheckpointError, ConfigError, DfkdError, ShapeError
from .losses import WeightedTerm, build_terms
from .modalities import get_modality
from .models import create_model
from .runs import MetricLogger, is_main_process, new_run_dir, rank, world_size
from .synthesis import SYNTHESIZER, Synthesizer, build_batch_transform
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
    """A trained network with its optimizer, learning-rate schedule and, optionally, an
    exponential moving average of its weights."""

    def __init__(self, name: str, cfg: PlayerConfig, module: nn.Module, total_steps: int):
        self.name, self.cfg, self.module = name, cfg, module
        self.kind = cfg.kind
        self.ddp: nn.Module | None = None  # the DistributedDataParallel wrapper under torchrun
        self.optimizer = build_optimizer([p for p in module.parameters() if p.requires_grad], cfg.optim)
        self.ema = copy.deepcopy(module).eval().requires_grad_(False) if cfg.ema else None
        self.total_steps = max(1, total_steps)
        self.steps = 0
        self._apply_lr()

    @property
    def eval_module(self) -> nn.Module:
        """What is evaluated and exported: the weight average when there is one."""
        return self.ema if self.ema is not None else self.module

    @torch.no_grad()
    def update_ema(self) -> None:
        """ema ← d·ema + (1 − d)·weights, parameters and float buffers (BN statistics) alike.
        The decay ramps up as (1 + n) / (10 + n) over the first steps, so the average is not
        dominated by the random initialization early in a run."""
        decay = min(self.cfg.ema, (1 + self.steps) / (10 + self.steps))
        for avg, live in zip(self.ema.state_dict().values(), self.module.state_dict().values()):
            if avg.is_floating_point():
                avg.lerp_(live, 1 - decay)
            else:
                avg.copy_(live)

    def _apply_lr(self) -> None:
        factor = lr_factor(self.cfg.sched, self.steps, self.total_steps, self.cfg.optim.lr)
        for group in self.optimizer.param_groups:
            group["lr"] = self.cfg.optim.lr * factor

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def step(self, scaler: torch.amp.GradScaler) -> torch.Tensor | None:
        """After the backward: optional clipping, optimizer step, schedule advance. Returns the
        gradient norm before clipping when clipping is on. The caller updates the scaler."""
        grad_norm = None
        if self.cfg.optim.grad_clip is not None:
            scaler.unscale_(self.optimizer)
            grad_norm = nn.utils.clip_grad_norm_(self.module.parameters(), self.cfg.optim.grad_clip)
        scaler.step(self.optimizer)
        if self.ema is not None:
            self.update_ema()
        self.steps += 1
        self._apply_lr()
        return grad_norm

    def state_dict(self) -> dict:
        state = {"model": ckpt_io.unwrap(self.module).state_dict(), "optim": self.optimizer.state_dict(),
                 "steps": self.steps}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        ckpt_io.unwrap(self.module).load_state_dict(state["model"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optim"])
        self.steps = state["steps"]
        self._apply_lr()


@contextlib.contextmanager
def only_trainable(players: dict[str, "Player"], active: str | set[str]):
    """During a phase only the active players' parameters take gradients (saving the backward
    work for the others) and only they are in train mode; generators always stay in train mode
    because their last BatchNorm normalizes with batch statistics by design."""
    active = {active} if isinstance(active, str) else active
    saved = {}
    for name, player in players.items():
        is_active = name in active
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
    teacher_images: torch.Tensor | None = None  # cross-modal: what the teacher sees (None: ``images``)


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
            item = next(self._it)
        except StopIteration:
            self.epoch, self.index, self._it = self.epoch + 1, 0, None
            return self.next()
        self.index += 1
        if len(item) == 3:  # cross-modal pairs: students see the second modality, the teacher the first
            images, labels, paired = item
            return Batch(paired, None if bool((labels < 0).any()) else labels, "real", teacher_images=images)
        images, labels = item
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
        self.student_name = engine.student_of(phase)
        self._outputs: dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}

    @property
    def images(self) -> torch.Tensor:
        return self.batch.images

    @property
    def teacher_images(self) -> torch.Tensor:
        return self.batch.images if self.batch.teacher_images is None else self.batch.teacher_images

    @property
    def labels(self) -> torch.Tensor:
        if self.batch.labels is None:
            raise ConfigError(f"phase '{self.phase.name}': a loss term needs labels, and '{self.batch.source}' "
                              f"batches have none")
        return self.batch.labels

    def _model_pass(self, name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and tapped features of model player ``name`` on this batch, computed once."""
        if name not in self._outputs:
            engine = self.engine
            logits = engine.forward(engine.module_of(engine.players[name]), self.images)
            tap = engine.model_taps.get(name)
            self._outputs[name] = (logits, dict(tap.features) if tap else {})
        return self._outputs[name]

    def logits_of(self, network: str) -> torch.Tensor:
        """``teacher``, ``student`` (this phase's student) or a model player's name."""
        if network == "teacher":
            return self.teacher_logits
        return self._model_pass(self.student_name if network == "student" else network)[0]

    def features_of(self, network: str) -> dict[str, torch.Tensor]:
        if network == "teacher":
            return self.teacher_features
        return self._model_pass(self.student_name if network == "student" else network)[1]

    @property
    def student_logits(self) -> torch.Tensor:
        return self._model_pass(self.student_name)[0]

    def record(self, tag: str, value: torch.Tensor) -> None:
        """A diagnostic scalar (not part of the loss), averaged and logged with the losses."""
        self.engine._accum.setdefault(tag, []).append(value.detach().float())

    @cached_property
    def teacher_logits(self) -> torch.Tensor:
        logits, self._teacher_embedding = self._teacher_pass(self.teacher_images, record=True)
        return logits

    def _teacher_pass(self, images: torch.Tensor, record: bool = False):
        """The teacher's (or the ensemble's) forward; gradients flow through the frozen teachers
        only when the images themselves are being trained. ``record``: keep this pass's BN
        statistics (of every teacher that ran) and taps (of the first that ran)."""
        engine = self.engine
        running = engine.running_teachers()
        needs_bn = record and engine.phase_needs_bn(self.phase)
        logits = []
        with torch.set_grad_enabled(images.requires_grad):
            for i in running:
                if engine.bn_taps:
                    engine.bn_taps[i].enabled = needs_bn
                logits.append(engine.forward(engine.teachers[i], images))
        embeddings = [engine.teacher_embedding.pop(i, None) for i in running]
        if record:
            self._teacher_bn = [s for i in running for s in engine.bn_taps[i].stats] if needs_bn and engine.bn_taps \
                else []
            self._teacher_features = dict(engine.teacher_taps[running[0]].features) if engine.teacher_taps else {}
        return engine.combine_teachers(logits), embeddings[0]

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
        return self._model_pass(self.student_name)[1]

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
        # cross-modal: students see a modality of the images; a synthetic batch needs gradients through it
        self.modality = get_modality(config.data.modality, differentiable=config.synthesis.kind != "none") \
            if config.data.modality else None
        self.student_shape = tuple(self.info.shape) if self.modality is None else tuple(
            self.modality(torch.zeros((1, *self.info.shape)), self.info).shape[1:])
        pairs_test = load_pairs(config.data.pairs_test, self.info, "test") if config.data.pairs_test else None
        self.teachers = self._build_teachers()
        self.teacher = self.teachers[0] if self.teachers else None  # the one that shows samples, etc.
        self.teacher_pick = 0  # ensemble 'random': this iteration's teacher
        self.phases = _named_phases(config.phases)
        self.terms: dict[int, list[WeightedTerm]] = {
            i: build_terms(p.losses, f"phases.{i}.losses") for i, p in enumerate(self.phases)}
        self.batch_transforms = {i: build_batch_transform(p, self.info.shape) for i, p in enumerate(self.phases)}
        self._check_needs()

        # Real data: the training split is read only if some phase trains on it. A data-free
        # config never touches it; the test split is read for evaluation only, and not at all
        # when data.eval is false.
        uses = {p.batch for p in self.phases if p.player != SYNTHESIZER}
        if config.data.pairs:
            train_split = load_pairs(config.data.pairs, self.info, "train")
            self.student_shape = tuple(train_split.paired.shape[1:])
        else:
            train_split = load_dataset(config.data.name, "train", config.data.root, config.data.download) \
                if uses & {"real", "labeled"} else None

        def stream(dataset) -> RealStream:
            return RealStream(TensorLoader(
                dataset, min(config.data.batch_size, len(dataset)), shuffle=True, augment=config.data.augment,
                drop_last=True, device=self.device, seed=config.seed, shard=(rank(), world_size())))

        self.real = stream(train_split) if "real" in uses else None
        self.labeled = stream(labeled_subset(train_split, config.data.labeled_fraction, config.seed)) \
            if "labeled" in uses else None
        self.test_loader = TensorLoader(
            pairs_test or load_dataset(config.data.name, "test", config.data.root, config.data.download),
            config.data.eval_batch_size, device=self.device) if config.data.eval else None

        tc = config.train
        if tc.iters_per_epoch is None:
            if self.real is None and self.labeled is None:
                raise ConfigError("train.iters_per_epoch must be set when no phase trains on real data")
            self.iters_per_epoch = len((self.real or self.labeled).loader)
        else:
            self.iters_per_epoch = tc.iters_per_epoch
        self.total_iters = tc.epochs * self.iters_per_epoch

        # networks first, then the taps on them, then what is sized by what the taps see
        self.players = {name: self._build_player(name, pc) for name, pc in config.players.items()
                        if pc.kind in ("model", "generator")}
        self._install_taps()
        self.players.update(self._build_judges())
        self.players = {name: self.players[name] for name in config.players}  # config order
        self._wrap_for_ddp()
        self.active: str | None = None  # the player of the phase being run
        self.active_set: set[str] = set()  # it and the phase's 'also' players
        self.last_batch: Batch | None = None  # what a 'same' phase reuses
        self.synth = Synthesizer(config.synthesis, self) if config.synthesis.kind != "none" else None
        self.term_optimizers = self._build_term_modules()
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
    def _build_teachers(self) -> list[nn.Module]:
        tc = self.config.teacher
        if tc is None:
            return []
        if not tc.checkpoints:
            raise ConfigError("teacher.checkpoint is not set: pass --teacher PATH (a model file from `dfkd teacher`)")
        return [self._load_teacher(path) for path in tc.checkpoints]

    def _load_teacher(self, path: str) -> nn.Module:
        teacher, meta = ckpt_io.load_model(path, self.device)
        arch = meta["arch"]
        try:
            with torch.no_grad():
                teacher(torch.zeros((2, *self.info.shape), device=self.device))
        except RuntimeError:
            raise ShapeError(f"teacher {path} ({arch['name']}, {arch.get('image_size')} px, trained on "
                             f"{meta.get('dataset')}) does not take dataset '{self.info.name}' images of shape "
                             f"{tuple(self.info.shape)}") from None
        if arch["num_classes"] != self.info.num_classes or arch["in_channels"] != self.info.shape[0]:
            raise ConfigError(f"teacher {path} takes {arch['in_channels']} channels and predicts "
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
        return player.ddp if player.ddp is not None and player.name in self.active_set else player.module

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

    def _build_player(self, name: str, pc: PlayerConfig, module: nn.Module | None = None) -> Player:
        steps = self.total_iters * sum(p.steps for p in self.phases if name == p.player or name in p.also)
        if module is None:
            module = self._build_model(pc) if pc.kind == "model" else self.build_generator(pc.net)
        return Player(name, pc, self._prepare(module), steps)

    def running_teachers(self) -> list[int]:
        """The teachers that run on a batch this iteration: all, or the one picked."""
        if self.config.teacher.ensemble == "random":
            return [self.teacher_pick]
        return list(range(len(self.teachers)))

    def combine_teachers(self, logits: list[torch.Tensor]) -> torch.Tensor:
        """One teacher's logits as they are; an ensemble's as the log of its (weighted) mean
        probabilities, so that softmax(result) is the averaged soft target."""
        if len(logits) == 1:
            return logits[0]
        probs = torch.stack([F.softmax(z.float(), dim=1) for z in logits])  # (teachers, N, classes)
        if self.config.teacher.ensemble == "confidence":
            weights = probs.max(dim=2).values                               # each teacher's top-class probability
            weights = (weights / weights.sum(0, keepdim=True)).unsqueeze(2)
        else:
            weights = torch.full_like(probs[:, :, :1], 1.0 / len(logits))
        return torch.log((weights * probs).sum(0).clamp_min(1e-12))

    def student_of(self, phase: PhaseConfig) -> str:
        """The network a phase's terms call 'student': the phase's own player when it is a
        model (a student, or a peer in online distillation), else the evaluated student."""
        pc = self.config.players.get(phase.player)
        return phase.player if pc is not None and pc.kind == "model" else self._student_name()

    def _build_judges(self) -> dict[str, Player]:
        """Discriminators and adapters, sized by probing the layers their terms read: a
        discriminator by its real side's output, an adapter from the student's layer to the
        real side's."""
        uses: dict[str, tuple] = {}  # player -> (kind, (network, layer), (network, layer) | None, where)
        for i, terms in self.terms.items():
            for term in terms:
                for name, use in (term.fn.player_uses() if hasattr(term.fn, "player_uses") else {}).items():
                    use = tuple((self.student_of(self.phases[i]) if s and s[0] == "student" else s[0], s[1])
                                if isinstance(s, tuple) else s for s in use)
                    pc = self.config.players.get(name)
                    where = f"phases.{i}.losses.{term.name}"
                    if pc is None or pc.kind != use[0]:
                        raise ConfigError(f"{where}: '{name}' is not a {use[0]} player "
                                          f"(players: {', '.join(self.config.players) or 'none'})")
                    if name in uses and uses[name][1:3] != use[1:3]:
                        raise ConfigError(f"{where}: {use[0]} '{name}' would see {use[1]}; {uses[name][3]} "
                                          f"already gives it {uses[name][1]}")
                    uses[name] = (*use, where)
        judges = {}
        for name, pc in self.config.players.items():
            if pc.kind not in ("discriminator", "adapter"):
                continue
            if name not in uses:
                raise ConfigError(f"players.{name}: no loss term uses {pc.kind} '{name}'")
            kind, source, target, _ = uses[name]
            shape = self._probe(*source)
            if kind == "discriminator" and target is not None and self._probe(*target) != shape:
                raise ShapeError(f"{uses[name][3]}: discriminator '{name}' compares {target[0]}'s "
                                 f"{target[1] or 'logits'} {self._probe(*target)} with {source[0]}'s "
                                 f"{source[1] or 'logits'} {shape}; give the term an 'adapter' player")
            if kind == "discriminator":
                from .discriminators import create_discriminator

                module = create_discriminator(pc.net.name or "mlp", shape, self.info.num_classes, **pc.net.kwargs)
            else:
                from .discriminators import create_adapter

                module = create_adapter(shape, self._probe(*target))
            judges[name] = self._build_player(name, pc, module)
        return judges

    @torch.no_grad()
    def _probe(self, network: str, layer: str | None) -> tuple[int, ...]:
        """The shape (without the batch) of ``network``'s logits or of its tapped ``layer``."""
        if network == "teacher":
            module, tap = self.teachers[0], self.teacher_taps[0] if self.teacher_taps else None
            shape = self.info.shape
        else:
            module, tap = self.players[network].module, self.model_taps.get(network)
            shape = self.student_shape
        was_training = module.training
        module.eval()  # no running statistics are touched by the dummy batch
        try:
            logits = self.forward(module, torch.zeros((2, *shape), device=self.device))
        finally:
            module.train(was_training)
        self.teacher_embedding.clear()
        if layer is None:
            return tuple(logits.shape[1:])
        return tuple(tap.features[layer].shape[1:])

    def build_generator(self, net: NetConfig) -> nn.Module:
        from generators import create_generator

        kwargs = {"nz": 256, **net.kwargs}
        if kwargs.get("output") == "pixels":  # pixels in [0, 1], normalised as the dataset's are
            kwargs = {"mean": self.info.mean, "std": self.info.std, **kwargs}
        try:
            generator = create_generator(net.name, img_shape=self.info.shape, num_classes=self.info.num_classes,
                                         **kwargs)
        except ShapeError as exc:
            raise ShapeError(f"generator '{net.name}' cannot make dataset '{self.info.name}' images: {exc}") from None
        except (TypeError, ValueError) as exc:  # an unknown or bad option in net.kwargs
            raise ConfigError(f"generator '{net.name}': {exc}") from None
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
        """Hooks: on each teacher, BN statistics (when a term needs them), the input of its last
        linear layer (its embedding) and the feature paths terms ask for; on model players, the
        feature paths terms ask of them ("student" meaning each phase's student)."""
        self.bn_taps: list[BNStatsTap] = []
        self.teacher_taps: list[FeatureTap] = []
        self.model_taps: dict[str, FeatureTap] = {}
        self._bn_phases = {p.name for i, p in enumerate(self.phases)
                           if any("teacher_bn" in getattr(t.fn, "needs", ()) for t in self.terms[i])}
        self.teacher_embedding: dict[int, torch.Tensor] = {}
        wanted: dict[str, list[str]] = {}
        for i, terms in self.terms.items():
            for term in terms:
                taps = getattr(term.fn, "taps", None)
                for network, paths in (taps(term.params) if taps else {}).items():
                    network = self.student_of(self.phases[i]) if network == "student" else network
                    wanted.setdefault(network, [])
                    wanted[network] += [p for p in paths if p not in wanted[network]]
        for network, paths in wanted.items():
            if not paths or network == "teacher":
                continue
            player = self.players.get(network)
            if player is None or player.kind != "model":
                raise ConfigError(f"a loss term taps '{network}', which is neither the teacher nor a model player "
                                  f"(model players: {', '.join(n for n, p in self.players.items() if p.kind == 'model')})")
            self.model_taps[network] = FeatureTap(player.module, paths)
        if not self.teachers:
            return
        if any(self.phase_needs_bn(p) for p in self.phases):
            self.bn_taps = [BNStatsTap(t) for t in self.teachers]
        for i, teacher in enumerate(self.teachers):
            last_linear = [m for m in teacher.modules() if isinstance(m, nn.Linear)]
            if last_linear:
                last_linear[-1].register_forward_pre_hook(
                    lambda m, inp, i=i: self.teacher_embedding.__setitem__(i, inp[0]))
        if wanted.get("teacher"):
            self.teacher_taps = [FeatureTap(t, wanted["teacher"]) for t in self.teachers]

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
                        term.fn.build(self.teacher_embedding.pop(0).shape[1])
                        self.teacher_embedding.clear()
                        term.fn.to(self.device)
                    params = [p for p in term.fn.parameters() if p.requires_grad]
                    if params:
                        lr = (self.config.synthesis.inner.lr if self.phases[i].player == SYNTHESIZER
                              else self.config.players[self.phases[i].player].optim.lr)
                        optimizers[f"{i}.{term.name}"] = torch.optim.Adam(params, lr=lr, betas=(0.5, 0.999))
        return optimizers

    def _build_model(self, pc: PlayerConfig) -> nn.Module:
        C, H, _ = self.student_shape
        if pc.net.checkpoint:  # start from trained weights (fine-tuning, a pre-trained peer)
            model, meta = ckpt_io.load_model(pc.net.checkpoint)
            arch = meta["arch"]
            if arch["in_channels"] != C or arch.get("image_size", H) != H:
                view = f"modality '{self.config.data.modality}' of {self.info.name}" if self.modality \
                    else f"dataset {self.info.name}"
                raise ShapeError(f"{pc.net.checkpoint} ({arch['name']}) takes {arch['in_channels']}-channel "
                                 f"{arch.get('image_size')} px input; {view} gives {self.student_shape}")
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
                source = phase
                if phase.batch == "same":  # the batch of the nearest earlier phase that draws one
                    source = next(p for p in reversed(self.phases[i + 1:] + self.phases[:i]) if p.batch != "same")
                has_labels = (source.batch in ("real", "labeled") and source.player != SYNTHESIZER) \
                    or syn.labels != "none"
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
        """A batch from the phase's source. ``same`` is the batch an earlier phase drew last
        (a synthetic one without the generator's augmentation, and detached)."""
        if phase.batch == "same":
            if self.last_batch is None:
                raise ConfigError(f"phase '{phase.name}': a 'same' batch needs an earlier phase that draws one")
            return self.last_batch
        if phase.batch in ("real", "labeled"):
            batch = (self.real if phase.batch == "real" else self.labeled).next()
            self.last_batch = batch
            return batch
        if phase.batch == "pool":
            batch = self.synth.replay()
            self.last_batch = batch
            return batch
        gen_name = self.config.synthesis.generator
        batch = self.synth.fresh(self.module_of(self.players[gen_name]), train_generator=phase.player == gen_name)
        self.last_batch = self.synth.last
        return batch

    def student_view(self, batch: Batch) -> Batch:
        """Cross-modal: the students' modality of the batch's images, the teacher keeping the
        images themselves (differentiably, so synthesis can train through the modality)."""
        if self.modality is None or batch.teacher_images is not None:
            return batch
        return Batch(self.modality(batch.images, self.info), batch.labels, batch.source, batch.images)

    def phase_loss(self, index: int, phase: PhaseConfig, batch: Batch) -> torch.Tensor:
        """Σ weight × term on ``batch``, with a NaN guard; records the terms for logging."""
        ctx = StepContext(self, phase, self.student_view(batch))
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
            if key.split(".", 1)[0] != str(index):
                continue
            if before:
                opt.zero_grad(set_to_none=True)
                continue
            if world_size() > 1:  # term modules are not DDP-wrapped: average their gradients here
                for group in opt.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            torch.distributed.all_reduce(p.grad)
                            p.grad /= world_size()
            opt.step()

    def run_phase(self, index: int, phase: PhaseConfig) -> None:
        """All of a phase's steps in this iteration."""
        self.active, self.active_set = phase.player, {phase.player, *phase.also}
        if phase.player == SYNTHESIZER:
            t0 = time.perf_counter()
            with only_trainable(self.players, SYNTHESIZER):
                def inner_step(batch: Batch) -> torch.Tensor:
                    self._step_term_optimizers(index, before=True)
                    return self.phase_loss(index, phase, batch)

                self.synth.synthesize(inner_step, phase.steps, after_backward=lambda: self._step_term_optimizers(
                    index, before=False))
            self._end_batch(index)
            self.last_batch = self.synth.last
            self.timers["synthesis"] += time.perf_counter() - t0
            return
        player = self.players[phase.player]
        updated = [player] + [self.players[name] for name in phase.also]
        t0 = time.perf_counter()
        for _ in range(phase.steps):
            with only_trainable(self.players, self.active_set):
                self._step_term_optimizers(index, before=True)
                batch = self.next_batch(phase)
                if self.batch_transforms[index] is not None:
                    batch = self.batch_transforms[index](batch)
                total = self.phase_loss(index, phase, batch)
                for p in updated:
                    p.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(total).backward()
                for p in updated:
                    grad_norm = p.step(self.scaler)
                    if grad_norm is not None:
                        tag = f"grad_norm/{phase.name}" + ("" if p is player else f"/{p.name}")
                        self._accum.setdefault(tag, []).append(grad_norm.detach().float())
                self.scaler.update()
                self._step_term_optimizers(index, before=False)
                self._end_batch(index)
        if player.kind == "generator":  # training the generator is synthesis time
            self.timers["synthesis"] += time.perf_counter() - t0

    def _end_batch(self, index: int) -> None:
        """Terms that keep statistics across batches (``end_batch``) take in the one just done."""
        for term in self.terms[index]:
            if hasattr(term.fn, "end_batch"):
                term.fn.end_batch()

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
            self.teacher_acc = self.evaluate(self.teacher if len(self.teachers) == 1 else _Ensemble(self))["acc"]
            self.logger.scalars(0, {"eval/teacher_acc": self.teacher_acc})
        t_start = time.perf_counter()
        try:
            while self.step < self.total_iters:
                t0 = time.perf_counter()
                warming_up = self.step < self.config.synthesis.warmup_epochs * self.iters_per_epoch
                if len(self.teachers) > 1 and self.config.teacher.ensemble == "random":
                    self.teacher_pick = int(torch.randint(len(self.teachers), ()))
                    for i in range(len(self.teachers)):
                        self._accum.setdefault(f"teacher/picked_{i}", []).append(
                            torch.tensor(float(i == self.teacher_pick)))
                try:
                    epoch = self.step // self.iters_per_epoch
                    for i, phase in enumerate(self.phases):
                        in_window = phase.epochs is None or phase.epochs[0] <= epoch < phase.epochs[1]
                        if in_window and (not warming_up or phase.player == SYNTHESIZER):
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

    def warn(self, tag: str, message: str) -> None:
        """A problem worth a human's look that does not stop the run: stderr and TensorBoard."""
        if is_main_process():
            print(f"dfkd: warning: {message}", file=sys.stderr)
        self.logger.text(self.step, tag, message)

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
            tap = self.bn_taps[0] if self.bn_taps else BNStatsTap(self.teacher)
        except ConfigError:  # a teacher without BatchNorm: no distances to show
            tap = None
        if tap is not None:
            tap.enabled = True
        probs = F.softmax(self.forward(self.teacher, images).float(), dim=1)
        stats = list(tap.stats) if tap is not None else []
        if tap is not None and tap not in self.bn_taps:
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

    @torch.no_grad()
    def log_pair_grid(self, tag: str, images: torch.Tensor, paired: torch.Tensor | None = None) -> None:
        """Up to 8 samples: the teacher's modality on top, the students' (``paired``, or the
        built-in modality of ``images``; rescaled to [0, 1] per image, to the same size and
        channel count) below."""
        if self.logger.writer is None:
            return
        images = images[:8].float()
        a = denormalize(images, self.info)
        b = self.modality(images, self.info) if paired is None else paired[:8].float()
        low, high = b.amin(dim=(1, 2, 3), keepdim=True), b.amax(dim=(1, 2, 3), keepdim=True)
        b = (b - low) / (high - low).clamp_min(1e-6)
        b = F.interpolate(b, size=a.shape[2:], mode="bilinear", align_corners=False) if b.shape[2:] != a.shape[2:] else b
        channels = max(a.shape[1], b.shape[1])
        a, b = a.expand(-1, channels, -1, -1), b.expand(-1, channels, -1, -1)
        self.logger.image_grid(self.step, tag, torch.cat([a, b]), nrow=len(a))

    def end_of_epoch(self, epoch: int) -> None:
        tc, oc = self.config.train, self.config.output
        last_epoch = self.step == self.total_iters
        record = {"epoch": epoch, "step": self.step}
        if self.test_loader is not None and (epoch % tc.eval_every == 0 or last_epoch):
            t0 = time.perf_counter()
            result = self.evaluate(self.student.eval_module, student=True)
            scalars = {}
            if self.student.ema is not None:  # the live weights too, to see what the average adds
                scalars["eval/acc_live"] = record["acc_live"] = self.evaluate(self.student.module, student=True)["acc"]
            self.timers["eval"] += time.perf_counter() - t0
            record.update(acc=result["acc"], loss=result["loss"], time_train_s=round(self.timers["train"], 2))
            improved = result["acc"] > self.best_acc
            self.best_acc = max(self.best_acc, result["acc"])
            self.logger.scalars(self.step, {"eval/acc": result["acc"], "eval/loss": result["loss"],
                                            "eval/best_acc": self.best_acc, "epoch": epoch, **scalars})
            if improved and self.run_dir is not None:
                self.save_model("best.pt", result["acc"], epoch)
        if self.synth is not None and self.synth.last is not None and self.teacher is not None \
                and (epoch % oc.image_every == 0 or last_epoch):
            self.log_sample_grids(self.synth.last.images)
            if self.modality is not None:
                self.log_pair_grid("crossmodal/synthetic_pairs", self.synth.last.images)
        paired_run = self.modality is not None or self.config.data.pairs
        if paired_run and self.test_loader is not None and (epoch % oc.image_every == 0 or last_epoch):
            self.log_pair_grid("crossmodal/real_pairs", *next(iter(self.test_loader))[::2])
        self.history.append(record)
        if self.run_dir is not None:
            if last_epoch:
                self.save_model("final.pt", record.get("acc"), epoch)
            if epoch % oc.save_every == 0 or last_epoch:
                self.save_state()

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: TensorLoader | None = None, student: bool = False) -> dict:
        """Accuracy and loss on the test split (a student: on its modality of it)."""
        loader = loader or self.test_loader
        was_training = model.training
        model.eval()
        correct, loss_sum, n = 0, 0.0, 0
        for images, labels, *paired in loader:
            if student and paired:  # a user's pairs: the student's modality is stored
                images = paired[0]
            elif student and self.modality is not None:
                images = self.modality(images, self.info)
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
                "final_acc": final.get("acc"), **({"final_acc_live": final["acc_live"]} if "acc_live" in final else {}),
                "best_acc": self.best_acc if self.best_acc >= 0 else None,
                "teacher_acc": self.teacher_acc, "time_to_99pct_teacher_s": reached.get("time_train_s"),
                "time_total_s": round(wall, 2), "time_train_s": round(self.timers["train"], 2),
                "time_synthesis_s": round(self.timers["synthesis"], 2), "time_eval_s": round(self.timers["eval"], 2),
                "run_dir": str(self.run_dir) if self.run_dir else None}

    # ---------------------------------------------------------------- checkpoints
    def arch(self) -> dict:
        C, H, _ = self.student_shape
        net = self.student.cfg.net
        if net.checkpoint:
            return ckpt_io.read_model_file(net.checkpoint)["arch"]
        return {"name": net.name, "in_channels": C, "num_classes": self.info.num_classes, "image_size": H,
                "kwargs": dict(net.kwargs)}

    def save_model(self, filename: str, accuracy: float | None, epoch: int) -> Path:
        return ckpt_io.save_model(self.run_dir / "ckpt" / filename, self.student.eval_module, self.arch(),
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
                "labeled": self.labeled.state_dict() if self.labeled else None,
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
        if self.labeled is not None:
            self.labeled.load_state_dict(state["labeled"])
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


class _Ensemble(nn.Module):
    """A teacher ensemble as one model, for evaluation: every teacher, combined as in training
    (``random`` is evaluated as the mean)."""

    def __init__(self, engine: Engine):
        super().__init__()
        self.engine = engine

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        logits = self.engine.combine_teachers([t(images) for t in self.engine.teachers])
        self.engine.teacher_embedding.clear()
        return logits


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
