"""``inversion``: the pixels of each batch optimized from noise (DeepInversion, ADI)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from dfkd.core.registries import SYNTHESIZERS
from dfkd.methods.synthesis.base import PerBatchOptions, PerBatchSynthesizer


@dataclass
class InversionOptions(PerBatchOptions):
    clamp: bool = False                 # keep pixels in the dataset's valid range after each step


@SYNTHESIZERS.register("inversion")
class PixelInversion(PerBatchSynthesizer):
    """``synthesis.clamp``: after every step the pixels are put back into the range real images
    take, [(0 − mean) / std, (1 − mean) / std] per channel (the DataFree benchmark's DeepInversion
    and NVlabs' ImageNet script do; their CIFAR-10 script does not)."""

    Options = InversionOptions

    def __init__(self, cfg, info, runtime):
        super().__init__(cfg, info, runtime)
        mean = torch.as_tensor(info.mean, dtype=torch.float, device=self.device).view(-1, 1, 1)
        std = torch.as_tensor(info.std, dtype=torch.float, device=self.device).view(-1, 1, 1)
        self.low, self.high = -mean / std, (1 - mean) / std
        self.pixels: torch.Tensor | None = None

    def variables(self, n, labels):
        self.pixels = pixels = torch.randn((n, *self.shape), device=self.device, requires_grad=True)
        return [pixels], lambda: pixels

    @torch.no_grad()
    def after_step(self) -> None:
        if self.cfg.clamp:
            self.pixels.copy_(torch.maximum(torch.minimum(self.pixels, self.high), self.low))
