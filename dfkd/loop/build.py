"""From a config to a run: the runtime, data streams, teachers, phases, players, the hooks on
them, the players sized by what they see (discriminators, adapters), the synthesizer and the
stateful loss terms, in that order (the order fixes the random draws of initialization).

A data-free config never reads the training split: it is loaded only when some phase trains on
``real`` or ``labeled`` batches, and the test split only for evaluation (``data.eval``).
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Callable

import torch
from torch import nn

from dfkd.core import checkpoint as ckpt_io
from dfkd.core.runs import is_main_process, mean_across_ranks, rank, world_size
from dfkd.core.schema import SYNTHESIZER, Config, PhaseConfig, PlayerConfig
from dfkd.data.batch import Batch
from dfkd.data.card import run_info
from dfkd.data.datasets import DatasetInfo, ImageTensorDataset, describe, load_dataset
from dfkd.data.loader import TensorLoader
from dfkd.data.modalities import get_modality
from dfkd.data.pairs import load_pairs
from dfkd.data.splits import hold_out, labeled_subset, plant_canaries
from dfkd.loop.needs import check_teacher_gives
from dfkd.loop.phases import Phase, RealStream, build_phases
from dfkd.loop.players import Player, Players
from dfkd.loop.runtime import Runtime, seed_everything
from dfkd.loop.teachers import Teachers, check_teachers, ensemble_card, load_teachers
from dfkd.methods.losses.base import Feature, PlayerUse
from dfkd.methods.synthesis import create_synthesizer
from dfkd.methods.synthesis.base import Synthesizer, build_generator
from dfkd.nets.arch import is_black_box, load_model
from dfkd.nets.models import create_model
from dfkd.nets.taps import FeatureTap, probe
from dfkd_base.errors import ConfigError, ShapeError


@dataclasses.dataclass
class Run:
    """Everything a config builds, ready for the loop."""

    config: Config
    runtime: Runtime
    info: DatasetInfo
    modality: Callable | None                # cross-modal: the students' view of the teacher's images
    student_shape: tuple[int, int, int]      # what the students take
    teachers: Teachers
    phases: list[Phase]
    real: RealStream | None
    labeled: RealStream | None
    test_loader: TensorLoader | None
    iters_per_epoch: int
    total_iters: int
    players: Players
    model_taps: dict[str, FeatureTap]
    synth: Synthesizer | None
    student: Player                          # the evaluated and exported one
    canaries: dict | None = None             # data.canaries: planted indices and labels, recorded in model files

    def student_view(self, batch: Batch) -> Batch:
        """Cross-modal: the students' modality of the batch's images, the teacher keeping the
        images themselves (differentiably, so synthesis can train through the modality)."""
        if self.modality is None or batch.teacher_images is not None:
            return batch
        return dataclasses.replace(batch, images=self.modality(batch.images, self.info), teacher_images=batch.images)

    def student_arch(self) -> dict:
        """The ``create_model`` arguments that rebuild the student (a model file's ``arch``), with
        its quantization settings (``quant``) when it is quantized."""
        net, quant = self.student.cfg.net, self.student.cfg.quant
        if net.checkpoint:
            return ckpt_io.read_model_file(net.checkpoint)["arch"]
        if quant is not None and quant.init == "teacher":
            arch = dict(ckpt_io.read_model_file(self.config.teacher.checkpoints[0])["arch"])
        else:
            C, H, _ = self.student_shape
            arch = {"name": net.name, "in_channels": C, "num_classes": self.info.num_classes, "image_size": H,
                    "kwargs": dict(net.kwargs)}
        if quant is not None:
            arch["quant"] = dataclasses.asdict(quant)
        return arch


def eval_player_name(config: Config) -> str:
    return config.train.eval_player or ("student" if "student" in config.players else next(
        (n for n, p in config.players.items() if p.kind == "model"), ""))


def build_run(config: Config, train_split: ImageTensorDataset | None = None) -> Run:
    """Everything ``config`` runs on; ``train_split`` replaces the training split of the config's
    dataset (an in-memory one: an audit's shadow models train on parts of the test split)."""
    runtime = Runtime(config.runtime, synthesis=config.synthesis.kind != "none")
    seed_everything(config.seed + rank())  # per-rank seeds: ranks must not draw identical batches
    teacher_modules, metas = load_teachers(config, runtime)
    # the teacher's input card describes what the run's images are; the dataset, if read, must agree
    card = ensemble_card(config, metas)
    uses_real = any(p.batch in ("real", "labeled") and p.player != SYNTHESIZER for p in config.phases)
    reads_data = config.data.eval or uses_real or bool(config.data.validation) or bool(config.data.pairs)
    info = run_info(config.data.name, card, f"teacher {config.teacher.checkpoints[0]}" if card else "",
                    reads_data and not config.data.pairs_test)
    like = info if card is not None else None  # how real images are read: as the card says
    if info.name == "card" and is_main_process():  # the dataset the config names disagrees, and is never read
        print(f"dfkd: warning: dataset '{config.data.name}' is not what teacher {config.teacher.checkpoints[0]} takes "
              f"({describe(info)}); the run reads no real data and follows the teacher's input card", file=sys.stderr)
    check_teachers(config, teacher_modules, metas, info, runtime)
    # cross-modal: students see a modality of the images; a synthetic batch needs gradients through it
    modality = get_modality(config.data.modality, differentiable=config.synthesis.kind != "none") \
        if config.data.modality else None
    student_shape = tuple(info.shape) if modality is None else tuple(
        modality(torch.zeros((1, *info.shape)), info).shape[1:])
    pairs_test = load_pairs(config.data.pairs_test, info, "test") if config.data.pairs_test else None
    teachers = Teachers(teacher_modules, config.teacher.ensemble if config.teacher else "mean", runtime,
                        [m.get("sha256") for m in metas])
    eval_name = eval_player_name(config)

    def student_of(phase: PhaseConfig) -> str:
        """A phase's own player when it is a model (a student, or a peer in online distillation),
        else the evaluated student."""
        pc = config.players.get(phase.player)
        return phase.player if pc is not None and pc.kind == "model" else eval_name

    phases = build_phases(config.phases, info, student_of)
    _check_needs(config, phases)
    for teacher, path in zip(teacher_modules, config.teacher.checkpoints if teacher_modules else []):
        check_teacher_gives(config.experiment, [t for p in phases for t in p.terms], teacher, is_black_box(teacher),
                            path)

    # real data, only as far as some phase trains on it
    uses = {p.batch for p in phases if p.player != SYNTHESIZER}
    if config.data.pairs:
        train_split = load_pairs(config.data.pairs, info, "train")
        student_shape = tuple(train_split.paired.shape[1:])
    elif train_split is None:
        train_split = load_dataset(config.data.name, "train", config.data.root, config.data.download, like) \
            if uses & {"real", "labeled"} or config.data.validation else None
    held_out = None
    if config.data.validation:  # evaluation reads the held-out part; training (if it reads any) the rest
        train_split, held_out = hold_out(train_split, config.data.validation)
        train_split = train_split if uses & {"real", "labeled"} else None
    canaries = None
    if config.data.canaries and train_split is not None:
        train_split, canaries = plant_canaries(train_split, config.data.canaries, config.seed)

    def stream(dataset) -> RealStream:
        return RealStream(TensorLoader(
            dataset, min(config.data.batch_size, len(dataset)), shuffle=True, augment=config.data.augment,
            drop_last=True, device=runtime.device, seed=config.seed, shard=(rank(), world_size()),
            class_pairs=config.data.class_pairs))

    real = stream(train_split) if "real" in uses else None
    labeled = stream(labeled_subset(train_split, config.data.labeled_fraction, config.seed)) \
        if "labeled" in uses else None
    test_loader = TensorLoader(
        pairs_test or held_out or load_dataset(config.data.name, "test", config.data.root, config.data.download, like),
        config.data.eval_batch_size, device=runtime.device) if config.data.eval else None

    tc = config.train
    if tc.iters_per_epoch is None:
        if real is None and labeled is None:
            raise ConfigError("train.iters_per_epoch must be set when no phase trains on real data")
        iters_per_epoch = len((real or labeled).loader)
    else:
        iters_per_epoch = tc.iters_per_epoch
    total_iters = tc.epochs * iters_per_epoch

    # only synthesis runs in the warm-up epochs: a player's schedule spans the iterations it trains in
    # (Fast-DFKD's cosine starts after the warm-up and ends at its floor on the last epoch)
    training_iters = max(0, total_iters - config.synthesis.warmup_epochs * iters_per_epoch)

    def player(name: str, pc: PlayerConfig, module: nn.Module) -> Player:
        per_iter = sum(p.steps for p in phases if name == p.player or name in p.also)
        return Player(name, pc, runtime.prepare(module), training_iters * per_iter, iters_per_epoch * per_iter)

    # networks first, then the taps on them, then what is sized by what the taps see
    players = {name: player(name, pc, _create_model(pc, config, info, modality, student_shape) if pc.kind == "model"
                            else build_generator(pc.net, info, runtime.device))
               for name, pc in config.players.items() if pc.kind in ("model", "generator")}
    model_taps = _install_taps(phases, players, teachers)
    sizes = _Shapes(runtime, teachers, players, model_taps, info, student_shape,
                    train_split.labels if train_split is not None else None)
    for name, (pc, module) in _build_sized_players(config, phases, sizes, info).items():
        players[name] = player(name, pc, module)
    players = Players({name: players[name] for name in config.players})  # config order
    _calibrate(config, players, real or labeled)
    _wrap_for_ddp(players, runtime.device)
    synth = create_synthesizer(config.synthesis, info, runtime)
    if synth is not None and not config.data.eval and len(teachers):  # no labeled image: measure on held-out samples
        synth.hold_out(config.data.agreement_samples)
    _build_terms(config, phases, players, sizes, runtime.device)
    if eval_name not in players or players[eval_name].kind != "model":
        raise ConfigError(f"train.eval_player '{eval_name}' is not a model player")
    return Run(config, runtime, info, modality, student_shape, teachers, phases, real, labeled, test_loader,
               iters_per_epoch, total_iters, players, model_taps, synth, players[eval_name], canaries)


def _create_model(pc: PlayerConfig, config: Config, info: DatasetInfo, modality, student_shape) -> nn.Module:
    """A model player's network: trained weights from ``net.checkpoint`` (fine-tuning, a
    pre-trained peer) or a new ``create_model`` network for the students' input; with ``quant``,
    that network (or a copy of the teacher, ``quant.init: teacher``) with quantized layers."""
    if pc.quant is None:
        return _float_model(pc, config, info, modality, student_shape)
    from dfkd.nets.quant import quantize

    if pc.net.checkpoint and ckpt_io.read_model_file(pc.net.checkpoint)["arch"].get("quant"):
        raise ConfigError(f"{pc.net.checkpoint} is already a quantized model; drop the quant settings to "
                          f"fine-tune it as it is, or start from a float model file")
    if pc.quant.init == "teacher":
        path = config.teacher.checkpoints[0]
        model, meta = load_model(path, allow_code=config.teacher.allow_code)
        if pc.net.name not in (None, meta["arch"]["name"]):
            raise ConfigError(f"quant.init 'teacher' copies the teacher ({meta['arch']['name']}, {path}); "
                              f"net.name '{pc.net.name}' differs (set net.name to it, or null)")
        model.train()
    else:
        model = _float_model(pc, config, info, modality, student_shape)
    return quantize(model, dataclasses.asdict(pc.quant), tuple(student_shape))


def _calibrate(config: Config, players: Players, stream: RealStream | None) -> None:
    """Post-training calibration of quantized players (``quant.calibrate`` batches of the real
    training split), before any training; the stream's own position is not moved."""
    for name, pc in config.players.items():
        if pc.quant is None or not pc.quant.calibrate:
            continue
        if stream is None:
            raise ConfigError(f"players.{name}.quant.calibrate reads real training batches, and no phase of this "
                              f"config trains on real data")
        from dfkd.nets.quant import calibrate

        batches = iter(stream.loader)
        calibrate(players[name].module, (next(batches)[0] for _ in range(min(pc.quant.calibrate, len(stream.loader)))))


def _float_model(pc: PlayerConfig, config: Config, info: DatasetInfo, modality, student_shape) -> nn.Module:
    C, H, _ = student_shape
    if pc.net.checkpoint:
        consent = config.teacher is not None and config.teacher.allow_code
        model, meta = load_model(pc.net.checkpoint, allow_code=consent)
        arch = meta["arch"]
        if arch["in_channels"] != C or arch.get("image_size", H) != H:
            view = f"modality '{config.data.modality}' of {info.name}" if modality else f"dataset {info.name}"
            raise ShapeError(f"{pc.net.checkpoint} ({arch['name']}) takes {arch['in_channels']}-channel "
                             f"{arch.get('image_size')} px input; {view} gives {student_shape}")
        return model.train()
    return create_model(pc.net.name, in_channels=C, num_classes=info.num_classes, image_size=H, **pc.net.kwargs)


def _check_needs(config: Config, phases: list[Phase]) -> None:
    """Every term gets what it needs: a teacher, labels on its batches."""
    syn = config.synthesis
    for i, phase in enumerate(phases):
        if all(t.from_epoch > 0 for t in phase.terms):
            raise ConfigError(f"phases.{i}: every loss term starts after epoch 0 (from_epoch); start the phase "
                              f"later with phases.{i}.epochs instead")
        for term in phase.terms:
            needs = term.term.needs
            if ({"teacher", "teacher_bn"} & set(needs)) and config.teacher is None:
                raise ConfigError(f"phases.{i}.losses.{term.name} needs a teacher, and the config has none")
            source = phase
            if phase.batch == "same":  # the batch of the nearest earlier phase that draws one
                source = next(p for p in reversed(phases[i + 1:] + phases[:i]) if p.batch != "same")
            has_labels = (source.batch in ("real", "labeled") and source.player != SYNTHESIZER) \
                or syn.labels != "none"
            if "labels" in needs and not has_labels:
                raise ConfigError(f"phases.{i}.losses.{term.name} needs labels, and '{phase.batch}' batches "
                                  f"have none (set synthesis.labels to random or balanced)")


def _install_taps(phases: list[Phase], players: dict[str, Player], teachers: Teachers) -> dict[str, FeatureTap]:
    """Hooks: on each teacher, BN statistics (when a term needs them) and the feature paths terms
    ask for; on model players, the feature paths terms ask of them ("student" meaning each
    phase's student). Returns the model players' taps."""
    wanted: dict[str, list[str]] = {}
    for phase in phases:
        for term in phase.terms:
            for network, paths in term.term.taps().items():
                network = phase.student if network == "student" else network
                wanted.setdefault(network, [])
                wanted[network] += [p for p in paths if p not in wanted[network]]
    model_taps = {}
    for network, paths in wanted.items():
        if not paths or network == "teacher":
            continue
        player = players.get(network)
        if player is None or player.kind != "model":
            raise ConfigError(f"a loss term taps '{network}', which is neither the teacher nor a model player "
                              f"(model players: {', '.join(n for n, p in players.items() if p.kind == 'model')})")
        model_taps[network] = FeatureTap(player.module, paths)
    if len(teachers):
        teachers.install_taps(bn=any(p.needs_bn for p in phases), paths=wanted.get("teacher", []))
    return model_taps


class _Shapes:
    """The one probe: a network's logit and tapped-feature shapes (without the batch) from a
    dummy batch in eval mode, so no running statistic moves; one forward per network."""

    def __init__(self, runtime, teachers, players, model_taps, info, student_shape, train_labels=None):
        self.runtime, self.teachers, self.players, self.model_taps = runtime, teachers, players, model_taps
        self.info, self.student_shape = info, student_shape
        self.train_labels = train_labels  # the real training split's labels (None: the run reads none)
        self._seen: dict[str, tuple[tuple[int, ...], dict[str, tuple[int, ...]]]] = {}

    def _probe(self, network: str) -> tuple[tuple[int, ...], dict[str, tuple[int, ...]]]:
        if network == "teacher":
            return self.teachers.shapes(torch.zeros((2, *self.info.shape), device=self.runtime.device))
        logits, features = probe(self.players[network].module,
                                 torch.zeros((2, *self.student_shape), device=self.runtime.device),
                                 self.runtime.forward, self.model_taps.get(network))
        return tuple(logits.shape[1:]), features

    def __call__(self, feature: Feature) -> tuple[int, ...]:
        if feature.network not in self._seen:
            self._seen[feature.network] = self._probe(feature.network)
        logits, features = self._seen[feature.network]
        return logits if feature.layer is None else features[feature.layer]


def _build_sized_players(config: Config, phases: list[Phase], shape: _Shapes,
                         info: DatasetInfo) -> dict[str, tuple[PlayerConfig, nn.Module]]:
    """Discriminators and adapters, sized by probing the layers their terms read: a
    discriminator by its real side's output, an adapter from the student's layer to the real
    side's."""
    from dfkd.nets.discriminators import create_adapter, create_discriminator

    uses: dict[str, tuple[PlayerUse, str]] = {}  # player -> (what it sees, the term that says so)
    for i, phase in enumerate(phases):
        for term in phase.terms:
            for name, use in term.term.player_uses().items():
                def resolve(f: Feature | None) -> Feature | None:
                    return dataclasses.replace(f, network=phase.student) if f and f.network == "student" else f

                use = dataclasses.replace(use, source=resolve(use.source), target=resolve(use.target))
                pc = config.players.get(name)
                where = f"phases.{i}.losses.{term.name}"
                if pc is None or pc.kind != use.kind:
                    raise ConfigError(f"{where}: '{name}' is not a {use.kind} player "
                                      f"(players: {', '.join(config.players) or 'none'})")
                if name in uses and (uses[name][0].source, uses[name][0].target) != (use.source, use.target):
                    raise ConfigError(f"{where}: {use.kind} '{name}' would see {use.source}; {uses[name][1]} "
                                      f"already gives it {uses[name][0].source}")
                uses[name] = (use, where)
    judges = {}
    for name, pc in config.players.items():
        if pc.kind not in ("discriminator", "adapter"):
            continue
        if name not in uses:
            raise ConfigError(f"players.{name}: no loss term uses {pc.kind} '{name}'")
        use, where = uses[name]
        source = shape(use.source)
        if use.kind == "discriminator":
            if use.target is not None and shape(use.target) != source:
                raise ShapeError(f"{where}: discriminator '{name}' compares {use.target} {shape(use.target)} "
                                 f"with {use.source} {source}; give the term an 'adapter' player")
            module = create_discriminator(pc.net.name or "mlp", source, info.num_classes, **pc.net.kwargs)
        else:
            module = create_adapter(source, shape(use.target), **pc.net.kwargs)
        judges[name] = (pc, module)
    return judges


def _wrap_for_ddp(players: Players, device: torch.device) -> None:
    """Under torchrun every trained player gets a DistributedDataParallel wrapper (which also
    broadcasts rank 0's initial weights). Only the active players of a phase are called through
    it: the others run unwrapped, since their parameters take no gradients in that phase."""
    if world_size() == 1:
        return
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    for player in players.values():
        player.ddp = DistributedDataParallel(player.module, device_ids=ids)


def _build_terms(config: Config, phases: list[Phase], players: Players, shape: _Shapes,
                 device: torch.device) -> None:
    """Loss terms on the device, sized (``build``) from the networks they read; those with
    trainable parameters (e.g. the contrastive projection head) get an optimizer of their own
    (Adam at the phase's learning rate unless the term says otherwise), stepped with their phase,
    or join their phase player's optimizer as a parameter group (``trains_with_player``)."""
    for phase in phases:
        for term in phase.terms:
            term.term.build(shape)
            term.term.to(device)
            params = [p for p in term.term.parameters() if p.requires_grad]
            if params and term.term.trains_with_player and phase.player != SYNTHESIZER:
                # the group takes the optimizer's defaults (rate, momentum, decay), and _apply_lr
                # schedules every group: the term's weights train as the player's own
                players[phase.player].optimizer.add_param_group({"params": params})
                if world_size() > 1:  # not inside the DDP wrapper: averaged across ranks as DDP would
                    for p in params:
                        p.register_hook(mean_across_ranks)
            elif params:
                lr = (config.synthesis.inner.lr if phase.player == SYNTHESIZER
                      else config.players[phase.player].optim.lr)
                term.optimizer = term.term.make_optimizer(params, lr)
