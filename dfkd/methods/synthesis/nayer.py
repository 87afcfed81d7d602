"""``nayer``: NAYER (Tran et al., CVPR 2024): one generator for the whole run, fed fixed class
embeddings through a noisy layer that is re-initialized for every batch instead of input noise."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from dfkd.core.registries import SYNTHESIZERS
from dfkd.core.schema import NetConfig
from dfkd.methods.synthesis.base import PerBatchOptions, PerBatchSynthesizer
from dfkd.methods.synthesis.reinit import reset_parameters


@dataclass
class NayerOptions(PerBatchOptions):
    net: NetConfig = field(default_factory=lambda: NetConfig(name="nayer", kwargs={"nz": 512}))  # a noisy-layer generator
    reset_every: int = 0                # re-initialize the whole generator every this many batches; 0: never


@SYNTHESIZERS.register("nayer")
class NoisyLayerSynthesis(PerBatchSynthesizer):
    """Per batch: the generator's noisy layers are drawn anew, then the generator (all of it) takes
    the phase's inner steps from where the last batch left it; the best step's batch is kept. The
    whole generator is re-initialized every ``synthesis.reset_every`` batches (NAYER: every 10
    epochs). Labels are NAYER's: every class once per group, in order, then random classes for the
    remainder, so each noisy layer sees one sample of each class."""

    Options = NayerOptions

    def __init__(self, cfg, info, runtime):
        super().__init__(cfg, info, runtime)
        net = dataclasses.replace(cfg.net, kwargs={"batch_size": cfg.batch_size, **cfg.net.kwargs})
        self.generator = self.build_generator(net, info)
        self.batches = 0

    def sample_labels(self, n: int) -> torch.Tensor:
        k = self.num_classes
        return torch.cat([torch.arange(k, device=self.device).repeat(n // k),
                          torch.randint(k, (n % k,), device=self.device)])

    def variables(self, n, labels):
        if self.cfg.reset_every and self.batches and self.batches % self.cfg.reset_every == 0:
            reset_parameters(self.generator)
        self.batches += 1
        self.generator.reset_noise()
        return [{"params": list(self.generator.parameters())}], lambda: self.generator(None, labels)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "generator": self.generator.state_dict(), "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.generator.load_state_dict(state["generator"])
        self.batches = state["batches"]
