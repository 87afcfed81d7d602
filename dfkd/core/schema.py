"""The typed schema of a run config: one dataclass per section, checked key by key when a config is
loaded (:mod:`dfkd.core.validate`). A field's comment is its documentation.

Sections that name a registered kind (``synthesis``) declare the registry in ``__kinds__``: the
kind's own options dataclass, a subclass, then validates the section, so a new kind brings its
options with it and this file does not change.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal, NoReturn, Optional, Union

from dfkd.core.registries import SYNTHESIZERS
from dfkd_base.errors import ConfigError

SYNTHESIZER = "synthesizer"  # the pseudo-player of phases that synthesize a batch per step (per-batch kinds)


@dataclass
class DataConfig:
    name: str = "digits"                # a registered dataset (dfkd list datasets)
    root: Optional[str] = None          # where the dataset's files are; None: the dataset's default places
    download: bool = False              # let torchvision download a missing dataset (needs internet)
    batch_size: int = 128               # batch of real data (teacher training, real-data KD)
    eval_batch_size: int = 1000         # batch of evaluation
    augment: bool = True                # the dataset's standard train augmentation, if it has one
    eval: bool = True                   # evaluate on the test split; False: the run reads no real data at all
    agreement_samples: int = 512        # eval: false: held-out synthetic samples the student is measured on
    # Cross-modal: the students see this built-in modality of the images (dfkd/data/modalities.py),
    # the teacher the images themselves; evaluation is on the test split's modality.
    modality: Optional[str] = None
    labeled_fraction: float = 1.0       # the share of the training split (stratified, per seed) 'labeled' batches draw
    # model selection (dfkd search): this share of the training split, stratified and the same in every
    # run, is held out; training reads the rest and evaluation reads it in place of the test split
    validation: float = 0.0
    class_pairs: bool = False           # real batches also carry another sample of each one's class (CS-KD)
    # privacy-audit canaries: this many training samples (drawn by seed) relabeled to another class at
    # random; their indices and planted labels are recorded in the trained model's file (dfkd audit)
    canaries: int = 0
    # Cross-modal with a user's own pairs: one .npz/.pt file (arrays a, b[, y]) or two folders whose
    # files pair by name; pairs_test: labeled pairs to evaluate students on (see dfkd.data.pairs.load_pairs)
    pairs: Optional[list[str]] = None
    pairs_test: Optional[list[str]] = None # labeled pairs the students are evaluated on


@dataclass
class OptimConfig:
    name: Literal["sgd", "adam", "adamw"] = "sgd" # torch.optim.SGD, Adam or AdamW
    lr: float = 0.1                     # learning rate at the schedule's peak
    momentum: float = 0.9               # SGD only
    weight_decay: float = 0.0           # L2 penalty (decoupled for AdamW)
    nesterov: bool = False              # SGD only
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999]) # Adam and AdamW only
    grad_clip: Optional[float] = None   # max global gradient norm, None: no clipping


@dataclass
class SchedConfig:
    name: Literal["constant", "cosine", "multistep"] = "cosine" # the schedule's shape
    warmup_steps: int = 0               # linear warm-up, in optimizer steps of this player
    milestones: list[float] = field(default_factory=list)  # multistep: fractions of the run, e.g. [0.5, 0.75]
    gamma: float = 0.1                  # multistep: the factor at each milestone
    min_lr: float = 0.0                 # cosine floor
    # step: the rate changes after every optimizer step; epoch: it is held through each epoch the player
    # trains in, as torch's schedulers stepped once an epoch (the references' CosineAnnealingLR) hold it
    interval: Literal["step", "epoch"] = "step"


@dataclass
class NetConfig:
    """A network: a registered architecture, or a checkpoint that records its own architecture."""

    name: Optional[str] = None          # a model (dfkd list models) or a generator, by name
    checkpoint: Optional[str] = None    # a model file to start from (its arch and weights)
    kwargs: dict[str, Any] = field(default_factory=dict) # the network's options (width, exits, nz, ngf ...)


@dataclass
class TeacherConfig:
    """The frozen teacher, or an ensemble of them. ``checkpoint`` is one model file or a list;
    an ensemble's output is, per ``ensemble``: ``mean`` (the averaged soft targets), ``random``
    (one teacher picked per iteration, as in MEAL), ``confidence`` (each sample's soft targets
    averaged with weights ∝ each teacher's top-class probability) or ``drop_one`` (the mean of all
    but one teacher, dropped at random per iteration: DGKD's stochastic guidance)."""

    checkpoint: Union[str, list[str], None] = None # model file(s); --teacher sets it
    ensemble: Literal["mean", "random", "confidence", "drop_one"] = "mean" # how an ensemble's outputs combine (above)
    # the teacher a paper's recipe was written for (name and kwargs); another gets a one-line warning
    expected: Optional[NetConfig] = None
    # model files that name a user's class (dfkd import --arch module:Name) import it, running its code:
    # only with this consent (--allow-code on the command line)
    allow_code: bool = False

    @property
    def checkpoints(self) -> list[str]:
        c = self.checkpoint
        return [] if c is None else [c] if isinstance(c, str) else list(c)


@dataclass
class QuantConfig:
    """A quantized model player (see :mod:`dfkd.nets.quant`): bit widths of weights and of the
    activations entering each weighted layer, the quantizer, and where its weights start."""

    weights: int = 8                    # bits of the weights (1-16)
    acts: int = 8                       # bits of the activations entering each weighted layer (1-16)
    quantizer: Literal["lsq", "pact", "minmax"] = "lsq" # learned steps, learned clip, or min/max ranges
    per_channel: bool = True            # a weight step per output channel
    keep_first_last: Optional[int] = None  # bits of the first and last weighted layers (None: as the rest)
    quantize_input: bool = True         # false: the network's input (the first weighted layer's) stays float
    init: Literal["scratch", "teacher"] = "scratch"  # teacher: a quantized copy of the (first) teacher
    fold_bn: bool = False               # fold each conv's BatchNorm into it before quantizing
    freeze_bn: bool = False             # BatchNorm layers normalize with their running statistics while training
    stats_steps: int = 30               # training batches whose activation ranges initialize lsq/minmax steps
    clip_init: float = 10.0             # pact: the initial clip value α (PACT's paper: 10)
    calibrate: int = 0                  # batches of the run's real data that set activation ranges before training


QUANTIZERS = ("lsq", "pact", "minmax")


def quant_problems(quant: dict[str, Any]) -> list[tuple[str, str]]:
    """What is wrong with a quant mapping's values, as (key, message) pairs (its fields' types are
    checked by :class:`QuantConfig`); a model file's recorded settings are checked with it too."""
    problems = []
    for key in ("weights", "acts") + (("keep_first_last",) if quant.get("keep_first_last") is not None else ()):
        bits = quant[key]
        if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= 16:
            problems.append((key, f"bit widths must be integers in 1-16, got {bits!r}"))
    if quant["quantizer"] not in QUANTIZERS:
        problems.append(("quantizer", f"must be one of {', '.join(QUANTIZERS)}, got {quant['quantizer']!r}"))
    elif quant["quantizer"] == "minmax" and not problems and min(quant["weights"], quant["acts"]) < 2:
        key = "weights" if quant["weights"] < 2 else "acts"
        problems.append((key, "minmax quantization needs at least 2 bits (an asymmetric range with a zero point)"))
    if quant["stats_steps"] < 1:
        problems.append(("stats_steps", f"must be >= 1, got {quant['stats_steps']}"))
    if not quant["clip_init"] > 0:
        problems.append(("clip_init", f"must be > 0, got {quant['clip_init']}"))
    if quant.get("calibrate", 0) < 0:
        problems.append(("calibrate", f"must be >= 0 (batches of calibration), got {quant['calibrate']}"))
    return problems


def check_quant(quant: dict[str, Any], where: str) -> None:
    """A one-line error for the first problem of a quant mapping (see :func:`quant_problems`)."""
    for key, message in quant_problems(quant)[:1]:
        raise ConfigError(f"{where}.{key}: {message}")


@dataclass
class PlayerConfig:
    """A trained participant of the loop: its network, optimizer and schedule. Discriminators
    and adapters get their input shapes from the loss terms that use them."""

    kind: Literal["model", "generator", "discriminator", "adapter"] = "model" # what the player is; sized players get shapes from their terms
    net: NetConfig = field(default_factory=NetConfig) # its network
    optim: OptimConfig = field(default_factory=OptimConfig) # its optimizer
    sched: SchedConfig = field(default_factory=SchedConfig) # its learning-rate schedule, over its own optimizer steps
    # decay of an exponential moving average of the weights (timm's model EMA; e.g. 0.999): a model's
    # average is what is evaluated and exported, the raw weights keep training; a generator's average
    # makes the 'fresh+ema' batches (MAD)
    ema: Optional[float] = None
    quant: Optional[QuantConfig] = None  # a quantized model (model players only)


@dataclass
class PhaseConfig:
    """One step type of an iteration: which player is updated, on which batch, with which losses.

    ``batch``: ``real`` (the training split; never used by data-free methods), ``labeled`` (its
    ``data.labeled_fraction`` subset, for few-label fine-tuning and baselines), ``fresh`` (a new
    synthetic batch each step), ``same`` (the batch an earlier phase drew last; synthetic ones
    detached and without the generator's augmentation), ``regenerated`` (the latents of the latest
    ``fresh`` batch through the generator as it is now, after its update: ZSKT), ``fresh+ema`` (a
    fresh batch of the generator and one of its weight average, with their own latents, as one:
    MAD) or ``pool`` (replay of the image pool).
    ``losses``: term name → weight, or term name → {weight: w, <term parameters>}.
    ``augment`` and ``mixup`` transform the batch before this phase's networks see it (e.g. the
    student's view of synthetic or replayed images); the generator's own augmentation is
    ``synthesis.augment``.
    """

    player: str = "student"             # the player updated, or 'synthesizer' (per-batch kinds)
    steps: int = 1                      # optimizer steps per iteration (a synthesizer's: inner steps)
    batch: Literal["real", "labeled", "fresh", "fresh+ema", "same", "regenerated", "pool"] = "real" # where its batches come from (above)
    losses: dict[str, Any] = field(default_factory=dict) # term: weight, or term: {weight, params} (loss terms page)
    name: Optional[str] = None          # defaults to the player's name; used in log tags
    also: list[str] = field(default_factory=list)  # more players updated by this phase's loss, in one backward
    # players not updated here that still run in train mode (BatchNorm on the batch's statistics, its running
    # ones updated), as ZSKT's student in the generator's step; the others run in eval mode
    train_mode: list[str] = field(default_factory=list)
    epochs: Optional[list[int]] = None  # [first, last) epochs in which the phase runs (stages); None: all
    augment: Optional[AugmentConfig] = None # this phase's view of its batches
    mixup: float = 0.0                  # Beta(α, α) mixing of each image with another of the batch; 0: off


@dataclass
class AugmentConfig:
    """Differentiable augmentation of synthetic batches before the teacher sees them."""

    crop_padding: int = 0               # random crop after padding by this many pixels
    pad: Literal["mean", "black"] = "mean"  # the crop's padding: the data's mean, or black (as the references pad [0, 1] pixels)
    flip: bool = False                  # random horizontal flip
    jitter: int = 0                     # random roll by up to this many pixels (DeepInversion)
    brightness: float = 0.0             # random shift of each image by up to this much (normalized units)
    contrast: float = 0.0               # random scaling of each image around its mean by 1 ± this


@dataclass
class SynthesisConfig:
    """Where data-free batches come from. ``kind`` names a registered synthesizer
    (:data:`dfkd.core.registries.SYNTHESIZERS`); validation takes the section's other keys from that
    synthesizer's own options dataclass, a subclass of this one (the options every kind shares are
    here). ``none``: a run on real data."""

    __kinds__: ClassVar = SYNTHESIZERS   # the registry whose entries' ``Options`` validate the section
    kind: str = "none"                  # a registered synthesizer (below), or none
    batch_size: int = 256               # synthetic batch, and replay batch from the pool
    labels: Literal["none", "random", "balanced"] = "none"  # classes to ask for (conditional G, onehot_ce)
    mix_prob: float = 0.0               # Qimera: probability that a batch asks for superposed classes (soft labels)
    mix_classes: int = 2                # Qimera: classes superposed per sample
    pool_size: int = 0                  # synthetic images kept for replay; 0: no pool
    augment: AugmentConfig = field(default_factory=AugmentConfig)  # before the teacher sees a synthetic batch
    warmup_epochs: int = 0              # epochs of synthesis alone before the other phases start

    def check(self, config: "Config", fail: Callable[[str, str], NoReturn]) -> None:
        """A kind's constraints on its options within the whole ``config``, checked when the config
        is loaded; ``fail(key, message)`` reports one. None here."""


@dataclass
class StopConfig:
    """Ending a run before its last iteration (:mod:`dfkd.loop.stopping`); both off by default."""

    teacher_share: Optional[float] = None   # end once the evaluated model has this share of the teacher's accuracy
    patience: Optional[int] = None          # end once this many evaluations in a row improved nothing


@dataclass
class TrainConfig:
    epochs: int = 10                    # the run's length: epochs x iters_per_epoch iterations
    iters_per_epoch: Optional[int] = None   # None: one pass over the real training split
    eval_every: int = 1                     # epochs
    log_every: int = 50                     # iterations
    eval_player: Optional[str] = None       # None: "student" if present, else the first model player
    on_nan: Literal["stop", "rollback"] = "stop"   # rollback: reload ckpt/last.pt, reseed, go on
    max_rollbacks: int = 3              # on_nan: rollback gives up after this many
    # an epoch's state is kept as ckpt/last.pt only if its weights and evaluation loss are finite and
    # no player's weight norm grew more than this factor since the last kept state (0: no limit)
    max_weight_growth: float = 100.0
    stop_at: StopConfig = field(default_factory=StopConfig)  # end early once more iterations buy nothing


@dataclass
class RuntimeConfig:
    device: str = "auto"                    # auto | cpu | cuda | cuda:N
    amp: Literal["auto", "off", "bf16", "fp16"] = "auto"   # auto: bf16 on CUDA, off on CPU
    channels_last: Union[bool, Literal["auto"]] = "auto"   # auto: on for CUDA and for synthesis
    num_threads: Optional[int] = None       # torch intra-op threads on CPU; None: torch's default
    progress: Union[bool, Literal["auto"]] = "auto"        # auto: a bar only on an interactive terminal
    deterministic: bool = False         # torch.use_deterministic_algorithms
    # non-finite losses: step checks each phase step before its update (the host waits for the device each
    # time); flush keeps flags on the device, read once at the iterations that log or end an epoch (a
    # divergence is then caught a few steps late, before anything is saved); auto: step on CPU, flush elsewhere
    finite_check: Literal["auto", "step", "flush"] = "auto"
    rendezvous_timeout_s: float = 300.0     # under torchrun: how long to wait for every rank to join


@dataclass
class OutputConfig:
    root: str = "runs"                  # run folders go under it (--out)
    save_every: int = 1                     # epochs between full-state checkpoints
    tensorboard: bool = True            # write TensorBoard events beside metrics.jsonl
    image_every: int = 1                    # epochs between synthetic sample grids
    show_real: bool = True                  # also show a labeled grid of the evaluation split (off: never display real data)
    # sample quality (dfkd.loop.quality: teacher-FID, precision/recall/density/coverage, diversity) at image
    # epochs, on the newest this-many synthetic samples against as many of the evaluation split (0: off)
    quality_samples: int = 256
    # epochs between embedding-projector snapshots (synthetic and real samples in the teacher's feature
    # space, at image epochs); None: the last epoch only; 0: never
    projector_every: Optional[int] = None


@dataclass
class Config:
    experiment: str = "default"         # the run's name: runs/<experiment>/<stamp>_s<seed>/
    task: Literal["teacher", "distill"] = "teacher" # teacher: `dfkd teacher` trains on labels; distill: `dfkd distill` needs a teacher
    seed: int = 0                       # every random draw of the run follows from it (per rank under torchrun)
    data: DataConfig = field(default_factory=DataConfig) # the real data: what a teacher trains on, what a student is evaluated on
    teacher: Optional[TeacherConfig] = None # the frozen teacher(s); null: none (teacher training, online)
    players: dict[str, PlayerConfig] = field(default_factory=dict) # the trained networks by name (student, generator, disc, ...)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig) # where data-free batches come from
    phases: list[PhaseConfig] = field(default_factory=list) # the steps of one iteration, in order
    train: TrainConfig = field(default_factory=TrainConfig) # the length of the run, evaluation and logging
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig) # device, precision, threads
    output: OutputConfig = field(default_factory=OutputConfig) # where and what a run writes
