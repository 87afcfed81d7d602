"""A method's reference implementation run beside dfkd's config at equal work.

    python scripts/reference.py --case dfq|fast|cmi|dfad|zskt|dafl|deepinv|nayer --teacher T.pt [--seeds 0 1 2]
        [--epochs 4] [--iters 10] [--batch 64] [--set FIELD=VALUE ...] [--source URL_OR_GIT_DIR]
        [--cache ~/.cache/dfkd/reference] [--out runs/reference] [--threads 1]

Both sides get one set of settings (the case's :class:`Work`): the same teacher weights, student
architecture, batch, generator (latent size, width, output), generator and student steps per
iteration, the number of iterations, learning rates, loss weights, temperature and the method's
own settings. dfkd's side is its shipped config with those settings as overrides; the script reads
the resolved config back and stops if any setting differs from what the reference side was given.
Each seed runs the two sides side by side (two processes, ``--threads`` torch threads each) and
prints, per side, the final test accuracy and the seconds per iteration of the training loop: the
reference's evaluator, logger and checkpoints are left out, and dfkd's side evaluates, draws its
pictures and saves its state at the end only (no sample-quality measures), so neither clock counts
more than training. ``<out>/<case>.jsonl`` keeps the rows and ``<out>/<case>.md`` the table.

The reference code is checked out into the cache at a pinned commit (``git clone`` from the
reference's URL, or from ``--source``: a mirror or another URL); nothing of it enters dfkd. What makes
it run here is a shim of ours, listed in the output: the modules it imports that this environment
lacks or that newer torchvision moved, the teacher's ``return_features`` call, the device, the data
it is evaluated on, and its training loop re-typed without the CIFAR evaluator, logger and
checkpoints of its script.

The knowledge-distillation terms on real data (``--case kd|dkd|at|fitnet|rkd|sp|pkt|crd``, beside
mdistiller's distillers, with ``--epochs`` and ``--batch`` their budget) are the cases of
``scripts/reference_kd.py``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_kd import KD_CASES  # noqa: E402
from reference_kd import term_option as _option  # noqa: E402
from reference_kd import term_weight as _weight  # noqa: E402
from reference_quant import QUANT_CASES  # noqa: E402

DEFAULT_CACHE = os.path.expanduser("~/.cache/dfkd/reference")
REFERENCES = {  # name -> (where it is published, the commit measured)
    "fast-datafree": ("https://github.com/zju-vipa/Fast-Datafree", "0dcecbc178b87048bedf730acb577045b3c0b57a"),
    "dfad": ("https://github.com/VainF/Data-Free-Adversarial-Distillation", "c161591aae4c13e53943dcb61c162876421aad7a"),
    "zskt": ("https://github.com/polo5/ZeroShotKnowledgeTransfer", "e24915d713672554800372c777c9014e3399e13b"),
    "deepinversion": ("https://github.com/NVlabs/DeepInversion", "2413af1f97f6c73c4dcb47b6a44266aad458ff28"),
    "nayer": ("https://github.com/tmtuan1307/NAYER", "c6bedcd49ad7362ff3dc5697202d97e303919a05"),
    # DAFL's code lives in the vendor's collection (Data-Efficient-Model-Compression/DAFL)
    "dafl": ("https://github.com/huawei-noah/Efficient-Computing", "225ddd2e6ca41915434557f7f49d395e4f801e3e"),
    # the knowledge-distillation terms on real data (scripts/reference_kd.py)
    "mdistiller": ("https://github.com/megvii-research/mdistiller", "a08d46f10d6102bd6e3f258ca5ac880b020ea259"),
    # the quantized students (scripts/reference_quant.py)
    "gdfq": ("https://github.com/xushoukai/GDFQ", "a93210e7309527cdd0ac2763d2a6928a8a767838"),
    "qimera": ("https://github.com/iamkanghyunchoi/qimera", "2f48cbaf1d0dbaf893ca6369681e801af16e4fef"),
}


@dataclass(frozen=True)
class Work:
    """What both sides of a case are given: equal work. Each method adds its own settings."""
    batch: int = 256          # synthetic batch, for the generator's step and each student step
    nz: int = 256             # generator latent size
    ngf: int = 64             # generator width (2*ngf, ngf channels)
    g_steps: int = 1          # generator steps per iteration
    kd_steps: int = 10        # student steps per iteration
    epochs: int = 4
    iters: int = 10           # iterations per epoch
    lr: float = 0.1           # student SGD, momentum 0.9, cosine to lr_min over the run
    lr_min: float = 2e-4
    interval: str = "epoch"   # the cosine steps once an epoch (CosineAnnealingLR)
    weight_decay: float = 1e-4
    lr_g: float = 1e-3        # generator Adam, betas (0.5, 0.999)
    T: float = 1.0            # the student's KL temperature


@dataclass(frozen=True)
class DFQWork(Work):
    output: str = "pixels"    # generator output: sigmoid pixels, then the teacher's normalization
    adv: float = 1.0          # loss weights of the generator's step
    bn: float = 1.0
    oh: float = 1.0
    balance: float = 20.0


@dataclass(frozen=True)
class FastWork(Work):
    """Fast-DFKD's meta-learned synthesis, as fast_cifar.sh's "Fast-10" runs it (ResNet-34 settings)."""
    batch: int = 256
    g_steps: int = 10         # inner steps of the generator's copy and the latents per batch
    kd_steps: int = 400       # student steps per iteration, each on a batch replayed from the pool
    epochs: int = 220
    iters: int = 1
    lr: float = 0.2
    weight_decay: float = 5e-4
    lr_g: float = 2e-3        # inner Adam; the shared generator's outer step is lr_g * g_steps
    lr_z: float = 0.01        # the latents' learning rate
    T: float = 20.0
    adv: float = 1.33         # on samples where student and teacher agree, from the warm-up's end
    bn: float = 10.0
    oh: float = 0.5
    bn_mmt: float = 0.9       # BN-statistics momentum across batches
    warmup: int = 20          # epochs of synthesis alone; the student's cosine starts after them
    labels: str = "random"    # classes asked for: torch.randint, as the reference draws them
    crop: int = 4             # the synthesis augmentation's crop padding, and it flips (fixed in the code)
    flip: bool = True
    pad: str = "black"        # kornia's crop of [0, 1] pixels before normalizing pads black
    student_crop: int = 4     # the student's augmentation of replayed images (the dataset's train transform)
    student_flip: bool = True
    student_pad: str = "black"  # torchvision's RandomCrop of a PIL image pads black


@dataclass(frozen=True)
class CMIWork(Work):
    """CMI as cmi_cifar.sh runs it (WRN-40-2 settings, CIFAR-10)."""
    batch: int = 256
    g_steps: int = 200        # inner steps of the re-initialized generator and its latents per batch
    kd_steps: int = 400
    epochs: int = 200
    iters: int = 1
    lr: float = 0.1
    weight_decay: float = 1e-4
    lr_g: float = 1e-3        # Adam of the generator, the latents and the contrastive head
    T: float = 20.0
    adv: float = 0.5          # on samples where student and teacher agree, from the start
    bn: float = 1.0
    oh: float = 1.0
    cr: float = 0.8           # the contrastive term: weight, temperature, memory bank, negatives, head width
    cr_T: float = 0.2
    bank: int = 40960
    negatives: int = 4096
    head_dim: int = 256
    labels: str = "random"
    crop: int = 4             # the global view: crop (black padding) and flip, fixed in the code
    flip: bool = True
    pad: str = "black"
    local_flip: bool = True   # the local view: a random resized crop of 25-100% of the area, flipped
    student_crop: int = 4
    student_flip: bool = True
    student_pad: str = "black"


@dataclass(frozen=True)
class DFADWork(Work):
    """DFAD as run_mnist.sh runs DFAD_mnist.py: per iteration kd_steps student steps on fresh batches
    (mean L1 between logits), then g_steps generator steps (-L1); no schedule on either."""
    batch: int = 512
    nz: int = 100
    g_steps: int = 1
    kd_steps: int = 5
    epochs: int = 40
    iters: int = 50
    lr: float = 0.01
    weight_decay: float = 1e-4
    lr_g: float = 1e-3        # generator Adam with torch's default betas (0.9, 0.999)
    sched: str = "constant"   # both players' schedules


@dataclass(frozen=True)
class ZSKTWork(Work):
    """ZSKT as scripts/ZeroShot runs main.py (CIFAR-10, WRN-16-2 -> WRN-16-1): per pseudo batch one
    generator step (-KL), then kd_steps student steps on the same latents (KL + attention transfer).
    One iteration an epoch, so that both sides' cosines step once an iteration, as the solver's do."""
    batch: int = 128
    nz: int = 100
    g_steps: int = 1
    kd_steps: int = 10
    epochs: int = 80000       # total_n_pseudo_batches
    iters: int = 1
    lr: float = 2e-3          # the student's Adam (default betas), cosine to 0
    lr_min: float = 0.0
    weight_decay: float = 0.0
    lr_g: float = 1e-3        # the generator's Adam, cosine to 0
    beta: float = 250.0       # attention transfer's weight
    at_layers: str = "relu1,relu2"  # the activations paired, tapped on both sides by these module paths
    grad_clip: float = 5.0


@dataclass(frozen=True)
class NayerWork(Work):
    """NAYER as scripts/nayer_100.sh runs it (CIFAR, ResNet-34 -> ResNet-18; its student batch is 512,
    the synthesis batch 400: one batch here, for both)."""
    batch: int = 400
    nz: int = 512             # the class embeddings' width (CLIP's text embeddings in the code)
    noise_dim: int = 1000     # the noisy layer's output (--le_emb_size)
    g_steps: int = 40         # Adam steps of the whole generator per batch, from where the last left it
    kd_steps: int = 400
    epochs: int = 120
    iters: int = 1
    lr: float = 0.2
    weight_decay: float = 1e-4
    lr_g: float = 4e-3        # betas (0.5, 0.999), a new Adam per batch
    T: float = 20.0
    adv: float = 1.33         # on samples where student and teacher agree, after the warm-up
    bn: float = 10.0
    oh: float = 0.5
    bn_mmt: float = 0.9
    warmup: int = 20
    g_life: int = 10          # the generator re-initialized every g_life batches
    g_loops: int = 2          # batches per iteration after the warm-up, and during it
    gwp_loops: int = 10
    crop: int = 4             # the synthesis augmentation: crop (black padding) and flip, fixed in the code
    flip: bool = True
    pad: str = "black"
    student_crop: int = 4
    student_flip: bool = True
    student_pad: str = "black"


@dataclass(frozen=True)
class DAFLWork(Work):
    """DAFL as DAFL-train.py runs on MNIST: per iteration one fresh batch, one backward of the
    generator's loss (one-hot, information entropy, activation) plus the student's KL on the detached
    batch, then both optimizers step. Adam for both, no schedule (the code decays only off MNIST)."""
    batch: int = 512
    nz: int = 100
    ngf: int = 64             # the code's 128/64 channels
    bn_eps: float = 0.8       # BatchNorm2d(C, 0.8) in the generator's blocks
    g_steps: int = 1
    kd_steps: int = 1
    epochs: int = 200
    iters: int = 120
    lr: float = 2e-3          # the student's Adam, default betas
    weight_decay: float = 0.0
    lr_g: float = 0.2         # the generator's Adam, default betas
    oh: float = 1.0
    ie: float = 5.0           # information entropy, with log10 (dfkd's class_balance uses ln: ie / ln 10)
    a: float = 0.1            # activation of the teacher's relu3 (its 120 features)
    layer: str = "relu3"


@dataclass(frozen=True)
class DeepInvWork(Work):
    """DeepInversion as NVlabs' CIFAR-10 script inverts a batch with the paper's parameters
    (--bs=256 --r_feature_weight=10 --di_lr=0.05), then a student distilled on the pool of inverted
    batches: the script stops at the images, so the student's loop is the pool's replay with KD at T
    (the DataFree benchmark's DeepInversion student, as dfkd's recipe has it)."""
    batch: int = 256
    g_steps: int = 2000       # Adam steps of each batch's pixels, from noise
    kd_steps: int = 400       # student steps per batch, each on batch images drawn from the whole pool
    epochs: int = 200
    iters: int = 1
    lr: float = 0.1
    lr_min: float = 0.0
    interval: str = "step"
    weight_decay: float = 5e-4
    lr_g: float = 0.05        # the pixels' Adam (default betas), its state reset each batch
    T: float = 20.0
    bn: float = 10.0          # Σ over BatchNorm layers of ‖μ − μ_BN‖₂ + ‖σ² − σ²_BN‖₂
    tv: float = 2.5e-5        # the l2 total variation over four directions
    adv: float = 0.0          # Adaptive DeepInversion's competition (T = 3); the script's default 0
    jitter: int = 2           # the batch rolled by up to 2 pixels each step
    labels: str = "balanced"  # every class equally often (a batch of 256); or random


COMMON_SHIMS = (
    "termcolor (its logger's colours, unused here) is a stub module",
    "torchvision.models.utils (moved in newer torchvision) points to torch.hub's load_state_dict_from_url",
    "the teacher is dfkd's network from the model file, wrapped so that teacher(x, return_features=True) "
    "also returns its embedding (a forward hook on its classifier's input)",
    "device: CPU (the scripts' CPU path) with --threads torch threads",
    "evaluated once, after training, on the test split through dfkd's reader (the script evaluates "
    "CIFAR each epoch)",
    "the loop of datafree_kd.py's main() and train() re-typed without its evaluator, logger and "
    "checkpoints; its CosineAnnealingLR steps per epoch after the warm-up, with T_max = the run's epochs "
    "less the warm-up (the script hard-codes 200, its own count)",
)
POOL_SHIMS = (
    "Module.cuda and Tensor.cuda are the identity (Generator.clone and the meta-gradient's first zeros "
    "call .cuda() unconditionally)",
    "the image pool's PNG writer saves one-channel images as greyscale (PIL cannot write an (H, W, 1) "
    "array); other images go to the reference's writer",
    "the pool's DataLoader reads in the main process (num_workers=0, no pinned memory): the script's four "
    "workers would take the other side's core",
    "the student's transform of replayed images is the CIFAR train transform's analogue at the teacher's "
    "size: RandomCrop(padding=student_crop), RandomHorizontalFlip if student_flip, ToTensor, Normalize",
)


POOL_NOTE = ("the reference's pool holds 8-bit PNG files, read back through PIL each student step; dfkd's holds "
             "the float batches in memory")


@dataclass(frozen=True)
class Case:
    """A method's pair: dfkd's config and the reference's code, given one :class:`Work`."""
    reference: str
    config: str               # dfkd's config for the method
    work: Work
    shims: tuple[str, ...]    # what was done to make the reference run here
    notes: tuple[str, ...]    # where the reference, run as its authors run it, differs by design or by bug

    def overrides(self, work: Work) -> list[str]:
        """dfkd's config overrides that give it ``work``."""
        raise NotImplementedError

    def work_of(self, config) -> Work:
        """The work a resolved dfkd config does, read back from it."""
        raise NotImplementedError

    def drive_reference(self, code: Path, work: Work, teacher: str, student: str, seed: int) -> dict:
        """The reference's loop on dfkd's teacher at ``work``: final accuracy, seconds per iteration."""
        raise NotImplementedError

    def budget(self, work: Work) -> str:
        return f"{work.epochs * work.iters} it x {work.kd_steps} student steps, batch {work.batch}"


def _student_overrides(work: Work) -> list[str]:
    return [f"players.student.optim.lr={work.lr}", f"players.student.optim.weight_decay={work.weight_decay}",
            f"players.student.sched.min_lr={work.lr_min}", f"players.student.sched.interval={work.interval}",
            f"synthesis.batch_size={work.batch}",
            f"train.epochs={work.epochs}", f"train.iters_per_epoch={work.iters}"]


def _student_work(config) -> dict:
    student, kd = config.players["student"], config.phases[1].losses["kd_kl"]
    return dict(batch=config.synthesis.batch_size, epochs=config.train.epochs, iters=config.train.iters_per_epoch,
                lr=student.optim.lr, lr_min=student.sched.min_lr, interval=student.sched.interval,
                weight_decay=student.optim.weight_decay,
                T=float(_option(kd, "T", 1.0)), g_steps=config.phases[0].steps, kd_steps=config.phases[1].steps)


def _augment_settings(config) -> dict:
    """The synthesis augmentation's and the student replay's settings of a pool-based config."""
    synth, replay = config.synthesis.augment, config.phases[1].augment
    return dict(labels=config.synthesis.labels, crop=synth.crop_padding, flip=synth.flip, pad=synth.pad,
                student_crop=replay.crop_padding if replay else 0, student_flip=bool(replay and replay.flip),
                student_pad=replay.pad if replay else "mean")


def _fixed(work: Work, why: str, **expected) -> None:
    """Stops when ``work`` asks the reference for settings its code fixes."""
    wrong = [name for name, value in expected.items() if getattr(work, name) != value]
    if wrong:
        raise SystemExit(f"reference.py: {why}: {', '.join(wrong)} cannot be changed")


class DFQCase(Case):
    """DFQ: a generator trained each iteration against the teacher's BN statistics, then the
    student on fresh batches of it (datafree_kd.py --method dfq)."""

    def overrides(self, work: DFQWork) -> list[str]:
        return [*_student_overrides(work),
                f"players.generator.net.kwargs.nz={work.nz}", f"players.generator.net.kwargs.ngf={work.ngf}",
                f"players.generator.net.kwargs.output={work.output}", "players.generator.net.kwargs.native_size=null",
                f"players.generator.optim.lr={work.lr_g}",
                f"phases.0.steps={work.g_steps}", f"phases.1.steps={work.kd_steps}",
                f"phases.0.losses={{adv_kl: {work.adv}, bn_stats: {work.bn}, onehot_ce: {work.oh}, "
                f"class_balance: {work.balance}}}",
                f"phases.1.losses={{kd_kl: {{weight: 1.0, T: {work.T}}}}}"]

    def work_of(self, config) -> DFQWork:
        generator = config.players["generator"]
        kwargs, losses = generator.net.kwargs, config.phases[0].losses
        return DFQWork(**_student_work(config), nz=kwargs.get("nz", 256), ngf=kwargs.get("ngf", 64),
                       output=kwargs.get("output", "bn"), lr_g=generator.optim.lr,
                       adv=_weight(losses["adv_kl"]), bn=_weight(losses["bn_stats"]),
                       oh=_weight(losses["onehot_ce"]), balance=_weight(losses["class_balance"]))

    def drive_reference(self, code, work, teacher_path, student_name, seed):
        teacher, student, info, meta = _reference_setup(code, teacher_path, student_name, seed)
        from datafree.criterions import KLDiv
        from datafree.models.generator import Generator
        from datafree.synthesis import GenerativeSynthesizer
        from datafree.utils import Normalizer

        generator = Generator(nz=work.nz, ngf=work.ngf, img_size=info.shape[1], nc=info.shape[0])
        synthesizer = GenerativeSynthesizer(
            teacher=teacher, student=teacher, generator=generator, nz=work.nz, img_size=tuple(info.shape),
            iterations=work.g_steps, lr_g=work.lr_g, synthesis_batch_size=work.batch,
            sample_batch_size=work.batch, adv=work.adv, bn=work.bn, oh=work.oh, act=0, balance=work.balance,
            criterion=KLDiv(), normalizer=Normalizer(info.mean, info.std), device="cpu")
        return _reference_loop(synthesizer, lambda: synthesizer.sample()[0], student, teacher, work, 0, meta,
                               teacher_path, info)


class FastCase(Case):
    """Fast-DFKD: a shared generator cloned per batch, the clone and fresh latents optimized for
    g_steps, the shared weights meta-updated; the best batch enters the pool, which the student
    replays (datafree_kd.py --method fast_meta, FastMetaSynthesizer)."""

    def overrides(self, work: FastWork) -> list[str]:
        return [*_student_overrides(work),
                f"synthesis.net.kwargs.nz={work.nz}", f"synthesis.net.kwargs.ngf={work.ngf}",
                "synthesis.net.kwargs.output=pixels", f"synthesis.inner.lr={work.lr_g}",
                f"synthesis.latent_lr={work.lr_z}", f"synthesis.outer.lr={work.lr_g * work.g_steps}",
                "synthesis.meta=fomaml", f"synthesis.labels={work.labels}", f"synthesis.warmup_epochs={work.warmup}",
                f"synthesis.augment={{crop_padding: {work.crop}, flip: {str(work.flip).lower()}, pad: {work.pad}}}",
                f"phases.0.steps={work.g_steps}", f"phases.1.steps={work.kd_steps}",
                f"phases.0.losses={{adv_kl: {{weight: {work.adv}, agreement_mask: true, from_epoch: {work.warmup}}}, "
                f"bn_stats: {{weight: {work.bn}, momentum: {work.bn_mmt}}}, "
                f"onehot_ce: {{weight: {work.oh}, target: labels}}}}",
                f"phases.1.augment={{crop_padding: {work.student_crop}, flip: {str(work.student_flip).lower()}, "
                f"pad: {work.student_pad}}}",
                f"phases.1.losses={{kd_kl: {{weight: 1.0, T: {work.T}}}}}"]

    def work_of(self, config) -> FastWork:
        synth, losses = config.synthesis, config.phases[0].losses
        kwargs, adv = synth.net.kwargs, losses["adv_kl"]
        if synth.kind != "meta" or synth.meta != "fomaml" or kwargs.get("output") != "pixels" \
                or not _option(adv, "agreement_mask", False) or _option(losses["onehot_ce"], "target", "") != "labels" \
                or abs(synth.outer.lr - synth.inner.lr * config.phases[0].steps) > 1e-12:
            raise SystemExit(f"reference.py: {config.experiment} is not Fast-DFKD's synthesis as the reference "
                             "runs it (meta, fomaml, pixels, agreement mask, one-hot on the labels asked for, "
                             "outer lr = inner lr x steps)")
        return FastWork(**_student_work(config), nz=kwargs.get("nz", 256), ngf=kwargs.get("ngf", 64),
                        lr_g=synth.inner.lr, lr_z=synth.latent_lr, adv=_weight(adv), bn=_weight(losses["bn_stats"]),
                        oh=_weight(losses["onehot_ce"]), bn_mmt=float(_option(losses["bn_stats"], "momentum", 0.0)),
                        warmup=synth.warmup_epochs, **_augment_settings(config))

    def drive_reference(self, code, work, teacher_path, student_name, seed):
        _fixed(work, "the reference's synthesis always crops with padding 4 (black), flips and draws classes "
                     "at random, and its student's crop pads black", crop=4, flip=True, pad="black", labels="random",
               student_pad="black")

        def make(teacher, student, generator, info, pool, replay, normalizer):
            from datafree.synthesis import FastMetaSynthesizer

            return FastMetaSynthesizer(
                teacher, student, generator, nz=work.nz, num_classes=info.num_classes, img_size=tuple(info.shape),
                init_dataset=None, save_dir=pool, device="cpu", transform=replay, normalizer=normalizer,
                synthesis_batch_size=work.batch, sample_batch_size=work.batch, iterations=work.g_steps,
                warmup=work.warmup, lr_g=work.lr_g, lr_z=work.lr_z, adv=work.adv, bn=work.bn, oh=work.oh,
                reset_l0=0, reset_bn=0, bn_mmt=work.bn_mmt, is_maml=1)

        return _drive_pool(code, work, teacher_path, student_name, seed, work.warmup, make)


class CMICase(Case):
    """CMI: a generator re-initialized per batch, optimized with its latents against BN statistics,
    the one-hot and adversarial terms and the contrastive term on two views; the best step's batch
    enters the pool, which the student replays (datafree_kd.py --method cmi, CMISynthesizer)."""

    def overrides(self, work: CMIWork) -> list[str]:
        flag = lambda value: str(value).lower()  # noqa: E731  YAML's booleans
        return [*_student_overrides(work),
                f"synthesis.net.kwargs.nz={work.nz}", f"synthesis.net.kwargs.ngf={work.ngf}",
                "synthesis.net.kwargs.output=pixels", f"synthesis.inner.lr={work.lr_g}", "synthesis.latent_lr=null",
                f"synthesis.labels={work.labels}",
                f"synthesis.augment={{crop_padding: {work.crop}, flip: {flag(work.flip)}, pad: {work.pad}}}",
                f"phases.0.steps={work.g_steps}", f"phases.1.steps={work.kd_steps}",
                f"phases.0.losses={{adv_kl: {{weight: {work.adv}, agreement_mask: true}}, bn_stats: {work.bn}, "
                f"onehot_ce: {{weight: {work.oh}, target: labels}}, contrastive: {{weight: {work.cr}, "
                f"T: {work.cr_T}, bank_size: {work.bank}, negatives: {work.negatives}, dim: {work.head_dim}, "
                f"flip: {flag(work.local_flip)}}}}}",
                f"phases.1.augment={{crop_padding: {work.student_crop}, flip: {flag(work.student_flip)}, "
                f"pad: {work.student_pad}}}",
                f"phases.1.losses={{kd_kl: {{weight: 1.0, T: {work.T}}}}}"]

    def work_of(self, config) -> CMIWork:
        synth, losses = config.synthesis, config.phases[0].losses
        kwargs, adv, contrastive = synth.net.kwargs, losses["adv_kl"], losses["contrastive"]
        if synth.kind != "reinit" or synth.init != "dcgan" or synth.keep != "best" \
                or kwargs.get("output") != "pixels" or synth.latent_lr not in (None, synth.inner.lr) \
                or not _option(adv, "agreement_mask", False) or _option(losses["onehot_ce"], "target", "") != "labels":
            raise SystemExit(f"reference.py: {config.experiment} is not CMI's synthesis as the reference runs it "
                             "(reinit with DCGAN's initialization, best step kept, pixels, the latents at the "
                             "generator's lr, agreement mask, one-hot on the labels asked for)")
        return CMIWork(**_student_work(config), nz=kwargs.get("nz", 256), ngf=kwargs.get("ngf", 64),
                       lr_g=synth.inner.lr, adv=_weight(adv), bn=_weight(losses["bn_stats"]),
                       oh=_weight(losses["onehot_ce"]), cr=_weight(contrastive),
                       cr_T=float(_option(contrastive, "T", 0.2)), bank=_option(contrastive, "bank_size", 40960),
                       negatives=_option(contrastive, "negatives", 4096), head_dim=_option(contrastive, "dim", 256),
                       local_flip=bool(_option(contrastive, "flip", False)), **_augment_settings(config))

    def drive_reference(self, code, work, teacher_path, student_name, seed):
        _fixed(work, "the reference's CMI always crops its global view with padding 4 (black), flips both views "
                     "and draws classes at random, and its student's crop pads black", crop=4, flip=True,
               pad="black", labels="random", local_flip=True, student_pad="black")

        def make(teacher, student, generator, info, pool, replay, normalizer):
            from datafree.synthesis import CMISynthesizer

            return CMISynthesizer(
                teacher, student, generator, nz=work.nz, num_classes=info.num_classes, img_size=tuple(info.shape),
                feature_reuse=False, feature_layers=None, bank_size=work.bank, n_neg=work.negatives,
                head_dim=work.head_dim, init_dataset=None, iterations=work.g_steps, lr_g=work.lr_g,
                progressive_scale=False, synthesis_batch_size=work.batch, sample_batch_size=work.batch,
                adv=work.adv, bn=work.bn, oh=work.oh, cr=work.cr, cr_T=work.cr_T, save_dir=pool, transform=replay,
                normalizer=normalizer, device="cpu")

        return _drive_pool(code, work, teacher_path, student_name, seed, 0, make)


class DFADCase(Case):
    """DFAD: the student's L1 steps on fresh generator batches, then the generator's step against
    it (VainF's DFAD_mnist.py). Its teacher and student have no BatchNorm (teacher/lenet5-nobn-digits)."""

    student_kwargs = {"batchnorm": False}

    def overrides(self, work: DFADWork) -> list[str]:
        return [f"players.student.optim.lr={work.lr}", f"players.student.optim.weight_decay={work.weight_decay}",
                f"players.student.sched.name={work.sched}", f"players.generator.sched.name={work.sched}",
                f"synthesis.batch_size={work.batch}", f"train.epochs={work.epochs}",
                f"train.iters_per_epoch={work.iters}", f"players.generator.net.kwargs.nz={work.nz}",
                f"players.generator.net.kwargs.ngf={work.ngf}", "players.generator.net.kwargs.output=bn",
                "players.generator.net.kwargs.native_size=null", f"players.generator.optim.lr={work.lr_g}",
                "players.generator.optim.betas=[0.9, 0.999]", f"phases.0.steps={work.kd_steps}",
                f"phases.1.steps={work.g_steps}", "phases.0.losses={l1_logits: 1.0}",
                "phases.1.losses={adv_l1: 1.0}"]

    def work_of(self, config) -> DFADWork:
        student, generator = config.players["student"], config.players["generator"]
        kwargs, phases = generator.net.kwargs, config.phases
        if [p.player for p in phases] != ["student", "generator"] or any(p.batch != "fresh" for p in phases) \
                or set(phases[0].losses) != {"l1_logits"} or set(phases[1].losses) != {"adv_l1"} \
                or kwargs.get("output", "bn") != "bn" or kwargs.get("native_size") is not None \
                or tuple(generator.optim.betas) != (0.9, 0.999) or student.sched.name != generator.sched.name:
            raise SystemExit(f"reference.py: {config.experiment} is not DFAD's loop as the reference runs it "
                             "(student L1 steps then the generator's -L1 step on fresh batches; tanh and "
                             "BatchNorm output at full size; Adam's default betas; one schedule for both)")
        return DFADWork(batch=config.synthesis.batch_size, nz=kwargs.get("nz", 100), ngf=kwargs.get("ngf", 64),
                        g_steps=phases[1].steps, kd_steps=phases[0].steps, epochs=config.train.epochs,
                        iters=config.train.iters_per_epoch, lr=student.optim.lr,
                        weight_decay=student.optim.weight_decay, lr_g=generator.optim.lr, sched=student.sched.name)

    def drive_reference(self, code, work, teacher_path, student_name, seed):
        import types

        import torch

        _fixed(work, "DFAD_mnist.py as run_mnist.sh runs it has no schedule, and its train() takes 5 student "
                     "steps and 1 generator step an iteration", sched="constant", kd_steps=5, g_steps=1)
        teacher, student, info, meta = _reference_setup(code, teacher_path, student_name, seed,
                                                        self.student_kwargs)
        import DFAD_mnist
        from network.gan import GeneratorA

        channels, height, _ = info.shape
        generator = GeneratorA(nz=work.nz, ngf=work.ngf, nc=channels, img_size=height)
        optimizers = [torch.optim.SGD(student.parameters(), lr=work.lr, weight_decay=work.weight_decay,
                                      momentum=0.9),
                      torch.optim.Adam(generator.parameters(), lr=work.lr_g)]
        args = types.SimpleNamespace(epoch_itrs=work.iters, batch_size=work.batch, nz=work.nz, verbose=False,
                                     log_interval=10)
        start = time.perf_counter()
        for epoch in range(1, work.epochs + 1):
            DFAD_mnist.train(args, teacher=teacher.network, student=student, generator=generator,
                             device=torch.device("cpu"), optimizer=optimizers, epoch=epoch)
        seconds = time.perf_counter() - start
        return {"final_acc": _test_accuracy(student, meta, teacher_path, info),
                "s_per_iter": seconds / (work.epochs * work.iters)}


class ZSKTCase(Case):
    """ZSKT: polo5's ZeroShotKTSolver.run() as it is, with dfkd's networks in place of its models."""

    def overrides(self, work: ZSKTWork) -> list[str]:
        pairs = ", ".join(f"[{name}, {name}]" for name in work.at_layers.split(","))
        players = []
        for name, lr in (("student", work.lr), ("generator", work.lr_g)):
            players += [f"players.{name}.optim.name=adam", f"players.{name}.optim.lr={lr}",
                        f"players.{name}.optim.betas=[0.9, 0.999]", f"players.{name}.optim.grad_clip={work.grad_clip}",
                        f"players.{name}.sched.name=cosine", f"players.{name}.sched.min_lr={work.lr_min}",
                        f"players.{name}.sched.interval={work.interval}"]
        return [*players, f"players.student.optim.weight_decay={work.weight_decay}",
                f"synthesis.batch_size={work.batch}", f"train.epochs={work.epochs}",
                f"train.iters_per_epoch={work.iters}", f"players.generator.net.kwargs.nz={work.nz}",
                f"players.generator.net.kwargs.ngf={work.ngf}", "players.generator.net.kwargs.output=affine_bn",
                "players.generator.net.kwargs.native_size=null", f"phases.0.steps={work.g_steps}",
                f"phases.1.steps={work.kd_steps}", "phases.0.train_mode=[student]",
                f"phases.0.losses={{adv_kl: {{weight: 1.0, reduction: mean, T: {work.T}}}}}",
                f"phases.1.losses={{kd_kl: {{weight: 1.0, reduction: mean, T: {work.T}}}, "
                f"attention: {{weight: {work.beta}, pairs: [{pairs}]}}}}"]

    def work_of(self, config) -> ZSKTWork:
        student, generator, phases = config.players["student"], config.players["generator"], config.phases
        kwargs, kd, at = generator.net.kwargs, phases[1].losses.get("kd_kl"), phases[1].losses.get("attention")
        adv = phases[0].losses.get("adv_kl")
        same = [(p.optim.name, tuple(p.optim.betas), p.optim.grad_clip, p.sched.name, p.sched.min_lr, p.sched.interval)
                for p in (student, generator)]
        if [p.player for p in phases] != ["generator", "student"] or [p.batch for p in phases] != \
                ["fresh", "regenerated"] or "student" not in phases[0].train_mode or adv is None or kd is None \
                or at is None or _option(adv, "reduction", "") != "mean" or _option(kd, "reduction", "") != "mean" \
                or kwargs.get("output") != "affine_bn" or kwargs.get("native_size") is not None \
                or same[0] != same[1] or same[0][:2] != ("adam", (0.9, 0.999)) or same[0][3] != "cosine" \
                or _option(adv, "T", 1.0) != _option(kd, "T", 1.0):
            raise SystemExit(f"reference.py: {config.experiment} is not ZSKT's loop as the reference runs it "
                             "(the generator's -KL step with the student in train mode, then student steps on "
                             "the regenerated batch; KL with mean reduction; Adam and a cosine for both)")
        pairs = _option(at, "pairs", [])
        return ZSKTWork(batch=config.synthesis.batch_size, nz=kwargs.get("nz", 100), ngf=kwargs.get("ngf", 64),
                        g_steps=phases[0].steps, kd_steps=phases[1].steps, epochs=config.train.epochs,
                        iters=config.train.iters_per_epoch, lr=student.optim.lr, lr_min=same[0][4],
                        interval=same[0][5], weight_decay=student.optim.weight_decay, lr_g=generator.optim.lr,
                        T=float(_option(kd, "T", 1.0)), beta=_weight(at),
                        at_layers=",".join(s for s, t in pairs if s == t) if all(s == t for s, t in pairs) else "",
                        grad_clip=same[0][2])

    def drive_reference(self, code, work, teacher_path, student_name, seed):
        import types

        import torch
        from torch import nn

        _fixed(work, "ZSKT's solver builds a 128/64-channel generator, clips gradients at 5, steps its cosines "
                     "once a pseudo batch to 0 and has no weight decay", ngf=64, grad_clip=5.0, iters=1,
               interval="epoch", lr_min=0.0, weight_decay=0.0)
        teacher, student, info, meta = _reference_setup(code, teacher_path, student_name, seed)
        logger = types.ModuleType("utils.logger")
        logger.Logger = type("Logger", (), {"__init__": lambda self, log_dir: None})
        sys.modules["utils.logger"] = logger
        import models.generator
        import solver
        import utils.loaders

        from dfkd.nets.taps import resolve_module

        layers = work.at_layers.split(",")

        class WithActivations(nn.Module):  # network(x) -> (logits, *activations at ``layers``)
            def __init__(self, network):
                super().__init__()
                self.network, self.seen = network, {}
                for name in layers:
                    resolve_module(network, name).register_forward_hook(
                        lambda module, inputs, output, name=name: self.seen.__setitem__(name, output))

            def forward(self, x):
                return (self.network(x), *(self.seen[name] for name in layers))

        channels = info.shape[0]

        class Generator(models.generator.Generator):  # the teacher's channels, not CIFAR's three
            def __init__(self, z_dim):
                super().__init__(z_dim)
                self.layers[11], self.layers[12] = nn.Conv2d(64, channels, 3, 1, 1), nn.BatchNorm2d(channels)

        utils.loaders.Generator = Generator
        nets = {True: WithActivations(teacher.network), False: WithActivations(student)}
        solver.select_model = lambda dataset, model_name, pretrained, pretrained_models_path: nets[pretrained]
        solver.get_test_loader = lambda args: []  # evaluated below, on dfkd's reader of the test split
        total = work.epochs * work.iters
        with tempfile.TemporaryDirectory() as logs:
            args = types.SimpleNamespace(
                dataset="digits", teacher_architecture="dfkd", student_architecture="dfkd", batch_size=work.batch,
                z_dim=work.nz, device=torch.device("cpu"),
                n_generator_iter=work.g_steps, n_student_iter=work.kd_steps, generator_learning_rate=work.lr_g,
                student_learning_rate=work.lr, total_n_pseudo_batches=total, KL_temperature=work.T,
                AT_beta=work.beta, log_directory_path=logs, save_model_path=logs, experiment_name="zskt",
                use_gpu=False, log_freq=total + 1, save_n_checkpoints=0, save_final_model=False,
                pretrained_models_path=None)
            runner = solver.ZeroShotKTSolver(args)
            start = time.perf_counter()
            runner.run()
            seconds = time.perf_counter() - start
        return {"final_acc": _test_accuracy(student, meta, teacher_path, info), "s_per_iter": seconds / total}


class NayerCase(Case):
    """NAYER: its synthesizer (datafree/synthesis/nayer.py) and NLGenerator on dfkd's teacher,
    driven by datafree_kd.py's loop as the benchmark's other pool-based methods are."""

    def overrides(self, work: NayerWork) -> list[str]:
        return [*_student_overrides(work), f"synthesis.net.kwargs.nz={work.nz}",
                f"synthesis.net.kwargs.ngf={work.ngf}", f"synthesis.net.kwargs.noise_dim={work.noise_dim}",
                "synthesis.net.kwargs.output=pixels", "synthesis.inner.name=adam", f"synthesis.inner.lr={work.lr_g}",
                "synthesis.inner.betas=[0.5, 0.999]", "synthesis.keep=best", f"synthesis.warmup_epochs={work.warmup}",
                f"synthesis.reset_every={work.g_life}",
                f"synthesis.augment={{crop_padding: {work.crop}, flip: {str(work.flip).lower()}, pad: {work.pad}}}",
                f"phases.0.steps={work.g_steps}", f"phases.1.steps={work.kd_steps}",
                f"phases.0.losses={{adv_kl: {{weight: {work.adv}, agreement_mask: true, from_epoch: {work.warmup}}}, "
                f"bn_stats: {{weight: {work.bn}, momentum: {work.bn_mmt}}}, "
                f"onehot_ce: {{weight: {work.oh}, target: labels}}}}",
                f"phases.1.augment={{crop_padding: {work.student_crop}, flip: {str(work.student_flip).lower()}, "
                f"pad: {work.student_pad}}}", f"phases.1.losses={{kd_kl: {{weight: 1.0, T: {work.T}}}}}"]

    def work_of(self, config) -> NayerWork:
        synth, phases = config.synthesis, config.phases
        losses, kwargs = phases[0].losses, synth.net.kwargs
        adv, bn, oh = losses.get("adv_kl"), losses.get("bn_stats"), losses.get("onehot_ce")
        settings = _augment_settings(config)
        if synth.kind != "nayer" or kwargs.get("output") != "pixels" or synth.keep != "best" \
                or synth.inner.name != "adam" or tuple(synth.inner.betas) != (0.5, 0.999) \
                or set(losses) != {"adv_kl", "bn_stats", "onehot_ce"} or not _option(adv, "agreement_mask", False) \
                or _option(adv, "from_epoch", 0) != synth.warmup_epochs or _option(oh, "target", "") != "labels":
            raise SystemExit(f"reference.py: {config.experiment} is not NAYER's synthesis as the reference runs it "
                             "(the noisy-layer generator in pixels, the best step kept, Adam with betas (0.5, 0.999), "
                             "the masked adversarial term from the warm-up's end, one-hot on the classes asked for)")
        return NayerWork(**_student_work(config), nz=kwargs.get("nz", 512), ngf=kwargs.get("ngf", 64),
                         noise_dim=kwargs.get("noise_dim", 1000), lr_g=synth.inner.lr, adv=_weight(adv),
                         bn=_weight(bn), oh=_weight(oh), bn_mmt=float(_option(bn, "momentum", 0.0)),
                         warmup=synth.warmup_epochs, g_life=synth.reset_every or 10 ** 9, g_loops=1, gwp_loops=1,
                         **{k: v for k, v in settings.items() if k != "labels"})

    def drive_reference(self, code, work, teacher_path, student_name, seed):
        _fixed(work, "dfkd's synthesizer phase makes one batch an iteration (the script's --g_loops and "
                     "--gwp_loops are not expressible), and the reference's synthesis always crops with padding 4 "
                     "and flips, padding black, as the student's crop of a PNG does", g_loops=1, gwp_loops=1, crop=4,
               flip=True, pad="black", student_pad="black")
        if any(k % work.g_life and (k - work.warmup) % work.g_life == 0 for k in range(work.epochs * work.iters)):
            raise SystemExit("reference.py: NAYER re-initializes its generator every g_life batches counted from the "
                             "warm-up's end as well as from the start; dfkd's reset_every counts from the start, so "
                             "the warm-up must be a multiple of g_life")

        def make(teacher, student, generator, info, pool, replay, normalizer):
            import torch
            from datafree.models.generator import NLGenerator
            from datafree.synthesis import NAYER

            channels, height, _ = info.shape
            label_emb = torch.randn(info.num_classes, work.nz)  # dfkd's fixed embeddings' draw (no CLIP here)
            nayer = NLGenerator(ngf=work.ngf, img_size=height, nc=channels, nl=info.num_classes, label_emb=label_emb,
                                le_emb_size=work.noise_dim, le_size=work.nz, sbz=work.batch)
            return NAYER(teacher, student, nayer, num_classes=info.num_classes, img_size=tuple(info.shape),
                         init_dataset=None, save_dir=pool, device="cpu", transform=replay, normalizer=normalizer,
                         synthesis_batch_size=work.batch, sample_batch_size=work.batch, g_steps=work.g_steps,
                         warmup=work.warmup, lr_g=work.lr_g, adv=work.adv, bn=work.bn, oh=work.oh,
                         bn_mmt=work.bn_mmt, g_life=work.g_life, g_loops=work.g_loops, gwp_loops=work.gwp_loops)

        with contextlib.redirect_stdout(sys.stderr):  # its synthesizer prints every step's losses
            result = _drive_pool(code, work, teacher_path, student_name, seed, work.warmup, make)
        return result


class DAFLCase(Case):
    """DAFL: DAFL-train.py's generator and its iteration's statements run as they are, on dfkd's
    BatchNorm-free LeNet-5 teacher and LeNet-5-half student (teacher/lenet5-nobn-digits)."""

    student_kwargs = {"batchnorm": False}
    script = "Data-Efficient-Model-Compression/DAFL/DAFL-train.py"

    def overrides(self, work: DAFLWork) -> list[str]:
        players = []
        for name, lr in (("student", work.lr), ("generator", work.lr_g)):
            players += [f"players.{name}.optim.name=adam", f"players.{name}.optim.lr={lr}",
                        f"players.{name}.optim.betas=[0.9, 0.999]", f"players.{name}.sched.name=constant"]
        return [*players, f"players.student.optim.weight_decay={work.weight_decay}",
                "players.generator.optim.weight_decay=0.0", f"synthesis.batch_size={work.batch}",
                f"train.epochs={work.epochs}", f"train.iters_per_epoch={work.iters}",
                f"players.generator.net.kwargs.nz={work.nz}", f"players.generator.net.kwargs.ngf={work.ngf}",
                f"players.generator.net.kwargs.bn_eps={work.bn_eps}", "players.generator.net.kwargs.output=bn",
                "players.generator.net.kwargs.native_size=null", f"phases.0.steps={work.g_steps}",
                f"phases.1.steps={work.kd_steps}",
                f"phases.0.losses={{onehot_ce: {work.oh}, class_balance: {work.ie / math.log(10)!r}, "
                f"activation_norm: {{weight: {work.a}, layer: {work.layer}}}}}",
                f"phases.1.losses={{kd_kl: {{weight: 1.0, T: {work.T}}}}}"]

    def work_of(self, config) -> DAFLWork:
        student, generator, phases = config.players["student"], config.players["generator"], config.phases
        kwargs = generator.net.kwargs
        g_losses, kd = phases[0].losses if phases else {}, phases[1].losses.get("kd_kl") if len(phases) > 1 else None
        optim = [(p.optim.name, tuple(p.optim.betas), p.sched.name) for p in (student, generator)]
        if [(p.player, p.batch) for p in phases] != [("generator", "fresh"), ("student", "same")] \
                or set(g_losses) != {"onehot_ce", "class_balance", "activation_norm"} \
                or set(phases[1].losses) != {"kd_kl"} or _option(kd, "reduction", "batchmean") != "batchmean" \
                or _option(g_losses["onehot_ce"], "target", "argmax") != "argmax" \
                or kwargs.get("output", "bn") != "bn" or kwargs.get("native_size") is not None \
                or any(o != ("adam", (0.9, 0.999), "constant") for o in optim) or generator.optim.weight_decay:
            raise SystemExit(f"reference.py: {config.experiment} is not DAFL's loop as the reference runs it "
                             "(the generator's one-hot, entropy and activation step on a fresh batch, then the "
                             "student's batch-mean KL on the same batch; Adam's default betas, no schedule)")
        return DAFLWork(batch=config.synthesis.batch_size, nz=kwargs.get("nz", 100), ngf=kwargs.get("ngf", 64),
                        bn_eps=float(kwargs.get("bn_eps", 1e-5)), g_steps=phases[0].steps,
                        kd_steps=phases[1].steps, epochs=config.train.epochs, iters=config.train.iters_per_epoch,
                        lr=student.optim.lr, weight_decay=student.optim.weight_decay, lr_g=generator.optim.lr,
                        T=float(_option(kd, "T", 1.0)), oh=_weight(g_losses["onehot_ce"]),
                        ie=_weight(g_losses["class_balance"]) * math.log(10),
                        a=_weight(g_losses["activation_norm"]),
                        layer=_option(g_losses["activation_norm"], "layer", None) or "")

    @staticmethod
    def out_feature(network, layer: str):
        """``network`` in eval mode, called as DAFL-train.py calls its teacher: ``teacher(x,
        out_feature=True)`` gives ``(logits, the output of layer flattened)``."""
        from torch import nn

        from dfkd.nets.taps import resolve_module

        class OutFeature(nn.Module):
            def __init__(self):
                super().__init__()
                self.network, self.feature = network, None
                resolve_module(network, layer).register_forward_hook(
                    lambda module, inputs, output: setattr(self, "feature", output.flatten(1)))

            def forward(self, x, out_feature=False):
                logits = self.network(x)
                return (logits, self.feature) if out_feature else logits

        return OutFeature().eval()

    def program(self, code: Path, work: DAFLWork, shape: tuple[int, int, int]):
        """DAFL-train.py's Generator and kdloss defined in a scope with the run's settings as its
        ``opt``, and its iteration's statements compiled as a loop of ``iters`` iterations, which
        runs in that scope once ``generator``, ``teacher``, ``net``, ``criterion`` and the two
        optimizers are set there: ``(scope, loop)``."""
        import ast
        import types

        import torch
        import torch.nn.functional as F
        from torch import nn

        torch.Tensor.cuda = _module_cuda
        tree = ast.parse((Path(code) / self.script).read_text())
        definitions = [n for n in tree.body if isinstance(n, (ast.ClassDef, ast.FunctionDef))
                       and n.name in ("Generator", "kdloss")]
        epochs = next(n for n in tree.body if isinstance(n, ast.For) and "n_epochs" in ast.unparse(n.iter))
        iteration = next(n for n in epochs.body if isinstance(n, ast.For))  # for i in range(120): ...
        iteration.iter = ast.parse("range(iters)", mode="eval").body
        channels, height, _ = shape
        opt = types.SimpleNamespace(latent_dim=work.nz, img_size=height, channels=channels, n_epochs=work.epochs,
                                    batch_size=work.batch, oh=work.oh, ie=work.ie, a=work.a)
        scope = {"nn": nn, "F": F, "torch": torch, "Variable": torch.autograd.Variable, "opt": opt, "epoch": 0}
        exec(compile(ast.Module(body=definitions, type_ignores=[]), self.script, "exec"), scope)
        return scope, compile(ast.Module(body=[iteration], type_ignores=[]), self.script, "exec")

    def drive_reference(self, code, work, teacher_path, student_name, seed):
        import torch
        from torch import nn

        _fixed(work, "DAFL-train.py builds a 128/64-channel generator with BatchNorm eps 0.8, takes one "
                     "generator and one student step an iteration, and distils at T=1 with the teacher's "
                     "relu3 features", ngf=64, bn_eps=0.8, g_steps=1, kd_steps=1, T=1.0, layer="relu3")
        teacher, student, info, meta = _reference_setup(code, teacher_path, student_name, seed,
                                                        self.student_kwargs)
        scope, loop = self.program(code, work, info.shape)
        generator = scope["Generator"]()
        scope.update(generator=generator, teacher=self.out_feature(teacher.network, work.layer), net=student,
                     criterion=nn.CrossEntropyLoss(), iters=work.iters,
                     optimizer_G=torch.optim.Adam(generator.parameters(), lr=work.lr_g),
                     optimizer_S=torch.optim.Adam(student.parameters(), lr=work.lr,
                                                  weight_decay=work.weight_decay))
        start = time.perf_counter()
        for epoch in range(work.epochs):
            scope["epoch"] = epoch
            exec(loop, scope)
        seconds = time.perf_counter() - start
        return {"final_acc": _test_accuracy(student, meta, teacher_path, info),
                "s_per_iter": seconds / (work.epochs * work.iters)}


class DeepInvCase(Case):
    """DeepInversion: NVlabs' get_images() as it is, one call per batch, on dfkd's teacher."""

    script = "cifar10/deepinversion_cifar10.py"

    def overrides(self, work: DeepInvWork) -> list[str]:
        adv = f", competition: {{weight: {work.adv}, T: 3.0}}" if work.adv else ""
        return [*_student_overrides(work), f"synthesis.labels={work.labels}", f"synthesis.inner.lr={work.lr_g}",
                "synthesis.inner.name=adam", "synthesis.inner.betas=[0.9, 0.999]", "synthesis.keep=last",
                f"synthesis.augment={{jitter: {work.jitter}}}", "synthesis.clamp=false",
                f"phases.0.steps={work.g_steps}", f"phases.1.steps={work.kd_steps}",
                f"phases.0.losses={{bn_stats: {work.bn}, onehot_ce: {{weight: 1.0, target: labels}}, "
                f"tv: {work.tv}{adv}}}", f"phases.1.losses={{kd_kl: {{weight: 1.0, T: {work.T}}}}}"]

    def work_of(self, config) -> DeepInvWork:
        synth, phases = config.synthesis, config.phases
        losses = phases[0].losses if phases else {}
        bn, tv, adv = losses.get("bn_stats"), losses.get("tv"), losses.get("competition", 0.0)
        augment = synth.augment
        if synth.kind != "inversion" or [(p.player, p.batch) for p in phases] != [("synthesizer", "real"),
                                                                                  ("student", "pool")] \
                or set(losses) - {"competition"} != {"bn_stats", "onehot_ce", "tv"} \
                or _option(losses["onehot_ce"], "target", "argmax") != "labels" or _weight(losses["onehot_ce"]) != 1 \
                or _option(tv, "norm", "l2") != "l2" or _option(bn, "momentum", 0.0) or _option(bn, "layers", "sum") \
                != "sum" or (adv and _option(adv, "T", 3.0) != 3.0) or synth.clamp or synth.keep != "last" \
                or synth.inner.name != "adam" or tuple(synth.inner.betas) != (0.9, 0.999) \
                or (augment.crop_padding, augment.flip, augment.brightness, augment.contrast) != (0, False, 0, 0) \
                or phases[1].augment or set(phases[1].losses) != {"kd_kl"}:
            raise SystemExit(f"reference.py: {config.experiment} is not DeepInversion as the reference runs it "
                             "(pixels from noise under BN statistics, cross-entropy to the asked classes and "
                             "l2 total variation, jittered, unclamped, the last step kept; the student's KD on "
                             "the pool)")
        return DeepInvWork(**{**_student_work(config), "lr_g": synth.inner.lr, "bn": _weight(bn), "tv": _weight(tv),
                              "adv": _weight(adv), "jitter": augment.jitter, "labels": synth.labels})

    @staticmethod
    def train_student(student, teacher, pool, optimizer, scheduler, work: DeepInvWork) -> None:
        """One iteration's student steps (the script has none): the benchmark's train(), each step
        on ``work.batch`` images drawn uniformly from the whole ``pool``, KL at T (batch mean, times
        T², the benchmark's KLDiv); ``scheduler``, if given, steps after each."""
        import torch
        import torch.nn.functional as F

        def kl(s_out, t_out):
            return F.kl_div(F.log_softmax(s_out / work.T, dim=1), F.softmax(t_out / work.T, dim=1),
                            reduction="batchmean") * work.T * work.T

        _train_student(student, teacher, optimizer, kl, work.kd_steps,
                       lambda: pool[torch.randint(len(pool), (work.batch,))], scheduler)

    def drive_reference(self, code, work, teacher_path, student_name, seed):
        import torch

        _fixed(work, "get_images() jitters by up to 2 pixels", jitter=2)
        if work.labels == "balanced" and work.batch != 256:
            raise SystemExit("reference.py: get_images()'s balanced classes are a list of 256: batch must be 256 "
                             "(or --set labels=random)")
        teacher, student, info, meta = _reference_setup(code, teacher_path, student_name, seed)
        shape = (work.batch, *info.shape)
        randn, to = torch.randn, torch.Tensor.to

        def cifar_noise(*size, **kwargs):  # the script's (bs, 3, 32, 32) noise on 'cuda', at the teacher's shape
            if size and tuple(size[0]) == (work.batch, 3, 32, 32) and kwargs.get("device") == "cuda":
                return randn(shape, requires_grad=kwargs.get("requires_grad", False))
            return randn(*size, **kwargs)

        torch.randn = cifar_noise
        torch.Tensor.to = lambda self, *args, **kwargs: self if args == ("cuda",) else to(self, *args, **kwargs)
        torch.nn.Module.cuda = _module_cuda
        sys.path.insert(0, str(Path(code) / Path(self.script).parent))
        import deepinversion_cifar10 as nvlabs

        nvlabs.debug_output = False  # its pictures and prints every 200 steps
        inputs = randn(shape, requires_grad=True)
        optimizer_di = torch.optim.Adam([inputs], lr=work.lr_g)
        optimizer = torch.optim.SGD(student.parameters(), work.lr, weight_decay=work.weight_decay, momentum=0.9)
        per_step = work.interval == "step"
        total = work.epochs * work.iters * (work.kd_steps if per_step else 1)
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total, eta_min=work.lr_min)
        pool = []
        with tempfile.TemporaryDirectory() as folder, contextlib.chdir(folder):  # it writes to ./best_images
            Path("best_images").mkdir()
            start = time.perf_counter()
            for _ in range(work.epochs):
                for _ in range(work.iters):
                    images = nvlabs.get_images(
                        net=teacher.network, bs=work.batch, epochs=work.g_steps, idx=-1, net_student=student,
                        prefix="", competitive_scale=work.adv, optimizer=optimizer_di, inputs=inputs,
                        bn_reg_scale=work.bn, var_scale=work.tv, random_labels=work.labels == "random",
                        l2_coeff=0.0)
                    pool.append(images.detach().clone())
                    self.train_student(student, teacher, torch.cat(pool), optimizer,
                                       scheduler if per_step else None, work)
                if not per_step:
                    scheduler.step()
            seconds = time.perf_counter() - start
        return {"final_acc": _test_accuracy(student, meta, teacher_path, info),
                "s_per_iter": seconds / (work.epochs * work.iters)}


CASES: dict[str, Case] = {
    "dfq": DFQCase(
        reference="fast-datafree", config="datafree/dfq-digits-paper", work=DFQWork(),
        shims=COMMON_SHIMS,
        notes=("datafree_kd.py builds DFQ's GenerativeSynthesizer with student=teacher, so its adversarial "
               "term is the teacher against itself: zero. The reference side runs as the authors run it; "
               "dfkd keeps the paper's term.",
               "the reference's generator convolutions have no bias (each is followed by BatchNorm, "
               "which removes a bias in training mode); dfkd's have one.")),
    "cmi": CMICase(
        reference="fast-datafree", config="datafree/cmi-digits-paper", work=CMIWork(),
        shims=COMMON_SHIMS + POOL_SHIMS,
        notes=(POOL_NOTE,
               "the reference sorts the classes it asks for (for its pictures); dfkd does not: the batch's "
               "order changes no loss")),
    "dfad": DFADCase(
        reference="dfad", config="datafree/dfad-digits-paper", work=DFADWork(),
        shims=("visdom (its plotter, unused here) is a stub module", COMMON_SHIMS[1], COMMON_SHIMS[3],
               "the teacher is dfkd's BatchNorm-free LeNet-5 from the model file, the student dfkd's "
               "BatchNorm-free LeNet-5-half (the script's own LeNets have the same layers)",
               "DFAD_mnist.py's train() is called as it is, per epoch, with its arguments as a namespace; "
               "evaluated once, after training, on the test split through dfkd's reader (the script "
               "evaluates MNIST each epoch)"),
        notes=("the reference draws its latents as (N, nz, 1, 1) and flattens them; dfkd draws (N, nz)",)),
    "zskt": ZSKTCase(
        reference="zskt", config="datafree/zskt-digits-paper", work=ZSKTWork(),
        shims=("utils.logger (its TensorFlow summary writer) is a stub: the log interval is past the run's end, "
               "so the solver logs and saves nothing", COMMON_SHIMS[3],
               "select_model gives dfkd's teacher and student, each returning (logits, *activations) at the "
               "layers dfkd's attention term pairs (the code's LeNet returns its two convolutions' outputs)",
               "its Generator's last convolution and BatchNorm have the teacher's channels (the code "
               "hard-codes CIFAR's three)",
               "ZeroShotKTSolver.run() is called as it is; evaluated once, after training, on the test split "
               "through dfkd's reader (its test loader is empty)"),
        notes=("the solver computes the teacher's logits once per pseudo batch (the ten student steps see the "
               "same images); dfkd computes them at each step: the same values, nine more teacher forwards",
               "the solver regenerates its batch with gradients at every student step, so each student "
               "backward runs through the generator too (gradients the generator's step zeroes first); dfkd "
               "regenerates it detached")),
    "nayer": NayerCase(
        reference="nayer", config="datafree/nayer-digits", work=NayerWork(),
        shims=COMMON_SHIMS + POOL_SHIMS + (
            "the class embeddings are N(0, 1) draws, as dfkd's are: the code reads CLIP text embeddings of "
            "CIFAR's class names from a pickle, which digits have none of",
            "its per-step prints of the losses go to stderr; xlsxwriter (imported by its fast_meta module, "
            "unused here) is a stub module"),
        notes=(POOL_NOTE,
               "the script runs --g_loops 2 batches an iteration (10 in the warm-up); dfkd's synthesizer phase "
               "makes one, so both sides here take one",
               "NAYER re-initializes its generator at the warm-up's end too ((ep - warmup) % g_life == 0), so "
               "with a warm-up that is not a multiple of g_life it re-initializes twice in a row each cycle",
               "the reference's generator convolutions have no bias (each is followed by BatchNorm); dfkd's have "
               "one")),
    "dafl": DAFLCase(
        reference="dafl", config="datafree/dafl-digits-paper", work=DAFLWork(),
        shims=(COMMON_SHIMS[3],
               "the teacher is dfkd's BatchNorm-free LeNet-5 from the model file, wrapped so that "
               "teacher(x, out_feature=True) also returns its relu3 output flattened (the code's LeNet-5 "
               "returns the same 120 features); the student is dfkd's BatchNorm-free LeNet-5-half (the "
               "code's has the same layers)",
               "Tensor.cuda is the identity; no DataParallel wrappers",
               "DAFL-train.py runs its whole job at import, so its Generator class and kdloss function are "
               "read from the file and executed with the run's settings as its opt, and its iteration's "
               "statements (the body of `for epoch`'s inner loop) are executed as they are, once an epoch "
               "for the run's iterations; its per-epoch MNIST evaluation and model saving are left out. "
               "Evaluated once, after training, on the test split through dfkd's reader"),
        notes=("the code's information entropy is Σ p̄ log10 p̄ of the batch's mean softmax; dfkd's "
               "class_balance is Σ p̄ ln p̄ + ln K (finite where a class's mean probability underflows), "
               "so its weight is the code's divided by ln 10 and the gradients are the same",
               "the code backpropagates the generator's loss and the student's KL in one backward and "
               "steps both optimizers; dfkd takes the generator's step, then the student's on the same "
               "detached batch with the teacher's logits computed again (the same values: the teacher is "
               "in eval mode)")),
    "deepinv": DeepInvCase(
        reference="deepinversion", config="datafree/deepinv-digits-paper", work=DeepInvWork(),
        shims=(COMMON_SHIMS[3],
               "get_images()'s noise, hard-coded (bs, 3, 32, 32) on 'cuda', is drawn at the teacher's shape on the "
               "CPU (torch.randn of that size and device is wrapped); Tensor.to('cuda') and Module.cuda are the "
               "identity",
               "its debug pictures and prints every 200 steps are off (debug_output=False); its 20-image picture "
               "of each batch goes to a temporary folder, the working directory while it runs",
               "the teacher is dfkd's network from the model file; the student, which get_images() only reads "
               "for the competition term, is dfkd's",
               "the script stops at the images: the student's loop is ours, the DataFree benchmark's train() "
               "re-typed: per batch kd_steps SGD steps of KL at T on batches drawn uniformly from the in-memory "
               "pool, its cosine stepped as dfkd's config steps it; evaluated once, after training, on the test "
               "split through dfkd's reader"),
        notes=("get_images() registers its BatchNorm hooks on every call and never removes them, so at the n-th "
               "batch each BatchNorm layer runs n hooks (the loss reads the newest): the values are right and "
               "the reference's time per batch grows with the run",
               "get_images() keeps `best_inputs = inputs.data`, a reference to the optimized tensor, so the batch "
               "it returns is the last step's, whatever its loss: dfkd's `keep: last`")),
    "fast": FastCase(
        reference="fast-datafree", config="datafree/fast-digits-paper", work=FastWork(),
        shims=COMMON_SHIMS + POOL_SHIMS,
        notes=(POOL_NOTE,
               "both sides pad their crops with black pixels, as the reference's crops of [0, 1] pixels do "
               "(dfkd's own recipes pad with the data's mean)",
               "fast_cifar.sh re-initializes the generator's first layers at epoch 120 + warm-up "
               "(reset_l0); neither side does at these budgets")),
}
CASES.update(KD_CASES)
CASES.update(QUANT_CASES)


# ---------------------------------------------------------------- equal work, both ways
def differences(a: Work, b: Work) -> list[str]:
    return [f"{f.name}: {getattr(a, f.name)!r} vs {getattr(b, f.name)!r}" for f in dataclasses.fields(a)
            if getattr(a, f.name) != getattr(b, f.name)]


def check_equal_work(case: Case, work: Work, teacher: str) -> list[str]:
    """dfkd's config with ``work``'s overrides, checked to do exactly ``work``; returns the overrides."""
    from dfkd.core.config import load_config

    overrides = case.overrides(work)
    config = load_config(case.config, [f"teacher.checkpoint={teacher}", *overrides])
    wrong = differences(case.work_of(config), work)
    if wrong:
        raise SystemExit(f"reference.py: dfkd's side would not do the reference's work: {'; '.join(wrong)}")
    return overrides


def shipped_differences(case: Case, teacher: str) -> list[str]:
    """Where dfkd's config, as shipped, does other work than the case's reference settings
    (budget aside): divergences to explain beside the config, or to fix."""
    from dfkd.core.config import load_config

    shipped = case.work_of(load_config(case.config, [f"teacher.checkpoint={teacher}"]))
    budget = {name: getattr(case.work, name) for name in ("epochs", "iters") if hasattr(case.work, name)}
    return differences(dataclasses.replace(shipped, **budget), case.work)


# ---------------------------------------------------------------- the reference side
def checkout_folder(name: str, cache: Path) -> Path:
    return Path(cache) / f"{name}-{REFERENCES[name][1][:12]}"


def checkout(name: str, cache: Path, source: str | None) -> Path:
    """The reference's code at its pinned commit, in the cache (cloned on first use)."""
    url, commit = REFERENCES[name]
    folder = checkout_folder(name, cache)
    if not (folder / ".git").exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "clone", "-q", "--no-checkout", source or url, str(folder)], check=True)
        # the code, without pictures and notebooks (a mirror may lack their blobs)
        subprocess.run(["git", "-C", str(folder), "sparse-checkout", "set", "--no-cone", "/*", "!*.gif", "!*.png",
                        "!*.jpg", "!*.pdf", "!*.ipynb"], check=True)
    subprocess.run(["git", "-C", str(folder), "checkout", "-q", commit], check=True)
    return folder


def _stub_modules() -> None:
    import types

    import torch

    termcolor = types.ModuleType("termcolor")
    termcolor.colored = lambda text, *args, **kwargs: text
    moved = types.ModuleType("torchvision.models.utils")
    moved.load_state_dict_from_url = torch.hub.load_state_dict_from_url
    visdom = types.ModuleType("visdom")
    visdom.Visdom = type("Visdom", (), {})
    sys.modules.setdefault("termcolor", termcolor)
    sys.modules.setdefault("visdom", visdom)
    sys.modules.setdefault("xlsxwriter", types.ModuleType("xlsxwriter"))  # NAYER's fast_meta imports it, unused
    sys.modules.setdefault("torchvision.models.utils", moved)


def _module_cuda(self, *args, **kwargs):
    return self


def _pool_shims() -> None:
    """What the pool-based synthesizers need on a CPU-only machine and one-channel images (POOL_SHIMS)."""
    import datafree.utils._utils as utils
    import torch

    torch.nn.Module.cuda = _module_cuda
    torch.Tensor.cuda = _module_cuda
    loader = torch.utils.data.DataLoader
    torch.utils.data.DataLoader = lambda *args, **kwargs: loader(*args, **{**kwargs, "num_workers": 0,
                                                                           "pin_memory": False})
    utils.save_image_batch = greyscale_writer(utils.save_image_batch)


def greyscale_writer(write):
    """The benchmark's ``save_image_batch`` (``write``), saving unpacked one-channel batches as
    greyscale PNGs, which PIL cannot make of (H, W, 1) arrays."""
    from PIL import Image

    def save_image_batch(imgs, output, col=None, size=None, pack=True):
        if pack or imgs.shape[1] != 1:
            return write(imgs, output, col=col, size=size, pack=pack)
        pixels = (imgs.detach().clamp(0, 1).cpu().numpy() * 255).astype("uint8")
        for i, image in enumerate(pixels):
            Image.fromarray(image[0], mode="L").save(f"{output[:-len('.png')]}-{i}.png")

    return save_image_batch


def _reference_setup(code: Path, teacher_path: str, student_name: str, seed: int, student_kwargs: dict | None = None):
    """Seeds, the reference's package on the path, the teacher wrapped as it calls teachers, and
    the student: ``(teacher, student, info, meta)``."""
    import random

    import numpy as np
    import torch
    from torch import nn

    from dfkd.data.card import card_of, info_from_card
    from dfkd.nets.arch import load_model
    from dfkd.nets.models import create_model
    from dfkd.nets.taps import embedding_layer, resolve_module

    sys.path.insert(0, str(code))
    _stub_modules()
    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    net, meta = load_model(teacher_path)
    info = info_from_card(card_of(meta), meta.get("dataset") or "card")

    class WithFeatures(nn.Module):  # teacher(x, return_features=True) -> (logits, embedding)
        def __init__(self, network):
            super().__init__()
            self.network, self.features = network, None
            resolve_module(network, embedding_layer(network)).register_forward_hook(
                lambda module, inputs, output: setattr(self, "features", inputs[0].flatten(1)))

        def forward(self, x, return_features=False):
            logits = self.network(x)
            return (logits, self.features) if return_features else logits

    student = create_model(student_name, info.shape[0], info.num_classes, info.shape[1], **(student_kwargs or {}))
    return WithFeatures(net).eval(), student, info, meta


def _student_optimizer(student, work: Work, warmup: int):
    import torch

    optimizer = torch.optim.SGD(student.parameters(), work.lr, weight_decay=work.weight_decay, momentum=0.9)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, work.epochs - warmup),
                                                                 eta_min=work.lr_min)


def _drive_pool(code: Path, work: Work, teacher_path: str, student_name: str, seed: int, warmup: int, make) -> dict:
    """A pool-based synthesizer of the benchmark, ``make(teacher, student, generator, info, pool, replay,
    normalizer)``, on its Generator and a temporary PNG pool, driven by datafree_kd.py's loop."""
    teacher, student, info, meta = _reference_setup(code, teacher_path, student_name, seed)
    _pool_shims()
    from datafree.models.generator import Generator
    from datafree.utils import Normalizer

    generator = Generator(nz=work.nz, ngf=work.ngf, img_size=info.shape[1], nc=info.shape[0])
    with _replay_pool(work, info) as (pool, replay):
        synthesizer = make(teacher, student, generator, info, pool, replay, Normalizer(info.mean, info.std))
        return _reference_loop(synthesizer, synthesizer.sample, student, teacher, work, warmup, meta, teacher_path,
                               info)


@contextlib.contextmanager
def _replay_pool(work: Work, info):
    """A folder for the reference's PNG pool, removed after the run, and the student's transform of
    the images read back from it."""
    from torchvision import transforms

    replay = transforms.Compose([
        transforms.RandomCrop(info.shape[1], padding=work.student_crop),
        *([transforms.RandomHorizontalFlip()] if work.student_flip else []),
        transforms.ToTensor(), transforms.Normalize(info.mean, info.std)])
    with tempfile.TemporaryDirectory() as pool:
        yield pool, replay


def _reference_loop(synthesizer, sample, student, teacher, work: Work, warmup: int, meta, teacher_path: str,
                    info) -> dict:
    """datafree_kd.py's epochs: per iteration one synthesize(), then (after the warm-up) kd_steps
    student steps on ``sample()``; the schedule steps per epoch after the warm-up."""
    from datafree.criterions import KLDiv

    optimizer, scheduler = _student_optimizer(student, work, warmup)
    start = time.perf_counter()
    for epoch in range(work.epochs):
        for _ in range(work.iters):
            synthesizer.synthesize()
            if epoch >= warmup:
                _train_student(student, teacher, optimizer, KLDiv(T=work.T), work.kd_steps, sample)
        if epoch >= warmup:
            scheduler.step()
    seconds = time.perf_counter() - start
    return {"final_acc": _test_accuracy(student, meta, teacher_path, info),
            "s_per_iter": seconds / (work.epochs * work.iters)}


def _train_student(student, teacher, optimizer, criterion, steps: int, sample, scheduler=None) -> None:
    """datafree_kd.py's train(): ``steps`` student steps, each on ``sample()``; ``scheduler``, if
    given, steps after each (a per-step cosine)."""
    import torch

    student.train()
    for _ in range(steps):
        images = sample()
        with torch.no_grad():
            t_out = teacher(images)
        loss = criterion(student(images.detach()), t_out.detach())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()


def _test_accuracy(student, meta, teacher_path: str, info) -> float:
    from dfkd.data.datasets import normalize
    from dfkd.loop.evaluation import evaluate, evaluation_split

    test = evaluation_split(meta, teacher_path, None, "test", None)
    batches = ((normalize(test.images[i:i + 1000], info), test.labels[i:i + 1000])
               for i in range(0, len(test.labels), 1000))
    student.eval()
    return evaluate(student, batches)["acc"]


# ---------------------------------------------------------------- dfkd's side
def drive_dfkd(case: Case, work: Work, teacher: str, seed: int, out: Path) -> dict:
    from dfkd.core.config import load_config
    from dfkd.loop.engine import Engine

    overrides = check_equal_work(case, work, teacher)
    config = load_config(case.config, [f"teacher.checkpoint={teacher}", *overrides, f"seed={seed}",
                                       f"output.root={out}", "output.tensorboard=false", "runtime.progress=false",
                                       f"train.eval_every={work.epochs}", f"output.image_every={work.epochs}",
                                       f"output.save_every={work.epochs}", "output.quality_samples=0"])
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
    case = CASES[first["case"]]
    work = type(case.work)(**first["work"])
    return "\n".join([
        "| method | reference @ commit | budget | dfkd final | reference final | dfkd s/it | reference s/it | seeds |",
        "|---|---|---|---|---|---|---|---|",
        f"| {first['case']} | {first['code']} @ {first['commit'][:7]} | {case.budget(work)} | "
        f"{stat('dfkd', 'final_acc')} | "
        f"{stat('reference', 'final_acc')} | {stat('dfkd', 's_per_iter')} | {stat('reference', 's_per_iter')} | "
        f"{', '.join(str(r['seed']) for r in rows)} |"])


def settings(pairs: list[str], kind: type[Work]) -> dict:
    """``FIELD=VALUE`` pairs as ``kind``'s fields, of their declared types."""
    types = {f.name: type(f.default) for f in dataclasses.fields(kind)}
    out = {}
    for pair in pairs:
        name, _, value = pair.partition("=")
        if name not in types or not value or (types[name] is bool and value not in ("true", "false")):
            raise SystemExit(f"reference.py: --set {pair}: expected FIELD=VALUE with FIELD one of {', '.join(types)}"
                             f"{' and VALUE true or false' if types.get(name) is bool else ''}")
        out[name] = value == "true" if types[name] is bool else types[name](value)
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
    p.add_argument("--cache", default=DEFAULT_CACHE)
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
        work = type(case.work)(**json.loads(args.work))
        result = drive_dfkd(case, work, args.teacher, args.seed_only, Path(args.out) / "dfkd") \
            if args.side == "dfkd" else case.drive_reference(Path(args.code), work, args.teacher, args.student,
                                                             args.seed_only)
        print(json.dumps(result))
        return 0
    budget = {k: v for k, v in (("epochs", args.epochs), ("iters", args.iters), ("batch", args.batch)) if v is not None}
    if "iters" in budget and not hasattr(case.work, "iters"):
        raise SystemExit(f"reference.py: --iters: case {args.case} runs whole epochs of its dataset (give --epochs)")
    work = dataclasses.replace(case.work, **budget,
                               **settings(args.set, type(case.work)))
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
