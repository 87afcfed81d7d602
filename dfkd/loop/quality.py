"""How good and how varied synthetic samples are, measured in the teacher's feature space.

A data-free student can reach its teacher's accuracy on samples that look nothing like the data;
these measures put numbers on the gap, on a fixed sample count so that runs compare:

- **teacher-FID**: the Fréchet distance between synthetic and evaluation-split samples' teacher
  embeddings (the input of the teacher's last Linear layer), computed by torchmetrics'
  ``FrechetInceptionDistance`` with the teacher in Inception's place;
- **precision, recall, density, coverage** (Naeem et al., ICML 2020, k = 5) of the synthetic
  embeddings against the real ones: how many synthetic samples fall in the real manifold's k-NN
  balls, and how much of it they cover. No maintained library in the dependencies has them
  (torchmetrics does not; the authors' ``prdc`` is NumPy-only and unmaintained), so they are the
  few lines of ``prdc`` below;
- **diversity**: the mean pairwise distance between synthetic embeddings, beside the same for
  the real samples.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class _Identity(nn.Module):
    """torchmetrics' FID takes a feature extractor; the features here are computed beforehand."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """The Fréchet distance between Gaussians fitted to two feature sets (N, d)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=_Identity(real.shape[1]))
    metric.update(real.double().cpu(), real=True)
    metric.update(fake.double().cpu(), real=False)
    return float(metric.compute())


def prdc(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> dict[str, float]:
    """Precision, recall, density and coverage of ``fake`` against ``real`` features (Naeem et
    al. 2020): a sample's k-NN radius is the distance to its k-th nearest neighbour in its own set."""
    real, fake = real.double(), fake.double()
    real_radius = torch.cdist(real, real).kthvalue(k + 1, dim=1).values  # k + 1: each point is its own nearest
    fake_radius = torch.cdist(fake, fake).kthvalue(k + 1, dim=1).values
    distance = torch.cdist(real, fake)                                    # (real, fake)
    inside = distance <= real_radius[:, None]                             # fake j in real i's ball
    return {"precision": float(inside.any(0).double().mean()),
            "recall": float((distance <= fake_radius[None, :]).any(1).double().mean()),
            "density": float(inside.sum(0).double().mean() / k),
            "coverage": float((distance.min(1).values <= real_radius).double().mean())}


def diversity(features: torch.Tensor) -> float:
    """Mean pairwise Euclidean distance within a set of features."""
    return float(torch.pdist(features.double()).mean())


class SampleQuality:
    """The measures of synthetic samples against a fixed set of evaluation-split samples whose
    features are computed once; ``real`` None: diversity only (a run that reads no real data).
    ``embed(images)`` gives the teacher's embedding of images and its logits
    (:func:`dfkd.nets.taps.embed`)."""

    def __init__(self, embed: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]], real: torch.Tensor | None,
                 k: int = 5):
        self.embed, self.k = embed, k
        self.real = embed(real)[0] if real is not None else None
        self.real_diversity = diversity(self.real) if self.real is not None else None

    def __call__(self, synthetic: torch.Tensor) -> dict[str, float]:
        return self.measure(self.embed(synthetic)[0])

    def measure(self, fake: torch.Tensor) -> dict[str, float]:
        """The measures of synthetic samples' embeddings ``fake``."""
        out = {"quality/diversity": diversity(fake)}
        if self.real is not None:
            out["quality/diversity_real"] = self.real_diversity
            out["quality/teacher_fid"] = frechet_distance(self.real, fake)
            out.update({f"quality/{name}": value for name, value in prdc(self.real, fake, self.k).items()})
        return out
