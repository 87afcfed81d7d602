"""``generator``: batches from a generator player that the engine's phases train (DAFL, DFAD,
ZSKT, DFQ)."""
from __future__ import annotations

import torch
from torch import nn

from ..checkpoint import unwrap
from ..phases import Batch
from .base import SYNTHESIZERS, Synthesizer


@SYNTHESIZERS.register("generator")
class GeneratorSynthesizer(Synthesizer):
    def fresh(self, generator: nn.Module, train_generator: bool) -> Batch:
        """A new batch from ``generator``: with gradients and ``synthesis.augment`` when the
        phase trains the generator, plain and detached otherwise. ``last`` is set to it,
        unaugmented and detached."""
        n = self.cfg.batch_size
        labels = self.sample_labels(n)
        net = unwrap(generator)  # the network's attributes, not the DDP wrapper's
        if getattr(net, "conditional", False) and labels is None:
            labels = torch.randint(self.num_classes, (n,), device=self.device)
        with torch.set_grad_enabled(train_generator), self.runtime.autocast():
            images = generator(self.latents(net, n), labels).float()
        self.last = Batch(images.detach(), labels, "synthetic")
        return Batch(self.augment(images), labels, "synthetic") if train_generator else self.last
