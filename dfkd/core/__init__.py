"""The core layer: what every other layer stands on and that depends on none of them. Config
schema, loading and validation (:mod:`~dfkd.core.schema`, :mod:`~dfkd.core.config`,
:mod:`~dfkd.core.validate`), the registries a config names kinds from
(:mod:`~dfkd.core.registries`), checkpoints read safely and written atomically
(:mod:`~dfkd.core.checkpoint`, :mod:`~dfkd.core.io`), optimizers and schedules
(:mod:`~dfkd.core.optim`), and run folders, process identity and metric logging
(:mod:`~dfkd.core.runs`). Error types and the registry class itself are :mod:`dfkd_base`'s."""
