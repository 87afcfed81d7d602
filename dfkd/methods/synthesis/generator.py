"""``generator``: batches from a generator player that the engine's phases train (DAFL, DFAD,
ZSKT, DFQ)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from dfkd.core.checkpoint import unwrap
from dfkd.core.registries import SYNTHESIZERS
from dfkd.core.schema import PlayerConfig, SynthesisConfig
from dfkd.data.batch import Batch
from dfkd.methods.synthesis.base import Synthesizer, soft_labels
from dfkd_base.errors import ConfigError

HELD_OUT_SEED = 1 << 31  # the seed of held-out samples, which no training draw takes


@dataclass
class GeneratorOptions(SynthesisConfig):
    generator: str = "generator"        # the generator player whose samples the batches are

    def check(self, config, fail) -> None:
        player = config.players.get(self.generator, PlayerConfig())
        if player.kind != "generator":
            fail("synthesis.generator", f"synthesis.generator '{self.generator}' is not a generator player")
        for i, phase in enumerate(config.phases):
            if phase.batch == "fresh+ema" and player.ema is None:
                fail(f"phases.{i}.batch", f"phases.{i}.batch 'fresh+ema' needs players.{self.generator}.ema "
                                          f"(the generator's weight average)")


@SYNTHESIZERS.register("generator")
class GeneratorSynthesizer(Synthesizer):
    Options = GeneratorOptions
    draws = ("fresh", "fresh+ema", "regenerated")

    def __init__(self, cfg, info, runtime):
        super().__init__(cfg, info, runtime)
        self.drawn: tuple[torch.Tensor, torch.Tensor | None] | None = None  # the latest fresh latents, labels
        self._regenerated: tuple[object, Batch] | None = None  # (version, batch)

    def draw(self, source: str, module: nn.Module, player, trains_generator: bool) -> Batch:
        """A batch from the generator ``player`` (called through ``module``) for a phase whose
        source is ``fresh``, ``fresh+ema`` or ``regenerated``; what a student trains on is kept for
        replay."""
        if source == "fresh":
            batch = self.fresh(module, train_generator=trains_generator)
            if not trains_generator:
                self.keep(self.last)
            return batch
        if source == "fresh+ema":
            batch, new = self.fresh_with_average(module, player.ema), True
        else:
            batch, new = self.regenerate(module, version=player.steps)
        if new:
            self.keep(batch)
        return batch

    def fresh(self, generator: nn.Module, train_generator: bool) -> Batch:
        """A new batch from ``generator``: with gradients and ``synthesis.augment`` when the
        phase trains the generator, plain and detached otherwise. ``last`` is set to it,
        unaugmented and detached."""
        n = self.cfg.batch_size
        labels = self.sample_labels(n)
        net = unwrap(generator)  # the network's attributes, not the DDP wrapper's
        if getattr(net, "conditional", False) and labels is None:
            labels = torch.randint(self.num_classes, (n,), device=self.device)
        z = self.latents(net, n, labels)
        self.drawn, self._regenerated = (z, labels), None
        with torch.set_grad_enabled(train_generator), self.runtime.autocast():
            images = generator(z, labels).float()
        self.last = Batch(images.detach(), soft_labels(labels), "synthetic")
        return Batch(self.augment(images), self.last.labels, "synthetic") if train_generator else self.last

    @torch.no_grad()
    def held_out(self, generator: nn.Module | None = None) -> torch.Tensor | None:
        """Samples of ``generator`` as it is now, from latents (and classes) drawn anew from a fixed
        seed that training never draws from, so no student trained on them; the run's random state
        and the generator's BatchNorm statistics are left as they were."""
        if generator is None or self.heldout is None:
            return super().held_out(generator)
        net = unwrap(generator)
        buffers = {k: v.clone() for k, v in net.state_dict().items() if not v.is_floating_point() or "running" in k}
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(HELD_OUT_SEED)
            n = self.heldout.capacity
            labels = self.sample_labels(n)
            if getattr(net, "conditional", False) and labels is None:
                labels = torch.randint(self.num_classes, (n,), device=self.device)
            with self.runtime.autocast():
                images = generator(self.latents(net, n, labels), labels).float()
        net.load_state_dict(buffers, strict=False)
        return images

    @torch.no_grad()
    def fresh_with_average(self, generator: nn.Module, average: nn.Module) -> Batch:
        """MAD's student batch: a fresh batch of ``generator`` and one of its weight ``average``,
        each from its own latents (and labels), concatenated; ``last`` is set to it."""
        halves = [self.fresh(generator, train_generator=False).images]
        first_labels = self.last.labels
        with self.runtime.autocast():
            labels = self.sample_labels(self.cfg.batch_size)
            if getattr(average, "conditional", False) and labels is None:
                labels = torch.randint(self.num_classes, (self.cfg.batch_size,), device=self.device)
            halves.append(average(self.latents(average, self.cfg.batch_size, labels), labels).float())
        labels = None if labels is None else torch.cat([first_labels, soft_labels(labels)])
        self.last = Batch(torch.cat(halves), labels, "synthetic")
        return self.last

    @torch.no_grad()
    def regenerate(self, generator: nn.Module, version: object) -> tuple[Batch, bool]:
        """The latest fresh latents through ``generator`` as it is now (ZSKT trains its student on
        the generator's images after the generator's step, from the same z). ``version`` names the
        generator's weights: while it is unchanged the batch is reused, not recomputed. Returns the
        batch and whether it is new."""
        if self.drawn is None:
            raise ConfigError("a 'regenerated' batch needs an earlier phase that draws a 'fresh' one")
        if self._regenerated is not None and self._regenerated[0] == version:
            return self._regenerated[1], False
        z, labels = self.drawn
        with self.runtime.autocast():
            images = generator(z, labels).float()
        self.last = Batch(images, soft_labels(labels), "synthetic")
        self._regenerated = (version, self.last)
        return self.last, True
