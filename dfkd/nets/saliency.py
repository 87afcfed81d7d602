"""What evidence a network responds to: Grad-CAM maps of its feature maps for a class score."""
from __future__ import annotations

import torch


def grad_cam(score: torch.Tensor, maps: list[torch.Tensor], retain_graph: bool = False) -> list[torch.Tensor]:
    """Grad-CAM (Selvaraju et al. 2017) of ``score`` (a scalar, e.g. the sum over a batch of each
    sample's class logit) on each feature map ``A`` of ``maps`` (N, C, H, W): Σ_c w_c A_c with w_c the
    spatial mean of ∂score/∂A_c, one (N, H, W) map each, in float32, before any ReLU. The weights
    are constants (no second-order graph); the maps keep ``A``'s graph, so a loss on them trains
    what made ``A``."""
    grads = torch.autograd.grad(score, maps, retain_graph=retain_graph)
    return [(g.float().mean((2, 3), keepdim=True) * a.float()).sum(1) for g, a in zip(grads, maps)]
