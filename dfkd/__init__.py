"""dfkd: data-free and adversarial knowledge distillation.

The package is in layers, each importing only from those before it (``tests/test_layout.py``
checks): :mod:`dfkd.core` (config, registries, checkpoints, run folders), :mod:`dfkd.data`
(datasets, loaders, modalities), :mod:`dfkd.nets` (models, quantization, discriminators, hooks),
then, above the ``generators`` package, :mod:`dfkd.methods` (loss terms and synthesis strategies),
:mod:`dfkd.loop` (the one training loop), :mod:`dfkd.tools` (chain, search, audit, export) and
:mod:`dfkd.cli`. Error types and the registry class are :mod:`dfkd_base`'s, which ``generators``
shares.
"""

__version__ = "0.1.0"
