"""Command line: ``dfkd teacher | distill | chain | search | eval | export | audit | list``.

Config overrides follow the config name, either as ``key.path=value`` or ``--key.path value``::

    dfkd teacher --config teacher/lenet5-fmnist train.epochs=4 --optim.lr 0.05

Errors caused by input (config, checkpoint, dataset, name) print one line and exit with 2.
"""
from __future__ import annotations

import argparse
import json
import sys

from dfkd_base.errors import DfkdError


def _overrides(extra: list[str]) -> list[str]:
    """Turn leftover arguments into ``key=value`` overrides (``--a.b v`` and ``--a.b=v`` too)."""
    out, i = [], 0
    while i < len(extra):
        arg = extra[i]
        if arg.startswith("--"):
            key = arg[2:]
            if "=" in key:
                out.append(key)
            elif i + 1 < len(extra):
                out.append(f"{key}={extra[i + 1]}")
                i += 1
            else:
                raise DfkdError(f"option '{arg}' needs a value")
        elif "=" in arg:
            out.append(arg)
        else:
            raise DfkdError(f"unexpected argument '{arg}' (overrides look like key.path=value)")
        i += 1
    return out


def _player_shortcuts(overrides: list[str], player: str) -> list[str]:
    """``optim.lr=...`` / ``sched.*`` / ``net.*`` without a player prefix address the trained model."""
    return [f"players.{player}.{o}" if o.split(".")[0] in ("optim", "sched", "net") else o for o in overrides]


def _run(args, extra: list[str], task: str) -> int:
    from dfkd.core.config import load_config
    from dfkd.loop.engine import Engine

    player = "model" if task == "teacher" else "student"
    overrides = _player_shortcuts(_overrides(extra), player)
    teachers = getattr(args, "teacher", None)
    if teachers:  # one file, or several (an ensemble) as a YAML list
        overrides.append(f"teacher.checkpoint={teachers[0] if len(teachers) == 1 else json.dumps(teachers)}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.out:
        overrides.append(f"output.root={args.out}")
    config = load_config(args.config, overrides)
    if config.task != task:
        raise DfkdError(f"config '{args.config}' is a {config.task} config; run it with `dfkd {config.task}`")
    if args.run_dir and not args.resume:
        raise DfkdError("--run-dir names the folder a resumed run continues in; give it with --resume")
    engine = Engine(config, run_dir=args.run_dir, resume=args.resume)
    print(f"run folder: {engine.run_dir}", file=sys.stderr)
    summary = engine.fit()
    print(json.dumps(summary))
    return 0


def _eval(args, extra: list[str]) -> int:
    from dfkd.data.datasets import load_dataset
    from dfkd.data.loader import TensorLoader
    from dfkd.loop.evaluation import evaluate
    from dfkd.loop.runtime import resolve_device
    from dfkd.nets.arch import load_model

    device = resolve_device(args.device)
    model, meta = load_model(args.checkpoint, device, allow_unhashed=args.allow_unhashed)
    data_config = (meta.get("config") or {}).get("data") or {}
    if data_config.get("pairs_test") and not args.data:  # a student of a user's pairs: their test pairs
        from dfkd.data.datasets import dataset_info
        from dfkd.data.pairs import load_pairs

        dataset = load_pairs(data_config["pairs_test"], dataset_info(meta["dataset"]), "test")
    else:
        dataset = load_dataset(args.data or meta["dataset"], args.split, args.root)
    if dataset.info.num_classes != meta["arch"]["num_classes"]:
        raise DfkdError(f"{args.checkpoint} predicts {meta['arch']['num_classes']} classes; "
                        f"'{dataset.info.name}' has {dataset.info.num_classes}")
    if not data_config.get("modality") and not data_config.get("pairs_test"):
        import torch

        try:
            with torch.no_grad():
                model(torch.zeros(2, *dataset.info.shape, device=device))
        except RuntimeError:
            arch = meta["arch"]
            raise DfkdError(f"{args.checkpoint} ({arch['name']}, {arch['in_channels']} channels, {arch['image_size']} "
                            f"px) does not take '{dataset.info.name}' images of shape {tuple(dataset.info.shape)}") \
                from None
    # a cross-modal student is evaluated on the modality it was trained on
    modality_name = data_config.get("modality")
    modality = None
    if modality_name:
        from dfkd.data.modalities import get_modality

        modality = get_modality(modality_name)
    scores = evaluate(model, TensorLoader(dataset, args.batch_size, device=device), modality=modality,
                      info=dataset.info)
    result = {"checkpoint": args.checkpoint, "dataset": dataset.info.name, "modality": modality_name,
              "split": args.split,
              "acc": round(scores["acc"], 2), "n": scores["n"], "recorded_acc": meta.get("accuracy"),
              "sha256": meta.get("sha256")}
    if meta["arch"].get("quant"):
        from dfkd.nets.quant import model_bytes, quant_summary

        result.update(precision=quant_summary(meta["arch"]["quant"]), model_bytes=model_bytes(model)[0])
    if "exits" in scores:
        result.update(exits=[round(a, 2) for a in scores["exits"]], exit_ensemble=round(scores["exit_ensemble"], 2))
    if args.exit_thresholds:
        from dfkd.loop.evaluation import early_exit, exits_of

        if exits_of(model) is None:
            raise DfkdError(f"{args.checkpoint} has no exits; --exit-thresholds needs a model built with "
                            f"net.kwargs: {{exits: ...}}")
        result["early_exit"] = early_exit(model, TensorLoader(dataset, args.batch_size, device=device),
                                          args.exit_thresholds, dataset.info.shape)
    print(json.dumps(result))
    return 0


def _export(args, extra: list[str]) -> int:
    """ONNX export of a model file (a quantized one as an integer QDQ graph), checked against the
    model on the test split in ONNX Runtime, with its CPU latency beside the float network's."""
    from pathlib import Path

    import torch

    from dfkd.data.datasets import load_dataset
    from dfkd.data.loader import TensorLoader
    from dfkd.nets.arch import load_model
    from dfkd.nets.quant import is_quantized, quant_summary
    from dfkd.tools.export import export_onnx, float_copy, onnx_check

    model, meta = load_model(args.checkpoint, "cpu", allow_unhashed=args.allow_unhashed)
    arch = meta["arch"]
    out = Path(args.out or Path(args.checkpoint).with_suffix(".onnx"))
    if out.resolve() == Path(args.checkpoint).resolve():
        raise DfkdError(f"--out {out} would replace the model file itself")
    if not out.parent.is_dir():
        raise DfkdError(f"--out {out}: folder {out.parent} does not exist")
    example = torch.zeros(1, arch["in_channels"], arch["image_size"], arch["image_size"])
    export_onnx(model, out, example)
    result = {"checkpoint": args.checkpoint, "onnx": str(out), "precision": quant_summary(arch.get("quant"))}
    if not args.no_check:
        dataset = load_dataset(args.data or meta["dataset"], "test", args.root)
        loader = TensorLoader(dataset, args.batch_size)
        result.update(onnx_check(out, model, loader))
        if result["agreement_deployed"] < result["agreement"] - 0.5:
            print(f"dfkd: warning: ONNX Runtime's optimized integer kernels on this CPU agree with the model on "
                  f"{result['agreement_deployed']:.1f}% of predictions (the exported graph itself: "
                  f"{result['agreement']:.1f}%): its uint8 x int8 products saturate on x86-64 without VNNI",
                  file=sys.stderr)
        if is_quantized(model):  # the same network in float32, exported and timed the same way
            reference = out.with_name(out.stem + ".fp32.onnx")
            export_onnx(float_copy(model, arch), reference, example)
            result["latency_ms_fp32"] = onnx_check(reference, float_copy(model, arch), loader)["latency_ms"]
    print(json.dumps(result))
    return 0


def _audit(args, extra: list[str]) -> int:
    from dfkd.tools.audit.report import render
    from dfkd.tools.audit.run import audit

    report = audit(args.run_dir, samples=args.samples, references=args.references, k=args.pairs,
                   margin=args.margin, root=args.root, shadows=args.shadows, lira=args.lira)
    print(render(report), end="")
    return 0


def _search(args, extra: list[str]) -> int:
    from dfkd.tools.search.config import load_search
    from dfkd.tools.search.study import Search

    if args.resume:
        if extra or args.config or args.teacher or args.storage:
            raise DfkdError("--resume continues a search as it was configured; give no --config, --teacher, "
                            "--storage or overrides")
        search = Search.resume(args.resume)
    else:
        if not args.config:
            raise DfkdError("dfkd search needs --config (a search/ config) or --resume SEARCH_DIR")
        overrides = _overrides(extra) + ([f"seed={args.seed}"] if args.seed is not None else []) + \
            ([f"root={args.out}"] if args.out else []) + ([f"teacher={args.teacher}"] if args.teacher else [])
        search = Search(load_search(args.config, overrides), storage=args.storage, study_name=args.study_name)
    print(f"search folder: {search.folder}", file=sys.stderr)
    search.run(trials_only=args.trials_only)
    if not args.trials_only:
        print((search.folder / "search.md").read_text(), end="")
    return 0


def _chain(args, extra: list[str]) -> int:
    from dfkd.tools.chain import Chain, load_chain

    if args.resume:
        if extra or args.config:
            raise DfkdError("--resume continues a chain as it was configured; give no --config or overrides")
        chain = Chain.resume(args.resume)
    else:
        if not args.config:
            raise DfkdError("dfkd chain needs --config (a chain/ config) or --resume CHAIN_DIR")
        overrides = _overrides(extra) + ([f"seed={args.seed}"] if args.seed is not None else []) + \
            ([f"root={args.out}"] if args.out else [])
        chain = Chain(load_chain(args.config, overrides))
    print(f"chain folder: {chain.folder}", file=sys.stderr)
    state = chain.run()
    print((chain.folder / "chain.md").read_text(), end="")
    return 0 if state else 1


def _list(args, extra: list[str]) -> int:
    import generators
    from dfkd.core.config import named_configs
    from dfkd.core.registries import SYNTHESIZERS
    from dfkd.data.datasets import DATASETS
    from dfkd.data.modalities import MODALITIES
    from dfkd.methods.losses.base import LOSSES
    from dfkd.nets.discriminators import DISCRIMINATORS
    from dfkd.nets.models import list_models

    tables = {"configs": named_configs, "models": list_models, "datasets": DATASETS.names, "losses": LOSSES.names,
              "discriminators": DISCRIMINATORS.names, "modalities": MODALITIES.names,
              "generators": generators.GENERATORS.names, "synthesizers": SYNTHESIZERS.names}
    for what in [args.what] if args.what else tables:
        print(f"{what}: {', '.join(tables[what]())}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfkd", description="Data-free and adversarial knowledge distillation.")
    sub = parser.add_subparsers(dest="command", required=True)

    def training(name: str, help: str, default: str):
        p = sub.add_parser(name, help=help, description=help + " Extra arguments are config overrides.")
        p.add_argument("--config", default=default, help=f"shipped config name or YAML path (default: {default})")
        p.add_argument("--resume", metavar="CKPT", help="continue a run from its ckpt/last.pt")
        p.add_argument("--run-dir", metavar="DIR", help="with --resume: the folder to continue in, when the state "
                                                        "was moved out of its run")
        p.add_argument("--seed", type=int, help="shortcut for seed=N")
        p.add_argument("--out", help="output root (shortcut for output.root=DIR)")
        return p

    training("teacher", "Train a teacher on a real dataset.", "teacher/lenet5-digits")
    p = training("distill", "Distil a teacher into a student.", "datafree/dfad-digits")
    p.add_argument("--teacher", metavar="CKPT", action="append",
                   help="teacher model file (shortcut for teacher.checkpoint=...); repeat it for an ensemble")

    p = sub.add_parser("chain", help="Run a chain of distillations (TAKD, DGKD, born-again), each stage's "
                                     "model the next one's teacher.", description="Extra arguments are chain "
                                     "config overrides (stage overrides go in the config).")
    p.add_argument("--config", help="chain config: a shipped chain/ name or a YAML path")
    p.add_argument("--resume", metavar="CHAIN_DIR", help="continue a killed chain in its folder")
    p.add_argument("--seed", type=int, help="shortcut for seed=N")
    p.add_argument("--out", help="output root (shortcut for root=DIR)")

    p = sub.add_parser("search", help="Search a student architecture for a teacher: an Optuna study of short "
                                      "distillations under a budget, then the best retrained over seeds and a "
                                      "Pareto table.", description="Extra arguments are search config overrides.")
    p.add_argument("--config", help="search config: a shipped search/ name or a YAML path")
    p.add_argument("--teacher", metavar="CKPT", help="the teacher's model file (shortcut for teacher=CKPT)")
    p.add_argument("--resume", metavar="SEARCH_DIR", help="continue a killed search in its folder")
    p.add_argument("--storage", metavar="URL", help="the study's database (any URL Optuna accepts, e.g. "
                                                    "postgresql://host/db); default: study.db in the search folder")
    p.add_argument("--study-name", help="the study's name in --storage (default: the experiment's)")
    p.add_argument("--trials-only", action="store_true",
                   help="run trials until the study has enough, then stop (a helper worker of a shared study)")
    p.add_argument("--seed", type=int, help="shortcut for seed=N")
    p.add_argument("--out", help="output root (shortcut for root=DIR)")

    p = sub.add_parser("eval", help="Evaluate a model file on a dataset split.")
    p.add_argument("checkpoint")
    p.add_argument("--data", help="dataset name (default: the one the checkpoint was trained on)")
    p.add_argument("--split", default="test", choices=["train", "test"])
    p.add_argument("--root", help="dataset root folder")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--device", default="auto")
    p.add_argument("--allow-unhashed", action="store_true",
                   help="load a model file that records no SHA-256 of its weights (only one you trust)")
    p.add_argument("--exit-thresholds", type=float, nargs="+", metavar="P",
                   help="a model with exits: early-exit accuracy and FLOPs at each confidence threshold")

    p = sub.add_parser("export", help="Export a model file to ONNX (a quantized one as an integer QDQ graph) "
                                      "and check it in ONNX Runtime against the model on the test split.")
    p.add_argument("checkpoint")
    p.add_argument("--out", help="the .onnx file (default: beside the model file)")
    p.add_argument("--data", help="dataset of the check (default: the model's)")
    p.add_argument("--root", help="dataset root folder")
    p.add_argument("--batch-size", type=int, default=256, help="batch of the check and of the latency timing")
    p.add_argument("--no-check", action="store_true", help="export only")
    p.add_argument("--allow-unhashed", action="store_true", help="load a model file that records no SHA-256")

    p = sub.add_parser("audit", help="Privacy audit of a finished run: membership inference on its teacher and "
                                     "student, and how close its synthetic samples come to training images. "
                                     "Reads the teacher's training split; writes audit.json and audit.md into the run.")
    p.add_argument("run_dir")
    p.add_argument("--samples", type=int, default=500, help="synthetic samples to compare (default 500)")
    p.add_argument("--references", type=int, default=2000, help="training and test images each (default 2000)")
    p.add_argument("--pairs", type=int, default=8, help="closest synthetic/training pairs drawn (default 8)")
    p.add_argument("--margin", type=float, default=0.1,
                   help="a sample counts as closer to training data when d_train < (1 - margin) d_test")
    p.add_argument("--root", help="dataset root folder")
    p.add_argument("--shadows", type=int, default=4, help="shadow models of LiRA (default 4; 0: none)")
    p.add_argument("--lira", choices=["offline", "online"], default="offline",
                   help="offline: shadows on held-out test images only; online: shadows on random halves of "
                        "training and test images, each sample in half of them (stronger, costlier)")

    p = sub.add_parser("list", help="List what is registered and shipped.")
    p.add_argument("what", nargs="?", choices=["configs", "models", "datasets", "losses", "discriminators",
                                               "modalities", "generators", "synthesizers"])
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    handlers = {"teacher": lambda: _run(args, extra, "teacher"), "distill": lambda: _run(args, extra, "distill"),
                "eval": lambda: _eval(args, extra), "list": lambda: _list(args, extra),
                "chain": lambda: _chain(args, extra), "export": lambda: _export(args, extra),
                "audit": lambda: _audit(args, extra), "search": lambda: _search(args, extra)}
    if extra and args.command in ("eval", "list", "export", "audit"):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return handlers[args.command]()
    except DfkdError as exc:
        print(f"dfkd: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dfkd: interrupted; the last checkpoint is in the run folder's ckpt/", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
