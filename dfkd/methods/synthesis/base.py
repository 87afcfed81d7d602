"""What every synthesis strategy shares: its options, the image pool, augmentation, label
sampling, state; and what the per-batch strategies share: the inner optimization of one batch.

A strategy is a :class:`Synthesizer` subclass registered in
:data:`~dfkd.core.registries.SYNTHESIZERS` under the name ``synthesis.kind`` takes. Its ``Options``
dataclass (a subclass of the schema's :class:`~dfkd.core.schema.SynthesisConfig`) validates the
``synthesis`` section of a config that names it, and its class attributes say what config
validation may ask of it: ``runs_as_phase`` (it makes batches in a ``synthesizer`` phase) and
``draws`` (the batch sources other phases may draw from it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.core.optim import build_optimizer
from dfkd.core.schema import NetConfig, OptimConfig, SynthesisConfig
from dfkd.data.augment import build_augment
from dfkd.data.batch import Batch
from dfkd.data.datasets import DatasetInfo
from dfkd.methods.ring_buffer import RingBuffer
from dfkd.nets.taps import probe
from dfkd_base.errors import ConfigError, ShapeError
from generators import create_generator


@dataclass
class PerBatchOptions(SynthesisConfig):
    """Options of the strategies that optimize each batch from scratch in a ``synthesizer`` phase."""

    # the optimizer of one batch's variables, new for every batch
    inner: OptimConfig = field(default_factory=lambda: OptimConfig(name="adam", lr=0.1, betas=[0.5, 0.999]))
    keep: Literal["last", "best"] = "last"   # which batch of the inner loop enters the pool


HELD_OUT_SHARE = 16  # one sample in this many of each kept batch is held out, when a run holds any out


def soft_labels(labels: torch.Tensor | None) -> torch.Tensor | None:
    """What a batch carries for the classes asked for: superposed slots ``(n, slots, classes)``
    summed to each sample's soft label ``(n, classes)``; class indices and None as they are."""
    return labels.sum(1) if labels is not None and labels.dim() == 3 else labels


def default_generator() -> NetConfig:
    return NetConfig(name="dcgan", kwargs={"nz": 256})


def build_generator(net: NetConfig, info: DatasetInfo, device: torch.device) -> nn.Module:
    """A generator of ``info``'s images (``create_generator`` with the dataset's shape and
    classes), checked to make what the teacher takes."""
    kwargs = {"nz": 256, **net.kwargs}
    if kwargs.get("native_size") == "data":  # the resolution the dataset's pictures were taken at, if resized
        kwargs["native_size"] = info.native_size
    if kwargs.get("output") == "pixels":  # pixels in [0, 1], normalised as the dataset's are
        kwargs = {"mean": info.mean, "std": info.std, **kwargs}
    try:
        generator = create_generator(net.name, img_shape=info.shape, num_classes=info.num_classes, **kwargs)
    except ShapeError as exc:
        raise ShapeError(f"generator '{net.name}' cannot make dataset '{info.name}' images: {exc}") from None
    except (TypeError, ValueError) as exc:  # an unknown or bad option in net.kwargs
        raise ConfigError(f"generator '{net.name}': {exc}") from None
    y = torch.zeros(2, dtype=torch.long) if getattr(generator, "conditional", False) else None
    # in train mode, as generators always run (their last BatchNorm uses batch statistics)
    images, _ = probe(generator, torch.randn(2, generator.nz), forward=lambda g, z: g(z, y), eval_mode=False)
    if tuple(images.shape[1:]) != tuple(info.shape):
        raise ShapeError(f"generator '{net.name}' makes {tuple(images.shape[1:])} images; the teacher and dataset "
                         f"'{info.name}' take {tuple(info.shape)}")
    return generator.to(device)


class Synthesizer:
    """A synthesis strategy: makes batches of ``info``'s shape per its options (``cfg``).
    ``last`` is the latest batch made (detached, without augmentation), the one shown in
    TensorBoard and reused by ``same`` phases; ``replay`` samples the image pool (images and the
    classes asked for, -1 for none). ``runtime`` is the run's (:class:`dfkd.loop.runtime.Runtime`:
    its device and autocast)."""

    Options: ClassVar[type[SynthesisConfig]] = SynthesisConfig
    runs_as_phase: ClassVar[bool] = False      # makes its batches in a 'synthesizer' phase
    draws: ClassVar[tuple[str, ...]] = ()      # batch sources other phases draw from it

    def __init__(self, cfg: SynthesisConfig, info: DatasetInfo, runtime):
        self.cfg, self.runtime = cfg, runtime
        self.shape, self.num_classes, self.device = info.shape, info.num_classes, runtime.device
        self.pool = RingBuffer(cfg.pool_size, self.device) if cfg.pool_size else None
        self.heldout: RingBuffer | None = None  # synthetic samples no student trains on (hold_out)
        self.augment = build_augment(cfg.augment, self.shape, info.mean, info.std)
        self.last: Batch | None = None

    def sample_labels(self, n: int) -> torch.Tensor | None:
        """The classes to ask for: ``(n,)`` indices; or, for a batch superposed with probability
        ``mix_prob`` (Qimera), ``(n, mix_classes, classes)`` slots: slot j of sample i asks for one
        random class (repeats allowed) with a softmax(N(0, 1)) weight, a weighted one-hot row; the
        sample's soft label is the sum of its slots (:func:`soft_labels`). The generator takes the
        slots (a latent each, as Qimera draws them), the batch and its losses the soft label."""
        if self.cfg.labels == "none":
            return None
        if self.cfg.mix_prob and float(torch.rand(())) < self.cfg.mix_prob:
            k = self.cfg.mix_classes
            classes = torch.randint(self.num_classes, (n, k), device=self.device)
            weights = torch.softmax(torch.randn(n, k, device=self.device), dim=1)
            return F.one_hot(classes, self.num_classes).to(weights.dtype) * weights.unsqueeze(2)
        if self.cfg.labels == "balanced":  # every class equally often, in random order
            return (torch.arange(n, device=self.device) % self.num_classes)[torch.randperm(n, device=self.device)]
        return torch.randint(self.num_classes, (n,), device=self.device)

    def build_generator(self, net: NetConfig, info: DatasetInfo) -> nn.Module:
        """The strategy's generator, on the run's device and in its memory format (channels_last on
        CPU synthesis: the last convolution to few channels runs several times faster there)."""
        return self.runtime.prepare(build_generator(net, info, self.device))

    def latents(self, generator: nn.Module, n: int, labels: torch.Tensor | None = None) -> torch.Tensor:
        """N(0, 1) latents: ``(n, nz)``, or ``(n, slots, nz)`` for superposed ``labels``, one a slot."""
        slots = (labels.shape[1],) if labels is not None and labels.dim() == 3 else ()
        return torch.randn(n, *slots, generator.nz, device=self.device)

    def keep(self, batch: Batch) -> None:
        """Put ``batch`` in the pool for replay (nothing without a pool); with a held-out store, its
        first sixteenth goes there instead, never to be replayed."""
        if self.pool is None:
            return
        images, labels = batch.images, batch.labels
        labels = labels.argmax(1) if labels is not None and labels.dim() == 2 else labels
        if self.heldout is not None:
            k = max(1, len(images) // HELD_OUT_SHARE)
            self.heldout.add(images=images[:k])
            images, labels = images[k:], labels[k:] if labels is not None else None
        self.pool.add(images=images, labels=labels)

    def hold_out(self, capacity: int) -> None:
        """Keep up to ``capacity`` synthetic samples aside that no phase trains on: what a run with no
        labeled image measures the student's agreement with the teacher on."""
        self.heldout = RingBuffer(capacity, self.device)

    def held_out(self, generator: nn.Module | None = None) -> torch.Tensor | None:
        """The held-out synthetic samples (None before any was made)."""
        return self.heldout.columns["images"][: len(self.heldout)] if self.heldout and len(self.heldout) else None

    def replay(self) -> Batch:
        if not len(self.pool):
            raise ConfigError("the image pool is empty: put a 'synthesizer' phase before the phases that replay it")
        index = self.pool.random_index(self.cfg.batch_size)
        images, labels = self.pool.rows("images", index), self.pool.rows("labels", index)
        return Batch(images, labels if bool((labels >= 0).all()) else None, "pool")

    def draw(self, source: str, module: nn.Module, player, trains_generator: bool) -> Batch:
        raise ConfigError(f"synthesis.kind '{self.cfg.kind}' makes batches in a 'synthesizer' phase; "
                          f"'{source}' batches need synthesis.kind generator")

    def state_dict(self) -> dict:
        state = {"pool": self.pool.state_dict()} if self.pool is not None else {}
        return {**state, "heldout": self.heldout.state_dict()} if self.heldout is not None else state

    def load_state_dict(self, state: dict) -> None:
        if self.pool is not None:
            self.pool.load_state_dict(state["pool"])
        if self.heldout is not None and "heldout" in state:
            self.heldout.load_state_dict(state["heldout"])


class PerBatchSynthesizer(Synthesizer):
    """A strategy that optimizes each batch from scratch for a number of inner steps (the
    ``synthesizer`` phase's ``steps``); the kept batch (the last, or the best with
    ``keep: best``) enters the pool. Subclasses say what is optimized (``variables``) and may
    act once a batch is done (``finish``)."""

    Options = PerBatchOptions
    runs_as_phase = True

    def variables(self, n: int, labels: torch.Tensor | None) -> tuple[list, Callable[[], torch.Tensor]]:
        """The optimizer's parameter groups for one batch, and how to make the images from them."""
        raise NotImplementedError

    def gradients_ready(self) -> None:
        """After an inner step's backward, before its optimizer step."""

    def after_step(self) -> None:
        """After an inner step's optimizer step."""

    def finish(self) -> None:
        """After a batch's inner steps."""

    def kept(self) -> None:
        """The step just taken made the batch that will be kept (so far)."""

    def synthesize(self, run_step: Callable[[Batch], torch.Tensor], steps: int,
                   after_backward: Callable[[], None] = lambda: None, on_keep: Callable[[], None] = lambda: None
                   ) -> None:
        """Optimize one batch for ``steps`` inner steps; ``run_step(batch)`` returns the weighted
        loss of the phase's terms on ``batch``; ``on_keep()`` is told when a step's batch becomes
        the one kept. The kept batch goes to the pool."""
        n = self.cfg.batch_size
        labels = self.sample_labels(n)
        params, make = self.variables(n, labels)
        optimizer = build_optimizer(params, self.cfg.inner)
        best, best_loss = None, float("inf")
        for _ in range(steps):
            with self.runtime.autocast():
                images = make().float()
            loss = run_step(Batch(self.augment(images), soft_labels(labels), "synthetic", plain=images))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.gradients_ready()
            optimizer.step()
            self.after_step()
            after_backward()
            # CMI keeps the best batch of the inner loop (reading the loss waits for the device), the others
            # the last one
            value = loss.item() if self.cfg.keep == "best" else None
            if value is None or value < best_loss:
                best, best_loss = images.detach(), value
                self.kept()
                on_keep()
        self.finish()
        self.last = Batch(best, soft_labels(labels), "synthetic")
        self.keep(self.last)
