"""Synthesis strategies: where data-free batches come from, one registered class each.

``generator``  a generator *player* trained adversarially by the engine's phases (DAFL, DFAD,
               ZSKT, DFQ); ``fresh`` batches are new samples.
``inversion``  pixels of a batch optimized for k steps from noise (DeepInversion, ADI).
``reinit``     a generator and its latents re-initialized for every batch and optimized for k
               steps; the best batch is kept (CMI).
``meta``       a shared generator cloned per batch, the clone and latents optimized for a few
               steps, then the shared weights meta-updated by Reptile or first-order MAML
               (Fast-DFKD).
``nayer``      one generator, fed class embeddings through a noisy layer re-drawn per batch (NAYER).
``spaceship``  one generator optimized per batch; replayed batches are regenerated from its stored
               intermediate features, channels exchanged between samples (SpaceshipNet).

Every strategy may keep what it made in an image pool that ``pool`` phases replay. The per-batch
strategies run as the pseudo-player ``synthesizer``: its phase's ``steps`` are the inner
optimization steps for one batch, its ``losses`` the synthesis objective. A new strategy is one
module here that registers a :class:`Synthesizer` subclass under the name ``synthesis.kind``
takes, plus a config.
"""
from __future__ import annotations

from ..config import SynthesisConfig
from ..data import DatasetInfo
from ..phases import SYNTHESIZER
from ..runtime import Runtime
from .base import SYNTHESIZERS, ImagePool, PerBatchSynthesizer, Synthesizer, build_generator
from . import generator, inversion, meta, nayer, reinit, spaceship  # noqa: F401  (they register themselves)

__all__ = ["SYNTHESIZER", "SYNTHESIZERS", "ImagePool", "PerBatchSynthesizer", "Synthesizer", "build_generator",
           "create_synthesizer"]


def create_synthesizer(cfg: SynthesisConfig, info: DatasetInfo, runtime: Runtime) -> Synthesizer | None:
    """The strategy ``cfg.kind`` names; None for ``none`` (real-data runs)."""
    if cfg.kind == "none":
        return None
    return SYNTHESIZERS.get(cfg.kind)(cfg, info, runtime)
