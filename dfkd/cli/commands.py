"""The commands: one function each, taking the parsed arguments and the leftover ones (config
overrides), printing their result and returning the exit status."""
from __future__ import annotations

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

    if task == "profile":  # any config: the profiler runs it as it is
        task, args.profile = load_config(args.config).task, 25 if args.profile is None else args.profile
    player = "model" if task == "teacher" else "student"
    overrides = _player_shortcuts(_overrides(extra), player)
    teachers = getattr(args, "teacher", None)
    if teachers:  # one file, or several (an ensemble) as a YAML list
        overrides.append(f"teacher.checkpoint={teachers[0] if len(teachers) == 1 else json.dumps(teachers)}")
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.out:
        overrides.append(f"output.root={args.out}")
    if getattr(args, "allow_code", False):
        overrides.append("teacher.allow_code=true")
    config = load_config(args.config, overrides)
    if config.task != task:
        raise DfkdError(f"config '{args.config}' is a {config.task} config; run it with `dfkd {config.task}`")
    if args.run_dir and not args.resume:
        raise DfkdError("--run-dir names the folder a resumed run continues in; give it with --resume")
    if args.profile is not None:
        return _profile(config, args)
    engine = Engine(config, run_dir=args.run_dir, resume=args.resume)
    print(f"run folder: {engine.run_dir}", file=sys.stderr)
    summary = engine.fit()
    print(json.dumps(summary))
    return 0


def _profile(config, args) -> int:
    from dfkd.tools.profile import ProfiledEngine, profile_run, render

    if args.profile < 1 or args.profile_warmup < 0:
        raise DfkdError(f"--profile must be >= 1 and --profile-warmup >= 0, got {args.profile} and "
                        f"{args.profile_warmup}")
    engine = ProfiledEngine(config, run_dir=args.run_dir, resume=args.resume)
    if engine.step >= engine.total_iters:
        raise DfkdError(f"{args.resume}: the run is finished; there is no iteration left to profile")
    print(f"run folder: {engine.run_dir}", file=sys.stderr)
    print(render(profile_run(engine, args.profile, args.profile_warmup)))
    return 0


def _eval(args, extra: list[str]) -> int:
    from dfkd.data.loader import TensorLoader
    from dfkd.loop.evaluation import evaluate, evaluation_split
    from dfkd.loop.runtime import resolve_device
    from dfkd.nets.arch import load_model

    device = resolve_device(args.device)
    model, meta = load_model(args.checkpoint, device, allow_unhashed=args.allow_unhashed, allow_code=args.allow_code)
    data_config = (meta.get("config") or {}).get("data") or {}
    if data_config.get("pairs_test") and not args.data:  # a student of a user's pairs: their test pairs
        from dfkd.data.datasets import dataset_info
        from dfkd.data.pairs import load_pairs

        dataset = load_pairs(data_config["pairs_test"], dataset_info(meta["dataset"]), "test")
    else:
        dataset = evaluation_split(meta, args.checkpoint, args.data, args.split, args.root)
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

    from dfkd.core.io import check_output_folder, check_replaceable
    from dfkd.data.loader import TensorLoader
    from dfkd.loop.evaluation import evaluation_split
    from dfkd.nets.arch import load_model
    from dfkd.nets.quant import is_quantized, quant_summary
    from dfkd.tools.export import export_onnx, float_copy, onnx_check

    model, meta = load_model(args.checkpoint, "cpu", allow_unhashed=args.allow_unhashed, allow_code=args.allow_code)
    arch = meta["arch"]
    out = Path(args.out or Path(args.checkpoint).with_suffix(".onnx"))
    reference = out.with_name(out.stem + ".fp32.onnx")
    if out.resolve() == Path(args.checkpoint).resolve():
        raise DfkdError(f"--out {out} would replace the model file itself")
    if not out.parent.is_dir():
        raise DfkdError(f"--out {out}: folder {out.parent} does not exist")
    # room for the graph and its float reference: about twice the float weights
    check_output_folder(out.parent, need_bytes=8 * sum(p.numel() for p in model.parameters()))
    for path in (out, reference) if is_quantized(model) and not args.no_check else (out,):
        check_replaceable(path)  # never a link, a folder or a device, even with --force
        if path.exists() and not args.force:
            raise DfkdError(f"{path} exists; give --force to replace it")
    example = torch.zeros(1, arch["in_channels"], arch["image_size"], arch["image_size"])
    export_onnx(model, out, example)
    result = {"checkpoint": args.checkpoint, "onnx": str(out), "precision": quant_summary(arch.get("quant"))}
    if not args.no_check:
        dataset = evaluation_split(meta, args.checkpoint, args.data, "test", args.root)
        loader = TensorLoader(dataset, args.batch_size)
        result.update(onnx_check(out, model, loader))
        if result["agreement_deployed"] < result["agreement"] - 0.5:
            print(f"dfkd: warning: ONNX Runtime's optimized integer kernels on this CPU agree with the model on "
                  f"{result['agreement_deployed']:.1f}% of predictions (the exported graph itself: "
                  f"{result['agreement']:.1f}%): its uint8 x int8 products saturate on x86-64 without VNNI",
                  file=sys.stderr)
        if is_quantized(model):  # the same network in float32, exported and timed the same way
            export_onnx(float_copy(model, arch, args.allow_code), reference, example)
            result["latency_ms_fp32"] = onnx_check(reference, float_copy(model, arch, args.allow_code),
                                                   loader)["latency_ms"]
    print(json.dumps(result))
    return 0


def _audit(args, extra: list[str]) -> int:
    from dfkd.tools.audit.report import render
    from dfkd.tools.audit.run import audit

    report = audit(args.run_dir, samples=args.samples, references=args.references, k=args.pairs,
                   margin=args.margin, root=args.root, shadows=args.shadows, lira=args.lira, data=args.data,
                   allow_code=args.allow_code)
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
            ([f"root={args.out}"] if args.out else []) + ([f"teacher={args.teacher}"] if args.teacher else []) + \
            (["allow_code=true"] if args.allow_code else [])
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
            ([f"root={args.out}"] if args.out else []) + (["allow_code=true"] if args.allow_code else [])
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


def _import(args, extra: list[str]) -> int:
    from dfkd.tools.importer import card_from_args, describe_import, import_teacher

    try:
        kwargs = json.loads(args.kwargs) if args.kwargs else {}
    except json.JSONDecodeError as error:
        raise DfkdError(f"--kwargs must be a JSON object, got {args.kwargs!r} ({error.msg})") from None
    if not isinstance(kwargs, dict):
        raise DfkdError(f"--kwargs must be a JSON object, got {args.kwargs!r}")
    card = card_from_args(args.input, args.mean, args.std, args.classes, args.class_names, args.native_size)
    result = import_teacher(args.weights, args.out, card, arch=args.arch, kwargs=kwargs, allow_code=args.allow_code,
                            force=args.force)
    print(describe_import(result), file=sys.stderr)
    print(json.dumps(result))
    return 0


def _inspect(args, extra: list[str]) -> int:
    from dfkd.tools.inspect import inspect_model, render

    report = inspect_model(args.model, allow_code=args.allow_code)
    print(json.dumps(report) if args.json else render(report), end="\n" if args.json else "")
    return 0


COMMANDS = {"teacher": lambda args, extra: _run(args, extra, "teacher"),
            "distill": lambda args, extra: _run(args, extra, "distill"),
            "profile": lambda args, extra: _run(args, extra, "profile"),
            "import": _import, "inspect": _inspect, "eval": _eval, "list": _list, "chain": _chain,
            "export": _export, "audit": _audit, "search": _search}
