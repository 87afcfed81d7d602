"""Engine overhead and the digits data-free target: one DFAD run through the engine and the same
run as a minimal inline PyTorch loop, timed and evaluated alike.

    python scripts/benchmark.py [--teacher PATH | --teacher-epochs N] [--iters 300] [--eval-every 50]
        [--repeats 1] [--warmup 2] [--seed 0] [--device auto] [--amp auto] [--threads N] [--out FILE]

Both variants do the same work from the same seed: per iteration, 5 student steps (L1 between
logits) on fresh generator batches made without gradients, then 1 generator step (−L1), with
the networks, batch size, optimizers and schedules of the shipped config datafree/dfad-digits.
The clock runs only while training: the test-split evaluation every --eval-every iterations is
paused out. Variants alternate over --repeats; medians are reported. Writes a JSON report.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dfkd.core.config import load_config
from dfkd.core.schema import Config
from dfkd.data.datasets import dataset_info, load_dataset
from dfkd.data.loader import TensorLoader
from dfkd.loop.engine import Engine
from dfkd.loop.runtime import amp_dtype, resolve_device
from dfkd.nets.arch import load_model
from dfkd.nets.models import create_model
from dfkd_base.errors import ConfigError, DfkdError
from generators import create_generator

CONFIG = "datafree/dfad-digits"
VARIANTS = ("engine", "inline")


class Clock:
    """Accumulated training time; evaluation runs inside ``paused()``. On CUDA it synchronizes
    before each reading so that queued kernels are charged to the right side."""

    def __init__(self, device: torch.device):
        self.device, self.elapsed, self._t0 = device, 0.0, None

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self) -> None:
        self._t0 = self._now()

    def stop(self) -> None:
        self.elapsed += self._now() - self._t0

    @contextlib.contextmanager
    def paused(self):
        self.stop()
        try:
            yield
        finally:
            self.start()


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: TensorLoader, channels_last: bool) -> float:
    """Top-1 accuracy (%) in float32, the same function for both variants and the teacher."""
    was_training = model.training
    model.eval()
    correct = n = 0
    for images, labels in loader:
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        correct += int((model(images).argmax(1) == labels).sum())
        n += labels.numel()
    model.train(was_training)
    return 100.0 * correct / n


class Recorder:
    """One timed run: its clock and its accuracy curve [(iteration, training seconds, acc)]."""

    def __init__(self, device: torch.device, loader: TensorLoader, channels_last: bool):
        self.clock, self.loader, self.channels_last = Clock(device), loader, channels_last
        self.curve: list[dict] = []

    def evaluate_at(self, model: torch.nn.Module, iteration: int) -> None:
        with self.clock.paused():
            acc = evaluate(model, self.loader, self.channels_last)
            self.curve.append({"iter": iteration, "time_s": round(self.clock.elapsed, 3), "acc": acc})


def channels_last_for(config: Config, device: torch.device) -> bool:
    """The engine's rule (Engine.channels_last): on CUDA, and on CPU whenever it synthesizes."""
    rt = config.runtime
    return (device.type == "cuda" or config.synthesis.kind != "none") if rt.channels_last == "auto" \
        else rt.channels_last


# --------------------------------------------------------------------------------------
# The two variants
# --------------------------------------------------------------------------------------
def run_engine(config: Config, rec: Recorder) -> torch.nn.Module:
    class Probed(Engine):  # evaluates at every epoch end; an epoch is --eval-every iterations
        def end_of_epoch(self, epoch: int) -> None:
            super().end_of_epoch(epoch)
            rec.evaluate_at(self.student.module, self.step)

    engine = Probed(config, write=False)
    assert engine.channels_last == rec.channels_last, "channels_last rule out of sync with the engine"
    rec.clock.start()
    engine.fit()
    rec.clock.stop()
    return engine.student.module


def _optimizer(module: torch.nn.Module, player) -> torch.optim.Optimizer:
    o = player.optim
    if o.name == "sgd":
        return torch.optim.SGD(module.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay,
                               nesterov=o.nesterov and o.momentum > 0)
    if o.name == "adam":
        return torch.optim.Adam(module.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)
    raise ConfigError(f"the inline loop mirrors sgd and adam only, not '{o.name}'")


def _cosine(optimizer: torch.optim.Optimizer, player, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    s = player.sched
    if (s.name, s.warmup_steps, s.min_lr) != ("cosine", 0, 0.0):
        raise ConfigError("the inline loop mirrors a plain cosine schedule only (no warm-up, min_lr 0)")
    # the engine's closed form; CosineAnnealingLR's recursive update can differ in the last bits
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: 0.5 * (1 + math.cos(math.pi * min(1.0, k / total_steps))))


def run_inline(config: Config, rec: Recorder) -> torch.nn.Module:
    student_phase, generator_phase = config.phases
    if [(p.player, p.batch, list(p.losses)) for p in config.phases] != [
            ("student", "fresh", ["l1_logits"]), ("generator", "fresh", ["adv_l1"])]:
        raise ConfigError(f"{CONFIG} no longer has DFAD's phases; update the inline loop")
    device = resolve_device(config.runtime.device)
    dtype = amp_dtype(config.runtime.amp, device)
    autocast = (lambda: torch.autocast(device.type, dtype=dtype)) if dtype else contextlib.nullcontext
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    fmt = torch.channels_last if rec.channels_last else torch.contiguous_format
    info = dataset_info(config.data.name)
    C, H, _ = info.shape
    s_cfg, g_cfg = config.players["student"], config.players[config.synthesis.generator]

    # Build in the engine's order so that the seed gives the same weights: the teacher (its
    # architecture's init draws from the RNG before the checkpoint overwrites it), the student,
    # the generator, then the 2-latent shape check that the engine runs on every new generator.
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    teacher, _ = load_model(config.teacher.checkpoint, device)
    teacher = teacher.to(memory_format=fmt).requires_grad_(False).eval()
    student = create_model(s_cfg.net.name, in_channels=C, num_classes=info.num_classes, image_size=H,
                           **s_cfg.net.kwargs)
    generator = create_generator(g_cfg.net.name, img_shape=info.shape, num_classes=info.num_classes,
                                 **{"nz": 256, **g_cfg.net.kwargs})
    with torch.no_grad():
        generator(torch.randn(2, generator.nz))
    student, generator = student.to(device, memory_format=fmt), generator.to(device, memory_format=fmt).train()

    iters = config.train.epochs * config.train.iters_per_epoch
    opt_s, opt_g = _optimizer(student, s_cfg), _optimizer(generator, g_cfg)
    sched_s = _cosine(opt_s, s_cfg, iters * student_phase.steps)
    sched_g = _cosine(opt_g, g_cfg, iters * generator_phase.steps)

    def fake_batch() -> torch.Tensor:
        with autocast():
            return generator(torch.randn(config.synthesis.batch_size, generator.nz, device=device)).float()

    def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        with autocast():
            return model(x.contiguous(memory_format=fmt)).float()

    def step(loss, optimizer, scheduler) -> None:
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()

    rec.clock.start()
    for it in range(1, iters + 1):
        # Student steps: the generator only samples (no graph) but stays in train mode, as in the
        # engine: its last BatchNorm normalizes with batch statistics by design.
        student.train()
        for _ in range(student_phase.steps):
            with torch.no_grad():
                x = fake_batch()
                t = logits(teacher, x)
            step(F.l1_loss(logits(student, x), t), opt_s, sched_s)
        # Generator step: the student is frozen (no weight gradients) and in eval mode.
        student.eval().requires_grad_(False)
        for _ in range(generator_phase.steps):
            x = fake_batch()
            step(-F.l1_loss(logits(student, x), logits(teacher, x)), opt_g, sched_g)
        student.requires_grad_(True)
        if it % config.train.iters_per_epoch == 0:
            rec.evaluate_at(student, it)
    rec.clock.stop()
    return student


# --------------------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------------------
def dfad_config(args: argparse.Namespace, teacher: str, iters: int, eval_every: int) -> Config:
    return load_config(CONFIG, [
        f"seed={args.seed}", f"teacher.checkpoint={teacher}", f"train.epochs={iters // eval_every}",
        f"train.iters_per_epoch={eval_every}",
        "data.eval=false",  # the engine evaluates nothing itself: the Recorder does, off the clock
        "output.tensorboard=false", "runtime.progress=false",
        f"runtime.device={args.device}", f"runtime.amp={args.amp}"])


def train_teacher(args: argparse.Namespace, root: Path) -> str:
    overrides = [f"seed={args.seed}", f"output.root={root}", f"runtime.device={args.device}",
                 "output.tensorboard=false", "runtime.progress=false"]
    if args.teacher_epochs:
        overrides.append(f"train.epochs={args.teacher_epochs}")
    summary = Engine(load_config("teacher/lenet5-digits", overrides)).fit()
    print(f"benchmark: trained teacher {summary['run_dir']} (acc {summary['final_acc']:.2f})", file=sys.stderr)
    return str(Path(summary["run_dir"]) / "ckpt" / "final.pt")


def summarize(runs: list[dict], teacher_acc: float) -> dict:
    target = 0.99 * teacher_acc
    for run in runs:
        run["final_acc"] = run["curve"][-1]["acc"]
        hit = next((p for p in run["curve"] if p["acc"] >= target), None)
        run["time_to_99pct_s"], run["iter_to_99pct"] = (hit["time_s"], hit["iter"]) if hit else (None, None)
    reached = [r for r in runs if r["iter_to_99pct"] is not None]
    final = statistics.median(r["final_acc"] for r in runs)
    return {"time_s": statistics.median(r["time_s"] for r in runs), "final_acc": final,
            "student_teacher_ratio": final / teacher_acc,
            "time_to_99pct_s": statistics.median(r["time_to_99pct_s"] for r in reached) if reached else None,
            "iter_to_99pct": statistics.median(r["iter_to_99pct"] for r in reached) if reached else None,
            "runs": runs}


def run_method(args: argparse.Namespace, teacher: str, inline_s: float) -> dict:
    """A shipped method at its own budget; its time to 99% of the teacher (training time, evaluation
    excluded, at the config's evaluation points) against half the inline DFAD loop's wall time."""
    overrides = [f"teacher.checkpoint={teacher}", f"seed={args.seed}", "output.tensorboard=false",
                 f"runtime.device={args.device}", f"runtime.amp={args.amp}", *args.method_set]
    summary = Engine(load_config(args.method, overrides), write=False).fit()
    reached = summary["time_to_99pct_teacher_s"]
    return {"config": args.method, "final_acc": summary["final_acc"], "best_acc": summary["best_acc"],
            "time_train_s": summary["time_train_s"], "time_to_99pct_s": reached,
            "target_s": inline_s / 2, "target_met": reached is not None and reached <= inline_s / 2}


def render(report: dict) -> str:
    lines = ["| variant | train time (s) | final acc (%) | student / teacher | ≥ 99% of teacher at |",
             "|---|---|---|---|---|"]
    for name in VARIANTS:
        v = report[name]
        at = f"{v['time_to_99pct_s']:.1f} s (iter {v['iter_to_99pct']:g})" if v["iter_to_99pct"] else "not reached"
        lines.append(f"| {name} | {v['time_s']:.2f} | {v['final_acc']:.2f} | {v['student_teacher_ratio']:.3f} | {at} |")
    lines.append(f"\nteacher {report['teacher_acc']:.2f}% · engine overhead {report['overhead_pct']:+.1f}% · "
                 f"max |Δweight| engine vs inline {report['max_weight_diff']:.2g} · {report['iters']} iters, "
                 f"median of {report['repeats']}, {report['device']}, {report['threads']} threads")
    if "method" in report:
        m = report["method"]
        at = f"{m['time_to_99pct_s']:.1f} s" if m["time_to_99pct_s"] is not None else "never"
        lines.append(f"\n{m['config']}: final {m['final_acc']:.2f}% (best {m['best_acc']:.2f}%) in "
                     f"{m['time_train_s']:.1f} s; 99% of the teacher after {at}; half the inline DFAD loop is "
                     f"{m['target_s']:.1f} s: {'met' if m['target_met'] else 'not met'}")
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", metavar="PATH", help="teacher model file (default: train a digits LeNet-5)")
    p.add_argument("--teacher-epochs", type=int, help="epochs when training the teacher (default: its config's)")
    p.add_argument("--iters", type=int, default=300, help="DFAD iterations (5 student + 1 generator step each)")
    p.add_argument("--eval-every", type=int, default=50, help="iterations between evaluations (off the clock)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs of each variant, alternating")
    p.add_argument("--warmup", type=int, default=2, help="untimed inline iterations first (kernel and cache set-up)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"])
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--out", help="JSON report path (default: runs/benchmarks/benchmark-<stamp>.json)")
    p.add_argument("--method", metavar="CONFIG", help="also run this shipped data-free config and compare its time "
                                                      "to 99%% of the teacher with the inline DFAD loop's time")
    p.add_argument("--method-set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for --method")
    args = p.parse_args(argv)
    if args.iters < 1 or args.eval_every < 1 or args.iters % args.eval_every:
        p.error("--iters must be a positive multiple of --eval-every")
    return args


def benchmark(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out or f"runs/benchmarks/benchmark-{time.strftime('%Y%m%d-%H%M%S')}.json")
    teacher_path = args.teacher or train_teacher(args, out.parent / "teachers")
    config = dfad_config(args, teacher_path, args.iters, args.eval_every)
    device = resolve_device(config.runtime.device)
    channels_last = channels_last_for(config, device)
    loader = TensorLoader(load_dataset(config.data.name, "test", config.data.root, config.data.download),
                          config.data.eval_batch_size, device=device)
    teacher = load_model(teacher_path, device)[0].to(memory_format=torch.channels_last if channels_last
                                                    else torch.contiguous_format)
    teacher_acc = evaluate(teacher, loader, channels_last)

    if args.warmup:  # the first convolutions of a process pay one-off set-up costs: keep them off both clocks
        run_inline(dfad_config(args, teacher_path, args.warmup, args.warmup), Recorder(device, loader, channels_last))
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    students = {}
    for r in range(args.repeats):
        for name in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:  # alternate the order against drift
            rec = Recorder(device, loader, channels_last)
            student = (run_engine if name == "engine" else run_inline)(config, rec)
            students.setdefault(name, student)  # the first repeat's, for the weight comparison
            runs[name].append({"time_s": round(rec.clock.elapsed, 3), "curve": rec.curve})
            print(f"benchmark: {name} repeat {r}: {rec.clock.elapsed:.2f} s, acc {rec.curve[-1]['acc']:.2f}",
                  file=sys.stderr)

    # Same seed, same computation: the two students of the first repeat should agree to rounding.
    weights = [s.state_dict() for s in students.values()]
    diff = max(float((a.float() - weights[1][k].float()).abs().max()) for k, a in weights[0].items())
    report = {"config": CONFIG, "teacher": teacher_path, "teacher_acc": teacher_acc, "iters": args.iters,
              "eval_every": args.eval_every, "repeats": args.repeats, "seed": args.seed, "device": str(device),
              "amp": str(amp_dtype(args.amp, device) or "off").removeprefix("torch."), "channels_last": channels_last,
              "threads": torch.get_num_threads(), "torch": torch.__version__,
              **{name: summarize(runs[name], teacher_acc) for name in VARIANTS}, "max_weight_diff": diff}
    engine_s, inline_s = report["engine"]["time_s"], report["inline"]["time_s"]
    report["overhead_pct"] = 100.0 * (engine_s - inline_s) / inline_s
    if args.method:
        report["method"] = run_method(args, teacher_path, inline_s)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    report["out"] = str(out)
    return report


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = benchmark(args)
    except DfkdError as exc:
        print(f"benchmark: error: {exc}", file=sys.stderr)
        return 2
    print(render(report), end="")
    print(f"report: {report['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
