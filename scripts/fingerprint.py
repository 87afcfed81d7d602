"""Weight fingerprints of short runs: proof that a change to the engine changes no number.

    python scripts/fingerprint.py --out FILE [--compare EARLIER.json] [--cases NAME ...] [--root DIR]

Trains two digits teachers (for the ensemble case), then runs each case below at a short budget
on one thread with a fixed seed, and records the SHA-256 of every player's final weights (the
``last.pt`` state of each run, and the exported ``final.pt``). Run it on the old code and on
the new, then ``--compare`` the two reports: any difference is a change of behaviour. Fingerprints
are comparable only on the same machine, torch build and thread count.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

from dfkd.core.checkpoint import safe_load, state_hash
from dfkd.core.config import load_config
from dfkd.loop.engine import Engine

COMMON = ["runtime.num_threads=1", "runtime.progress=false", "seed=0"]
# name -> (config, overrides); '{teacher}' / '{teachers}' are filled in
CASES: dict[str, tuple[str, list[str]]] = {
    "teacher": ("teacher/lenet5-digits", ["train.epochs=1", "train.iters_per_epoch=8"]),
    "dfq-digits": ("datafree/dfq-digits", ["teacher.checkpoint={teacher}", "train.epochs=2",
                                           "train.iters_per_epoch=3"]),
    "cmi-digits": ("datafree/cmi-digits", ["teacher.checkpoint={teacher}", "train.epochs=2",
                                           "train.iters_per_epoch=2", "phases.0.steps=4", "phases.1.steps=3"]),
    "fast-digits": ("datafree/fast-digits", ["teacher.checkpoint={teacher}", "train.epochs=3",
                                             "train.iters_per_epoch=2", "phases.0.steps=3", "phases.1.steps=2"]),
    "meal-digits": ("adversarial/meal-fmnist", ["teacher.checkpoint={teachers}", "data.name=digits",
                                                "experiment=meal-digits", "train.epochs=2",
                                                "train.iters_per_epoch=5"]),
    "crossmodal-response-digits": ("crossmodal/crossmodal-response-digits",
                                   ["teacher.checkpoint={teacher}", "train.epochs=2", "train.iters_per_epoch=5"]),
    # beyond the five above: every other synthesis kind, term family and player kind
    "dafl-digits": ("datafree/dafl-digits", ["teacher.checkpoint={teacher}", "train.epochs=2",
                                             "train.iters_per_epoch=3"]),
    "zskt-digits": ("datafree/zskt-digits", ["teacher.checkpoint={teacher}", "train.epochs=2",
                                             "train.iters_per_epoch=2", "phases.1.steps=3"]),
    "deepinv-digits": ("datafree/deepinv-digits", ["teacher.checkpoint={teacher}", "train.epochs=2",
                                                   "train.iters_per_epoch=2", "phases.0.steps=4",
                                                   "phases.1.steps=3", "synthesis.augment.flip=true",
                                                   "synthesis.augment.brightness=0.1",
                                                   "phases.0.losses.competition=0.2"]),
    "dfad+advkd-logit-digits": ("datafree/dfad+advkd-logit-digits", ["teacher.checkpoint={teacher}",
                                                                     "train.epochs=2", "train.iters_per_epoch=3"]),
    "afd-digits": ("adversarial/afd-fmnist", ["data.name=digits", "experiment=afd-digits", "train.epochs=2",
                                              "train.iters_per_epoch=4"]),
    "advkd-feature-digits": ("adversarial/advkd-feature-fmnist", [
        "teacher.checkpoint={teacher}", "data.name=digits", "experiment=advkd-feature-digits", "train.epochs=2",
        "train.iters_per_epoch=4", "players.student.ema=0.9", "phases.1.mixup=0.2",
        "phases.0.augment={crop_padding: 2}"]),
    "crossmodal-feature-digits": ("crossmodal/crossmodal-feature-digits", [
        "teacher.checkpoint={teacher}", "train.epochs=4", "train.iters_per_epoch=3", "phases.0.epochs=[0, 2]",
        "phases.1.epochs=[2, 4]"]),
    "crossmodal-datafree-digits": ("crossmodal/crossmodal-datafree-digits", [
        "teacher.checkpoint={teacher}", "train.epochs=2", "train.iters_per_epoch=2"]),
    "dfq-ensemble-bf16": ("datafree/dfq-digits", ["teacher.checkpoint={teachers}", "teacher.ensemble=confidence",
                                                  "runtime.amp=bf16", "train.epochs=2", "train.iters_per_epoch=2"]),
    # the remaining synthesis kinds, term families and quantizers
    "nayer-digits": ("datafree/nayer-digits", ["teacher.checkpoint={teacher}", "train.epochs=2",
                                               "train.iters_per_epoch=2", "phases.0.steps=3", "phases.1.steps=2"]),
    "spaceship-digits": ("datafree/spaceship-digits", ["teacher.checkpoint={teacher}", "train.epochs=2",
                                                       "train.iters_per_epoch=2", "phases.0.steps=3",
                                                       "phases.1.steps=2"]),
    "mad-digits": ("datafree/mad-digits", ["teacher.checkpoint={teacher}", "train.epochs=2",
                                           "train.iters_per_epoch=3"]),
    "inversion-clamp-digits": ("datafree/deepinv-digits", ["teacher.checkpoint={teacher}", "train.epochs=2",
                                                           "train.iters_per_epoch=2", "phases.0.steps=3",
                                                           "phases.1.steps=2", "synthesis.clamp=true"]),
    **{f"{m}-digits": (f"kd/{m}-digits", ["teacher.checkpoint={teacher}", "train.epochs=2",
                                          "train.iters_per_epoch=3"])
       for m in ("at", "dkd", "crd", "rkd", "sp", "pkt")},
    "fsp-digits": ("kd/fsp-digits", ["teacher.checkpoint={teacher}", "train.epochs=4", "train.iters_per_epoch=2",
                                     "phases.0.epochs=[0, 2]", "phases.1.epochs=[2, 4]"]),
    "fitnets-digits": ("kd/fitnets-digits", ["teacher.checkpoint={teacher}", "train.epochs=4",
                                             "train.iters_per_epoch=2", "phases.0.epochs=[0, 2]",
                                             "phases.1.epochs=[2, 4]"]),
    "byot-digits": ("kd/byot-digits", ["train.epochs=2", "train.iters_per_epoch=3"]),
    "cskd-digits": ("kd/cskd-digits", ["train.epochs=2", "train.iters_per_epoch=3"]),
    "gdfq-digits": ("quant/gdfq-digits", ["teacher.checkpoint={teacher}", "train.epochs=3",
                                          "train.iters_per_epoch=2", "phases.1.epochs=[1, 3]"]),
    "qimera-digits": ("quant/qimera-digits", ["teacher.checkpoint={teacher}", "train.epochs=3",
                                              "train.iters_per_epoch=2", "phases.1.epochs=[1, 3]"]),
    "genie-digits": ("quant/genie-digits", ["teacher.checkpoint={teacher}", "train.epochs=2",
                                            "train.iters_per_epoch=2", "phases.0.steps=3", "phases.1.steps=2"]),
    "qat-kd-digits": ("quant/qat-kd-digits", ["teacher.checkpoint={teacher}", "train.epochs=2",
                                              "train.iters_per_epoch=3"]),
    "ptq-digits": ("quant/ptq-digits", ["teacher.checkpoint={teacher}"]),
}


def train_teachers(root: Path) -> list[str]:
    paths = []
    for seed in (0, 1):
        cfg = load_config("teacher/lenet5-digits", [*COMMON, f"seed={seed}", f"output.root={root}",
                                                     "train.epochs=2", "output.tensorboard=false"])
        engine = Engine(cfg)
        engine.fit()
        paths.append(str(engine.run_dir / "ckpt" / "final.pt"))
    return paths


def fingerprint(name: str, root: Path, teachers: list[str]) -> dict[str, str]:
    config, overrides = CASES[name]
    overrides = [o.replace("{teachers}", json.dumps(teachers)).replace("{teacher}", teachers[0]) for o in overrides]
    cfg = load_config(config, [*COMMON, *overrides, f"output.root={root}"])
    engine = Engine(cfg)
    engine.fit()
    state = safe_load(engine.run_dir / "ckpt" / "last.pt")
    prints = {f"{player}": state_hash(s["model"]) for player, s in state["players"].items()}
    for player, s in state["players"].items():
        if "ema" in s:
            prints[f"{player}.ema"] = state_hash(s["ema"])
    if state.get("synthesis") and "pool" in state["synthesis"]:
        prints["pool"] = state_hash({k: v for k, v in state["synthesis"]["pool"].items() if torch.is_tensor(v)})
    prints["final.pt"] = safe_load(engine.run_dir / "ckpt" / "final.pt")["sha256"]
    return prints


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="JSON report to write")
    parser.add_argument("--compare", help="an earlier report: exit 1 and list what differs")
    parser.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--root", help="run folders go here (default: a temporary folder)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.root or tmp)
        teachers = train_teachers(root / "teachers")
        report = {"torch": torch.__version__, "cases": {}}
        for name in args.cases:
            report["cases"][name] = fingerprint(name, root, teachers)
            print(f"{name}: {report['cases'][name]}", file=sys.stderr)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    if args.compare:
        earlier = json.loads(Path(args.compare).read_text())["cases"]
        differ = [f"{case}.{key}" for case in report["cases"] for key in
                  set(report["cases"][case]) | set(earlier.get(case, {}))
                  if report["cases"][case].get(key) != earlier.get(case, {}).get(key)]
        print("identical" if not differ else "differ: " + ", ".join(sorted(differ)))
        return 1 if differ else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
