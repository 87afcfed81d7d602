"""Optimizers and learning-rate schedules from their config sections: what every trained part of a
run (players, per-batch synthesis, stateful loss terms, shadow models) is stepped with."""
from __future__ import annotations

import math

import torch

from dfkd.core.schema import OptimConfig, SchedConfig


def build_optimizer(params, cfg: OptimConfig) -> torch.optim.Optimizer:
    # foreach: each update one batched kernel over all tensors, as torch already does on CUDA; on CPU
    # it computes the per-tensor loop's values bit for bit, Adam's step over a generator in 0.6x the time
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                               nesterov=cfg.nesterov and cfg.momentum > 0, foreach=True)
    cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return cls(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay, foreach=True)


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
