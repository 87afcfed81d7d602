"""The data-free table: every method, fast variant and paper recipe, on digits and Fashion-MNIST.

    python scripts/reproduce.py [--datasets digits fmnist] [--methods dafl dfad ...] [--recipes fast paper]
        [--seeds 0 1 2] [--teacher-digits PATH] [--teacher-fmnist PATH] [--out runs/reproduce]
        [--set KEY=VALUE ...] [--skip-done] [--table-only]

LeNet-5 → LeNet-5-half. Teachers are trained first (seed 0) unless given: ``teacher/lenet5-<dataset>``,
and for the recipes whose papers used LeNets without BatchNorm (DAFL, DFAD) also
``teacher/lenet5-nobn-<dataset>``. Each finished run is appended to ``<out>/results.jsonl`` at once
(``--skip-done`` resumes a killed table); ``<out>/results.md`` is the markdown table: final accuracy
(mean ± sample std over seeds; best beside it, for reference only), synthesis and total seconds, the
budget beside the paper's, the teacher's weight hash, and the paper's own number where one exists.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from dfkd.core.checkpoint import read_model_file
from dfkd.core.config import load_config
from dfkd.core.schema import Config
from dfkd.loop.engine import Engine

METHODS = ["dfq", "fast", "cmi", "nayer", "mad", "spaceship", "deepinv", "zskt", "dfad", "dafl"]
PAPER_RECIPES = {"dfq", "fast", "cmi", "deepinv", "zskt", "dfad", "dafl"}  # methods with a -paper config
DATASETS = {"digits": "digits", "fmnist": "fashion-mnist"}
NOBN = {"dafl", "dfad"}  # their papers' LeNet-5 pair has no BatchNorm
# the papers' own LeNet-5 -> LeNet-5-half numbers (MNIST), and other data-free methods' on the same pair
PUBLISHED = {("digits", "dafl"): "DAFL 98.20 (MNIST)", ("digits", "dfad"): "DFAD 98.3 (MNIST)"}
REFERENCES = {"digits": "ZSKD 98.77 on MNIST (teacher 99.34)",
              "fmnist": "ZSKD 79.62 (teacher 90.84); KegNet 85.23 / 87.80 (ResNet-14 teacher 92.50)"}


def config_name(method: str, dataset: str, recipe: str) -> str:
    return f"datafree/{method}-{dataset}" + ("-paper" if recipe == "paper" else "")


def budget(config: Config) -> str:
    """Iterations × the synthetic batch, and the inner steps of per-batch synthesis."""
    iters = config.train.epochs * config.train.iters_per_epoch
    inner = next((p.steps for p in config.phases if p.player == "synthesizer"), None)
    return f"{iters} it × {config.synthesis.batch_size}" + (f", {inner} inner" if inner else "")


def train_teacher(name: str, root: Path, threads: int) -> str:
    summary = Engine(load_config(name, [f"output.root={root}", f"runtime.num_threads={threads}"])).fit()
    return str(Path(summary["run_dir"]) / "ckpt" / "final.pt")


class Teachers:
    """The dataset's teacher model files, with BatchNorm or without: given, found in the table's
    folder from an earlier run, or trained (seed 0) when first needed."""

    def __init__(self, args, root: Path):
        self.args, self.root, self.files = args, root, {}

    def __call__(self, dataset: str, batchnorm: bool) -> str:
        if (dataset, batchnorm) not in self.files:
            given = getattr(self.args, f"teacher_{dataset}") if batchnorm else None
            name = f"teacher/lenet5-{dataset}" if batchnorm else f"teacher/lenet5-nobn-{dataset}"
            done = sorted((self.root / "teachers").glob(f"{load_config(name).experiment}/*/ckpt/final.pt"))
            self.files[dataset, batchnorm] = given or (str(done[-1]) if done else train_teacher(
                name, self.root / "teachers", self.args.threads))
        return self.files[dataset, batchnorm]


def table_arguments(p: argparse.ArgumentParser, out: str) -> None:
    """The options the table scripts share: seeds, teachers, threads, folder, overrides, resuming."""
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--teacher-digits", help="LeNet-5 (BatchNorm) model file for digits")
    p.add_argument("--teacher-fmnist", help="LeNet-5 (BatchNorm) model file for Fashion-MNIST")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--out", default=out)
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for every run")
    p.add_argument("--skip-done", action="store_true", help="skip runs already in results.jsonl")
    p.add_argument("--table-only", action="store_true", help="only render results.jsonl")


def read_results(out: str) -> tuple[Path, Path, list[dict]]:
    """The table's folder, its results.jsonl and the rows already in it."""
    root = Path(out)
    results = root / "results.jsonl"
    return root, results, [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []


def append_row(results: Path, rows: list[dict], row: dict) -> None:
    """One finished run, written at once: a killed table loses only the run in flight."""
    with results.open("a") as f:
        f.write(json.dumps(row) + "\n")
    rows.append(row)


def write_table(root: Path, table: str) -> int:
    (root / "results.md").write_text(table)
    print(table, end="")
    return 0


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}" if values else "–"


def render(rows: list[dict]) -> str:
    latest = {(r["dataset"], r["config"], r["seed"]): r for r in rows}
    groups: dict[tuple, list[dict]] = {}
    for (dataset, config, _), row in latest.items():
        groups.setdefault((dataset, config), []).append(row)
    lines = ["| dataset | config | final | best | seeds | synthesis s | total s | budget (ours / paper's) | "
             "teacher (acc, sha256) | published |", "|" + "---|" * 10]
    for (dataset, config), group in groups.items():
        first = group[0]
        cells = [dataset, config, mean_std([r["final_acc"] for r in group]),
                 mean_std([r["best_acc"] for r in group]), ", ".join(str(r["seed"]) for r in group),
                 f"{statistics.mean(r['time_synthesis_s'] for r in group):.0f}",
                 f"{statistics.mean(r['time_total_s'] for r in group):.0f}", f"{first['budget']} / {first['paper_budget']}",
                 f"{first['teacher_acc']:.2f}, {first['teacher_sha256'][:12]}", first.get("published") or ""]
        lines.append("| " + " | ".join(cells) + " |")
    notes = [f"- {DATASETS.get(d, d)}: {text}" for d, text in REFERENCES.items()]
    return "\n".join(lines) + "\n\nOther data-free methods on the same pair, as published:\n" + "\n".join(notes) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--recipes", nargs="+", default=["fast"], choices=["fast", "paper"])
    table_arguments(p, "runs/reproduce")
    args = p.parse_args(argv)
    root, results, rows = read_results(args.out)
    if not args.table_only:
        root.mkdir(parents=True, exist_ok=True)
        done = {(r["dataset"], r["config"], r["seed"]) for r in rows} if args.skip_done else set()
        teachers = Teachers(args, root)
        for dataset in args.datasets:
            for recipe in args.recipes:
                for method in args.methods:
                    if recipe == "paper" and method not in PAPER_RECIPES:
                        continue
                    name = config_name(method, dataset, recipe)
                    teacher = teachers(dataset, batchnorm=not (recipe == "paper" and method in NOBN))
                    meta = read_model_file(teacher)
                    for seed in args.seeds:
                        if (dataset, name, seed) in done:
                            continue
                        print(f"reproduce: {name} seed {seed}", file=sys.stderr)
                        overrides = [f"teacher.checkpoint={teacher}", f"output.root={root}", f"seed={seed}",
                                     f"runtime.num_threads={args.threads}", *args.set]
                        config = load_config(name, overrides)
                        summary = Engine(config).fit()
                        row = {"dataset": dataset, "config": name, "recipe": recipe, **summary,
                               "budget": budget(config), "paper_budget": budget(load_config(config_name(
                                   method, dataset, "paper"))) if method in PAPER_RECIPES else "–",
                               "teacher": teacher,
                               "teacher_sha256": meta["sha256"], "published": PUBLISHED.get((dataset, method)),
                               "overrides": args.set}
                        append_row(results, rows, row)
    return write_table(root, render(rows))


if __name__ == "__main__":
    sys.exit(main())
