"""Writes the reference pages of the docs from the code itself, so they cannot drift from it:

    python scripts/docs_reference.py [--check]

* ``docs/reference/config.md``: every section and key of a run config, with its type, default and
  the comment beside it in the schema (and each synthesis kind's own options);
* ``docs/reference/terms.md``: every registered loss term, its family, what it needs, its
  parameters and its docstring;
* ``docs/reference/cli.md``: ``dfkd --help`` and each command's.

``--check`` writes nothing and exits 1 when a page differs from what the code gives (the test
suite runs it).
"""
from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import os
import sys
import textwrap
import tokenize
import typing
from contextlib import redirect_stdout
from pathlib import Path

from dfkd.cli import build_parser
from dfkd.core.registries import SYNTHESIZERS
from dfkd.core.schema import Config
from dfkd.methods.losses.base import LOSSES

DOCS = Path(__file__).resolve().parent.parent / "docs" / "reference"


def field_comments(cls: type) -> dict[str, str]:
    """Each field's comment in ``cls``'s source: the one after it on its line, and the comment
    lines right above it."""
    source = textwrap.dedent(inspect.getsource(cls))
    comments = {t.start[0]: t.string.lstrip("#").strip()
                for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    lines = source.splitlines()
    out = {}
    for node in ast.parse(source).body[0].body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            above, row = [], node.lineno - 1
            while row >= 1 and lines[row - 1].strip().startswith("#"):
                above.insert(0, comments[row])
                row -= 1
            out[node.target.id] = " ".join(above + ([comments[node.lineno]] if node.lineno in comments else []))
    return out


def docstring(cls: type) -> str:
    """The first paragraph of ``cls``'s own docstring, on one line ('' for a dataclass without one,
    whose generated docstring is its signature)."""
    doc = inspect.getdoc(cls) or ""
    return "" if doc.startswith(f"{cls.__name__}(") else " ".join(doc.split("\n\n")[0].split())


def type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        return " or ".join(type_name(a) for a in args if a is not type(None)) + (", or null" if type(None) in args else "")
    if origin in (list, dict):
        return f"{origin.__name__} of " + ", ".join(type_name(a) for a in args)
    return getattr(tp, "__name__", str(tp)).replace("typing.", "")


def default_of(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:
        value = f.default_factory()
    else:
        return ""
    if dataclasses.is_dataclass(value):
        return "(section)"
    return f"`{value!r}`".replace("|", "\\|")


def section_table(cls: type, prefix: str, seen: set) -> list[str]:
    """The rows of ``cls``'s keys, then the tables of its sub-sections."""
    hints, comments = typing.get_type_hints(cls), field_comments(cls)
    rows, nested = [f"### `{prefix}`" if prefix else "### top level", "", docstring(cls), "",
                    "| key | type | default | meaning |", "|---|---|---|---|"], []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)] or \
            ([tp] if dataclasses.is_dataclass(tp) else [])
        rows.append(f"| `{f.name}` | {type_name(tp)} | {default_of(f)} | {comments.get(f.name, '')} |")
        for sub in inner:
            if sub not in seen:
                seen.add(sub)
                key = f"{prefix}.{f.name}" if prefix else f.name
                if typing.get_origin(tp) is dict:
                    key += ".<name>"
                nested.append((sub, key))
    out = rows + [""]
    for sub, key in nested:
        out += section_table(sub, key, seen)
    return out


def config_page() -> str:
    lines = ["# Config reference", "", "Every key of a run config (`dfkd teacher` and `dfkd distill`), written by "
             "`scripts/docs_reference.py` from the schema (`dfkd/core/schema.py`). Keys are set in YAML files, "
             "merged over their `_base_`, then by `key.path=value` overrides on the command line.", ""]
    lines += section_table(Config, "", set())
    lines += ["## Synthesis kinds", "", "`synthesis.kind` names a registered synthesizer; its own options are "
              "accepted beside the shared ones above.", ""]
    shared = {f.name for f in dataclasses.fields(Config().synthesis)}
    for name in SYNTHESIZERS.names():
        cls = SYNTHESIZERS.get(name)
        options = cls.Options
        hints = typing.get_type_hints(options)
        comments = {}
        for klass in reversed(options.__mro__):
            if dataclasses.is_dataclass(klass):
                comments.update(field_comments(klass))
        doc = (inspect.getdoc(inspect.getmodule(cls)) or "").split("\n\n")[0].replace("\n", " ")
        lines += [f"### `{name}`", "", doc, "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for f in dataclasses.fields(options):
            if f.name not in shared:
                lines.append(f"| `synthesis.{f.name}` | {type_name(hints[f.name])} | {default_of(f)} | "
                             f"{comments.get(f.name, '')} |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def terms_page() -> str:
    lines = ["# Loss terms", "", "Every registered term, written by `scripts/docs_reference.py` from the "
             "registry. A phase's loss is `Σ weight × term`; `losses: {name: weight}` or "
             "`losses: {name: {weight: w, param: value}}`.", ""]
    for name in LOSSES.names():
        term = LOSSES.get(name)
        family = term.__module__.rsplit(".", 1)[-1] if not hasattr(term, "fn") else term.fn.__module__.rsplit(".", 1)[-1]
        params = ", ".join(f"`{p}`" + (f" = `{v.default!r}`" if v.default is not v.empty else "")
                           for p, v in term.parameters_of().items())
        needs = ", ".join(term.needs) or "nothing beyond the batch"
        doc = inspect.getdoc(term.fn if hasattr(term, "fn") else term) or ""
        lines += [f"## `{name}`", "", f"Family: {family}. Needs: {needs}. Parameters: {params or 'none'}.", "",
                  doc, ""]
    return "\n".join(lines).rstrip() + "\n"


def cli_page() -> str:
    parser = build_parser()
    lines = ["# Command line", "", "Written by `scripts/docs_reference.py` from the parser. Extra arguments of "
             "`teacher`, `distill`, `chain` and `search` are config overrides (`key.path=value`).", ""]
    commands = parser._subparsers._group_actions[0].choices  # noqa: SLF001 — argparse has no public accessor
    for command in [None, *commands]:
        text = (commands[command] if command else parser).format_help()
        lines += [f"## `dfkd {command}`" if command else "## `dfkd`", "", "```", text.rstrip(), "```", ""]
    return "\n".join(lines).rstrip() + "\n"


PAGES = {"config.md": config_page, "terms.md": terms_page, "cli.md": cli_page}


def main(argv: list[str] | None = None) -> int:
    os.environ["COLUMNS"] = "100"  # argparse wraps help to the terminal: the page is the same everywhere
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--check", action="store_true", help="compare only; exit 1 if a page is stale")
    check = args.parse_args(argv).check
    stale = []
    for name, page in PAGES.items():
        with redirect_stdout(io.StringIO()):
            text = page()
        path = DOCS / name
        if not path.exists() or path.read_text() != text:
            stale.append(name)
            if not check:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    if check and stale:
        print(f"stale: {', '.join(stale)} (run python scripts/docs_reference.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
