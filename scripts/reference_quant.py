"""The quantized-student cases of ``scripts/reference.py``: GDFQ's and Qimera's code beside dfkd's
``quant/gdfq-*-paper`` and ``quant/qimera-*-paper`` configs at equal work.

    python scripts/reference.py --case gdfq|qimera --teacher T.pt [--seeds 0 1 2] [--epochs 8] [--batch 128]
        [--set FIELD=VALUE ...]

GDFQ trains a label-conditional generator against the full-precision teacher (cross-entropy on the
asked labels + 0.1 x the BN-statistics loss) and, on the same batch, the quantized copy of the
teacher (cross-entropy + KL at temperature T x T^2), 200 iterations an epoch, the student held in
eval mode and idle through the warm-up epochs. The reference side builds main.py's ``Generator``
and quantizes dfkd's teacher with main.py's ``quantize_model`` (ZeroQ's layers), then calls
trainer.py's ``Trainer.train(epoch)`` as it is, epoch after epoch, with main.py's ``run()``'s
activation-range schedule around it; its CIFAR loaders, logger, test and checkpoints are not run.

Qimera's code is GDFQ's with superposed classes: with probability ``mix_prob`` a batch asks for
``mix_classes`` random classes a sample, mixed by softmax(N(0, 1)) weights that are also its soft
label. The reference side drives Qimera's main.py and trainer.py the same way.
"""
from __future__ import annotations

import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

GDFQ_SHIMS = (
    "pyhocon (its config reader; the settings are passed as a namespace) and termcolor (its log colours) are "
    "stub modules",
    "utils.data_parallel (which asserts a GPU) returns the model; Module.cuda and Tensor.cuda are the identity",
    "utils.compute_singlecrop (the training log's top-1 and top-5, whose .view fails on this torch) returns "
    "zeros for them: it feeds the log only",
    "the teacher and the student are called as GDFQ calls its pytorchcv models, model(x, True) -> (logits, "
    "features); the student is main.py's quantize_model of dfkd's teacher (ZeroQ's Quant_Conv2d, Quant_Linear "
    "and a QuantAct after each ReLU)",
    "evaluated once, after training, on the test split through dfkd's evaluator (the script tests CIFAR each epoch)",
)
QIMERA_SHIMS = GDFQ_SHIMS[:3] + (
    "the trainer's log line compares the teacher's argmax with a mixed batch's (batch, 2) labels, which numpy "
    "before 1.25 answered with False (the logged accuracy 0) and numpy now refuses: it is answered False again",
    "the teacher and the student are called as Qimera calls them, model(x) -> logits; the student is main.py's "
    "quantize_model of dfkd's teacher (ZeroQ's layers, as GDFQ's)",
    GDFQ_SHIMS[4],
)
GDFQ_NOTES = (
    "GDFQ quantizes each ReLU's output with a range kept as a moving average (beta 0.9, divided by 1 - beta^t "
    "at every step, so it compounds) through the first 4 epochs, then fixed; dfkd (brevitas) quantizes each "
    "quantized layer's input but the first (the image stays float, as in GDFQ's code: quantize_input false), "
    "its range the mean of the batch minima and maxima over the first stats_steps batches, then fixed",
    "GDFQ keeps biases in float; dfkd quantizes them to 32 bits at the input scale x the weight scale (but the "
    "first layer's, whose input is float)",
    "GDFQ's iterations per epoch (200) and the epochs its activation ranges move (4) are fixed in its code",
)
QIMERA_NOTES = tuple(note.replace("GDFQ", "Qimera") for note in GDFQ_NOTES)


@dataclass(frozen=True)
class GDFQWork:
    """What both sides of the GDFQ case are given (GDFQ's CIFAR-100 settings)."""
    data: str = "fashion-mnist"  # the teacher's dataset, where the student is tested
    batch: int = 200
    nz: int = 100             # the generator's latent size (its widths, 128 and 64, are fixed in the code)
    epochs: int = 400
    iters: int = 200          # fixed by trainer.py's train()
    warmup: int = 4           # epochs of the generator alone
    lr: float = 1e-4          # student SGD, Nesterov momentum 0.9, weight decay 1e-4
    weight_decay: float = 1e-4
    lr_g: float = 1e-3        # generator Adam, betas (0.5, 0.999)
    milestones: str = "0.25,0.5,0.75"  # both rates x gamma at these fractions of the epochs (100/200/300 of 400)
    gamma: float = 0.1
    T: float = 20.0
    bn: float = 0.1           # the BN-statistics loss's weight in the generator's step
    weights: int = 4          # bits
    acts: int = 4
    # fixed in GDFQ's code, read back from dfkd's config: its generator, its student's start and BatchNorms
    generator: str = "conditional, ngf 64, BatchNorm eps 0.8, tanh + BatchNorm output"
    student: str = "min/max quantizer, float input, initialized from the teacher, BatchNorm in eval mode"


@dataclass(frozen=True)
class QimeraWork(GDFQWork):
    """What both sides of the Qimera case are given (Qimera's CIFAR-10 script, run_cifar10_4bit.sh)."""
    nz: int = 64
    mix_prob: float = 0.4     # --multi_label_prob
    mix_classes: int = 2      # --multi_label_num
    noise_scale: float = 1.0  # --noise_scale
    generator: str = "superposed, random embeddings, no mapping, ngf 64, BatchNorm eps 0.8, tanh + BatchNorm output"


def _generator_body(kwargs) -> str:
    """The part of the generator both codes fix, as the work names it, from dfkd's generator kwargs."""
    output = "tanh + BatchNorm" if kwargs.get("output", "bn") == "bn" else kwargs.get("output")
    return f"ngf {kwargs.get('ngf', 64)}, BatchNorm eps {kwargs.get('bn_eps', 1e-5):g}, {output} output"


def _fractions(text: str) -> list[float]:
    return [float(m) for m in text.split(",")]


class GDFQCase:
    """GDFQ: dfkd's ``quant/gdfq-<data>-paper`` beside xushoukai/GDFQ's main.py and trainer.py."""

    def __init__(self, reference: str, config: str, work: GDFQWork, shims: tuple[str, ...], notes: tuple[str, ...]):
        self.reference, self.config, self.work, self.shims, self.notes = reference, config, work, shims, notes

    def budget(self, work: GDFQWork) -> str:
        return f"{work.epochs * work.iters} it x (1 + 1), batch {work.batch}"

    # ------------------------------------------------------------ dfkd's side
    def student_milestones(self, work: GDFQWork) -> list[float]:
        """GDFQ's milestones are epochs of the whole run; dfkd's student schedule spans the epochs it
        trains in (after the warm-up), so the same epochs are other fractions of it."""
        span = work.epochs - work.warmup
        milestones = [(m * work.epochs - work.warmup) / span for m in _fractions(work.milestones)]
        if not all(0 < m < 1 for m in milestones):
            raise SystemExit(f"reference.py: milestones {work.milestones} of {work.epochs} epochs fall at or before "
                             f"the warm-up's end (epoch {work.warmup}), where the student has not started")
        return milestones

    def overrides(self, work: GDFQWork) -> list[str]:
        student, generator = "players.student", "players.generator"
        milestones = _fractions(work.milestones)
        return [f"data.name={work.data}", f"synthesis.batch_size={work.batch}", f"train.epochs={work.epochs}",
                f"train.iters_per_epoch={work.iters}", f"phases.1.epochs=[{work.warmup},{work.epochs}]",
                f"{student}.optim.lr={work.lr}", f"{student}.optim.weight_decay={work.weight_decay}",
                f"{student}.sched={{name: multistep, milestones: {self.student_milestones(work)}, "
                f"gamma: {work.gamma}, interval: epoch}}",
                f"{generator}.optim.lr={work.lr_g}",
                f"{generator}.sched={{name: multistep, milestones: {milestones}, gamma: {work.gamma}, "
                f"interval: epoch}}",
                f"{generator}.net.kwargs.nz={work.nz}", f"phases.1.losses.kd_kl.T={work.T}",
                f"phases.0.losses.bn_stats.weight={work.bn}", f"{student}.quant.weights={work.weights}",
                f"{student}.quant.acts={work.acts}"]

    def work_of(self, config) -> GDFQWork:
        student, generator = config.players["student"], config.players["generator"]
        first, last = config.phases[1].epochs or [0, config.train.epochs]
        epochs, warmup = config.train.epochs, first
        g_sched, s_sched = generator.sched, student.sched
        milestones = ",".join(f"{m:g}" for m in g_sched.milestones) if g_sched.name == "multistep" else g_sched.name
        # the student's milestones, as fractions of the whole run, must be the generator's
        student_run = ",".join(f"{(m * (epochs - warmup) + warmup) / epochs:.6g}" for m in s_sched.milestones) \
            if s_sched.name == "multistep" else s_sched.name
        same_steps = (student_run == ",".join(f"{m:.6g}" for m in _fractions(milestones))
                      if g_sched.name == "multistep" else False) and s_sched.gamma == g_sched.gamma
        kd = config.phases[1].losses.get("kd_kl")
        bn = config.phases[0].losses.get("bn_stats")
        quant = student.quant
        optim_ok = student.optim.name == "sgd" and student.optim.momentum == 0.9 and student.optim.nesterov
        g = generator.net.kwargs
        g_arch = f"{generator.net.name}, {_generator_body(g)}"
        s_arch = (f"{quant.quantizer.replace('minmax', 'min/max')} quantizer, "
                  f"{'quantized' if quant.quantize_input else 'float'} input, "
                  f"{'initialized from the teacher' if quant.init == 'teacher' else quant.init}, "
                  f"BatchNorm {'in eval mode' if quant.freeze_bn else 'training'}") if quant else "not quantized"
        return GDFQWork(generator=g_arch, student=s_arch, data=config.data.name, batch=config.synthesis.batch_size,
                        nz=int(generator.net.kwargs.get("nz", 100)),
                        epochs=epochs, iters=config.train.iters_per_epoch, warmup=warmup if last == epochs else -1,
                        lr=student.optim.lr if optim_ok else float("nan"), weight_decay=student.optim.weight_decay,
                        lr_g=generator.optim.lr, milestones=milestones if same_steps else f"student {student_run}",
                        gamma=g_sched.gamma, T=float(kd.get("T", 1.0)) if isinstance(kd, dict) else 1.0,
                        bn=float(bn.get("weight", 1.0)) if isinstance(bn, dict) else float(bn or 0),
                        weights=quant.weights if quant else 32, acts=quant.acts if quant else 32)

    # ------------------------------------------------------------ GDFQ's side
    def drive_reference(self, code: Path, work: GDFQWork, teacher: str, student: str, seed: int) -> dict:
        return gdfq_run(code, work, teacher, seed)


class QimeraCase(GDFQCase):
    """Qimera: dfkd's ``quant/qimera-<data>-paper`` beside iamkanghyunchoi/qimera's main.py and trainer.py."""

    def overrides(self, work: QimeraWork) -> list[str]:
        return [*super().overrides(work), f"synthesis.mix_prob={work.mix_prob}",
                f"synthesis.mix_classes={work.mix_classes}",
                f"players.generator.net.kwargs.noise_scale={work.noise_scale}"]

    def work_of(self, config) -> QimeraWork:
        generator = config.players["generator"].net
        g = generator.kwargs
        g_arch = (f"{'superposed' if generator.name == 'qimera' else generator.name}, random embeddings, "
                  f"{'a mapping' if g.get('mapping') else 'no mapping'}, {_generator_body(g)}")
        fields = {**vars(super().work_of(config)), "generator": g_arch}
        return QimeraWork(**fields, mix_prob=config.synthesis.mix_prob, mix_classes=config.synthesis.mix_classes,
                          noise_scale=float(g.get("noise_scale", 1.0)))

    def drive_reference(self, code: Path, work: QimeraWork, teacher: str, student: str, seed: int) -> dict:
        # run_cifar10_4bit.sh's flags: --randemb (no teacher weights as embeddings), no --no_DM (so no mapping)
        return gdfq_run(code, work, teacher, seed, no_DM=True, noise_scale=work.noise_scale, intermediate_dim=100,
                        multi_label_prob=work.mix_prob, multi_label_num=work.mix_classes)


def _stub_for_gdfq() -> None:
    import torch

    pyhocon = types.ModuleType("pyhocon")
    pyhocon.ConfigFactory = SimpleNamespace(parse_file=lambda path: {})
    termcolor = types.ModuleType("termcolor")
    termcolor.colored = lambda text, *args, **kwargs: text
    sys.modules.setdefault("pyhocon", pyhocon)
    sys.modules.setdefault("termcolor", termcolor)
    torch.nn.Module.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.cuda = lambda self, *args, **kwargs: self


class _Called:
    """A dfkd network called as GDFQ calls its models: ``model(x, True)`` or ``model(x, out_feature=True)``
    -> (logits, None); ``model(x)`` -> logits."""

    @staticmethod
    def wrap(network):
        from torch import nn

        class GDFQModel(nn.Module):
            def __init__(self):
                super().__init__()
                self.network = network

            def forward(self, x, *args, **kwargs):
                logits = self.network(x)
                return (logits, None) if args or kwargs else logits

        return GDFQModel()


def _old_equality():
    import numpy as np

    class OldEquality(np.ndarray):
        """An array whose ``==`` with an array of another shape is False, as numpy < 1.25 answered."""

        def __eq__(self, other):
            try:
                return np.asarray(self) == other
            except ValueError:
                return False

    return OldEquality


def _import_fresh(code: Path, *names: str) -> list[types.ModuleType]:
    """``names`` imported from ``code``: GDFQ and Qimera share module names (main, trainer, utils, ...),
    so one imported before from the other's folder is dropped first."""
    import importlib

    shared = ("main", "trainer", "utils", "options", "dataloader", "quantization_utils", "conditional_batchnorm",
              "pytorchcv")
    for name in [n for n in sys.modules if n.split(".")[0] in shared]:
        del sys.modules[name]
    sys.path.insert(0, str(code))
    try:
        return [importlib.import_module(name) for name in names]
    finally:
        sys.path.remove(str(code))


def gdfq_setup(code: Path, work: GDFQWork, teacher_path: str, seed: int, **extra):
    """GDFQ's (or Qimera's) generator, quantized student and trainer on dfkd's teacher: ``(design,
    trainer, student, info, meta)``, ``design`` the main.py ExperimentDesign methods' holder;
    ``extra``: settings of Qimera's options."""
    import random

    import numpy as np
    import torch

    from dfkd.data.card import card_of, info_from_card
    from dfkd.nets.arch import load_model

    _stub_for_gdfq()
    gdfq_main, gdfq_utils, gdfq_trainer = _import_fresh(code, "main", "utils", "trainer")
    old = _old_equality()
    gdfq_trainer.np = SimpleNamespace(mean=np.mean, argmax=lambda a, axis=None: np.argmax(a, axis).view(old))
    gdfq_utils.data_parallel = lambda model, ngpus, gpu0=0: model
    gdfq_utils.compute_singlecrop = lambda outputs, labels, loss, **kwargs: (0.0, float(loss.detach()), 0.0)
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    teacher, meta = load_model(teacher_path)
    if meta.get("dataset") != work.data:
        raise SystemExit(f"reference.py: the teacher was trained on {meta.get('dataset')!r}, the work names "
                         f"{work.data!r} (--set data=...)")
    info = info_from_card(card_of(meta), meta.get("dataset") or "card")
    channels, size = info.shape[0], info.shape[1]
    settings = SimpleNamespace(nClasses=info.num_classes, latent_dim=work.nz, img_size=size, channels=channels,
                               batchSize=work.batch, nGPU=1, GPU=0, momentum=0.9, weightDecay=work.weight_decay,
                               lr_S=work.lr, lr_G=work.lr_g, b1=0.5, b2=0.999, nEpochs=work.epochs,
                               warmup_epochs=work.warmup, temperature=work.T, alpha=1.0, qw=work.weights,
                               qa=work.acts, dataset=meta.get("dataset"), **extra)
    generator = gdfq_main.Generator(options=settings)
    design = SimpleNamespace(settings=settings)
    design.quantize_model = lambda model: gdfq_main.ExperimentDesign.quantize_model(design, model)
    design.freeze_model = lambda model: gdfq_main.ExperimentDesign.freeze_model(design, model)
    design.unfreeze_model = lambda model: gdfq_main.ExperimentDesign.unfreeze_model(design, model)
    quantized = design.quantize_model(load_model(teacher_path)[0])
    masters = []
    for lr in (work.lr, work.lr_g):
        master = gdfq_utils.LRPolicy(lr, work.epochs, "multi_step")
        master.set_params({"step": _fractions(work.milestones), "decay_rate": work.gamma})
        masters.append(master)
    trainer = gdfq_main.Trainer(model=_Called.wrap(quantized), model_teacher=_Called.wrap(teacher),
                                generator=generator, lr_master_S=masters[0], lr_master_G=masters[1],
                                train_loader=None, test_loader=None, settings=settings, logger=None)
    return design, trainer, quantized, info, meta


def gdfq_train(design, trainer, quantized, work: GDFQWork) -> None:
    """main.py's run() without its tests: the activation ranges move in the first 4 epochs."""
    for epoch in range(work.epochs):
        if epoch < 4:
            design.unfreeze_model(quantized)
        trainer.train(epoch=epoch)
        design.freeze_model(quantized)


def gdfq_run(code: Path, work: GDFQWork, teacher_path: str, seed: int, **extra) -> dict:
    from dfkd.data.datasets import load_dataset
    from dfkd.data.loader import TensorLoader
    from dfkd.loop.evaluation import evaluate

    if work.bn != 0.1 or work.iters != 200:
        raise SystemExit(f"reference.py: {'Qimera' if extra else 'GDFQ'}'s trainer fixes the BN-statistics weight "
                         "(0.1) and the iterations per epoch (200): bn, iters cannot be changed")
    design, trainer, quantized, info, meta = gdfq_setup(code, work, teacher_path, seed, **extra)
    start = time.perf_counter()
    gdfq_train(design, trainer, quantized, work)
    seconds = time.perf_counter() - start
    test = TensorLoader(load_dataset(work.data, "test", card=info), 1000)
    return {"final_acc": evaluate(quantized, test)["acc"], "s_per_iter": seconds / (work.epochs * work.iters)}


QUANT_CASES = {
    "gdfq": GDFQCase(reference="gdfq", config="quant/gdfq-fmnist-paper", work=GDFQWork(), shims=GDFQ_SHIMS,
                     notes=GDFQ_NOTES),
    "qimera": QimeraCase(reference="qimera", config="quant/qimera-fmnist-paper", work=QimeraWork(),
                         shims=QIMERA_SHIMS, notes=QIMERA_NOTES),
}
