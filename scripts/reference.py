"""A method's reference implementation run beside dfkd's config at equal work.

    python scripts/reference.py --case dfq --teacher T.pt [--seeds 0 1 2] [--epochs 4] [--iters 10]
        [--source URL_OR_GIT_DIR] [--cache ~/.cache/dfkd/reference] [--out runs/reference] [--threads 1]

Both sides get one set of settings (:class:`Work`): the same teacher weights, student architecture,
batch, generator (latent size, width, output), generator and student steps per iteration, the
number of iterations, learning rates, loss weights and temperature. dfkd's side is its shipped config
with those settings as overrides; the script reads the resolved config back and stops if any
setting differs from what the reference side was given. Each seed runs the two sides side by side
(two processes, ``--threads`` torch threads each) and prints, per side, the final test accuracy and
the seconds per iteration of the loop (evaluation excluded); ``<out>/<case>.jsonl`` keeps the rows
and ``<out>/<case>.md`` the table.

The reference code is checked out into the cache at a pinned commit (``git clone`` from the
reference's URL, or from ``--source``: a mirror or another URL); nothing of it enters dfkd. What makes
it run here is a shim of ours, listed in the output: the modules it imports that this environment
lacks or that newer torchvision moved, the teacher's ``return_features`` call, the device, the data
it is evaluated on, and its training loop re-typed without the CIFAR evaluator, logger and
checkpoints of its script.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REFERENCES = {  # name -> (where it is published, the commit measured)
    "fast-datafree": ("https://github.com/zju-vipa/Fast-Datafree", "0dcecbc178b87048bedf730acb577045b3c0b57a"),
}


@dataclass(frozen=True)
class Work:
    """What both sides of a case are given: equal work."""
    batch: int = 256          # synthetic batch, for the generator's step and each student step
    nz: int = 256             # generator latent size
    ngf: int = 64             # generator width (2*ngf, ngf channels)
    output: str = "pixels"    # generator output: sigmoid pixels, then the teacher's normalization
    g_steps: int = 1          # generator steps per iteration
    kd_steps: int = 10        # student steps per iteration, each on a fresh batch
    epochs: int = 4
    iters: int = 10           # iterations per epoch
    lr: float = 0.1           # student SGD, momentum 0.9, cosine to lr_min over the run
    lr_min: float = 2e-4
    weight_decay: float = 1e-4
    lr_g: float = 1e-3        # generator Adam, betas (0.5, 0.999)
    T: float = 1.0            # the student's KL temperature
    adv: float = 1.0          # loss weights of the generator's step
    bn: float = 1.0
    oh: float = 1.0
    balance: float = 20.0


@dataclass(frozen=True)
class Case:
    reference: str
    config: str               # dfkd's config for the method
    work: Work
    shims: tuple[str, ...]    # what was done to make the reference run here
    notes: tuple[str, ...]    # where the reference, run as its authors run it, differs by design or by bug


COMMON_SHIMS = (
    "termcolor (its logger's colours, unused here) is a stub module",
    "torchvision.models.utils (moved in newer torchvision) points to torch.hub's load_state_dict_from_url",
    "the teacher is dfkd's network from the model file, wrapped so that teacher(x, return_features=True) "
    "also returns its embedding (a forward hook on its classifier's input)",
    "device: CPU (the reference script's args.gpu=None path) with --threads torch threads",
    "evaluated once, after training, on the test split through dfkd's reader (the script evaluates "
    "CIFAR each epoch)",
    "the loop of datafree_kd.py's main() and train() re-typed without its evaluator, logger and "
    "checkpoints; its CosineAnnealingLR steps per epoch with T_max = the run's epochs (the script "
    "hard-codes 200, its own epoch count)",
)

CASES = {
    "dfq": Case(
        reference="fast-datafree", config="datafree/dfq-digits-paper", work=Work(),
        shims=COMMON_SHIMS,
        notes=("datafree_kd.py builds DFQ's GenerativeSynthesizer with student=teacher, so its adversarial "
               "term is the teacher against itself: zero. The reference side runs as the authors run it; "
               "dfkd keeps the paper's term.",
               "the reference's generator convolutions have no bias (each is followed by BatchNorm, "
               "which removes a bias in training mode); dfkd's have one.",
               "dfkd's cosine schedule steps each optimizer step, the reference's each epoch")),
}


# ---------------------------------------------------------------- equal work, both ways
def dfkd_overrides(work: Work) -> list[str]:
    """dfkd's config overrides that give it ``work`` (DFQ's phase layout: generator, then student)."""
    return [f"synthesis.batch_size={work.batch}",
            f"players.generator.net.kwargs.nz={work.nz}", f"players.generator.net.kwargs.ngf={work.ngf}",
            f"players.generator.net.kwargs.output={work.output}", "players.generator.net.kwargs.native_size=null",
            f"players.generator.optim.lr={work.lr_g}",
            f"players.student.optim.lr={work.lr}", f"players.student.optim.weight_decay={work.weight_decay}",
            f"players.student.sched.min_lr={work.lr_min}",
            f"phases.0.steps={work.g_steps}", f"phases.1.steps={work.kd_steps}",
            f"phases.0.losses={{adv_kl: {work.adv}, bn_stats: {work.bn}, onehot_ce: {work.oh}, "
            f"class_balance: {work.balance}}}",
            f"phases.1.losses={{kd_kl: {{weight: 1.0, T: {work.T}}}}}",
            f"train.epochs={work.epochs}", f"train.iters_per_epoch={work.iters}"]


def _weight(entry) -> float:
    return float(entry["weight"] if isinstance(entry, dict) else entry)


def work_of(config) -> Work:
    """The work a resolved dfkd config does, read back from it."""
    generator, student = config.players["generator"], config.players["student"]
    kwargs, synth, student_phase = generator.net.kwargs, config.phases[0], config.phases[1]
    kd = student_phase.losses["kd_kl"]
    return Work(batch=config.synthesis.batch_size, nz=kwargs.get("nz", 256), ngf=kwargs.get("ngf", 64),
                output=kwargs.get("output", "bn"), g_steps=synth.steps, kd_steps=student_phase.steps,
                epochs=config.train.epochs, iters=config.train.iters_per_epoch, lr=student.optim.lr,
                lr_min=student.sched.min_lr, weight_decay=student.optim.weight_decay, lr_g=generator.optim.lr,
                T=float(kd.get("T", 1.0)) if isinstance(kd, dict) else 1.0,
                adv=_weight(synth.losses["adv_kl"]), bn=_weight(synth.losses["bn_stats"]),
                oh=_weight(synth.losses["onehot_ce"]), balance=_weight(synth.losses["class_balance"]))


def differences(a: Work, b: Work) -> list[str]:
    return [f"{f.name}: {getattr(a, f.name)!r} vs {getattr(b, f.name)!r}" for f in dataclasses.fields(Work)
            if getattr(a, f.name) != getattr(b, f.name)]


def check_equal_work(case: Case, work: Work, teacher: str) -> list[str]:
    """dfkd's config with ``work``'s overrides, checked to do exactly ``work``; returns the overrides.
    Also names what the shipped config does otherwise (printed: a divergence worth knowing)."""
    from dfkd.core.config import load_config

    overrides = dfkd_overrides(work)
    config = load_config(case.config, [f"teacher.checkpoint={teacher}", *overrides])
    wrong = differences(work_of(config), work)
    if wrong:
        raise SystemExit(f"reference.py: dfkd's side would not do the reference's work: {'; '.join(wrong)}")
    return overrides


def shipped_differences(case: Case, teacher: str) -> list[str]:
    """Where dfkd's config, as shipped, does other work than the case's reference settings
    (budget aside): divergences to explain beside the config, or to fix."""
    from dfkd.core.config import load_config

    shipped = work_of(load_config(case.config, [f"teacher.checkpoint={teacher}"]))
    budget = {"epochs": case.work.epochs, "iters": case.work.iters}
    return differences(dataclasses.replace(shipped, **budget), case.work)


# ---------------------------------------------------------------- the reference side
def checkout(name: str, cache: Path, source: str | None) -> Path:
    """The reference's code at its pinned commit, in the cache (cloned on first use)."""
    url, commit = REFERENCES[name]
    folder = cache / f"{name}-{commit[:12]}"
    if not (folder / ".git").exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "clone", "-q", "--no-checkout", source or url, str(folder)], check=True)
    subprocess.run(["git", "-C", str(folder), "checkout", "-q", commit], check=True)
    return folder


def _stub_modules() -> None:
    import types

    import torch

    termcolor = types.ModuleType("termcolor")
    termcolor.colored = lambda text, *args, **kwargs: text
    moved = types.ModuleType("torchvision.models.utils")
    moved.load_state_dict_from_url = torch.hub.load_state_dict_from_url
    sys.modules.setdefault("termcolor", termcolor)
    sys.modules.setdefault("torchvision.models.utils", moved)


def drive_reference(code: Path, work: Work, teacher_path: str, student_name: str, seed: int) -> dict:
    """The reference's DFQ (datafree_kd.py --method dfq) on dfkd's teacher, at ``work``."""
    import random

    import numpy as np
    import torch
    from torch import nn

    from dfkd.data.card import card_of, info_from_card
    from dfkd.loop.evaluation import evaluate, evaluation_split
    from dfkd.nets.arch import load_model
    from dfkd.nets.models import create_model
    from dfkd.nets.taps import embedding_layer, resolve_module

    sys.path.insert(0, str(code))
    _stub_modules()
    from datafree.criterions import KLDiv
    from datafree.models.generator import Generator
    from datafree.synthesis import GenerativeSynthesizer
    from datafree.utils import Normalizer

    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    net, meta = load_model(teacher_path)
    info = info_from_card(card_of(meta), meta.get("dataset") or "card")
    channels, height, _ = info.shape

    class WithFeatures(nn.Module):  # teacher(x, return_features=True) -> (logits, embedding)
        def __init__(self, network):
            super().__init__()
            self.network, self.features = network, None
            resolve_module(network, embedding_layer(network)).register_forward_hook(
                lambda module, inputs, output: setattr(self, "features", inputs[0].flatten(1)))

        def forward(self, x, return_features=False):
            logits = self.network(x)
            return (logits, self.features) if return_features else logits

    teacher = WithFeatures(net).eval()
    student = create_model(student_name, channels, info.num_classes, height)
    generator = Generator(nz=work.nz, ngf=work.ngf, img_size=height, nc=channels)
    synthesizer = GenerativeSynthesizer(
        teacher=teacher, student=teacher, generator=generator, nz=work.nz, img_size=tuple(info.shape),
        iterations=work.g_steps, lr_g=work.lr_g, synthesis_batch_size=work.batch, sample_batch_size=work.batch,
        adv=work.adv, bn=work.bn, oh=work.oh, act=0, balance=work.balance, criterion=KLDiv(),
        normalizer=Normalizer(info.mean, info.std), device="cpu")
    criterion = KLDiv(T=work.T)
    optimizer = torch.optim.SGD(student.parameters(), work.lr, weight_decay=work.weight_decay, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, work.epochs, eta_min=work.lr_min)
    start = time.perf_counter()
    for _ in range(work.epochs):
        for _ in range(work.iters):
            synthesizer.synthesize()
            student.train()
            for _ in range(work.kd_steps):
                images, _ = synthesizer.sample()
                with torch.no_grad():
                    t_out = teacher(images)
                loss = criterion(student(images.detach()), t_out.detach())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        scheduler.step()
    seconds = time.perf_counter() - start
    test = evaluation_split(meta, teacher_path, None, "test", None)
    student.eval()
    result = evaluate(student, _batches(test, info))
    return {"final_acc": result["acc"], "s_per_iter": seconds / (work.epochs * work.iters)}


def _batches(dataset, info, size: int = 1000):
    from dfkd.data.datasets import normalize

    for i in range(0, len(dataset.labels), size):
        yield normalize(dataset.images[i:i + size], info), dataset.labels[i:i + size]


# ---------------------------------------------------------------- dfkd's side
def drive_dfkd(case: Case, work: Work, teacher: str, seed: int, out: Path) -> dict:
    from dfkd.core.config import load_config
    from dfkd.loop.engine import Engine

    overrides = check_equal_work(case, work, teacher)
    config = load_config(case.config, [f"teacher.checkpoint={teacher}", *overrides, f"seed={seed}",
                                       f"output.root={out}", "output.tensorboard=false", "runtime.progress=false",
                                       f"train.eval_every={work.epochs}"])
    summary = Engine(config).fit()
    loop = summary["time_train_s"] - summary["time_eval_s"]
    return {"final_acc": summary["final_acc"], "s_per_iter": loop / summary["steps"]}


# ---------------------------------------------------------------- the pair, and the table
def run_pair(args, case: Case, work: Work, code: Path, seed: int) -> dict:
    """The two sides of one seed, launched together, one process each."""
    common = [sys.executable, __file__, "--case", args.case, "--teacher", args.teacher, "--seed-only", str(seed),
              "--work", json.dumps(dataclasses.asdict(work)), "--out", str(args.out)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    sides = {"dfkd": subprocess.Popen([*common, "--side", "dfkd"], stdout=subprocess.PIPE, env=env, text=True),
             "reference": subprocess.Popen([*common, "--side", "reference", "--code", str(code)],
                                           stdout=subprocess.PIPE, env=env, text=True)}
    row = {"case": args.case, "seed": seed, "code": case.reference, "commit": REFERENCES[case.reference][1],
           "work": dataclasses.asdict(work)}
    for name, process in sides.items():
        out, _ = process.communicate()
        if process.returncode:
            raise SystemExit(f"reference.py: the {name} side of seed {seed} failed (exit {process.returncode})")
        row[name] = json.loads(out.strip().splitlines()[-1])
    return row


def table(rows: list[dict]) -> str:
    def stat(side: str, key: str) -> str:
        values = [r[side][key] for r in rows]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.2f} ± {spread:.2f}" if key == "final_acc" else \
            f"{statistics.mean(values):.3f}"

    first = rows[0]
    work = first["work"]
    return "\n".join([
        "| method | reference @ commit | budget | dfkd final | reference final | dfkd s/it | reference s/it | seeds |",
        "|---|---|---|---|---|---|---|---|",
        f"| {first['case']} | {first['code']} @ {first['commit'][:7]} | {work['epochs'] * work['iters']} it x "
        f"{work['kd_steps']} student steps, batch {work['batch']} | {stat('dfkd', 'final_acc')} | "
        f"{stat('reference', 'final_acc')} | {stat('dfkd', 's_per_iter')} | {stat('reference', 's_per_iter')} | "
        f"{', '.join(str(r['seed']) for r in rows)} |"])


def settings(pairs: list[str]) -> dict:
    """``FIELD=VALUE`` pairs as :class:`Work` fields of their declared types."""
    types = {f.name: type(f.default) for f in dataclasses.fields(Work)}
    out = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in types or not value:
            raise SystemExit(f"reference.py: --set {pair}: expected FIELD=VALUE with FIELD one of {', '.join(types)}")
        out[name] = types[name](value)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", choices=sorted(CASES), default="dfq")
    p.add_argument("--teacher", required=True, help="a dfkd model file (the teacher of both sides)")
    p.add_argument("--student", default="lenet5_half")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=int)
    p.add_argument("--iters", type=int)
    p.add_argument("--batch", type=int)
    p.add_argument("--set", nargs="+", default=[], metavar="FIELD=VALUE",
                   help="other settings of the equal work, for both sides (e.g. adv=0)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--source", help="where to clone the reference from (default: its published URL)")
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/dfkd/reference"))
    p.add_argument("--out", default="runs/reference")
    p.add_argument("--side", choices=["dfkd", "reference"], help=argparse.SUPPRESS)
    p.add_argument("--seed-only", type=int, help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    p.add_argument("--code", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    case = CASES[args.case]
    import torch

    torch.set_num_threads(args.threads)
    if args.side:  # one side of one seed, in its own process: its result is the last line
        work = Work(**json.loads(args.work))
        result = drive_dfkd(case, work, args.teacher, args.seed_only, Path(args.out) / "dfkd") \
            if args.side == "dfkd" else drive_reference(Path(args.code), work, args.teacher, args.student,
                                                        args.seed_only)
        print(json.dumps(result))
        return 0
    work = dataclasses.replace(case.work, **{k: v for k, v in (("epochs", args.epochs), ("iters", args.iters),
                                                               ("batch", args.batch)) if v is not None},
                               **settings(args.set))
    overrides = check_equal_work(case, work, args.teacher)
    code = checkout(case.reference, Path(args.cache), args.source)
    print(f"{args.case}: {REFERENCES[case.reference][0]} @ {REFERENCES[case.reference][1]}")
    print(f"equal work: {json.dumps(dataclasses.asdict(work))}")
    print(f"dfkd: {case.config} {' '.join(overrides)}")
    shipped = shipped_differences(case, args.teacher)
    print(f"{case.config} as shipped differs from the reference's settings in: {'; '.join(shipped) or 'nothing'}")
    print("shims:\n" + "\n".join(f"  - {s}" for s in case.shims))
    print("notes:\n" + "\n".join(f"  - {n}" for n in case.notes))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for seed in args.seeds:
        row = run_pair(args, case, work, code, seed)
        rows.append(row)
        with open(out / f"{args.case}.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        print(f"seed {seed}: dfkd {row['dfkd']['final_acc']:.2f}% ({row['dfkd']['s_per_iter']:.3f} s/it), "
              f"reference {row['reference']['final_acc']:.2f}% ({row['reference']['s_per_iter']:.3f} s/it)")
    text = table(rows)
    (out / f"{args.case}.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
