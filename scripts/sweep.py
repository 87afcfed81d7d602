"""Method × seed sweep: run each (config, seed) in-process, one after another, and tabulate.

    python scripts/sweep.py --configs datafree/dfad-digits datafree/dfq-digits --seeds 0 1 2 \\
        --teacher runs/teacher-lenet5-digits/<run>/ckpt/final.pt [--out runs/sweeps/NAME] \\
        [--set train.epochs=5 ...] [--table results.md] [--skip-done]
    python scripts/sweep.py --from-jsonl runs/sweeps/NAME/results.jsonl    # the table only

Each finished run's summary is appended to ``<out>/results.jsonl`` at once, so a killed sweep
keeps its finished rows; ``--skip-done`` then runs only the (config, seed) pairs still missing.
The table reports the final-epoch accuracy (mean ± sample std over seeds) as the result; the
best accuracy is shown beside it only for reference, since it was picked on the eval split.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

COLUMNS = ["method / experiment", "teacher acc", "final acc", "best (on eval split)", "n seeds",
           "synthesis s", "total s", "to 99% of teacher s", "seeds"]


def _mean_std(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"  # stdev: sample (n-1)


def _mean(values: list, digits: int) -> str:
    values = [v for v in values if v is not None]
    return f"{statistics.mean(values):.{digits}f}" if values else "–"


def _reached(values: list) -> str:
    """Mean time over the seeds that reached the target, and how many did."""
    hit = [v for v in values if v is not None]
    return "–" if not hit else f"{statistics.mean(hit):.1f} ({len(hit)}/{len(values)})"


def render_table(rows: list[dict]) -> str:
    """One markdown row per config (in order of first appearance) aggregated over its seeds.
    A (config, seed) pair that occurs twice (a rerun) counts once, with its latest result."""
    latest: dict[tuple, dict] = {}
    for row in rows:
        latest[(row.get("config") or row["experiment"], row["seed"])] = row
    groups: dict[str, list[dict]] = {}
    for (name, _), row in latest.items():
        groups.setdefault(name, []).append(row)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for name, group in groups.items():
        def col(key):
            return [r.get(key) for r in group]
        cells = [name, _mean(col("teacher_acc"), 2), _mean_std(col("final_acc")), _mean_std(col("best_acc")),
                 str(len(group)), _mean(col("time_synthesis_s"), 1), _mean(col("time_total_s"), 1),
                 _reached(col("time_to_99pct_teacher_s")), ", ".join(str(s) for s in sorted(col("seed")))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def read_jsonl(path: Path) -> list[dict]:
    """The finished runs' rows; a last line cut short (a sweep killed while writing it) is dropped
    from the file, with a note; a damaged line elsewhere is an error naming it."""
    if not path.exists():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                from dfkd_base.errors import DfkdError

                raise DfkdError(f"{path}: line {number} is not a JSON row") from None
            print(f"sweep: {path}: dropped its last line, cut short (a run killed while writing it)", file=sys.stderr)
            from dfkd.core.io import atomic_write_text

            atomic_write_text(path, "".join(line + "\n" for line in lines[:-1]))  # rows appended later stay readable
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", help="shipped config names or YAML paths")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--teacher", metavar="PATH", nargs="+",
                   help="teacher model file for distill configs; several make an ensemble")
    p.add_argument("--out", help="sweep folder (default: runs/sweeps/<stamp>)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="config overrides for every run")
    p.add_argument("--table", help="where to write the markdown table (default: results.md beside results.jsonl)")
    p.add_argument("--skip-done", action="store_true", help="skip (config, seed) pairs already in results.jsonl")
    p.add_argument("--from-jsonl", metavar="FILE", help="only render the table of an existing results.jsonl")
    args = p.parse_args(argv)
    if not args.from_jsonl and not args.configs:
        p.error("--configs is required (or --from-jsonl FILE)")
    return args


def run_sweep(args: argparse.Namespace, results: Path) -> None:
    from dfkd.core.config import load_config
    from dfkd.loop.engine import Engine
    from dfkd_base.errors import ConfigError

    # Resolve every config before the first run, so a typo or a missing teacher fails now,
    # not after an hour of the configs before it.
    plans = []
    for name in args.configs:
        overrides = [f"output.root={results.parent}", *args.set]
        config = load_config(name, overrides)
        if config.teacher is not None:
            if args.teacher:
                teacher = args.teacher[0] if len(args.teacher) == 1 else json.dumps(args.teacher)
                overrides.append(f"teacher.checkpoint={teacher}")
            elif config.teacher.checkpoint is None:
                raise ConfigError(f"{name} distils a teacher: pass --teacher PATH (a model file)")
        plans.append((name, overrides))
    results.parent.mkdir(parents=True, exist_ok=True)

    # a row counts as done only if it ran with the same overrides: other --set values are other runs
    done = {(r.get("config"), r["seed"], tuple(r.get("overrides", []))) for r in read_jsonl(results)} \
        if args.skip_done else set()
    for name, overrides in plans:
        for seed in args.seeds:
            if (name, seed, tuple(args.set)) in done:
                print(f"sweep: skip {name} seed {seed} (in {results})", file=sys.stderr)
                continue
            print(f"sweep: {name} seed {seed}", file=sys.stderr)
            summary = Engine(load_config(name, [*overrides, f"seed={seed}"])).fit()
            row = {"config": name, **summary, "overrides": args.set}
            with results.open("a") as f:  # one line per finished run: a kill loses only the run in flight
                f.write(json.dumps(row) + "\n")


def main(argv: list[str] | None = None) -> int:
    from dfkd.core.io import atomic_write_text
    from dfkd_base.errors import DfkdError

    args = parse_args(argv)
    results = Path(args.from_jsonl) if args.from_jsonl else \
        Path(args.out or f"runs/sweeps/{time.strftime('%Y%m%d-%H%M%S')}") / "results.jsonl"
    try:
        if not args.from_jsonl:
            run_sweep(args, results)
        elif not results.exists():
            raise DfkdError(f"{results} not found")
        table = render_table(read_jsonl(results))
        atomic_write_text(Path(args.table) if args.table else results.with_name("results.md"), table)
    except DfkdError as exc:
        print(f"sweep: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"sweep: interrupted; finished runs are in {results} (rerun with --skip-done)", file=sys.stderr)
        return 130
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
