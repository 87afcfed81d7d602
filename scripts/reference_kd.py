"""The knowledge-distillation cases of ``scripts/reference.py``: mdistiller's distillers beside
dfkd's ``kd/`` configs on real data, at equal work.

    python scripts/reference.py --case kd|dkd|at|fitnet|rkd|sp|pkt|crd --teacher T.pt [--seeds 0 1 2]
        [--epochs 8] [--batch 128] [--set FIELD=VALUE ...]

Both sides train the same thin student (LeNet-5 at ``width`` of its channels) from the teacher of
the model file, on its dataset's training split, for ``epochs`` epochs of ``batch`` images: SGD at
the same rate, momentum, Nesterov and weight decay, the same cosine per step, the same loss
weights, temperature and layers. dfkd's side is its ``kd/<method>-fmnist`` config with those
settings as overrides (read back and checked as every case's are). The reference side builds
mdistiller's distiller class as it is, with the student and teacher called as mdistiller calls its
models, and steps it as mdistiller's trainer does (the sum of its losses' means, one optimizer over
``get_learnable_parameters()``); the trainer's CIFAR loader, step schedule, logger and checkpoints
are not run: the batches are dfkd's loader's (the same seed gives both sides the same batches in
the same order) and the rate follows the config's cosine.
"""
from __future__ import annotations

import importlib
import sys
import time
import types
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

EMBEDDING = "<embedding>"  # dfkd's tap path of a classifier's penultimate features (dfkd.nets.taps.EMBEDDING)

SHIMS = (
    "the teacher and the student are dfkd's networks, called as mdistiller calls its models: (logits, "
    "{'feats': [...], 'preact_feats': [...], 'pooled_feat': ...}), the maps tapped by forward hooks at the "
    "layers the case names and 'pooled_feat' the classifier's input",
    "mdistiller/distillers/__init__.py is not run (it imports every distiller, OFD's scipy among them): the "
    "package is a namespace and the method's own module is imported",
    "cfg: a namespace of the fields the distiller reads, in place of yacs' CfgNode",
    "the batches come from dfkd's loader (same seed, same order as dfkd's side) and the learning rate follows "
    "the config's cosine per step, in place of mdistiller's CIFAR loader and step schedule; test accuracy "
    "is read once, after training, through dfkd's evaluator",
)
FITNET_SHIM = ("FitNet probes its features' shapes with a (1, 3, 32, 32) image in train mode; the probe here has "
               "the data's shape and runs in eval mode (a one-image batch cannot pass LeNet-5's BatchNorm at 1x1)")


@dataclass(frozen=True)
class KDWork:
    """What both sides of a knowledge-distillation case are given."""
    data: str = "fashion-mnist"  # the teacher's dataset: its training split, its test split for the accuracy
    batch: int = 128
    epochs: int = 8
    lr: float = 0.05          # SGD over the student (and the method's own modules), cosine per step
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    lr_min: float = 0.0
    width: float = 0.125      # the student: LeNet-5 at this share of its channels
    ce: float = 1.0           # the cross-entropy's weight


@dataclass(frozen=True)
class KDWorkKD(KDWork):
    ce: float = 0.1
    kd: float = 0.9
    T: float = 4.0


@dataclass(frozen=True)
class DKDWork(KDWork):
    alpha: float = 1.0
    beta: float = 8.0
    T: float = 4.0
    warmup: int = 2           # epochs of the linear ramp, mdistiller's epochs counted from 1


@dataclass(frozen=True)
class ATWork(KDWork):
    at: float = 1000.0
    p: float = 2.0
    layers: str = "relu1,relu2"   # the maps compared (mdistiller's feats[1:])


@dataclass(frozen=True)
class FitNetWork(KDWork):
    hint: float = 100.0
    layer: str = "relu2"
    regressor_relu: bool = True   # mdistiller's ConvReg ends in a ReLU


@dataclass(frozen=True)
class RKDWork(KDWork):
    distance: float = 25.0
    angle: float = 50.0


@dataclass(frozen=True)
class SPWork(KDWork):
    sp: float = 3000.0
    layer: str = "relu3"      # mdistiller's feats[-1], the last stage


@dataclass(frozen=True)
class PKTWork(KDWork):
    pkt: float = 30000.0


@dataclass(frozen=True)
class CRDWork(KDWork):
    crd: float = 0.8
    dim: int = 128
    negatives: int = 16384
    nce_T: float = 0.07
    nce_momentum: float = 0.5


def _loss(config, name: str):
    return config.phases[0].losses.get(name)


def term_weight(entry) -> float:
    """A loss entry's weight: its number, its dict's ``weight`` (1 if unsaid), 0 when absent."""
    return float(entry.get("weight", 1.0) if isinstance(entry, dict) else entry) if entry is not None else 0.0


def term_option(entry, key: str, default):
    return entry.get(key, default) if isinstance(entry, dict) else default


@dataclass(frozen=True)
class KDCase:
    """A knowledge-distillation method's pair: dfkd's ``kd/`` config and mdistiller's distiller."""
    reference: str
    config: str
    work: KDWork
    distiller: str            # mdistiller's module and class, e.g. "KD"
    shims: tuple[str, ...]
    notes: tuple[str, ...]

    # ------------------------------------------------------------ dfkd's side
    def overrides(self, work: KDWork) -> list[str]:
        student = "players.student"
        return [f"data.name={work.data}", f"data.batch_size={work.batch}", f"train.epochs={work.epochs}",
                f"{student}.net.name=lenet5",
                f"{student}.net.kwargs.width={work.width}", f"{student}.optim.lr={work.lr}",
                f"{student}.optim.momentum={work.momentum}", f"{student}.optim.nesterov={str(work.nesterov).lower()}",
                f"{student}.optim.weight_decay={work.weight_decay}", f"{student}.sched.min_lr={work.lr_min}",
                f"{student}.sched.interval=step", *self.method_overrides(work)]

    def method_overrides(self, work: KDWork) -> list[str]:
        raise NotImplementedError

    def work_of(self, config) -> KDWork:
        student = config.players["student"]
        kwargs = student.net.kwargs or {}
        optim, sched = student.optim, student.sched
        common = dict(data=config.data.name, batch=config.data.batch_size, epochs=config.train.epochs,
                      lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov, weight_decay=optim.weight_decay,
                      lr_min=sched.min_lr if sched.name == "cosine" and sched.interval == "step" else float("nan"),
                      width=float(kwargs.get("width", 1.0)) if student.net.name == "lenet5" else
                      0.5 if student.net.name in ("lenet5_half", "lenet5-half") else float("nan"),
                      ce=term_weight(_loss(config, "ce")))
        return type(self.work)(**common, **self.method_work(config))

    def method_work(self, config) -> dict:
        raise NotImplementedError

    def budget(self, work: KDWork) -> str:
        return f"{work.epochs} epochs, batch {work.batch}"

    # ------------------------------------------------------------ mdistiller's side
    def taps(self, work: KDWork) -> list[str]:
        """The layers of mdistiller's ``feats`` list, in the order its distiller indexes them."""
        return []

    def cfg(self, work: KDWork) -> SimpleNamespace:
        raise NotImplementedError

    def build(self, module, student, teacher, work: KDWork, train) -> "object":
        return getattr(module, self.distiller)(student, teacher, self.cfg(work))

    def inputs(self, work: KDWork, distiller, loader, labels) -> dict:
        """What the distiller's forward_train takes beyond image, target and epoch."""
        return {}

    def drive_reference(self, code: Path, work: KDWork, teacher: str, student: str, seed: int) -> dict:
        return mdistiller_run(self, code, work, teacher, seed)


def ns(**fields) -> SimpleNamespace:
    return SimpleNamespace(**fields)


class KDCaseKD(KDCase):
    def method_overrides(self, work: KDWorkKD) -> list[str]:
        return [f"phases.0.losses.ce={work.ce}", f"phases.0.losses.kd_kl.weight={work.kd}",
                f"phases.0.losses.kd_kl.T={work.T}"]

    def method_work(self, config) -> dict:
        kd = _loss(config, "kd_kl")
        return dict(kd=term_weight(kd), T=float(term_option(kd, "T", 1.0)))

    def cfg(self, work: KDWorkKD) -> SimpleNamespace:
        return ns(KD=ns(TEMPERATURE=work.T, LOSS=ns(CE_WEIGHT=work.ce, KD_WEIGHT=work.kd)))


class DKDCase(KDCase):
    def method_overrides(self, work: DKDWork) -> list[str]:
        return [f"phases.0.losses.ce={work.ce}", *(f"phases.0.losses.dkd.{key}={getattr(work, key)}"
                                                  for key in ("alpha", "beta", "T", "warmup"))]

    def method_work(self, config) -> dict:
        dkd = _loss(config, "dkd")
        # a weighted dkd entry would scale both parts: refused by reading it as another alpha and beta
        scale = term_weight(dkd)
        return dict(alpha=scale * term_option(dkd, "alpha", 1.0), beta=scale * term_option(dkd, "beta", 8.0),
                    T=float(term_option(dkd, "T", 4.0)), warmup=int(term_option(dkd, "warmup", 20)))

    def cfg(self, work: DKDWork) -> SimpleNamespace:
        return ns(DKD=ns(CE_WEIGHT=work.ce, ALPHA=work.alpha, BETA=work.beta, T=work.T, WARMUP=work.warmup))


class ATCase(KDCase):
    def method_overrides(self, work: ATWork) -> list[str]:
        pairs = ",".join(f"[{layer},{layer}]" for layer in work.layers.split(","))
        return [f"phases.0.losses.ce={work.ce}", f"phases.0.losses.attention.weight={work.at}",
                f"phases.0.losses.attention.p={work.p}", f"phases.0.losses.attention.pairs=[{pairs}]"]

    def method_work(self, config) -> dict:
        at = _loss(config, "attention")
        pairs = term_option(at, "pairs", [])
        same = all(s == t for s, t in pairs)
        return dict(at=term_weight(at), p=float(term_option(at, "p", 2)),
                    layers=",".join(s for s, _ in pairs) if same else f"unpaired {pairs}")

    def taps(self, work: ATWork) -> list[str]:
        return ["<input>", *work.layers.split(",")]  # feats[0] is the stem, which AT skips

    def cfg(self, work: ATWork) -> SimpleNamespace:
        return ns(AT=ns(P=work.p, LOSS=ns(CE_WEIGHT=work.ce, FEAT_WEIGHT=work.at)))


class FitNetCase(KDCase):
    def method_overrides(self, work: FitNetWork) -> list[str]:
        adapter = "players.adapter"
        return [f"phases.0.losses.ce={work.ce}", f"phases.0.losses.feature_match.weight={work.hint}",
                f"phases.0.losses.feature_match.layer={work.layer}",
                f"{adapter}.net.kwargs.relu={str(work.regressor_relu).lower()}",
                f"{adapter}.optim.lr={work.lr}", f"{adapter}.optim.momentum={work.momentum}",
                f"{adapter}.optim.nesterov={str(work.nesterov).lower()}",
                f"{adapter}.optim.weight_decay={work.weight_decay}", f"{adapter}.sched.min_lr={work.lr_min}",
                f"{adapter}.sched.interval=step"]

    def method_work(self, config) -> dict:
        hint, adapter = _loss(config, "feature_match"), config.players["adapter"]
        student = config.players["student"]
        # the regressor trains with the student in mdistiller: one optimizer, one schedule
        same_steps = (adapter.optim, adapter.sched) == (student.optim, student.sched)
        return dict(hint=term_weight(hint) if same_steps else float("nan"), layer=term_option(hint, "layer", None),
                    regressor_relu=bool((adapter.net.kwargs or {}).get("relu", False)))

    def taps(self, work: FitNetWork) -> list[str]:
        return ["<input>", "<input>", work.layer]  # HINT_LAYER 2

    def cfg(self, work: FitNetWork) -> SimpleNamespace:
        return ns(FITNET=ns(HINT_LAYER=2, INPUT_SIZE=None, LOSS=ns(CE_WEIGHT=work.ce, FEAT_WEIGHT=work.hint)))


class RKDCase(KDCase):
    def method_overrides(self, work: RKDWork) -> list[str]:
        return [f"phases.0.losses.ce={work.ce}", f"phases.0.losses.rkd_distance={work.distance}",
                f"phases.0.losses.rkd_angle={work.angle}"]

    def method_work(self, config) -> dict:
        return dict(distance=term_weight(_loss(config, "rkd_distance")), angle=term_weight(_loss(config, "rkd_angle")))

    def cfg(self, work: RKDWork) -> SimpleNamespace:
        return ns(RKD=ns(DISTANCE_WEIGHT=work.distance, ANGLE_WEIGHT=work.angle, PDIST=ns(EPSILON=1e-12, SQUARED=False),
                         LOSS=ns(CE_WEIGHT=work.ce, FEAT_WEIGHT=1.0)))


class SPCase(KDCase):
    def method_overrides(self, work: SPWork) -> list[str]:
        return [f"phases.0.losses.ce={work.ce}", f"phases.0.losses.sp.weight={work.sp}",
                f"phases.0.losses.sp.layers=[{work.layer},{work.layer}]"]

    def method_work(self, config) -> dict:
        sp = _loss(config, "sp")
        student, teacher = term_option(sp, "layers", [EMBEDDING, EMBEDDING])
        return dict(sp=term_weight(sp), layer=student if student == teacher else f"unpaired {student}, {teacher}")

    def taps(self, work: SPWork) -> list[str]:
        return [work.layer]  # feats[-1]

    def cfg(self, work: SPWork) -> SimpleNamespace:
        return ns(SP=ns(LOSS=ns(CE_WEIGHT=work.ce, FEAT_WEIGHT=work.sp)))


class PKTCase(KDCase):
    def method_overrides(self, work: PKTWork) -> list[str]:
        return [f"phases.0.losses.ce={work.ce}", f"phases.0.losses.pkt={work.pkt}"]

    def method_work(self, config) -> dict:
        return dict(pkt=term_weight(_loss(config, "pkt")))

    def cfg(self, work: PKTWork) -> SimpleNamespace:
        return ns(PKT=ns(LOSS=ns(CE_WEIGHT=work.ce, FEAT_WEIGHT=work.pkt)))


class CRDCase(KDCase):
    def method_overrides(self, work: CRDWork) -> list[str]:
        return [f"phases.0.losses.ce={work.ce}",
                f"phases.0.losses.crd={{weight: {work.crd}, dim: {work.dim}, negatives: {work.negatives}, "
                f"T: {work.nce_T}, momentum: {work.nce_momentum}}}"]

    def method_work(self, config) -> dict:
        crd = _loss(config, "crd")
        return dict(crd=term_weight(crd), dim=int(term_option(crd, "dim", 128)),
                    negatives=int(term_option(crd, "negatives", 16384)),
                    nce_T=float(term_option(crd, "T", 0.07)), nce_momentum=float(term_option(crd, "momentum", 0.5)))

    def cfg(self, work: CRDWork) -> SimpleNamespace:
        return ns(CRD=ns(FEAT=ns(DIM=work.dim, STUDENT_DIM=None, TEACHER_DIM=None),
                         NCE=ns(K=work.negatives, MOMENTUM=work.nce_momentum, TEMPERATURE=work.nce_T),
                         LOSS=ns(CE_WEIGHT=work.ce, FEAT_WEIGHT=work.crd)))

    def build(self, module, student, teacher, work: CRDWork, train):
        cfg = self.cfg(work)
        cfg.CRD.FEAT.STUDENT_DIM, cfg.CRD.FEAT.TEACHER_DIM = student.embedding_dim, teacher.embedding_dim
        import torch

        cuda, torch.Tensor.cuda = torch.Tensor.cuda, lambda tensor, *args, **kwargs: tensor
        try:  # its memory's sampler moves itself to the GPU when built
            distiller = module.CRD(student, teacher, cfg, len(train))
        finally:
            torch.Tensor.cuda = cuda
        # CIFAR100InstanceSample's "exact" sampling: the sample itself, then K of other classes (numpy)
        labels = train.labels.numpy()
        distiller.others = [(labels != c).nonzero()[0] for c in range(int(labels.max()) + 1)]
        return distiller

    def inputs(self, work: CRDWork, distiller, loader, labels) -> dict:
        import numpy as np
        import torch

        index = loader.last_index
        negatives = np.stack([np.random.choice(distiller.others[int(y)], work.negatives, replace=True)
                              for y in labels])
        return {"index": index,
                "contrastive_index": torch.from_numpy(np.concatenate([index.numpy()[:, None], negatives], 1))}


# ---------------------------------------------------------------- mdistiller's side
class Tapped:
    """Builds a dfkd network's mdistiller face (see :data:`SHIMS`)."""

    @staticmethod
    def wrap(network, taps: list[str]):
        from torch import nn

        from dfkd.nets.taps import FeatureTap

        class MdistillerModel(nn.Module):
            def __init__(self):
                super().__init__()
                self.network = network
                self.tap = FeatureTap(network, [EMBEDDING, *(t for t in taps if t != "<input>")])
                self.embedding_dim = None

            def forward(self, x):
                logits = self.network(x)
                features = self.tap.features
                feats = [x if t == "<input>" else features[t] for t in taps]
                pooled = features[EMBEDDING].flatten(1)
                self.embedding_dim = pooled.shape[1]
                return logits, {"feats": feats, "preact_feats": feats, "pooled_feat": pooled}

        return MdistillerModel()


def mdistiller_module(code: Path, name: str):
    """mdistiller's ``distillers/<name>.py``, imported without the package's ``__init__``."""
    for package, folder in (("mdistiller", code / "mdistiller"), ("mdistiller.distillers",
                                                                   code / "mdistiller" / "distillers")):
        if package not in sys.modules:
            module = types.ModuleType(package)
            module.__path__ = [str(folder)]
            sys.modules[package] = module
    return importlib.import_module(f"mdistiller.distillers.{name}")


def _probe_shapes(student, teacher, input_size):
    """FitNet's get_feat_shapes with the data's image (see FITNET_SHIM)."""
    import torch

    shapes = []
    for network in (student, teacher):
        was_training = network.training
        network.eval()
        with torch.no_grad():
            _, features = network(torch.zeros(2, *input_size))
        network.train(was_training)
        shapes.append([f.shape for f in features["feats"]])
    return shapes


def mdistiller_setup(case: KDCase, code: Path, work: KDWork, teacher_path: str, seed: int, train=None, init=None):
    """The distiller, its optimizer and schedule, and the loader: ``(distiller, student, optimizer,
    scheduler, loader, info, meta)``. ``train`` replaces the teacher's training split; ``init``: the
    student's starting weights."""
    import random

    import numpy as np
    import torch

    from dfkd.core.optim import lr_factor
    from dfkd.core.schema import SchedConfig
    from dfkd.data.card import card_of, info_from_card
    from dfkd.data.datasets import load_dataset
    from dfkd.data.loader import TensorLoader
    from dfkd.nets.arch import load_model
    from dfkd.nets.models import create_model

    random.seed(seed), np.random.seed(seed), torch.manual_seed(seed)
    net, meta = load_model(teacher_path)
    info = info_from_card(card_of(meta), meta.get("dataset") or "card")
    if meta.get("dataset") != work.data:
        raise SystemExit(f"reference_kd: the teacher was trained on {meta.get('dataset')!r}, the work names "
                         f"{work.data!r} (--set data=...)")
    train = train if train is not None else load_dataset(work.data, "train", card=info)
    student = create_model("lenet5", info.shape[0], info.num_classes, info.shape[1], width=work.width)
    if init is not None:
        student.load_state_dict(init)
    taps = case.taps(work)
    s_model, t_model = Tapped.wrap(student, taps), Tapped.wrap(net, taps)
    with torch.no_grad():  # the embeddings' sizes, for CRD's heads
        s_model.eval()(torch.zeros(2, *info.shape)), t_model.eval()(torch.zeros(2, *info.shape))
    module = mdistiller_module(code, case.distiller)
    if case.distiller == "FitNet":
        module.get_feat_shapes = lambda s, t, size: _probe_shapes(s, t, info.shape)
        regressor = module.ConvReg.__init__
        module.ConvReg.__init__ = lambda self, s, t, use_relu=True: regressor(self, s, t, work.regressor_relu)
    distiller = case.build(module, s_model, t_model, work, train)
    optimizer = torch.optim.SGD(distiller.get_learnable_parameters(), lr=work.lr, momentum=work.momentum,
                                weight_decay=work.weight_decay, nesterov=work.nesterov)
    loader = TensorLoader(train, min(work.batch, len(train)), shuffle=True, augment=True, drop_last=True, seed=seed)
    total = work.epochs * len(loader)
    sched = SchedConfig(name="cosine", min_lr=work.lr_min, interval="step")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(sched, step, total, work.lr))
    return distiller, student, optimizer, scheduler, loader, info, meta


def mdistiller_train(case: KDCase, work: KDWork, distiller, optimizer, scheduler, loader) -> int:
    """mdistiller's train_iter, every batch of every epoch; returns the steps taken."""
    steps = 0
    distiller.train()
    for epoch in range(1, work.epochs + 1):  # mdistiller counts epochs from 1 (DKD's ramp reads it)
        for images, labels in loader:
            extra = case.inputs(work, distiller, loader, labels)
            _, losses = distiller(image=images, target=labels, epoch=epoch, **extra)
            loss = sum(value.mean() for value in losses.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            steps += 1
    return steps


def mdistiller_run(case: KDCase, code: Path, work: KDWork, teacher_path: str, seed: int) -> dict:
    from dfkd.data.datasets import load_dataset
    from dfkd.data.loader import TensorLoader
    from dfkd.loop.evaluation import evaluate

    distiller, student, optimizer, scheduler, loader, info, meta = mdistiller_setup(case, code, work, teacher_path,
                                                                                    seed)
    start = time.perf_counter()
    steps = mdistiller_train(case, work, distiller, optimizer, scheduler, loader)
    seconds = time.perf_counter() - start
    test = TensorLoader(load_dataset(work.data, "test", card=info), 1000)
    return {"final_acc": evaluate(student, test)["acc"], "s_per_iter": seconds / steps}


NOTES_RKD = ("mdistiller's RKD takes sqrt and normalizes where two embeddings coincide (eps 1e-12), so a thin "
             "student's dead embeddings get gradients of about 1/eps; dfkd gives coinciding points a distance of 0 "
             "and no gradient (dfkd/methods/losses/relation.py)",)

KD_CASES: dict[str, KDCase] = {
    "kd": KDCaseKD(reference="mdistiller", config="kd/kd-fmnist", work=KDWorkKD(), distiller="KD",
                   shims=SHIMS, notes=()),
    "dkd": DKDCase(reference="mdistiller", config="kd/dkd-fmnist", work=DKDWork(), distiller="DKD", shims=SHIMS,
                   notes=("mdistiller ramps DKD in over 20 of 240 epochs; both sides here over the first 2 of 8",)),
    "at": ATCase(reference="mdistiller", config="kd/at-fmnist", work=ATWork(), distiller="AT", shims=SHIMS,
                 notes=("mdistiller's attention map is mean_c f^p, dfkd's mean_c |f|^p: the same at p = 2",)),
    "fitnet": FitNetCase(reference="mdistiller", config="kd/hint-fmnist", work=FitNetWork(), distiller="FitNet",
                         shims=SHIMS + (FITNET_SHIM,),
                         notes=("mdistiller's FitNet is one stage, CE + 100 x the hint: dfkd's kd/hint config "
                                "(kd/fitnets is the paper's two stages)",)),
    "rkd": RKDCase(reference="mdistiller", config="kd/rkd-fmnist", work=RKDWork(), distiller="RKD", shims=SHIMS,
                   notes=NOTES_RKD),
    "sp": SPCase(reference="mdistiller", config="kd/sp-fmnist", work=SPWork(), distiller="SP", shims=SHIMS, notes=()),
    "pkt": PKTCase(reference="mdistiller", config="kd/pkt-fmnist", work=PKTWork(), distiller="PKT", shims=SHIMS,
                   notes=()),
    "crd": CRDCase(reference="mdistiller", config="kd/crd-fmnist", work=CRDWork(), distiller="CRD",
                   shims=SHIMS + ("CRD's sample indices and negatives, drawn by mdistiller's CIFAR100InstanceSample "
                                  "(exact mode), are drawn the same way beside dfkd's loader",
                                  "Tensor.cuda is the identity while ContrastMemory is built (its sampler calls it)"),
                   notes=("mdistiller scores each embedding against B x (1 + K) memory rows gathered one by one; dfkd "
                          "scores it against the whole memory and picks the drawn rows: the same scores, faster "
                          "where the memory is small",)),
}
