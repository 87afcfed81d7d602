"""``meta``: a shared generator, cloned per batch and meta-updated toward the adapted clone
(Fast-DFKD)."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Literal

import torch

from dfkd.core.optim import build_optimizer
from dfkd.core.registries import SYNTHESIZERS
from dfkd.core.schema import OptimConfig
from dfkd.methods.synthesis.reinit import ReinitGenerator, ReinitOptions


@dataclass
class MetaOptions(ReinitOptions):
    # the shared generator's optimizer, stepped with the meta-gradient once per batch
    outer: OptimConfig = field(default_factory=lambda: OptimConfig(name="adam", lr=1e-3, betas=[0.5, 0.999]))
    meta: Literal["reptile", "fomaml"] = "reptile"   # the meta-gradient of the shared weights


@SYNTHESIZERS.register("meta")
class MetaGenerator(ReinitGenerator):
    """The meta-gradient: Reptile's θ − θ' (the shared weights move toward the adapted copy), or
    first-order MAML's sum of the copy's gradients over all inner steps, as Fast-DFKD's code
    accumulates them. Fast-DFKD's outer learning rate is the inner one times the inner steps."""

    Options = MetaOptions

    def __init__(self, cfg, info, runtime):
        super().__init__(cfg, info, runtime)
        self.outer = build_optimizer(self.generator.parameters(), cfg.outer)
        self.fast = None
        self.grad_sum: list[torch.Tensor | None] = []

    def variables(self, n, labels):
        # optimize a copy; the shared weights move only in the outer step
        self.fast = copy.deepcopy(self.generator)
        self.grad_sum = [None] * len(list(self.fast.parameters()))
        return self.generator_variables(self.fast, n, labels)

    @torch.no_grad()
    def gradients_ready(self) -> None:
        if self.cfg.meta != "fomaml":
            return
        for i, q in enumerate(self.fast.parameters()):
            if q.grad is not None:
                self.grad_sum[i] = q.grad.clone() if self.grad_sum[i] is None else self.grad_sum[i] + q.grad

    def finish(self) -> None:
        for p, q, summed in zip(self.generator.parameters(), self.fast.parameters(), self.grad_sum):
            p.grad = (p.detach() - q.detach()).clone() if self.cfg.meta == "reptile" else summed
        self.outer.step()
        self.outer.zero_grad(set_to_none=True)
        # BatchNorm running statistics are not parameters: carry them over from the copy
        for b_shared, b_fast in zip(self.generator.buffers(), self.fast.buffers()):
            b_shared.copy_(b_fast)
        self.fast = None

    def state_dict(self) -> dict:
        return {**super().state_dict(), "outer": self.outer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.outer.load_state_dict(state["outer"])
