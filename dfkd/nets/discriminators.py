"""Discriminators and GAN objectives for adversarial distillation.

A discriminator tells the teacher's view of a batch ("real": its logits, probabilities or a
tapped feature map) from the student's ("fake"). The student, trained to fool it, learns a KD
loss instead of being handed one (Wang et al. 2018; Xu et al. 2018; MEAL; AFD).

Networks (``create_discriminator(name, in_shape, num_classes, **kwargs)``):

``mlp``         a vector (logits or probabilities) → hidden layers → one score.
``projection``  the same body, label-conditional by projection (Miyato & Koyama 2018): the score
                gains ⟨embed(y), φ(x)⟩, so it judges "is this a teacher output *for class y*".
``conv``        a feature map → a stack of 1×1 convolutions → a score per position, averaged
                (MEAL's block-wise discriminators; AFD's feature-map discriminators).

Any of them takes ``spectral_norm=True``. Adapters map a student feature map onto the teacher's
shape when the two differ (``create_adapter``); they are trained with the student.

Objectives (``OBJECTIVES``): ``vanilla`` (BCE; the generator minimizes log(1 − D)),
``nonsaturating`` (BCE; the generator maximizes log D), ``lsgan``, ``hinge`` and ``wgan-gp``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from dfkd_base.errors import ConfigError, ShapeError
from dfkd_base.registry import Registry

DISCRIMINATORS: Registry[Callable[..., nn.Module]] = Registry("discriminator")


def _maybe_sn(layer: nn.Module, spectral_norm: bool) -> nn.Module:
    return nn.utils.parametrizations.spectral_norm(layer) if spectral_norm else layer


def _check_vector(name: str, in_shape: tuple[int, ...]) -> int:
    if len(in_shape) != 1:
        raise ShapeError(f"discriminator '{name}' takes vectors (logits or probabilities), got shape "
                         f"{tuple(in_shape)}; use 'conv' for feature maps")
    return in_shape[0]


class MLPDiscriminator(nn.Module):
    """Vector → [Linear → LeakyReLU(0.2)] × len(hidden) → Linear → score; with ``num_classes``,
    a projection discriminator."""

    def __init__(self, in_features: int, hidden: tuple[int, ...] = (256, 256), spectral_norm: bool = False,
                 num_classes: int | None = None):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [_maybe_sn(nn.Linear(width, h), spectral_norm), nn.LeakyReLU(0.2)]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = _maybe_sn(nn.Linear(width, 1), spectral_norm)
        self.embed = _maybe_sn(nn.Embedding(num_classes, width), spectral_norm) if num_classes else None
        self.conditional = num_classes is not None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        h = self.body(x.flatten(1))
        score = self.head(h).squeeze(1)
        if self.embed is not None:
            if labels is None:
                raise ConfigError("a projection discriminator needs labels: set the term's 'labels' to "
                                  "'batch' or 'teacher'")
            score = score + (self.embed(labels) * h).sum(1)
        return score


class ConvDiscriminator(nn.Module):
    """Feature map (C, H, W) → [1×1 conv → LeakyReLU(0.2)] × len(hidden) → 1×1 conv → the mean
    score over positions."""

    def __init__(self, in_channels: int, hidden: tuple[int, ...] = (64, 64), spectral_norm: bool = False):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_channels
        for h in hidden:
            layers += [_maybe_sn(nn.Conv2d(width, h, 1), spectral_norm), nn.LeakyReLU(0.2)]
            width = h
        layers.append(_maybe_sn(nn.Conv2d(width, 1, 1), spectral_norm))
        self.net = nn.Sequential(*layers)
        self.conditional = False

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return self.net(x).mean(dim=(1, 2, 3))


@DISCRIMINATORS.register("mlp")
def mlp(in_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (256, 256),
        spectral_norm: bool = False) -> nn.Module:
    return MLPDiscriminator(_check_vector("mlp", in_shape), tuple(hidden), spectral_norm)


@DISCRIMINATORS.register("projection")
def projection(in_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (256, 256),
               spectral_norm: bool = False) -> nn.Module:
    return MLPDiscriminator(_check_vector("projection", in_shape), tuple(hidden), spectral_norm, num_classes)


@DISCRIMINATORS.register("conv")
def conv(in_shape: tuple[int, ...], num_classes: int, hidden: tuple[int, ...] = (64, 64),
         spectral_norm: bool = False) -> nn.Module:
    if len(in_shape) != 3:
        raise ShapeError(f"discriminator 'conv' takes feature maps (C, H, W), got shape {tuple(in_shape)}; "
                         f"use 'mlp' or 'projection' for vectors")
    return ConvDiscriminator(in_shape[0], tuple(hidden), spectral_norm)


def create_discriminator(name: str, in_shape: tuple[int, ...], num_classes: int, **kwargs) -> nn.Module:
    try:
        return DISCRIMINATORS.get(name)(tuple(in_shape), num_classes, **kwargs)
    except TypeError as exc:  # an unknown keyword in net.kwargs
        raise ConfigError(f"discriminator '{name}': {exc}") from None


class Adapter(nn.Module):
    """Student feature map → teacher's shape: a 1×1 convolution with BatchNorm for the channels,
    then bilinear resizing when the spatial sizes differ. A vector → vector adapter is linear.
    ``relu``: a ReLU after the BatchNorm, as the hint regressor of FitNets' code, RepDistiller and
    mdistiller (ConvReg) has, so that it regresses post-activation maps with non-negative outputs."""

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...], relu: bool = False):
        super().__init__()
        self.in_shape, self.out_shape = tuple(in_shape), tuple(out_shape)
        if len(in_shape) == 3 and len(out_shape) == 3:
            self.proj = nn.Sequential(nn.Conv2d(in_shape[0], out_shape[0], 1, bias=False), nn.BatchNorm2d(out_shape[0]),
                                      *([nn.ReLU()] if relu else []))
        elif len(in_shape) == 1 and len(out_shape) == 1:
            linear = nn.Linear(in_shape[0], out_shape[0])
            self.proj = nn.Sequential(linear, nn.ReLU()) if relu else linear
        else:
            raise ShapeError(f"no adapter maps a student feature of shape {self.in_shape} onto the teacher's "
                             f"{self.out_shape}: tap layers of the same kind (both feature maps or both vectors)")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        if x.dim() == 4 and tuple(x.shape[2:]) != self.out_shape[1:]:
            x = F.interpolate(x, size=self.out_shape[1:], mode="bilinear", align_corners=False)
        return x


def create_adapter(in_shape: tuple[int, ...], out_shape: tuple[int, ...], **kwargs) -> nn.Module:
    try:
        return Adapter(in_shape, out_shape, **kwargs)
    except TypeError as exc:  # an unknown keyword in net.kwargs
        raise ConfigError(f"adapter: {exc}") from None


# --------------------------------------------------------------------------------------
# GAN objectives
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Objective:
    """``d_loss(real_scores, fake_scores)`` for the discriminator; ``g_loss(fake_scores)`` for
    the player it judges (the student); ``gradient_penalty``: whether WGAN-GP's term applies."""

    d_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    g_loss: Callable[[torch.Tensor], torch.Tensor]
    gradient_penalty: bool = False
    threshold: float = 0.0              # a score above it is a "real" verdict (for accuracy)


def _bce(scores: torch.Tensor, target: float) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(scores, torch.full_like(scores, target))


def _bce_d(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    return _bce(real, 1.0) + _bce(fake, 0.0)


OBJECTIVES: dict[str, Objective] = {
    # saturating minimax: G minimizes log(1 − D(fake)) = −BCE(fake, 0)
    "vanilla": Objective(_bce_d, lambda fake: -_bce(fake, 0.0)),
    "nonsaturating": Objective(_bce_d, lambda fake: _bce(fake, 1.0)),
    "lsgan": Objective(lambda real, fake: 0.5 * ((real - 1) ** 2).mean() + 0.5 * (fake ** 2).mean(),
                       lambda fake: 0.5 * ((fake - 1) ** 2).mean(), threshold=0.5),
    "hinge": Objective(lambda real, fake: F.relu(1 - real).mean() + F.relu(1 + fake).mean(),
                       lambda fake: -fake.mean()),
    "wgan-gp": Objective(lambda real, fake: fake.mean() - real.mean(), lambda fake: -fake.mean(),
                         gradient_penalty=True),
}


def gradient_penalty(discriminator: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                     labels: torch.Tensor | None = None) -> torch.Tensor:
    """WGAN-GP (Gulrajani et al. 2017): E[(‖∇D(x̂)‖ − 1)²] at random interpolates x̂ of real and
    fake inputs, differentiable in the discriminator's parameters."""
    alpha = torch.rand((real.shape[0],) + (1,) * (real.dim() - 1), device=real.device, dtype=real.dtype)
    mixed = (alpha * real.detach() + (1 - alpha) * fake.detach()).requires_grad_(True)
    scores = discriminator(mixed, labels)
    (grad,) = torch.autograd.grad(scores.sum(), mixed, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


class _GradReverse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return -grad


def grad_reverse(x: torch.Tensor) -> torch.Tensor:
    """Identity forward, negated gradient backward: one backward pass trains the discriminator
    to minimize a loss and what feeds it to maximize it (MEAL's single-step adversarial update)."""
    return _GradReverse.apply(x)
