"""What every synthesis strategy shares: the image pool, augmentation, label sampling, state."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ..config import NetConfig, SynthesisConfig
from ..data import DatasetInfo
from ..errors import ConfigError, ShapeError
from ..phases import Batch, build_augment
from ..players import build_optimizer
from ..registry import Registry
from ..runtime import Runtime
from ..taps import probe

SYNTHESIZERS: Registry[type["Synthesizer"]] = Registry("synthesis kind")


def build_generator(net: NetConfig, info: DatasetInfo, device: torch.device) -> nn.Module:
    """A generator of ``info``'s images (``create_generator`` with the dataset's shape and
    classes), checked to make what the teacher takes."""
    from generators import create_generator

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


class ImagePool:
    """Synthetic images kept for replay, newest replacing oldest once full (FIFO)."""

    def __init__(self, capacity: int, shape: tuple[int, ...], device: torch.device):
        self.capacity = capacity
        self.images = torch.empty((capacity, *shape), device=device)
        self.labels = torch.full((capacity,), -1, dtype=torch.long, device=device)
        self.count = 0      # filled slots
        self.cursor = 0     # next slot to write

    def __len__(self) -> int:
        return self.count

    def add(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> None:
        images = images.detach()[-self.capacity:]  # a batch larger than the pool keeps its newest images
        labels = labels[-self.capacity:] if labels is not None else None
        n = images.shape[0]
        index = (self.cursor + torch.arange(n, device=images.device)) % self.capacity
        self.images[index] = images.to(self.images.dtype)
        self.labels[index] = labels.detach() if labels is not None else -1
        self.cursor = (self.cursor + n) % self.capacity
        self.count = min(self.capacity, self.count + n)

    def sample(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.count == 0:
            raise ConfigError("the image pool is empty: put a 'synthesizer' phase before the phases that replay it")
        index = torch.randint(self.count, (n,), device=self.images.device)
        return self.images[index], self.labels[index]

    def state_dict(self) -> dict:
        return {"images": self.images[: self.count].cpu(), "labels": self.labels[: self.count].cpu(),
                "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        n = state["images"].shape[0]
        self.images[:n] = state["images"].to(self.images.device)
        self.labels[:n] = state["labels"].to(self.labels.device)
        self.count, self.cursor = n, state["cursor"]


class Synthesizer:
    """A synthesis strategy: makes batches of ``info``'s shape per ``SynthesisConfig``.
    ``last`` is the latest batch made (detached, without augmentation), the one shown in
    TensorBoard and reused by ``same`` phases; ``replay`` samples the pool."""

    def __init__(self, cfg: SynthesisConfig, info: DatasetInfo, runtime: Runtime):
        self.cfg, self.runtime = cfg, runtime
        self.shape, self.num_classes, self.device = info.shape, info.num_classes, runtime.device
        self.pool = ImagePool(cfg.pool_size, self.shape, self.device) if cfg.pool_size else None
        self.augment = build_augment(cfg.augment, self.shape)
        self.last: Batch | None = None

    def sample_labels(self, n: int) -> torch.Tensor | None:
        """The classes to ask for: ``(n,)`` indices; or, for a batch superposed with probability
        ``mix_prob`` (Qimera), ``(n, classes)`` weights: each sample mixes ``mix_classes`` random
        classes (repeats allowed) with softmax(N(0, 1)) weights, its soft label."""
        if self.cfg.labels == "none":
            return None
        if self.cfg.mix_prob and float(torch.rand(())) < self.cfg.mix_prob:
            k = self.cfg.mix_classes
            classes = torch.randint(self.num_classes, (n, k), device=self.device)
            weights = torch.softmax(torch.randn(n, k, device=self.device), dim=1)
            return torch.zeros(n, self.num_classes, device=self.device).scatter_add_(1, classes, weights)
        if self.cfg.labels == "balanced":  # every class equally often, in random order
            return (torch.arange(n, device=self.device) % self.num_classes)[torch.randperm(n, device=self.device)]
        return torch.randint(self.num_classes, (n,), device=self.device)

    def latents(self, generator: nn.Module, n: int) -> torch.Tensor:
        return torch.randn(n, generator.nz, device=self.device)

    def keep(self, batch: Batch) -> None:
        """Put ``batch`` in the pool for replay (nothing without a pool)."""
        if self.pool is not None:
            labels = batch.labels
            self.pool.add(batch.images, labels.argmax(1) if labels is not None and labels.dim() == 2 else labels)

    def replay(self) -> Batch:
        images, labels = self.pool.sample(self.cfg.batch_size)
        return Batch(images, labels if bool((labels >= 0).all()) else None, "pool")

    def draw(self, source: str, module: nn.Module, player, trains_generator: bool) -> Batch:
        raise ConfigError(f"synthesis.kind '{self.cfg.kind}' makes batches in a 'synthesizer' phase; "
                          f"'{source}' batches need synthesis.kind generator")

    def state_dict(self) -> dict:
        return {"pool": self.pool.state_dict()} if self.pool is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.pool is not None:
            self.pool.load_state_dict(state["pool"])


class PerBatchSynthesizer(Synthesizer):
    """A strategy that optimizes each batch from scratch for a number of inner steps (the
    ``synthesizer`` phase's ``steps``); the kept batch (the last, or the best with
    ``keep: best``) enters the pool. Subclasses say what is optimized (``variables``) and may
    act once a batch is done (``finish``)."""

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
            loss = run_step(Batch(self.augment(images), labels, "synthetic", plain=images))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.gradients_ready()
            optimizer.step()
            self.after_step()
            after_backward()
            # CMI keeps the best batch of the inner loop, the others the last one
            value = loss.item()
            if self.cfg.keep == "last" or value < best_loss:
                best, best_loss = images.detach(), value
                self.kept()
                on_keep()
        self.finish()
        self.last = Batch(best, labels, "synthetic")
        self.keep(self.last)
