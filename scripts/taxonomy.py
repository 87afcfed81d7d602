"""The knowledge-distillation table: every kd/ config against the student alone, on real data.

    python scripts/taxonomy.py [--datasets digits fmnist] [--methods student kd ...] [--seeds 0 1 2]
        [--width 0.125] [--teacher-digits PATH] [--teacher-fmnist PATH] [--out runs/taxonomy]
        [--stretch F] [--set KEY=VALUE ...] [--skip-done] [--table-only]

Teacher LeNet-5 (``teacher/lenet5-<dataset>``, trained at seed 0 unless given); student LeNet-5 at
``--width`` of its channels (default 1/8: a real capacity gap), except FSP, whose matrices compare
channel by channel and so keep the teacher's widths (its row says so). BYOT has no teacher: the
thin network teaches its own exits (its row gives each exit's accuracy and their ensemble's); nor
has CS-KD, where each sample's prediction learns from another sample of its class. Each finished run is
appended to ``<out>/results.jsonl`` at once (``--skip-done`` resumes a killed table);
``<out>/results.md`` holds one table per dataset: final accuracy (mean ± sample std over seeds; the
best beside it, for reference only), seconds per run, and the published CIFAR-100 ResNet-56 →
ResNet-20 number of each method, the ordering to compare with.

Chains (``chain/<name>-<dataset>``, the table's teacher in their first stage's place, chain seed =
the row's seed) give rows of their own: born-again (the second generation; the first and the
ensemble beside), TAKD and DGKD (the thin student; the assistant beside). Data-free rows distil the
same thin student with no real image: ``dfq`` (``datafree/dfq-<dataset>``) and ``dfq+pkt``
(``datafree/dfq+pkt-<dataset>``, the same with PKT's relation term on the synthetic batches);
on Fashion-MNIST at 2000 iterations, a third of dfq-fmnist's 6000, to fit the table's time.

``--stretch F`` runs each config's schedule F times as long: its epochs, each phase's epoch bounds
(FitNets' hint stage keeps its share) and each term's ramp (DKD's warm-up), the rate's schedule
following the new length; ``--set`` overrides still come last.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce import Teachers, append_row, mean_std, read_results, table_arguments, write_table  # noqa: E402

from dfkd.core.config import load_config  # noqa: E402
from dfkd.loop.engine import Engine  # noqa: E402
from dfkd.tools.chain import Chain, load_chain  # noqa: E402

CHAINS = ["born-again", "takd", "dgkd"]
DATAFREE = ["dfq", "dfq+pkt"]
METHODS = ["student", "kd", "hint", "fitnets", "at", "rkd", "sp", "pkt", "crd", "fsp", "dkd", "byot", "cskd",
           *CHAINS, *DATAFREE]
# fmnist: 40 x 50 = 2000 iterations (dfq-fmnist: 6000); digits: 200 iterations x 5 student steps, the
# budget the digits rows were measured at (dfq-digits now ships 400 x 10, for teachers of other architectures)
DATAFREE_BUDGET = {"fmnist": ["train.epochs=40"], "digits": ["train.epochs=8", "phases.1.steps=5"]}
SELF = {"byot", "cskd"}  # no teacher: the trained network is the config's 'model' player
DATASETS = {"digits": "digits", "fmnist": "Fashion-MNIST"}
SAME_WIDTH = {"fsp", "born-again"}  # FSP matrices need the teacher's channel counts; born-again is the teacher's
# CIFAR-100, ResNet-56 (72.34) -> ResNet-20: Tian et al. 2020 (CRD), Table 1; DKD: Zhao et al. 2022
PUBLISHED = {"student": 69.06, "kd": 70.66, "hint": 69.21, "at": 70.55, "rkd": 69.61, "sp": 69.67, "pkt": 70.34,
             "crd": 71.16, "fsp": 69.95, "dkd": 71.97}


def render(rows: list[dict]) -> str:
    latest = {(r["dataset"], r["method"], r["seed"]): r for r in rows}
    out = []
    for dataset in dict.fromkeys(r["dataset"] for r in rows):
        groups: dict[str, list[dict]] = {}
        for (d, method, _), row in latest.items():
            if d == dataset:
                groups.setdefault(method, []).append(row)
        first = next(iter(groups.values()))[0]
        out += [f"**{DATASETS.get(dataset, dataset)}**, teacher LeNet-5 {first['teacher_acc']:.2f}%", "",
                "| method | student | final | best | seeds | s per run | CIFAR-100 R56→R20 (published) |",
                "|" + "---|" * 7]
        for method, group in sorted(groups.items(), key=lambda kv: METHODS.index(kv[0]) if kv[0] in METHODS else 99):
            student = group[0]["student"]
            if "final_exits" in group[0]:  # each exit, shallow to deep, and the exits' ensemble
                exits = [mean_std([r["final_exits"][i] for r in group]) for i in range(len(group[0]["final_exits"]))]
                student += f" (exits {' / '.join(exits)}; ensemble {mean_std([r['final_exit_ensemble'] for r in group])})"
            if "stages" in group[0]:  # a chain's earlier stages and its ensemble, final (best)
                beside = [f"{name} {mean_std([r['stages'][name]['final_acc'] for r in group])} "
                          f"({mean_std([r['stages'][name]['best_acc'] for r in group])})" for name in group[0]["stages"]]
                if "ensemble_acc" in group[0]:
                    beside.append(f"ensemble {mean_std([r['ensemble_acc'] for r in group])}")
                student += f" ({'; '.join(beside)})"
            cells = [group[0].get("config", f"kd/{method}-{dataset}"), student, mean_std([r["final_acc"] for r in group]),
                     mean_std([r["best_acc"] for r in group]), ", ".join(str(r["seed"]) for r in group),
                     f"{statistics.mean(r['time_total_s'] for r in group):.0f}", str(PUBLISHED.get(method, "–"))]
            out.append("| " + " | ".join(cells) + " |")
        out.append("")
    return "\n".join(out)


def chain_row(config: str, teacher: str, root: Path, seed: int, overrides: list[str]) -> dict:
    """Run one chain from the table's teacher; its last stage is the row, the others beside it."""
    state = Chain(load_chain(config, [f"teacher={teacher}", f"seed={seed}", f"root={root / 'chains'}",
                                      f"set={json.dumps(overrides)}"])).run()
    return chain_summary(state)


def chain_summary(state: dict) -> dict:
    """A finished chain's row: the last stage's summary, the earlier stages' accuracies (not the
    given teacher's) and the ensemble's, if the chain has one."""
    names = [s["name"] for s in state["config"]["stages"]]
    made = [n for n in names if state["stages"][n]["config"] != "given"]
    stages = {n: {k: state["stages"][n]["summary"][k] for k in ("final_acc", "best_acc")} for n in made[:-1]}
    row = {**state["stages"][names[-1]]["summary"], "seed": state["config"]["seed"], "stages": stages,
           "time_total_s": sum(state["stages"][n]["summary"]["time_total_s"] for n in made)}
    if "ensemble" in state:
        row["ensemble_acc"] = state["ensemble"]["acc"]
    return row


def stretched(config: str, overrides: list[str], factor: float) -> list[str]:
    """Overrides that make ``config`` (with ``overrides``) run the same schedule ``factor`` times as long:
    its epochs, each phase's epoch bounds and each term's ramp (``warmup``, in epochs), so a staged
    method keeps its stages' shares (a patient schedule, Beyer et al. 2022)."""
    c = load_config(config, overrides)
    out = [f"train.epochs={round(c.train.epochs * factor)}"]
    for i, phase in enumerate(c.phases):
        if phase.epochs is not None:
            out.append(f"phases.{i}.epochs=[{round(phase.epochs[0] * factor)},{round(phase.epochs[1] * factor)}]")
        for term, kwargs in phase.losses.items():
            if isinstance(kwargs, dict) and "warmup" in kwargs:
                out.append(f"phases.{i}.losses.{term}.warmup={round(kwargs['warmup'] * factor)}")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--width", type=float, default=0.125, help="the student's LeNet-5 width")
    p.add_argument("--stretch", type=float, default=1.0,
                   help="run each config's schedule this many times as long (epochs, stage bounds, ramps)")
    table_arguments(p, "runs/taxonomy")
    args = p.parse_args(argv)
    if args.stretch != 1.0 and set(args.methods) & set(CHAINS):
        p.error(f"--stretch takes single-run methods; a chain's stages ({', '.join(CHAINS)}) have budgets of their own")
    root, results, rows = read_results(args.out)
    if not args.table_only:
        root.mkdir(parents=True, exist_ok=True)
        # a row of another --stretch is another run: not done (the table shows each row's latest run)
        done = {(r["dataset"], r["method"], r["seed"]) for r in rows
                if r.get("stretch", 1.0) == args.stretch} if args.skip_done else set()
        teachers = Teachers(args, root)
        for dataset in args.datasets:
            teacher = teachers(dataset, batchnorm=True)
            for method in args.methods:
                student = "LeNet-5" if method in SAME_WIDTH else f"LeNet-5 × {args.width:g}"
                player = "model" if method in SELF else "student"
                width = [] if method in SAME_WIDTH else [
                    f"players.{player}.net.name=lenet5", f"players.{player}.net.kwargs.width={args.width}"]
                for seed in args.seeds:
                    if (dataset, method, seed) in done:
                        continue
                    if method in CHAINS:
                        config = f"chain/{method}-{dataset}"
                        print(f"taxonomy: {config} seed {seed}", file=sys.stderr)
                        row = chain_row(config, teacher, root, seed, [f"runtime.num_threads={args.threads}", *args.set])
                    else:
                        config = f"datafree/{method}-{dataset}" if method in DATAFREE else f"kd/{method}-{dataset}"
                        budget = DATAFREE_BUDGET.get(dataset, []) if method in DATAFREE else []
                        print(f"taxonomy: {config} seed {seed}", file=sys.stderr)
                        overrides = [f"teacher.checkpoint={teacher}", f"output.root={root}", f"seed={seed}",
                                     f"runtime.num_threads={args.threads}", *width, *budget]
                        if args.stretch != 1.0:
                            overrides += stretched(config, [*overrides, *args.set], args.stretch)
                        row = Engine(load_config(config, [*overrides, *args.set])).fit()
                    row = {"dataset": dataset, "method": method, "config": config, "student": student, **row,
                           "teacher": teacher, "overrides": args.set, "stretch": args.stretch}
                    append_row(results, rows, row)
    return write_table(root, render(rows))


if __name__ == "__main__":
    sys.exit(main())
