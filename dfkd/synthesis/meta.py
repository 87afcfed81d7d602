"""``meta``: a shared generator, cloned per batch and meta-updated toward the adapted clone
(Fast-DFKD)."""
from __future__ import annotations

import copy

from ..players import build_optimizer
from .base import SYNTHESIZERS
from .reinit import ReinitGenerator


@SYNTHESIZERS.register("meta")
class MetaGenerator(ReinitGenerator):
    def __init__(self, cfg, info, runtime):
        super().__init__(cfg, info, runtime)
        self.outer = build_optimizer(self.generator.parameters(), cfg.outer)
        self.fast = None

    def variables(self, n, labels):
        # optimize a copy; the shared weights move only in the outer step
        self.fast = copy.deepcopy(self.generator)
        return self.generator_variables(self.fast, n, labels)

    def finish(self) -> None:
        """Reptile: move the shared weights toward the adapted copy (gradient θ − θ'); first-order
        MAML: apply the copy's last gradient to the shared weights."""
        for p, q in zip(self.generator.parameters(), self.fast.parameters()):
            if self.cfg.meta == "reptile":
                p.grad = (p.detach() - q.detach()).clone()
            else:
                p.grad = None if q.grad is None else q.grad.detach().clone()
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
