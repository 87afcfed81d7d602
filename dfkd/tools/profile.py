"""``dfkd profile`` (or ``--profile N`` on ``dfkd teacher`` / ``dfkd distill``): where an
iteration's time goes.

The run is trained as usual for ``warmup`` iterations, then ``N`` more under ``torch.profiler``,
after which it stops. Ranges named ``dfkd:…`` mark what the loop does: each phase, inside it each
network's forward (every teacher, every player), the loss terms, the backward pass and the
optimizer step, and outside the phases the logging, evaluation and end-of-epoch work
(checkpoints, pictures). The trace goes into the run folder (``profile_trace.json``: open it in
Perfetto or chrome://tracing) and the table below it into ``profile.json``: per phase, the time
per iteration of each kind of work, each counted once (a teacher forward called by a loss term
is the teacher's, not the term's; "rest" is what no inner range covers), and the calls that would make a GPU wait for the host
(``aten::item``, ``aten::_local_scalar_dense``: a tensor read as a Python number).

Only this command's run carries the ranges: ordinary runs pay nothing for them.
"""
from __future__ import annotations

import contextlib
import json
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from dfkd.core.io import atomic_write_text
from dfkd.loop.callbacks import Callback
from dfkd.loop.engine import Engine

SYNCS = ("aten::item", "aten::_local_scalar_dense")   # a tensor read on the host: a GPU would wait
PREFIX = "dfkd:"


class _Done(Exception):
    """The profiled iterations are done: the run stops here."""


class _Window(Callback):
    def __init__(self, prof, iterations: int):
        self.prof, self.left = prof, iterations

    def on_iteration_end(self, engine) -> None:
        self.prof.step()
        self.left -= 1
        if self.left <= 0:
            raise _Done


class _LabeledTerm:
    """A loss term whose call is a ``dfkd:loss terms`` range (every other attribute its own)."""

    def __init__(self, weighted):
        self._weighted = weighted

    def __getattr__(self, name):
        return getattr(self._weighted, name)

    def __call__(self, ctx):
        with record_function(f"{PREFIX}loss terms"):
            return self._weighted(ctx)


class ProfiledEngine(Engine):
    """An engine whose phases, networks, terms, backward passes and optimizer steps are ranges."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._labels: list = []
        networks = {f"teacher {i}" if len(self.teachers) > 1 else "teacher": m for i, m in enumerate(self.teachers)}
        networks.update({name: player.module for name, player in self.players.items()})
        for name, module in networks.items():
            self._label_forward(module, f"{PREFIX}{name} forward")
        for phase in self.phases:
            phase.terms[:] = [_LabeledTerm(t) for t in phase.terms]
        for name, player in self.players.items():
            player.step = self._ranged(player.step, f"{PREFIX}optimizer")

    def _label_forward(self, module: torch.nn.Module, name: str) -> None:
        opened: list = []

        def enter(_module, _inputs):
            opened.append(record_function(name).__enter__())

        def leave(_module, _inputs, _output):
            if opened:
                opened.pop().__exit__(None, None, None)

        self._labels += [module.register_forward_pre_hook(enter), module.register_forward_hook(leave)]

    @staticmethod
    def _ranged(function, name: str):
        def ranged(*args, **kwargs):
            with record_function(name):
                return function(*args, **kwargs)
        return ranged

    def run_phase(self, phase) -> None:
        with record_function(f"{PREFIX}phase {phase.name}"):
            super().run_phase(phase)

    def _flush(self) -> None:
        with record_function(f"{PREFIX}logging"):
            super()._flush()

    def evaluate(self, *args, **kwargs) -> dict:
        with record_function(f"{PREFIX}evaluation"):
            return super().evaluate(*args, **kwargs)

    def end_of_epoch(self, epoch: int) -> None:
        with record_function(f"{PREFIX}end of epoch (checkpoints, pictures)"):
            super().end_of_epoch(epoch)


@contextlib.contextmanager
def _labeled_backward():
    """Every backward pass inside the block is a ``dfkd:backward`` range."""
    original = torch.Tensor.backward

    def backward(self, *args, **kwargs):
        with record_function(f"{PREFIX}backward"):
            return original(self, *args, **kwargs)

    torch.Tensor.backward = backward
    try:
        yield
    finally:
        torch.Tensor.backward = original


def profile_run(engine: ProfiledEngine, iterations: int, warmup: int) -> dict:
    """Train ``engine`` for ``warmup`` iterations, profile ``iterations`` more, stop; write the
    trace and the table into its run folder; return the table. A run with fewer iterations left
    is profiled over what it has (the warm-up first shortened, down to none)."""
    left = engine.total_iters - engine.step
    warmup = max(0, min(warmup, left - iterations))
    iterations = min(iterations, left - warmup)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.type == "cuda" else [])
    schedule = torch.profiler.schedule(wait=0, warmup=warmup, active=iterations, repeat=1)
    with profile(activities=activities, schedule=schedule) as prof, _labeled_backward():
        engine.callbacks.append(_Window(prof, warmup + iterations))
        with contextlib.suppress(_Done):
            engine.fit()
    table = time_table(prof.events(), iterations)
    table.update(iterations=iterations, warmup=warmup, device=str(engine.device), experiment=engine.config.experiment)
    if engine.run_dir is not None:
        prof.export_chrome_trace(str(engine.run_dir / "profile_trace.json"))
        atomic_write_text(engine.run_dir / "profile.json", json.dumps(table, indent=1))
        table["trace"] = str(engine.run_dir / "profile_trace.json")
    return table


def time_table(events, iterations: int) -> dict:
    """Milliseconds per iteration of each ``dfkd:`` range, exclusive of the ranges inside it,
    grouped by the phase (or the outside-the-phases work) it belongs to; and the host reads."""
    ranges = [e for e in events if e.name.startswith(PREFIX)]
    own = {id(e): e.time_range.elapsed_us() for e in ranges}
    for event in ranges:
        parent = _labeled_parent(event)
        if parent is not None:
            own[id(parent)] -= event.time_range.elapsed_us()
    rows: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for event in ranges:
        top = _outermost(event)
        kind = "rest" if top is event else event.name[len(PREFIX):]
        rows[top.name[len(PREFIX):]][kind] += own[id(event)] / 1000 / iterations
    syncs = [e for e in events if e.name in SYNCS]
    return {"ms_per_iteration": {row: dict(kinds) for row, kinds in rows.items()},
            "total_ms_per_iteration": sum(sum(k.values()) for k in rows.values()),
            "host_reads_per_iteration": len(syncs) / iterations,
            "host_reads_ms_per_iteration": sum(e.time_range.elapsed_us() for e in syncs) / 1000 / iterations}


def _labeled_parent(event):
    parent = event.cpu_parent
    while parent is not None and not parent.name.startswith(PREFIX):
        parent = parent.cpu_parent
    return parent


def _outermost(event):
    """The outermost ``dfkd:`` range around ``event`` (a phase, or logging, or an epoch's end)."""
    while (parent := _labeled_parent(event)) is not None:
        event = parent
    return event


def render(table: dict) -> str:
    """The table as text: a row per phase (and per kind of work outside the phases), a column per
    kind of work, milliseconds per iteration."""
    rows = table["ms_per_iteration"]
    kinds = sorted({k for kinds in rows.values() for k in kinds}, key=lambda k: (k == "rest", k))
    width = max(len(r) for r in rows) + 2
    lines = [f"ms per iteration, over {table['iterations']} iterations after {table['warmup']} ({table['device']})",
             "".ljust(width) + "".join(k[:18].rjust(20) for k in kinds) + "total".rjust(10)]
    for row, values in sorted(rows.items(), key=lambda item: -sum(item[1].values())):
        lines.append(row.ljust(width) + "".join(
            (f"{values[k]:.2f}" if k in values else "-").rjust(20) for k in kinds) + f"{sum(values.values()):.2f}".rjust(10))
    lines.append(f"all: {table['total_ms_per_iteration']:.2f} ms per iteration; host reads of device values "
                 f"(aten::item, a GPU waits on each): {table['host_reads_per_iteration']:.1f} per iteration, "
                 f"{table['host_reads_ms_per_iteration']:.2f} ms")
    if "trace" in table:
        lines.append(f"trace: {table['trace']} (Perfetto, chrome://tracing)")
    return "\n".join(lines)
