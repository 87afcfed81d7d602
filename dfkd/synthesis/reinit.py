"""``reinit``: a generator and its latents re-initialized for every batch (CMI)."""
from __future__ import annotations

from torch import nn

from .base import SYNTHESIZERS, PerBatchSynthesizer, build_generator


def reset_parameters(module: nn.Module) -> None:
    for m in module.modules():
        if m is not module and hasattr(m, "reset_parameters"):
            m.reset_parameters()


@SYNTHESIZERS.register("reinit")
class ReinitGenerator(PerBatchSynthesizer):
    def __init__(self, cfg, info, runtime):
        super().__init__(cfg, info, runtime)
        self.generator = build_generator(cfg.net, info, self.device)

    def variables(self, n, labels):
        reset_parameters(self.generator)
        return self.generator_variables(self.generator, n, labels)

    def generator_variables(self, generator: nn.Module, n, labels):
        """The generator's weights and fresh latents (at ``latent_lr``), optimized together."""
        z = self.latents(generator, n).requires_grad_(True)
        params = [{"params": list(generator.parameters())},
                  {"params": [z], "lr": self.cfg.latent_lr or self.cfg.inner.lr}]
        return params, lambda: generator(z, labels)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "generator": self.generator.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.generator.load_state_dict(state["generator"])
