"""``reinit``: a generator and its latents re-initialized for every batch (CMI)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

import torch
from torch import nn

from dfkd.core.registries import SYNTHESIZERS
from dfkd.core.schema import NetConfig
from dfkd.methods.synthesis.base import PerBatchOptions, PerBatchSynthesizer, default_generator


@dataclass
class ReinitOptions(PerBatchOptions):
    net: NetConfig = field(default_factory=default_generator)  # the generator re-initialized per batch
    latent_lr: Optional[float] = None   # learning rate of the latents (default: inner.lr)
    init: Literal["default", "dcgan"] = "default"  # PyTorch's init, or N(0, 0.02) weights (CMI's)


def reset_parameters(module: nn.Module) -> None:
    """PyTorch's default initialization of every layer."""
    for m in module.modules():
        if m is not module and hasattr(m, "reset_parameters"):
            m.reset_parameters()


@torch.no_grad()
def reset_dcgan(module: nn.Module) -> None:
    """DCGAN's initialization, which CMI re-applies to its generator for every batch: convolution
    and linear weights N(0, 0.02), BatchNorm scales N(1, 0.02), biases 0; running statistics reset."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            if m.affine:
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)


@SYNTHESIZERS.register("reinit")
class ReinitGenerator(PerBatchSynthesizer):
    Options = ReinitOptions

    def __init__(self, cfg, info, runtime):
        super().__init__(cfg, info, runtime)
        self.generator = self.build_generator(cfg.net, info)

    def variables(self, n, labels):
        (reset_dcgan if self.cfg.init == "dcgan" else reset_parameters)(self.generator)
        return self.generator_variables(self.generator, n, labels)

    def generator_variables(self, generator: nn.Module, n, labels):
        """The generator's weights and fresh latents (at ``latent_lr``), optimized together."""
        z = self.latents(generator, n, labels).requires_grad_(True)
        params = [{"params": list(generator.parameters())},
                  {"params": [z], "lr": self.cfg.latent_lr or self.cfg.inner.lr}]
        return params, lambda: generator(z, labels)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "generator": self.generator.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.generator.load_state_dict(state["generator"])
