"""Registries that config validation reads. A config names a synthesizer by kind
(``synthesis.kind``); validation takes the kinds, their options and their constraints from the
registered classes, which register themselves from the methods layer. The registry imports its
``locations`` on first use, so validation sees the built-in kinds without this layer importing
the one above it, and a kind registered anywhere else (a user's module, a test) is seen as well.
"""
from __future__ import annotations

from dfkd_base.registry import Registry

SYNTHESIZERS = Registry("synthesis kind", locations=("dfkd.methods.synthesis",))
