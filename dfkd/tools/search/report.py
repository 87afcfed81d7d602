"""What a search reports: its trials as a table, the proxy's rank correlation with the trials'
accuracy, and the retrained students' Pareto table and plot."""
from __future__ import annotations

import json
import statistics

from dfkd.tools.search.space import describe


def spearman(a: list[float], b: list[float]) -> float | None:
    """Spearman's rank correlation (None for fewer than 3 pairs or a constant side)."""
    from scipy.stats import spearmanr

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return None
    return float(spearmanr(a, b).statistic)


def trial_table(study) -> list[dict]:
    rows = []
    for t in study.get_trials(deepcopy=False):
        if "options" not in t.user_attrs:
            continue
        rows.append({"number": t.number, "state": t.state.name, "value": t.value, "options": t.user_attrs["options"],
                     "cost": t.user_attrs["cost"], "proxy": t.user_attrs.get("proxy"),
                     "over_budget": t.user_attrs.get("over_budget"), "duplicate_of": t.user_attrs.get("duplicate_of"),
                     "epochs": len(t.intermediate_values), "queued_by": t.user_attrs.get("queued_by"),
                     "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
                     if t.datetime_complete and t.datetime_start else None})
    return rows


def rank_correlations(trials: list[dict]) -> dict:
    """How well the proxy (and, for comparison, the parameter count) ranks the finished trials."""
    done = [t for t in trials if t["state"] == "COMPLETE" and t["proxy"] is not None and t.get("duplicate_of") is None]
    accuracy = [t["value"] for t in done]
    return {"n": len(done), "proxy": spearman([t["proxy"] for t in done], accuracy),
            "params": spearman([t["cost"]["params"] for t in done], accuracy)}


def pareto_rows(state: dict) -> list[dict]:
    rows = []
    for label, entry in state["retrain"].items():
        runs = list(entry["runs"].values())
        if not runs:
            continue
        final = [r["final_acc"] for r in runs]
        rows.append({"label": label, "arch": describe(entry["model"], entry["options"]), **entry["cost"],
                     "final": statistics.mean(final), "std": statistics.stdev(final) if len(final) > 1 else 0.0,
                     "best": statistics.mean(r["best_acc"] for r in runs), "seeds": len(runs),
                     "seconds": statistics.mean(r["time_total_s"] for r in runs)})
    for row in rows:  # Pareto-optimal: no other row has at most its parameters and a higher accuracy
        row["pareto"] = not any(o is not row and o["params"] <= row["params"] and o["final"] > row["final"]
                                for o in rows)
    return sorted(rows, key=lambda r: r["params"])


def render(state: dict, rows: list[dict]) -> str:
    trials = state.get("trials", [])
    trained = [t for t in trials if t["state"] in ("COMPLETE", "PRUNED") and not t["over_budget"]
               and t.get("duplicate_of") is None]
    lines = [f"# Search {state['config']['experiment']}", "",
             f"{len(trained)} trials trained ({sum(t['state'] == 'PRUNED' for t in trained)} pruned), "
             f"{sum(bool(t['over_budget']) for t in trials)} candidates over the budget rejected, "
             f"{sum(t.get('duplicate_of') is not None for t in trials)} repeated architectures answered from "
             f"earlier trials, "
             f"{state.get('search_s', 0):.0f} s of search.", ""]
    rc = state.get("rank_correlation") or {}
    if rc.get("n"):
        def fmt(v):
            return "–" if v is None else f"{v:.2f}"
        lines += [f"Spearman ρ with the trials' final validation accuracy over {rc['n']} finished trials: "
                  f"proxy {fmt(rc['proxy'])}, parameter count {fmt(rc['params'])}.", ""]
    lines += ["| student | params | FLOPs | CPU ms | final acc (mean ± std) | best | seeds | Pareto |",
              "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']}: {r['arch']} | {r['params']:,} | {r['flops'] / 1e6:.2f} M | "
                     f"{r.get('latency_ms', float('nan')):.3f} | {r['final']:.2f} ± {r['std']:.2f} | {r['best']:.2f} | "
                     f"{r['seeds']} | {'✓' if r['pareto'] else ''} |")
    lines += ["", "| trial | state | options | params | proxy | val acc | epochs |", "|---|---|---|---|---|---|---|"]
    for t in trials:
        if t["over_budget"] or t.get("duplicate_of") is not None:
            continue
        value = "–" if t["value"] is None else f"{t['value']:.2f}"
        proxy = "–" if t["proxy"] is None else f"{t['proxy']:.3f}"
        lines.append(f"| {t['number']} | {t['state'].lower()} | {json.dumps(t['options'])} | {t['cost']['params']:,} | "
                     f"{proxy} | {value} | {t['epochs']} |")
    return "\n".join(lines) + "\n"


def pareto_plot(rows: list[dict]):
    """Accuracy against parameters (log scale), the Pareto front joined, each point labeled."""
    from dfkd.loop.figures import pareto

    return pareto(rows, "params", "parameters (log scale)")
