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
module that registers a :class:`~dfkd.methods.synthesis.base.Synthesizer` subclass, with its
``Options`` dataclass, in :data:`~dfkd.core.registries.SYNTHESIZERS` under the name
``synthesis.kind`` takes (imported below, or by whoever uses it), plus a config.
"""
from __future__ import annotations

from dfkd.core.registries import SYNTHESIZERS
from dfkd.core.schema import SynthesisConfig
from dfkd.data.datasets import DatasetInfo
from dfkd.methods.synthesis import generator, inversion, meta, nayer, reinit, spaceship  # noqa: F401
from dfkd.methods.synthesis.base import Synthesizer


def create_synthesizer(cfg: SynthesisConfig, info: DatasetInfo, runtime) -> Synthesizer | None:
    """The strategy ``cfg.kind`` names; None for ``none`` (real-data runs)."""
    if cfg.kind == "none":
        return None
    return SYNTHESIZERS.get(cfg.kind)(cfg, info, runtime)
