"""The loss-term framework: what a term is (:class:`Term`), how one is registered, and how a
phase's config becomes its weighted sum (:func:`build_terms`).

A term is a registered :class:`Term`, or a function ``term(ctx, **params) -> scalar tensor``
registered as one. It reads what it needs from the step's :class:`~dfkd.loop.context.StepContext`
(images, labels, teacher and student logits, BN statistics, tapped features); the context
computes each of those on first use only. A phase's loss is ``Σ weight × term`` over the terms
its config names::

    losses:
      kd_kl: {weight: 1.0, T: 4}
      ce: 0.1

What a term needs, which layers it taps and which players it drives it declares (see
:class:`Term`), so that a config asking for something a run lacks fails at start-up, not after
an hour. A term with state across steps (a memory bank, a trainable head) is a :class:`Term`
subclass: its config params go to ``__init__``.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn

from dfkd.core.optim import build_optimizer
from dfkd.core.schema import OptimConfig
from dfkd_base.errors import ConfigError
from dfkd_base.registry import Registry, nearest

LOSSES: Registry[type["Term"]] = Registry("loss term")


@dataclass(frozen=True)
class Feature:
    """What a network shows a term: its logits (``layer`` None) or the output of its module at
    path ``layer``. ``network``: ``teacher``, ``student`` (the phase's student) or a model player."""

    network: str
    layer: str | None = None

    def __str__(self) -> str:
        return f"{self.network}'s {self.layer or 'logits'}"


@dataclass(frozen=True)
class PlayerUse:
    """A player that a term drives, and what it sees: a ``discriminator`` is sized by ``source``
    (and, when ``target`` is set, must see the same shape there); an ``adapter`` maps
    ``source`` to ``target``'s shape."""

    kind: str
    source: Feature
    target: Feature | None = None


Probe = Callable[[Feature], tuple[int, ...]]  # the shape, without the batch, of a feature


def no_taps(params: dict[str, Any]) -> dict[str, list[str]]:
    return {"teacher": [], "student": []}


class Term(nn.Module):
    """A loss term: ``forward(ctx)`` returns a scalar from the step's
    :class:`~dfkd.loop.context.StepContext`. What a run must provide for it is declared, not
    discovered:

    - ``needs``: what it reads that a run might lack (⊂ {"teacher", "teacher_bn", "labels"}), so
      a config that cannot provide it fails at start-up;
    - ``taps()``: the module paths it reads, per network (``teacher``, ``student`` or a player);
    - ``player_uses()``: the discriminator and adapter players it drives, which are sized from
      what they see;
    - ``build(probe)``: called once the networks exist, to size its own layers;
    - ``end_batch()``: called when a batch is done, for terms with statistics across batches.

    Its state (buffers, parameters, extra state) is saved with the run; parameters that take
    gradients get an optimizer of their own, stepped with the term's phase, or, with
    ``trains_with_player``, join the optimizer of the phase's player (its settings and schedule).
    """

    needs: tuple[str, ...] = ()
    trains_with_player: bool = False

    @classmethod
    def parameters_of(cls) -> dict[str, inspect.Parameter]:
        """The config parameters it takes (its ``__init__``'s)."""
        return dict(inspect.signature(cls).parameters)

    def taps(self) -> dict[str, list[str]]:
        return no_taps({})

    def player_uses(self) -> dict[str, PlayerUse]:
        return {}

    def build(self, probe: Probe) -> None:
        """Size the term's own layers: ``probe(feature)`` is a feature's shape without the batch;
        ``probe.train_labels`` the labels of the real training split (None when the run reads none)."""

    def end_batch(self) -> None:
        pass

    def keep_step(self) -> None:
        """Per-batch synthesis: the inner step just taken made the batch that will be kept (so far)."""

    def make_optimizer(self, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
        """The optimizer of its trainable parameters, at its phase's learning rate."""
        return build_optimizer(params, OptimConfig(name="adam", lr=lr, betas=[0.5, 0.999]))


class FunctionTerm(Term):
    """A stateless term written as ``fn(ctx, **params)``, bound to its params."""

    fn: Callable = staticmethod(lambda ctx: None)
    taps_of: Callable[[dict], dict[str, list[str]]] = staticmethod(no_taps)

    def __init__(self, **params):
        super().__init__()
        self.params = params

    @classmethod
    def parameters_of(cls) -> dict[str, inspect.Parameter]:
        return {n: p for n, p in inspect.signature(cls.fn).parameters.items() if n != "ctx"}

    def taps(self) -> dict[str, list[str]]:
        return self.taps_of(self.params)

    def forward(self, ctx) -> torch.Tensor:
        return self.fn(ctx, **self.params)


def register(name: str, needs: tuple[str, ...] = (), taps: Callable[[dict], dict[str, list[str]]] = no_taps):
    """Register a loss term: a :class:`Term` subclass, or a function ``fn(ctx, **params)`` (kept
    callable as it is, and registered as a :class:`FunctionTerm`). ``needs`` and ``taps(params)``
    declare what a function term reads; a class declares them itself (``needs`` here is its
    default)."""

    def decorator(term):
        if inspect.isclass(term):
            if not issubclass(term, Term):
                raise TypeError(f"loss term '{name}': a class term must subclass dfkd.methods.losses.base.Term")
            term.needs = term.__dict__.get("needs", needs)
            LOSSES.register(name)(term)
            return term
        term.needs, term.taps = needs, taps  # also on the function, for reading
        LOSSES.register(name)(type(f"{name}_term", (FunctionTerm,), {
            "fn": staticmethod(term), "taps_of": staticmethod(taps), "needs": needs, "__doc__": term.__doc__}))
        return term

    return decorator


def choice(options: dict[str, Any], value: str, where: str):
    """``options[value]``, or a ConfigError listing the valid values."""
    if value not in options:
        raise ConfigError(f"{where} must be one of {', '.join(options)}, got {value!r}")
    return options[value]


@dataclass
class WeightedTerm:
    """A term as a phase uses it: its config key, weight and params, the epoch from which it
    counts (``from_epoch``; Fast-DFKD's adversarial term waits for the warm-up to end), the built
    term and, when the term has trainable parameters, their optimizer."""

    name: str
    weight: float
    term: Term
    params: dict[str, Any]
    optimizer: torch.optim.Optimizer | None = None
    from_epoch: int = 0

    def __call__(self, ctx) -> torch.Tensor:
        return self.term(ctx)


def build_terms(spec: dict[str, Any], where: str) -> list[WeightedTerm]:
    """``{name: weight}`` or ``{name: {weight: w, from_epoch: k, **params}}`` → terms, parameters
    checked against each term's signature so a misspelt or missing parameter fails here, naming
    its key."""
    terms = []
    for name, value in spec.items():
        base = name.split("@")[0]  # "kd_kl@soft" lets one phase use a term twice with other params
        term = LOSSES.get(base)
        params = dict(value) if isinstance(value, dict) else {"weight": value}
        weight = params.pop("weight", 1.0)
        if not isinstance(weight, (int, float)) or isinstance(weight, bool):
            raise ConfigError(f"{where}.{name}.weight must be a number, got {weight!r}")
        from_epoch = params.pop("from_epoch", 0)
        if not isinstance(from_epoch, int) or isinstance(from_epoch, bool) or from_epoch < 0:
            raise ConfigError(f"{where}.{name}.from_epoch must be an epoch number >= 0, got {from_epoch!r}")
        signature = term.parameters_of()
        for key in params:
            if key not in signature:
                close = nearest(key, signature)
                hint = f"; did you mean '{close[0]}'?" if close else f"; it takes {', '.join(signature) or 'none'}"
                raise ConfigError(f"{where}.{name}: loss term '{base}' has no parameter '{key}'{hint}")
        missing = [n for n, p in signature.items() if p.default is p.empty and n not in params]
        if missing:
            raise ConfigError(f"{where}.{name}: loss term '{base}' needs parameter {', '.join(missing)}")
        terms.append(WeightedTerm(name, float(weight), term(**params), params, from_epoch=from_epoch))
    return terms
