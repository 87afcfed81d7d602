"""Phases and the batches they train on.

An iteration runs the config's phases in order. A :class:`Phase` bundles a phase's config with
what is built from it once: its weighted loss terms, its batch transform (augmentation, mixup)
and the network its terms call "student". A :class:`Batch` is what a phase's source gives it.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Iterator

import torch

from dfkd.core.runs import world_size
from dfkd.core.schema import PhaseConfig
from dfkd.data.augment import build_augment
from dfkd.data.batch import Batch
from dfkd.data.datasets import DatasetInfo
from dfkd.data.loader import TensorLoader
from dfkd.methods.losses.base import WeightedTerm, build_terms
from dfkd_base.errors import ConfigError


class RealStream:
    """An endless, resumable stream of real training batches: position = (epoch, batch index)."""

    def __init__(self, loader: TensorLoader):
        self.loader = loader
        self.epoch, self.index = 0, 0
        self._it: Iterator | None = None

    def next(self) -> Batch:
        if self._it is None:
            self.loader.epoch = self.epoch  # the loader's shuffle and augmentation are a function of (seed, epoch)
            self._it = iter(self.loader)
            for _ in range(self.index):
                next(self._it)
        try:
            item = next(self._it)
        except StopIteration:
            self.epoch, self.index, self._it = self.epoch + 1, 0, None
            return self.next()
        self.index += 1
        index = self.loader.last_index.to(item[1].device)
        if len(item) == 3:  # cross-modal pairs: students see the second modality, the teacher the first
            images, labels, paired = item
            return Batch(paired, None if bool((labels < 0).any()) else labels, "real", teacher_images=images,
                         index=index)
        images, labels = item
        return Batch(images, labels, "real", index=index, partners=self.loader.last_partners)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index, self._it = state["epoch"], state["index"], None


def build_batch_transform(phase: PhaseConfig, info: DatasetInfo) -> Callable[[Batch], Batch] | None:
    """The per-phase view of a batch: ``phase.augment`` then ``phase.mixup``; None when neither is
    set. Mixup pairs each image with another of the same batch, weighted by λ ~ Beta(α, α) per
    image; the mixed batch has no labels, since its targets come from the teacher."""
    if phase.augment is None and not phase.mixup:
        return None
    augment = build_augment(phase.augment, info.shape, info.mean, info.std) if phase.augment is not None else None
    beta = torch.distributions.Beta(phase.mixup, phase.mixup) if phase.mixup else None

    def transform(batch: Batch) -> Batch:
        images, labels, source, index, partners = batch.images, batch.labels, batch.source, batch.index, batch.partners
        if augment is not None:
            images = augment(images)
            partners = augment(partners) if partners is not None else None
        if beta is not None:  # a mixed image is no one sample: no label, no index
            lam = beta.sample((images.shape[0], 1, 1, 1)).to(images.device, images.dtype)
            partner = images[torch.randperm(images.shape[0], device=images.device)]
            images, labels, source, index = lam * images + (1 - lam) * partner, None, f"{source}+mixup", None
            partners = None
        return Batch(images, labels, source, index=index, partners=partners)

    return transform


@dataclasses.dataclass
class Phase:
    """One step type of an iteration, built: ``config`` as written (its name resolved), the
    weighted ``terms`` of its loss, the ``transform`` of its batches, and ``student``, the model
    player its terms call "student" (its own player when that is a model, else the evaluated one)."""

    index: int
    config: PhaseConfig
    terms: list[WeightedTerm]
    transform: Callable[[Batch], Batch] | None
    student: str

    name = property(lambda self: self.config.name)
    player = property(lambda self: self.config.player)
    batch = property(lambda self: self.config.batch)   # the batch source's name
    steps = property(lambda self: self.config.steps)
    also = property(lambda self: self.config.also)

    @property
    def trains(self) -> set[str]:
        """The players this phase's backward updates."""
        return {self.player, *self.also}

    @property
    def needs_bn(self) -> bool:
        """Whether a term reads the teacher's BatchNorm statistics (only then are they computed)."""
        return any("teacher_bn" in t.term.needs for t in self.terms)

    def zero_term_grads(self) -> None:
        for t in self.terms:
            if t.optimizer is not None:
                t.optimizer.zero_grad(set_to_none=True)

    def step_terms(self) -> None:
        """The optimizer step of the terms with parameters (e.g. a projection head)."""
        for t in self.terms:
            if t.optimizer is None:
                continue
            if world_size() > 1:  # term modules are not DDP-wrapped: average their gradients here
                for group in t.optimizer.param_groups:
                    for p in group["params"]:
                        if p.grad is not None:
                            torch.distributed.all_reduce(p.grad)
                            p.grad /= world_size()
            t.optimizer.step()

    def keep_step(self) -> None:
        for t in self.terms:
            t.term.keep_step()

    def end_batch(self) -> None:
        """Terms that keep statistics across batches take in the one just done."""
        for t in self.terms:
            t.term.end_batch()

    def runs_in(self, epoch: int) -> bool:
        window = self.config.epochs
        return window is None or window[0] <= epoch < window[1]


def named_phases(phases: list[PhaseConfig]) -> list[PhaseConfig]:
    """Phases named after their player unless named in the config; a second phase of the same
    player becomes ``<player>.2`` so that its losses are logged apart."""
    named, seen = [], {}
    for p in phases:
        base = p.name or p.player
        seen[base] = seen.get(base, 0) + 1
        named.append(dataclasses.replace(p, name=base if seen[base] == 1 else f"{base}.{seen[base]}"))
    if len({p.name for p in named}) != len(named):
        raise ConfigError(f"phase names must be unique, got {', '.join(p.name for p in named)}")
    return named


def build_phases(phases: list[PhaseConfig], info: DatasetInfo,
                 student_of: Callable[[PhaseConfig], str]) -> list[Phase]:
    """The config's phases, named, with their terms and transforms built."""
    named = named_phases(phases)
    terms = [build_terms(p.losses, f"phases.{i}.losses") for i, p in enumerate(named)]
    return [Phase(i, p, terms[i], build_batch_transform(p, info), student_of(p)) for i, p in enumerate(named)]
