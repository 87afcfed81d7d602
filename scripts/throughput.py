"""Throughput of the data-free loop: synthetic images per second, and how close the loop comes to
the accelerator's FLOP floor.

    python scripts/throughput.py [--config datafree/dfq-digits] [--teacher-net resnet34]
        [--student-net resnet18] [--dataset cifar10] [--generator dcgan_deep] [--batch 256]
        [--iters 20] [--warmup 5] [--device auto] [--amp auto] [--peak-tflops X] [--teacher PATH]
        [--set KEY=VALUE ...] [--out FILE]

The default is the GPU benchmark of the data-free engine: ResNet-34 → ResNet-18 at 32×32 (CIFAR-10's
shape), the DFQ loop of datafree/dfq-digits (one generator step with BN-statistics, adversarial,
one-hot and balance terms, then ten student KD steps on fresh batches), bf16 autocast and
channels_last on CUDA.
No dataset is read: the teacher is a freshly initialized network unless --teacher names a
model file, since weights do not change the work done per iteration.

* images/s: synthetic images the student trains on per second, over --iters timed iterations
  after --warmup untimed ones (CUDA is synchronized at both ends).
* FLOP floor: the iteration's FLOPs (convolutions and matrix products, forward and backward,
  counted by torch.utils.flop_counter as the difference between runs of two and one iterations,
  so set-up work is excluded) divided by the accelerator's dense bf16 peak. The fraction reported
  is floor time / measured time. The peak comes from --peak-tflops, else from a table of known
  GPUs; on a CPU, or an unknown GPU without --peak-tflops, the fraction is left out.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from dfkd.core.checkpoint import save_model
from dfkd.core.config import load_config
from dfkd.data.datasets import dataset_info
from dfkd.loop.engine import Engine
from dfkd.loop.runtime import amp_dtype, resolve_device
from dfkd.nets.models import create_model
from dfkd_base.errors import DfkdError

# Dense (no sparsity) bf16 tensor-core peaks from the vendor's data sheets, TFLOP/s; matched in
# order against torch.cuda.get_device_name(), so the more specific names come first.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("A100", 312.0))


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak known for a CPU"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value, name
    return None, f"no peak known for '{name}' (pass --peak-tflops)"


def make_config(args: argparse.Namespace, teacher: str, iters_per_epoch: int, epochs: int):
    return load_config(args.config, [
        f"data.name={args.dataset}", "data.eval=false", f"teacher.checkpoint={teacher}",
        f"players.student.net.name={args.student_net}", f"players.generator.net.name={args.generator}",
        f"players.generator.net.kwargs={{nz: 256, ngf: {args.ngf}}}", f"synthesis.batch_size={args.batch}",
        f"train.epochs={epochs}", f"train.iters_per_epoch={iters_per_epoch}", f"seed={args.seed}",
        # evaluation (here: agreement on held-out synthetic samples) only after the last iteration: it is
        # not training work, and it is neither timed nor counted (two runs' FLOPs differ by one iteration)
        "output.tensorboard=false", "runtime.progress=false", f"output.image_every={10 ** 9}",
        f"train.eval_every={10 ** 9}",
        f"runtime.device={args.device}", f"runtime.amp={args.amp}", *args.set])


def timed_run(config, warmup: int) -> tuple[float, int]:
    """Seconds for the iterations after the first ``warmup`` (one iteration per epoch, so that
    the clock can be read between iterations); returns (seconds, timed iterations)."""
    marks: list[float] = []

    class Clocked(Engine):
        def end_of_epoch(self, epoch: int) -> None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            marks.append(time.perf_counter())
            super().end_of_epoch(epoch)

    Clocked(config, write=False).fit()
    return marks[-1] - marks[warmup - 1], len(marks) - warmup


def iteration_flops(args: argparse.Namespace, teacher: str) -> int:
    """FLOPs of one iteration: a two-iteration run minus a one-iteration run from the same seed."""
    counts = []
    for iters in (1, 2):
        counter = FlopCounterMode(display=False)
        with counter:
            Engine(make_config(args, teacher, 1, iters), write=False).fit()
        counts.append(counter.get_total_flops())
    return counts[1] - counts[0]


def images_per_iteration(config) -> tuple[int, int]:
    """(images the student trains on, fresh synthetic images drawn) in one iteration."""
    batch = config.synthesis.batch_size
    student = sum(p.steps * batch for p in config.phases if p.player == "student")
    fresh = sum(p.steps * batch for p in config.phases if p.batch == "fresh")
    return student, fresh


def throughput(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        teacher = args.teacher
        if teacher is None:
            info = dataset_info(args.dataset)
            torch.manual_seed(args.seed)
            arch = {"name": args.teacher_net, "in_channels": info.shape[0], "num_classes": info.num_classes,
                    "image_size": info.shape[1]}
            teacher = str(save_model(Path(tmp) / "teacher.pt", create_model(**arch), arch, dataset=args.dataset))
        config = make_config(args, teacher, 1, args.warmup + args.iters)
        seconds, iters = timed_run(config, args.warmup)
        flops = iteration_flops(args, teacher)
    per_iter = seconds / iters
    student_images, fresh_images = images_per_iteration(config)
    peak, peak_source = peak_tflops(device, args.peak_tflops)
    achieved = flops / per_iter
    report = {
        "config": args.config, "dataset": args.dataset, "teacher_net": args.teacher_net,
        "student_net": args.student_net, "generator": args.generator, "batch": args.batch,
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "amp": str(amp_dtype(args.amp, device) or "off").removeprefix("torch."), "torch": torch.__version__,
        "threads": torch.get_num_threads(), "timed_iters": iters, "warmup_iters": args.warmup,
        "seconds_per_iter": per_iter, "student_images_per_s": student_images / per_iter,
        "synthetic_images_per_s": fresh_images / per_iter,
        "tflops_per_iter": flops / 1e12, "achieved_tflops": achieved / 1e12, "peak_tflops": peak,
        "peak_source": peak_source, "flop_floor_fraction": achieved / (peak * 1e12) if peak else None,
    }
    out = Path(args.out or f"runs/benchmarks/throughput-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    report["out"] = str(out)
    return report


def render(r: dict) -> str:
    fraction = f"{100 * r['flop_floor_fraction']:.1f}% of the FLOP floor" if r["flop_floor_fraction"] is not None \
        else f"FLOP-floor fraction not computed ({r['peak_source']})"
    return (f"{r['teacher_net']} -> {r['student_net']} on {r['dataset']} shapes, {r['config']}, batch {r['batch']}, "
            f"{r['device_name']}, amp {r['amp']}\n"
            f"{r['seconds_per_iter'] * 1e3:.1f} ms/iteration over {r['timed_iters']} iterations: "
            f"{r['student_images_per_s']:.0f} student images/s, {r['synthetic_images_per_s']:.0f} synthetic images/s\n"
            f"{r['tflops_per_iter'] * 1e3:.2f} GFLOP/iteration, {r['achieved_tflops']:.3g} TFLOP/s achieved; {fraction}\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="datafree/dfq-digits", help="data-free config whose loop is timed")
    p.add_argument("--dataset", default="cifar10", help="registered dataset whose shape and classes are used")
    p.add_argument("--teacher-net", default="resnet34")
    p.add_argument("--student-net", default="resnet18")
    p.add_argument("--generator", default="dcgan_deep")
    p.add_argument("--ngf", type=int, default=64, help="generator width")
    p.add_argument("--teacher", metavar="PATH", help="teacher model file (default: a fresh --teacher-net)")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--iters", type=int, default=20, help="timed iterations")
    p.add_argument("--warmup", type=int, default=5, help="untimed iterations first (at least 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--amp", default="auto", choices=["auto", "off", "bf16", "fp16"])
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--peak-tflops", type=float, help="the accelerator's peak (default: looked up by GPU name)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more config overrides")
    p.add_argument("--out", help="JSON report path (default: runs/benchmarks/throughput-<stamp>.json)")
    args = p.parse_args(argv)
    if min(args.iters, args.warmup, args.batch) < 1:
        p.error("--iters, --warmup and --batch must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        report = throughput(args)
    except DfkdError as exc:
        print(f"throughput: error: {exc}", file=sys.stderr)
        return 2
    print(render(report), end="")
    print(f"report: {report['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
