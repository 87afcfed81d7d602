"""Players: the trained networks of a run, each with its optimizer, schedule and optional EMA.

A phase names the player it updates (and the ``also`` players updated by the same backward);
:class:`Players` knows which are active, so that only they take gradients, only they run in
train mode, and only they run through their DistributedDataParallel wrapper.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterable, Iterator, Mapping

import torch
from torch import nn

from dfkd.core.checkpoint import unwrap
from dfkd.core.optim import build_optimizer, lr_factor
from dfkd.core.schema import PlayerConfig


class Player:
    """A trained network with its optimizer, learning-rate schedule and, optionally, an
    exponential moving average of its weights."""

    def __init__(self, name: str, cfg: PlayerConfig, module: nn.Module, total_steps: int, steps_per_epoch: int = 1):
        self.name, self.cfg, self.module = name, cfg, module
        self.kind = cfg.kind
        self.ddp: nn.Module | None = None  # the DistributedDataParallel wrapper under torchrun
        self.optimizer = build_optimizer([p for p in module.parameters() if p.requires_grad], cfg.optim)
        # a generator's average runs in train mode, as generators do (batch statistics in its last BN)
        self.ema = copy.deepcopy(module).train(cfg.kind == "generator").requires_grad_(False) if cfg.ema else None
        self.total_steps = max(1, total_steps)
        self.steps_per_epoch = max(1, steps_per_epoch)  # of the epochs it trains in
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
        if self.cfg.sched.interval == "epoch":  # the epoch's index of the epochs it trains in
            step, total = self.steps // self.steps_per_epoch, -(-self.total_steps // self.steps_per_epoch)
        else:
            step, total = self.steps, self.total_steps
        factor = lr_factor(self.cfg.sched, step, total, self.cfg.optim.lr)
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
        state = {"model": unwrap(self.module).state_dict(), "optim": self.optimizer.state_dict(),
                 "steps": self.steps}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        unwrap(self.module).load_state_dict(state["model"])
        trained = [p for p in self.module.parameters() if p.requires_grad]
        held = self.optimizer.param_groups[0]["params"]  # the others: loss terms' weights trained with it
        if len(trained) != len(held) or any(a is not b for a, b in zip(trained, held)):
            # the load replaced parameter objects (brevitas rebuilds its quantizers when loading):
            # the optimizer must step the model's parameters, not the ones it was built with
            joined = [group["params"] for group in self.optimizer.param_groups[1:]]
            self.optimizer = build_optimizer(trained, self.cfg.optim)
            for params in joined:
                self.optimizer.add_param_group({"params": params})
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(state["optim"])
        self.steps = state["steps"]
        self._apply_lr()


class Players(Mapping[str, Player]):
    """The run's players by name, in config order, and which of them the running phase trains."""

    def __init__(self, players: dict[str, Player]):
        self._players = players
        self.active: set[str] = set()  # the running phase's player and its 'also' players

    def __getitem__(self, name: str) -> Player:
        return self._players[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._players)

    def __len__(self) -> int:
        return len(self._players)

    def module(self, name: str) -> nn.Module:
        """What to call player ``name`` through now: its DDP wrapper while it trains, else the
        plain network (its parameters take no gradients then)."""
        player = self._players[name]
        return player.ddp if player.ddp is not None and name in self.active else player.module

    @contextlib.contextmanager
    def training(self, active: set[str], train_mode: Iterable[str] = ()):
        """During a phase only the ``active`` players' parameters take gradients (saving the
        backward work for the others) and only they, and those named in ``train_mode``, are in
        train mode; generators always stay in train mode because their last BatchNorm normalizes
        with batch statistics by design."""
        self.active = set(active)
        saved = {}
        for name, player in self._players.items():
            is_active = name in active
            for p in player.module.parameters():
                saved[p] = p.requires_grad
                p.requires_grad_(is_active and saved[p])
            player.module.train(is_active or player.kind == "generator" or name in train_mode)
        try:
            yield
        finally:
            for p, flag in saved.items():
                p.requires_grad_(flag)
