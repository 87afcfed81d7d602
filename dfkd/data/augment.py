"""Differentiable augmentation of synthetic batches (and of a phase's view of any batch): the
transforms run on normalized tensors and keep their autograd graph, so gradients reach the
synthesis variables through them. Real data's own augmentation is the loader's
(:func:`dfkd.data.loader.augment_batch`)."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from dfkd.core.schema import AugmentConfig


def build_augment(cfg: AugmentConfig, shape: tuple[int, int, int], mean: tuple[float, ...] = (0.0,),
                  std: tuple[float, ...] = (1.0,)) -> Callable[[torch.Tensor], torch.Tensor]:
    """Differentiable augmentation of synthetic batches (gradients flow back to the synthesis
    variables), which are normalized with the data's ``mean`` and ``std``. Brightness and contrast
    are done here rather than with kornia's ColorJitter, which clamps to [0, 1] (synthesis works in
    the normalized space) and whose saturation and hue need 3 channels; these two work on any
    number of channels."""
    import kornia.augmentation as K

    ops: list[nn.Module] = []
    if cfg.crop_padding:
        ops.append(K.RandomCrop(shape[1:], padding=cfg.crop_padding))
    if cfg.flip:
        ops.append(K.RandomHorizontalFlip())
    kornia_ops = nn.Sequential(*ops)
    # kornia pads with zeros; crop and flip commute with a shift, so shifting black to zero first
    # pads with black pixels
    black = torch.tensor([-m / s for m, s in zip(mean, std)]).view(1, -1, 1, 1) \
        if cfg.crop_padding and cfg.pad == "black" else None
    black_here = None

    def augment(x: torch.Tensor) -> torch.Tensor:
        if cfg.jitter:  # DeepInversion's random roll, the same shift for the whole batch
            dx, dy = (int(v) for v in torch.randint(-cfg.jitter, cfg.jitter + 1, (2,)))
            x = torch.roll(x, shifts=(dx, dy), dims=(2, 3))
        if black is not None:
            nonlocal black_here  # moved to the batch's device and dtype once, not at every step
            if black_here is None or (black_here.device, black_here.dtype) != (x.device, x.dtype):
                black_here = black.to(x.device, x.dtype)
            x = kornia_ops(x - black_here) + black_here
        elif ops:
            x = kornia_ops(x)
        if cfg.brightness or cfg.contrast:
            n = x.shape[0]
            u = lambda: torch.rand(n, 1, 1, 1, device=x.device) * 2 - 1  # noqa: E731  U(-1, 1) per image
            mean = x.mean(dim=(1, 2, 3), keepdim=True)
            x = (x - mean) * (1 + cfg.contrast * u()) + mean + cfg.brightness * u()
        return x

    return augment
