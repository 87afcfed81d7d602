"""The quantized-student table: bit widths down, methods across, final-epoch test accuracy as
mean ± sample std over seeds (best epoch beside it, for reference only), from the
``results.jsonl`` files that ``scripts/sweep.py`` writes for the quant/ configs.

    python scripts/sweep.py --configs quant/ptq-fmnist quant/qat-fmnist quant/qat-kd-fmnist \\
        quant/gdfq-fmnist quant/qimera-fmnist --seeds 0 1 2 --teacher TEACHER --out runs/quant/fmnist-w4a4 \\
        --set players.student.quant.weights=4 players.student.quant.acts=4
    python scripts/quant_table.py runs/quant/fmnist-*/results.jsonl [--out runs/quant/table.md]

"Data-free, best of ours" is the data-free method other than GDFQ with the highest mean final
accuracy in that row, named in the cell.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reproduce import mean_std  # noqa: E402
from sweep import read_jsonl  # noqa: E402

COLUMNS = {"ptq": "PTQ min/max", "qat": "QAT, labels", "qat-kd": "QAT + KD", "gdfq": "data-free GDFQ"}
DATA_FREE = {"qimera": "Qimera", "genie": "Genie-style", "qdfq": "DFQ"}


def method_of(experiment: str) -> str:
    """``qat-kd-fmnist`` -> ``qat-kd``: the experiment name less its dataset."""
    return experiment.rsplit("-", 1)[0]


def student_of(row: dict) -> str:
    names = [o.split("=", 1)[1] for o in row.get("overrides", []) if o.startswith("players.student.net.name=")]
    return {"lenet5_half": "LeNet-5-half"}.get(names[-1] if names else "", "LeNet-5")


def cell(rows: list[dict]) -> str:
    best = max(r["best_acc"] for r in rows)
    return f"{mean_std([r['final_acc'] for r in rows])} (best {best:.2f}, n={len(rows)})"


def render(rows: list[dict]) -> str:
    groups: dict[tuple[str, str], dict[str, list[dict]]] = defaultdict(lambda: defaultdict(list))
    teacher = {r["teacher_acc"] for r in rows if r.get("teacher_acc") is not None}
    for r in rows:
        groups[(student_of(r), r["precision"].split()[0] + (", first/last 8-bit" if "first/last" in r["precision"]
                                                            else ""))][method_of(r["experiment"])].append(r)
    header = ["student", "bits (W/A)", *COLUMNS.values(), "data-free, best of ours"]
    lines = [f"Teacher: {', '.join(f'{t:.2f}%' for t in sorted(teacher))} (float). Final-epoch test accuracy, "
             f"mean ± std over seeds; best epoch beside it.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    order = lambda key: (key[0] != "LeNet-5", -int(key[1][1:].split("A")[0]))  # noqa: E731
    for key in sorted(groups, key=order):
        by_method = groups[key]
        cells = [cell(by_method[m]) if m in by_method else "–" for m in COLUMNS]
        ours = [(statistics.mean(r["final_acc"] for r in by_method[m]), m) for m in DATA_FREE if m in by_method]
        best = f"{DATA_FREE[max(ours)[1]]}: {cell(by_method[max(ours)[1]])}" if ours else "–"
        lines.append("| " + " | ".join([*key, *cells, best]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="results.jsonl files of quant/ sweeps")
    p.add_argument("--out", help="also write the table here")
    args = p.parse_args(argv)
    rows = []
    for path in map(Path, args.results):
        if not path.is_file():
            print(f"quant_table: error: {path} not found", file=sys.stderr)
            return 2
        rows += read_jsonl(path)  # a last line cut short by a killed sweep is dropped, as sweep.py does
    rows = [r for r in rows if r.get("precision") not in (None, "float32")]
    table = render(rows)
    if args.out:
        Path(args.out).write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
