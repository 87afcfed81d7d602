"""``inversion``: the pixels of each batch optimized from noise (DeepInversion, ADI)."""
from __future__ import annotations

import torch

from .base import SYNTHESIZERS, PerBatchSynthesizer


@SYNTHESIZERS.register("inversion")
class PixelInversion(PerBatchSynthesizer):
    def variables(self, n, labels):
        pixels = torch.randn((n, *self.shape), device=self.device, requires_grad=True)
        return [pixels], lambda: pixels
