"""What a method asks of its teacher, read from its config's loss terms (their declared needs and
taps): its outputs alone, or also its BatchNorm statistics, its penultimate embedding, the inputs of
its BatchNorm layers, or the features at named modules. A teacher that cannot give what a method
asks (a black-box program, a network without BatchNorm or without a module a term names) is
refused before anything runs, in one line naming the method, what it needs, and the methods that
do apply."""
from __future__ import annotations

from torch import nn

from dfkd.core.config import load_config, named_configs
from dfkd.core.schema import Config
from dfkd.methods.losses.base import WeightedTerm, build_terms
from dfkd.nets.taps import BN_INPUT_MEANS, EMBEDDING, embedding_layer, resolve_module
from dfkd_base.errors import ConfigError


def config_terms(config: Config) -> list[WeightedTerm]:
    return [t for i, phase in enumerate(config.phases) for t in build_terms(phase.losses, f"phases.{i}.losses")]


def teacher_needs(terms: list[WeightedTerm]) -> list[tuple[str, str, str | None]]:
    """``(term, what, module path)`` for each thing ``terms`` read of the teacher beyond its outputs:
    ``bn`` (BatchNorm statistics), ``embedding``, ``bn-inputs`` or ``module`` (a path)."""
    out = []
    for term in terms:
        if "teacher_bn" in term.term.needs:
            out.append((term.name, "bn", None))
        for path in term.term.taps().get("teacher", []):
            kind = {EMBEDDING: "embedding", BN_INPUT_MEANS: "bn-inputs"}.get(path, "module")
            out.append((term.name, kind, path if kind == "module" else None))
    return out


WHAT = {"bn": "the teacher's BatchNorm statistics", "embedding": "the teacher's penultimate embedding",
        "bn-inputs": "the inputs of the teacher's BatchNorm layers"}


def describe_need(kind: str, path: str | None) -> str:
    return WHAT.get(kind, f"the teacher's features at '{path}'")


def missing(teacher: nn.Module, black_box: bool, kind: str, path: str | None) -> str | None:
    """Why ``teacher`` cannot give what a term reads (None: it can)."""
    if black_box:
        return "the teacher is a black box (a compiled program): only its outputs can be read"
    if kind in ("bn", "bn-inputs"):
        types = (nn.BatchNorm2d,) if kind == "bn-inputs" else (nn.BatchNorm1d, nn.BatchNorm2d)
        if not any(isinstance(m, types) and m.running_mean is not None for m in teacher.modules()):
            return "the teacher has no BatchNorm layer with running statistics"
        return None
    try:
        resolve_module(teacher, embedding_layer(teacher) if kind == "embedding" else path)
    except ConfigError as error:
        return str(error)
    return None


def refusals(terms: list[WeightedTerm], teacher: nn.Module, black_box: bool) -> list[str]:
    """One sentence per thing ``terms`` read that ``teacher`` cannot give."""
    out = []
    for term, kind, path in teacher_needs(terms):
        why = missing(teacher, black_box, kind, path)
        if why:
            out.append(f"loss term '{term}' needs {describe_need(kind, path)}; {why}")
    return out


def data_free_recipes() -> list[str]:
    """The shipped data-free recipes, one of each method (the digits fast variants)."""
    return [n for n in named_configs() if n.startswith("datafree/") and n.endswith("-digits") and "+" not in n]


def methods_that_apply(teacher: nn.Module, black_box: bool) -> list[str]:
    """The shipped data-free recipes whose terms read nothing this teacher cannot give."""
    return [name for name in data_free_recipes()
            if not refusals(config_terms(load_config(name)), teacher, black_box)]


def check_teacher_gives(experiment: str, terms: list[WeightedTerm], teacher: nn.Module, black_box: bool,
                        path: str) -> None:
    """A one-line error when ``terms`` read what ``teacher`` (from ``path``) cannot give."""
    problems = refusals(terms, teacher, black_box)
    if problems:
        applies = methods_that_apply(teacher, black_box)
        raise ConfigError(f"{experiment}: {problems[0]} (teacher {path}); methods that apply to it: "
                          f"{', '.join(applies) or 'none of the shipped ones'}")
