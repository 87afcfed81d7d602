"""Do the shipped data-free recipes hold for teachers of other architectures? One table.

    python scripts/teachers_table.py [--archs lenet5 resnet8 resnet20 wrn16_2] [--methods dfq fast cmi]
        [--seeds 0 1 2] [--teacher ARCH=PATH ...] [--dataset digits] [--out runs/teachers]
        [--teacher-set KEY=VALUE ...] [--set KEY=VALUE ...] [--skip-done] [--table-only]

Each teacher is ``teacher/lenet5-<dataset>`` with ``players.model.net.name=<arch>`` (trained here at
seed 0 unless given; ``--teacher-set`` overrides its training), the way a user with their own architecture would start; the student stays
each recipe's own (LeNet-5-half). Each finished run is appended to ``<out>/results.jsonl`` at once
(``--skip-done`` resumes a killed table); ``<out>/results.md`` has a row per recipe and a column per
teacher: final accuracy (mean ± std over seeds; best in brackets, for reference only) and its share
of the teacher's accuracy, marked where it reaches ``--target`` (97% of the teacher's).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce import append_row, mean_std, read_results, write_table  # noqa: E402

from dfkd.core.checkpoint import read_model_file  # noqa: E402
from dfkd.core.config import load_config  # noqa: E402
from dfkd.loop.engine import Engine  # noqa: E402

ARCHS = ["lenet5", "resnet8", "resnet20", "wrn16_2"]
METHODS = ["dfq", "fast", "cmi"]


def teacher_file(arch: str, args, root: Path) -> str:
    """The given model file of ``arch``, else the one trained here before, else one trained now."""
    if arch in args.teacher:
        return args.teacher[arch]
    name = f"teacher/lenet5-{args.dataset}"
    experiment = f"teacher-{arch}-{args.dataset}"
    done = sorted((root / "teachers").glob(f"{experiment}/*/ckpt/final.pt"))
    if done:
        return str(done[-1])
    print(f"teachers: training {experiment}", file=sys.stderr)
    summary = Engine(load_config(name, [f"players.model.net.name={arch}", f"experiment={experiment}",
                                        f"output.root={root / 'teachers'}",
                                        f"runtime.num_threads={args.threads}", *args.teacher_set])).fit()
    return str(Path(summary["run_dir"]) / "ckpt" / "final.pt")


def render(rows: list[dict], archs: list[str], target: float) -> str:
    latest = {(r["config"], r["arch"], r["seed"]): r for r in rows}
    archs = [a for a in archs if any(k[1] == a for k in latest)] + sorted(
        {k[1] for k in latest} - set(archs))
    teacher_acc = {a: next(r["teacher_acc"] for k, r in latest.items() if k[1] == a) for a in archs}
    lines = ["| config | " + " | ".join(f"{a} ({teacher_acc[a]:.2f})" for a in archs) + " |",
             "|" + "---|" * (len(archs) + 1)]
    for config in dict.fromkeys(k[0] for k in latest):
        cells = [config]
        for arch in archs:
            group = [r for k, r in latest.items() if k[0] == config and k[1] == arch]
            if not group:
                cells.append("–")
                continue
            share = statistics.mean(r["final_acc"] for r in group) / teacher_acc[arch]
            mark = " ✓" if share >= target else ""
            cells.append(f"{mean_std([r['final_acc'] for r in group])} ({mean_std([r['best_acc'] for r in group])}), "
                         f"{100 * share:.1f}%{mark}, seeds {', '.join(str(r['seed']) for r in group)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + (f"\n\nEach cell: final accuracy (best), the final's share of the teacher's accuracy "
                               f"(✓: at least {100 * target:g}%), the seeds.\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=ARCHS)
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--dataset", default="digits")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--teacher", nargs="+", default=[], metavar="ARCH=PATH", help="model files to use as teachers")
    p.add_argument("--target", type=float, default=0.97, help="the share of the teacher's accuracy to mark")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--out", default="runs/teachers")
    p.add_argument("--teacher-set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for teachers trained here")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="overrides for every distillation")
    p.add_argument("--skip-done", action="store_true", help="skip runs already in results.jsonl")
    p.add_argument("--table-only", action="store_true", help="only rewrite results.md from results.jsonl")
    args = p.parse_args(argv)
    bad = [t for t in args.teacher if "=" not in t]
    if bad:
        p.error(f"--teacher takes ARCH=PATH, got {bad[0]!r}")
    args.teacher = dict(t.split("=", 1) for t in args.teacher)
    root, results, rows = read_results(args.out)
    if not args.table_only:
        root.mkdir(parents=True, exist_ok=True)
        done = {(r["config"], r["arch"], r["seed"]) for r in rows} if args.skip_done else set()
        for arch in args.archs:
            teacher = teacher_file(arch, args, root)
            sha = read_model_file(teacher)["sha256"]
            for method in args.methods:
                config = f"datafree/{method}-{args.dataset}"
                for seed in args.seeds:
                    if (config, arch, seed) in done:
                        continue
                    print(f"teachers: {config} from {arch} seed {seed}", file=sys.stderr)
                    summary = Engine(load_config(config, [
                        f"teacher.checkpoint={teacher}", f"output.root={root / arch}", f"seed={seed}",
                        f"runtime.num_threads={args.threads}", *args.set])).fit()
                    append_row(results, rows, {"config": config, "arch": arch, **summary, "teacher": teacher,
                                               "teacher_sha256": sha, "overrides": args.set})
    return write_table(root, render(rows, args.archs, args.target))


if __name__ == "__main__":
    sys.exit(main())
