"""The privacy table: `dfkd audit` of finished runs, one row per run, beside its accuracy.

    python scripts/audit_table.py runs/table/fmnist/*/*_s0 runs/taxonomy/kd-fmnist/*_s0 \\
        [--samples 500] [--references 2000] [--shadows 4] [--lira offline|online] [--out runs/audit-fmnist.md]

Each run folder gets its audit.json / audit.md (as `dfkd audit` writes them); the table lists the
teacher's membership-inference AUC once per teacher, then per run: the student's final accuracy,
its loss-attack AUC and TPR at 1% FPR, and for data-free runs the median ratio of the distance to
the nearest training image over that to the nearest test image (pixels, teacher features) and the
share of synthetic samples closer to training images by more than the margin, beside the same
share for unseen test images (the null).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def row(run: Path, report: dict) -> str:
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").exists() else {}
    student = report["membership"]["student"]
    lira = report.get("lira", {}).get("student")
    cells = [summary.get("experiment", run.parent.name), f"{summary.get('final_acc', float('nan')):.2f}",
             f"{student['auc']:.3f}", f"{100 * student['tpr_at_1pct_fpr']:.2f}%",
             f"{lira['auc']:.3f} / {100 * lira['tpr_at_1pct_fpr']:.2f}%" if lira else "–"]
    syn = report.get("synthetic")
    if syn:
        null = syn["unseen_test_images"]
        cells += [f"{syn['pixel']['ratio_median']:.3f}", f"{syn['feature']['ratio_median']:.3f}",
                  f"{100 * syn['pixel']['closer_to_train']:.1f}% / {100 * syn['feature']['closer_to_train']:.1f}%",
                  f"{100 * null['pixel']['closer_to_train']:.1f}% / {100 * null['feature']['closer_to_train']:.1f}%"]
    else:
        cells += ["– (real data)", "–", "–", "–"]
    return "| " + " | ".join(cells) + " |"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="finished run folders")
    p.add_argument("--samples", type=int, default=500)
    p.add_argument("--references", type=int, default=2000)
    p.add_argument("--out", help="also write the table here")
    p.add_argument("--shadows", type=int, default=4, help="LiRA's shadow models per audit (0: none)")
    p.add_argument("--lira", choices=["offline", "online"], default="offline")
    p.add_argument("--reuse", action="store_true", help="tabulate a run's existing audit.json instead of auditing again")
    args = p.parse_args(argv)
    from dfkd.tools.audit.run import audit
    from dfkd_base.errors import DfkdError

    teachers, lines = {}, []
    for run in map(Path, args.runs):
        try:
            if args.reuse and (run / "audit.json").is_file():
                report = json.loads((run / "audit.json").read_text())
            else:
                report = audit(run, samples=args.samples, references=args.references, shadows=args.shadows,
                               lira=args.lira)
        except DfkdError as exc:
            print(f"audit_table: {run}: {exc}", file=sys.stderr)
            continue
        teachers.setdefault(report["teacher"], {**report["membership"]["teacher"],
                                                "lira": report.get("lira", {}).get("teacher")})
        lines.append(row(run, report))
    head = ["run", "student final acc", "loss attack AUC", "TPR @ 1% FPR", "LiRA AUC / TPR @ 1% FPR", "median d_train/d_test (pixels)",
            "(teacher features)", "closer to train > margin (pixels / features)", "the same for unseen test images"]
    table = [f"Teacher {t}: loss-attack AUC {s['auc']:.3f}, TPR @ 1% FPR {100 * s['tpr_at_1pct_fpr']:.2f}%"
             + (f"; LiRA AUC {s['lira']['auc']:.3f}, TPR @ 1% FPR {100 * s['lira']['tpr_at_1pct_fpr']:.2f}%, "
                f"@ 0.1% {100 * s['lira']['tpr_at_0.1pct_fpr']:.2f}%" if s.get("lira") else "")
             for t, s in teachers.items()]
    table += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head), *lines]
    text = "\n".join(table) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
