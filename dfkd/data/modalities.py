"""Second modalities derived from a dataset's images, for cross-modal distillation.

A teacher trained on a dataset's images (modality A) teaches a student that sees modality B,
a sensor-like function of the same scene. Each built-in modality is a documented transform done
with kornia or torch on [0, 1] pixels, followed by per-image standardization (zero mean, unit
variance), so that B needs no statistics from any data set, real or synthetic:

``edges``    Sobel gradient magnitude (an edge sensor); differentiable.
``canny``    Canny edge map (binary, thresholded); not differentiable.
``blur``     Gaussian blur, σ = 2 px (a defocused, cheaper camera); differentiable.
``lowres``   4× box downsampling, then bilinear upsampling to the original size (a
             low-resolution sensor); differentiable.
``fourier``  log(1 + |FFT|) magnitude spectrum, centred (a frequency-domain sensor, as in
             Fourier-plane optics); differentiable.

A differentiable modality can be computed on synthetic images with gradients flowing back to
the generator, which is what data-free cross-modal distillation needs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from dfkd.data.datasets import DatasetInfo
from dfkd.data.pairs import standardize
from dfkd_base.errors import ConfigError
from dfkd_base.registry import Registry


@dataclass(frozen=True)
class Modality:
    name: str
    transform: Callable[[torch.Tensor], torch.Tensor]  # [0, 1] pixels (N, C, H, W) → (N, C', H', W')
    differentiable: bool

    def __call__(self, x: torch.Tensor, info: DatasetInfo) -> torch.Tensor:
        """Normalized images of ``info``'s dataset → standardized modality-B images."""
        mean = torch.tensor(info.mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        std = torch.tensor(info.std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
        return standardize(self.transform(x.float() * std + mean))  # no clamp: it would stop gradients


MODALITIES: Registry[Modality] = Registry("modality")


def _gray(x: torch.Tensor) -> torch.Tensor:
    return x if x.shape[1] == 1 else x.mean(dim=1, keepdim=True)


def _edges(x: torch.Tensor) -> torch.Tensor:
    from kornia.filters import sobel

    return sobel(_gray(x))


def _canny(x: torch.Tensor) -> torch.Tensor:
    from kornia.filters import canny

    with torch.no_grad():
        return canny(_gray(x), low_threshold=0.1, high_threshold=0.2)[1]


def _blur(x: torch.Tensor) -> torch.Tensor:
    from kornia.filters import gaussian_blur2d

    return gaussian_blur2d(x, (9, 9), (2.0, 2.0))


def _lowres(x: torch.Tensor) -> torch.Tensor:
    return F.interpolate(F.avg_pool2d(x, 4, ceil_mode=True), size=x.shape[2:], mode="bilinear", align_corners=False)


def _fourier(x: torch.Tensor) -> torch.Tensor:
    spectrum = torch.fft.fftshift(torch.fft.fft2(_gray(x)), dim=(-2, -1))
    return torch.log1p(spectrum.abs())


for _m in (Modality("edges", _edges, True), Modality("canny", _canny, False), Modality("blur", _blur, True),
           Modality("lowres", _lowres, True), Modality("fourier", _fourier, True)):
    MODALITIES.register(_m.name)(_m)


def get_modality(name: str, differentiable: bool = False) -> Modality:
    modality = MODALITIES.get(name)
    if differentiable and not modality.differentiable:
        usable = ", ".join(n for n in MODALITIES.names() if MODALITIES.get(n).differentiable)
        raise ConfigError(f"modality '{name}' is not differentiable, and data-free synthesis needs gradients "
                          f"through it; use one of {usable}")
    return modality
