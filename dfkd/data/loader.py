"""The batch loader: whole batches of normalized images sliced from a dataset's tensors, shuffled
and augmented as a function of (seed, epoch) only, sharded across processes like torch's
DistributedSampler."""
from __future__ import annotations

import math
from typing import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from dfkd.data.datasets import AUGMENTATIONS, ImageTensorDataset
from dfkd.data.pairs import standardize
from dfkd_base.errors import ConfigError

# Padding of the CIFAR-style random crop, in pixels on each side.
CROP_PADDING = 4


def augment_batch(x: torch.Tensor, policy: str, generator: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding) and/or horizontal flip, drawn independently per image.

    ``x`` holds [0, 1] pixels, so the padding is black as in torchvision's
    ``RandomCrop(padding=4)``. Random numbers come from the CPU ``generator`` so that
    runs reproduce whatever device the batch is on.
    """
    if policy == "none":
        return x
    if policy not in AUGMENTATIONS:
        raise ConfigError(f"unknown augmentation '{policy}' (known: {', '.join(AUGMENTATIONS)})")
    n, channels, height, width = x.shape
    padded = F.pad(x, (CROP_PADDING,) * 4)
    # Offsets of each crop's top-left corner in the padded image; gathering with
    # broadcast index tensors crops every image of the batch in one operation.
    top = torch.randint(0, 2 * CROP_PADDING + 1, (n,), generator=generator).to(x.device)
    left = torch.randint(0, 2 * CROP_PADDING + 1, (n,), generator=generator).to(x.device)
    rows = (top[:, None] + torch.arange(height, device=x.device))[:, None, :, None]
    cols = (left[:, None] + torch.arange(width, device=x.device))[:, None, None, :]
    batch_index = torch.arange(n, device=x.device)[:, None, None, None]
    channel_index = torch.arange(channels, device=x.device)[None, :, None, None]
    x = padded[batch_index, channel_index, rows, cols]
    if policy == "crop_flip":
        flip = (torch.rand(n, generator=generator) < 0.5).to(x.device)
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


def epoch_seed(seed: int, epoch: int) -> int:
    """A well-mixed 32-bit seed for one epoch of one run.

    ``seed + epoch`` would make run 1's epoch 0 replay run 0's epoch 1, and packing the
    seed into high bits does not help because torch's CPU generator keeps only the low
    32 bits of a seed; SeedSequence hashes the pair instead.
    """
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


class TensorLoader:
    """Batches of ``(normalized images, labels)`` on ``device`` from an :class:`ImageTensorDataset`.

    ``last_index``: the dataset indices of the batch yielded last (CRD's memory is per sample);
    with ``class_pairs``, ``last_partners``: for each of its samples another of the same class,
    augmented and normalized alike (CS-KD).

    Each pass over the loader is one epoch. With ``shuffle`` or ``augment``, the
    randomness of epoch ``e`` is a function of ``(seed, e)`` only, so a run
    reproduces even when an epoch is abandoned half-way. Assign ``epoch`` to resume.

    ``shard=(rank, world_size)``: every process draws the same permutation (same seed) and
    takes every world_size-th sample of it, as torch's DistributedSampler does; the tail that
    does not divide evenly is dropped so that all ranks run the same number of batches.
    """

    def __init__(
        self,
        dataset: ImageTensorDataset,
        batch_size: int,
        shuffle: bool = False,
        augment: bool = False,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        seed: int = 0,
        shard: tuple[int, int] = (0, 1),
        class_pairs: bool = False,
    ):
        if batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
        if seed < 0:
            raise ConfigError(f"seed must be non-negative, got {seed}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.seed = seed
        self.rank, self.world_size = shard
        self.epoch = 0
        self.last_index: torch.Tensor | None = None
        self.class_pairs = class_pairs
        self.last_partners: torch.Tensor | None = None
        self.last_partner_index: torch.Tensor | None = None
        self._by_class: list[torch.Tensor] | None = None

    def _partners(self, index: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """For each sample, another sample of its class drawn at random (CS-KD's pair sampler)."""
        labels = self.dataset.labels
        if self._by_class is None:
            self._by_class = [(labels == c).nonzero().squeeze(1) for c in range(int(labels.max()) + 1)]
        pool = [self._by_class[int(y)] for y in labels[index]]
        picks = torch.randint(2**62, (len(index),), generator=generator)
        return torch.stack([members[int(p % len(members))] for members, p in zip(pool, picks)])

    def _samples(self) -> int:
        return len(self.dataset) // self.world_size if self.world_size > 1 else len(self.dataset)

    def __len__(self) -> int:
        round_ = math.floor if self.drop_last else math.ceil
        return round_(self._samples() / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        self.epoch += 1
        n = len(self.dataset)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        order = order[self.rank :: self.world_size][: self._samples()]
        # pairs of two modalities get no augmentation: one crop cannot be drawn for both shapes
        policy = self.dataset.info.augment if self.augment and self.dataset.paired is None else "none"
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = self.last_index = order[start : start + self.batch_size]
            images = self.dataset.images[index].to(self.device).float() / 255
            images = augment_batch(images, policy, generator)
            labels = self.dataset.labels[index].to(self.device)
            if self.class_pairs:
                self.last_partner_index = self._partners(index, generator)
                self.last_partners = self.dataset.normalize(augment_batch(
                    self.dataset.images[self.last_partner_index].to(self.device).float() / 255, policy, generator))
            if self.dataset.paired is None:
                yield self.dataset.normalize(images), labels
            else:
                yield self.dataset.normalize(images), labels, standardize(self.dataset.paired[index].to(self.device))

    def infinite(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Loop over epochs forever, for training counted in iterations rather than epochs."""
        if len(self) == 0:
            raise ConfigError(
                f"{self.dataset.info.name}/{self.dataset.split}: {len(self.dataset)} samples make no batch "
                f"of {self.batch_size} with drop_last=True"
            )
        while True:
            yield from self
