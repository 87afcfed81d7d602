"""Synthesis strategies: where data-free batches come from.

``generator``  a generator *player* trained adversarially by the engine's phases (DAFL, DFAD,
               ZSKT, DFQ); ``fresh`` batches are new samples.
``inversion``  pixels of a batch optimized for k steps from noise (DeepInversion, ADI); the
               result enters the image pool.
``reinit``     a generator and its latents re-initialized for every batch and optimized for k
               steps; the best batch enters the pool (CMI).
``meta``       a shared generator cloned per batch, the clone and latents optimized for a few
               steps, then the shared weights meta-updated by Reptile or first-order MAML; the
               batch enters the pool (Fast-DFKD).

The per-batch strategies run as the pseudo-player ``synthesizer``: its phase's ``steps`` are the
inner optimization steps for one batch, its ``losses`` the synthesis objective.
"""
from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Callable

import torch
from torch import nn

from .checkpoint import unwrap
from .config import AugmentConfig, PhaseConfig, SynthesisConfig
from .errors import ConfigError

if TYPE_CHECKING:
    from .engine import Batch, Engine

SYNTHESIZER = "synthesizer"  # the pseudo-player name of per-batch synthesis phases


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


def build_augment(cfg: AugmentConfig, shape: tuple[int, int, int]) -> Callable[[torch.Tensor], torch.Tensor]:
    """Differentiable augmentation of synthetic batches (gradients flow back to the synthesis
    variables). Brightness and contrast are done here rather than with kornia's ColorJitter,
    which clamps to [0, 1] (synthesis works in the normalized space) and whose saturation and
    hue need 3 channels; these two work on any number of channels."""
    import kornia.augmentation as K

    ops: list[nn.Module] = []
    if cfg.crop_padding:
        ops.append(K.RandomCrop(shape[1:], padding=cfg.crop_padding))
    if cfg.flip:
        ops.append(K.RandomHorizontalFlip())
    kornia_ops = nn.Sequential(*ops)

    def augment(x: torch.Tensor) -> torch.Tensor:
        if cfg.jitter:  # DeepInversion's random roll, the same shift for the whole batch
            dx, dy = (int(v) for v in torch.randint(-cfg.jitter, cfg.jitter + 1, (2,)))
            x = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
        x = kornia_ops(x) if ops else x
        if cfg.brightness or cfg.contrast:
            n = x.shape[0]
            u = lambda: torch.rand(n, 1, 1, 1, device=x.device) * 2 - 1  # noqa: E731  U(-1, 1) per image
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * (1 + cfg.contrast * u()) + mean + cfg.brightness * u()
        return x

    return augment


def build_batch_transform(phase: PhaseConfig, shape: tuple[int, int, int]) -> Callable[["Batch"], "Batch"] | None:
    """The per-phase view of a batch: ``phase.augment`` then ``phase.mixup``; None when neither is
    set. Mixup pairs each image with another of the same batch, weighted by λ ~ Beta(α, α) per
    image; the mixed batch has no labels, since its targets come from the teacher."""
    if phase.augment is None and not phase.mixup:
        return None
    augment = build_augment(phase.augment, shape) if phase.augment is not None else None
    beta = torch.distributions.Beta(phase.mixup, phase.mixup) if phase.mixup else None

    def transform(batch: "Batch") -> "Batch":
        from .engine import Batch

        images, labels, source = batch.images, batch.labels, batch.source
        if augment is not None:
            images = augment(images)
        if beta is not None:
            lam = beta.sample((images.shape[0], 1, 1, 1)).to(images.device, images.dtype)
            partner = images[torch.randperm(images.shape[0], device=images.device)]
            images, labels, source = lam * images + (1 - lam) * partner, None, f"{source}+mixup"
        return Batch(images, labels, source)

    return transform


def reset_parameters(module: nn.Module) -> None:
    for m in module.modules():
        if m is not module and hasattr(m, "reset_parameters"):
            m.reset_parameters()


class Synthesizer:
    """Produces synthetic batches for the engine according to ``SynthesisConfig``."""

    def __init__(self, cfg: SynthesisConfig, engine: "Engine"):
        self.cfg, self.engine = cfg, engine
        self.shape = engine.info.shape
        self.num_classes = engine.info.num_classes
        self.device = engine.device
        self.pool = ImagePool(cfg.pool_size, self.shape, self.device) if cfg.pool_size else None
        self.augment = build_augment(cfg.augment, self.shape)
        self.last: Batch | None = None
        self.generator: nn.Module | None = None      # reinit / meta: owned here, not a player
        self.outer: torch.optim.Optimizer | None = None
        if cfg.kind in ("reinit", "meta"):
            self.generator = engine.build_generator(cfg.net).to(self.device)
        if cfg.kind == "meta":
            from .engine import build_optimizer

            self.outer = build_optimizer(self.generator.parameters(), cfg.outer)

    # ----------------------------------------------------------- helpers
    def sample_labels(self, n: int) -> torch.Tensor | None:
        if self.cfg.labels == "none":
            return None
        if self.cfg.labels == "balanced":  # every class equally often, in random order
            return (torch.arange(n, device=self.device) % self.num_classes)[torch.randperm(n, device=self.device)]
        return torch.randint(self.num_classes, (n,), device=self.device)

    def latents(self, generator: nn.Module, n: int) -> torch.Tensor:
        return torch.randn(n, generator.nz, device=self.device)

    # ----------------------------------------------------------- generator player (fresh / same)
    def fresh(self, generator: nn.Module, train_generator: bool) -> "Batch":
        from .engine import Batch

        n = self.cfg.batch_size
        labels = self.sample_labels(n)
        net = unwrap(generator)  # the network's attributes, not the DDP wrapper's
        if getattr(net, "conditional", False) and labels is None:
            labels = torch.randint(self.num_classes, (n,), device=self.device)
        with torch.set_grad_enabled(train_generator), self.engine.autocast():
            images = generator(self.latents(net, n), labels).float()
        batch = Batch(self.augment(images) if train_generator else images, labels, "synthetic")
        self.last = Batch(images.detach(), labels, "synthetic")
        if self.pool is not None and not train_generator:  # what the student saw, kept for replay
            self.pool.add(self.last.images, labels)
        return batch

    def replay(self) -> "Batch":
        from .engine import Batch

        images, labels = self.pool.sample(self.cfg.batch_size)
        return Batch(images, labels if bool((labels >= 0).all()) else None, "pool")

    # ----------------------------------------------------------- per-batch synthesis (the pseudo-player)
    def synthesize(self, run_step: Callable[["Batch"], torch.Tensor], steps: int,
                   after_backward: Callable[[], None] = lambda: None) -> None:
        """Optimize one batch for ``steps`` inner steps; ``run_step(batch)`` returns the weighted
        loss of the phase's terms on ``batch``. The kept batch goes to the pool."""
        from .engine import Batch, build_optimizer

        n = self.cfg.batch_size
        labels = self.sample_labels(n)
        if self.cfg.kind == "inversion":
            pixels = torch.randn((n, *self.shape), device=self.device, requires_grad=True)
            params, make = [pixels], (lambda: pixels)
        else:
            gen = self.generator
            if self.cfg.kind == "reinit":
                reset_parameters(gen)
            else:  # meta: optimize a copy; the shared weights move only in the outer step
                gen = copy.deepcopy(self.generator)
            z = self.latents(gen, n).requires_grad_(True)
            params = [{"params": list(gen.parameters())}, {"params": [z], "lr": self.cfg.latent_lr or self.cfg.inner.lr}]
            make = lambda: gen(z, labels)  # noqa: E731
        optimizer = build_optimizer(params, self.cfg.inner)
        best, best_loss = None, float("inf")
        for _ in range(steps):
            with self.engine.autocast():
                images = make().float()
            loss = run_step(Batch(self.augment(images), labels, "synthetic"))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            after_backward()
            # CMI keeps the best batch of the inner loop, the others the last one
            value = loss.item()
            if self.cfg.keep == "last" or value < best_loss:
                best, best_loss = images.detach(), value
        if self.cfg.kind == "meta":
            self._meta_update(gen)
        self.last = Batch(best, labels, "synthetic")
        if self.pool is not None:
            self.pool.add(best, labels)

    def _meta_update(self, fast: nn.Module) -> None:
        """Reptile: move the shared weights toward the adapted copy (gradient θ − θ'); first-order
        MAML: apply the copy's last gradient to the shared weights."""
        for p, q in zip(self.generator.parameters(), fast.parameters()):
            if self.cfg.meta == "reptile":
                p.grad = (p.detach() - q.detach()).clone()
            else:
                p.grad = None if q.grad is None else q.grad.detach().clone()
        self.outer.step()
        self.outer.zero_grad(set_to_none=True)
        # BatchNorm running statistics are not parameters: carry them over from the copy
        for b_shared, b_fast in zip(self.generator.buffers(), fast.buffers()):
            b_shared.copy_(b_fast)

    # ----------------------------------------------------------- state
    def state_dict(self) -> dict:
        state: dict = {}
        if self.pool is not None:
            state["pool"] = self.pool.state_dict()
        if self.generator is not None:
            state["generator"] = self.generator.state_dict()
        if self.outer is not None:
            state["outer"] = self.outer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        if self.pool is not None:
            self.pool.load_state_dict(state["pool"])
        if self.generator is not None:
            self.generator.load_state_dict(state["generator"])
        if self.outer is not None:
            self.outer.load_state_dict(state["outer"])
