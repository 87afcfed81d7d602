"""What the loss terms of one optimizer step read, and the services they may use.

A term gets everything from its :class:`StepContext`: the batch, network outputs (each computed
on first use and cached, so a phase pays only for what its terms need), tapped features, BN
statistics, and a few services: the module to call for a player, a diagnostic recorder, a
warning channel and the iteration. Terms never see the engine.
"""
from __future__ import annotations

from functools import cached_property
from typing import Callable, NamedTuple

import torch
from torch import nn

from dfkd.data.batch import Batch
from dfkd.loop.phases import Phase
from dfkd.loop.players import Players
from dfkd.loop.runtime import Runtime
from dfkd.loop.teachers import Teachers
from dfkd.nets.taps import EMBEDDING, BNStats, FeatureTap
from dfkd_base.errors import ConfigError


class Services(NamedTuple):
    """What a run lends its steps: built once, shared by every context."""

    runtime: Runtime
    teachers: Teachers
    players: Players
    model_taps: dict[str, FeatureTap]              # feature hooks on model players, by player
    record: Callable[[str, torch.Tensor], None]    # a diagnostic scalar, averaged into the logs
    warn: Callable[[int, str, str], None]          # (step, tag, message)


class StepContext:
    """One optimizer step's view: ``step`` the iteration, ``epoch`` the (0-based) epoch it is in."""

    def __init__(self, phase: Phase, batch: Batch, services: Services, step: int, epoch: int = 0):
        self.phase, self.batch, self.step, self.epoch = phase, batch, step, epoch
        self._services = services
        self._outputs: dict[str, tuple[torch.Tensor, dict[str, torch.Tensor]]] = {}

    # ------------------------------------------------------------ services
    def module(self, player: str) -> nn.Module:
        """What to call ``player``'s network through in this phase (its DDP wrapper if it trains)."""
        return self._services.players.module(player)

    def network(self, network: str) -> nn.Module:
        """The bare module of ``teacher`` (the first teacher running), ``student`` or a model player,
        for reading its weights (a DDP wrapper unwrapped)."""
        if network == "teacher":
            teachers = self._services.teachers
            return teachers.modules[teachers.running()[0]]
        module = self.module(self.phase.student if network == "student" else network)
        return module.module if isinstance(module, nn.parallel.DistributedDataParallel) else module

    def record(self, tag: str, value: torch.Tensor) -> None:
        """A diagnostic scalar (not part of the loss), averaged and logged with the losses."""
        self._services.record(tag, value.detach().float())

    def warn(self, tag: str, message: str) -> None:
        """A problem worth a human's look that does not stop the run: stderr and TensorBoard."""
        self._services.warn(self.step, tag, message)

    # ------------------------------------------------------------ the batch
    @property
    def images(self) -> torch.Tensor:
        return self.batch.images

    @property
    def teacher_images(self) -> torch.Tensor:
        return self.batch.images if self.batch.teacher_images is None else self.batch.teacher_images

    @property
    def labels(self) -> torch.Tensor:
        if self.batch.labels is None:
            raise ConfigError(f"phase '{self.phase.name}': a loss term needs labels, and '{self.batch.source}' "
                              f"batches have none")
        return self.batch.labels

    # ------------------------------------------------------------ model players
    def _model_pass(self, name: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and tapped features of model player ``name`` on this batch, computed once."""
        if name not in self._outputs:
            logits = self._services.runtime.forward(self.module(name), self.images)
            tap = self._services.model_taps.get(name)
            self._outputs[name] = (logits, dict(tap.features) if tap else {})
        return self._outputs[name]

    def logits_on(self, network: str, images: torch.Tensor) -> torch.Tensor:
        """``student`` or a model player's logits on other images than the batch's (not cached; read
        this step's own outputs first, since the pass moves the network's taps)."""
        name = self.phase.student if network == "student" else network
        self._model_pass(name)
        return self._services.runtime.forward(self.module(name), images)

    def logits_of(self, network: str) -> torch.Tensor:
        """``teacher``, ``student`` (this phase's student) or a model player's name."""
        if network == "teacher":
            return self.teacher_logits
        return self._model_pass(self.phase.student if network == "student" else network)[0]

    def features_of(self, network: str) -> dict[str, torch.Tensor]:
        if network == "teacher":
            return self.teacher_features
        return self._model_pass(self.phase.student if network == "student" else network)[1]

    @property
    def student_logits(self) -> torch.Tensor:
        return self._model_pass(self.phase.student)[0]

    @property
    def student_features(self) -> dict[str, torch.Tensor]:
        return self._model_pass(self.phase.student)[1]

    # ------------------------------------------------------------ teachers
    @cached_property
    def _teacher_pass(self):
        """The batch's own teacher pass, with BN statistics when the phase's terms read them."""
        return self._services.teachers.run(self.teacher_images, bn=self.phase.needs_bn)

    @property
    def teacher_logits(self) -> torch.Tensor:
        return self._teacher_pass.logits

    @property
    def each_teacher_logits(self) -> list[torch.Tensor]:
        """The logits of every teacher running this iteration, one tensor each (an ensemble's parts)."""
        return self._teacher_pass.each

    @property
    def teacher_bn(self) -> list[BNStats]:
        return self._teacher_pass.bn

    @property
    def teacher_features(self) -> dict[str, torch.Tensor]:
        return self._teacher_pass.features

    @property
    def teacher_embedding(self) -> torch.Tensor:
        """The teacher's penultimate features (the input of its last Linear layer)."""
        return self._teacher_pass.features[EMBEDDING]

    def teacher_view(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Teacher logits and tapped features of other images (e.g. augmented views)."""
        self._teacher_pass  # the batch's own pass first, so its recorded statistics stay its own
        other = self._services.teachers.run(images)
        return other.logits, other.features
