"""``dfkd audit RUN_DIR``: what a distilled student and a data-free run's synthetic samples reveal
of the teacher's training set. The one command besides teacher training that reads the
teacher's training split; it writes only into the run folder it names (``audit.json``,
``audit.md``, ``audit_pairs.png`` and TensorBoard panels under ``audit/``).

* **Memorization of synthetic samples**: each synthetic sample's distance to its nearest
  training image and to its nearest test image (the same number of each, drawn at random), in
  pixel space and in the teacher's penultimate-feature space. Test images are unseen by the
  teacher, so if synthesis does not copy training images the ratio d_train / d_test is about 1
  (its distribution is reported), and the fraction of samples whose nearest training image is
  closer than the nearest test image by more than ``margin`` (relative) is no larger than for
  unseen test images outside the references, measured the same way as the null. The ``k``
  closest synthetic/training pairs are drawn side by side to be looked at.
* **Membership inference** (loss threshold, Yeom et al. 2018): the per-sample loss of members
  (training images) against non-members (test images), for the teacher and the student: ROC AUC
  and the true-positive rate at 1% and 0.1% false positives. On the teacher it shows whether the
  attack sees anything at all; on the student, whether the student parrots the teacher's
  membership signal (Jagielski et al. 2023) though it never saw the data.
* **Offline LiRA** (Carlini et al. 2022): shadow models with the teacher's recipe, trained on
  random halves of test images held out from the references, give each evaluated sample the
  spread of its true-class logit among models that never saw it; the target's logit, standardized
  by it, is the score. Stronger than the loss threshold at low false-positive rates.
* **Online LiRA** (``--lira online``): shadow models trained on random halves of a pool of
  training and test images, each sample in exactly half of them, so that every evaluated sample
  has IN and OUT distributions; the likelihood ratio between them is the score. The strongest
  attack here, at the cost of training every shadow on as many images as the teacher saw.
* **Canaries** (``dfkd teacher ... data.canaries=N``): training images the teacher learned under
  a wrong label, recorded in its model file; the audit counts those each model still "knows".
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from . import checkpoint as ckpt_io
from .config import load_config
from .data import dataset_info, denormalize, load_dataset
from .errors import CheckpointError, ConfigError
from .taps import EMBEDDING, FeatureTap


# ----------------------------------------------------------------------------- measures
def nearest_distances(queries: torch.Tensor, references: torch.Tensor, chunk: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query row, the Euclidean distance to its nearest reference row and that row's index."""
    best, where = [], []
    for q in queries.split(chunk):
        d = torch.cdist(q.float().flatten(1), references.float().flatten(1))
        value, index = d.min(1)
        best.append(value)
        where.append(index)
    return torch.cat(best), torch.cat(where)


def memorization(synthetic: torch.Tensor, train: torch.Tensor, test: torch.Tensor, margin: float) -> dict:
    """Distances of ``synthetic`` rows to their nearest ``train`` and ``test`` rows, the ratio
    d_train / d_test per sample (quantiles, mean), and the fraction with d_train < (1 − margin)·d_test."""
    d_train, nearest = nearest_distances(synthetic, train)
    d_test, _ = nearest_distances(synthetic, test)
    ratio = d_train / d_test.clamp_min(1e-12)
    quantiles = torch.quantile(ratio, torch.tensor([0.01, 0.1, 0.5, 0.9]))
    return {"ratio_mean": float(ratio.mean()), "ratio_q01": float(quantiles[0]), "ratio_q10": float(quantiles[1]),
            "ratio_median": float(quantiles[2]), "ratio_q90": float(quantiles[3]),
            "closer_to_train": float((d_train < (1 - margin) * d_test).float().mean()),
            "d_train_mean": float(d_train.mean()), "d_test_mean": float(d_test.mean()),
            "_ratio": ratio, "_d_train": d_train, "_nearest": nearest}


def roc_auc(members: torch.Tensor, non_members: torch.Tensor) -> float:
    """P(score of a member > score of a non-member), ties counting one half (Mann-Whitney U)."""
    scores = torch.cat([members, non_members]).double()
    ranks = torch.empty_like(scores)
    order = scores.argsort()
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.double)
    for value in scores.unique():  # average ranks over ties
        tied = scores == value
        if tied.sum() > 1:
            ranks[tied] = ranks[tied].mean()
    m, n = len(members), len(non_members)
    return float((ranks[:m].sum() - m * (m + 1) / 2) / (m * n))


def tpr_at_fpr(members: torch.Tensor, non_members: torch.Tensor, fpr: float) -> float:
    """The fraction of members scored above the threshold that only ``fpr`` of non-members exceed."""
    threshold = torch.quantile(non_members.double(), 1 - fpr)
    return float((members.double() > threshold).float().mean())


@torch.no_grad()
def losses_of(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> torch.Tensor:
    model.eval()
    return torch.cat([F.cross_entropy(model(x), y, reduction="none") for x, y in zip(images.split(batch),
                                                                                     labels.split(batch))])


def attack_scores(members: torch.Tensor, non_members: torch.Tensor) -> dict:
    """How well scores (higher: "member") separate members from non-members: ROC AUC and the
    true-positive rate at 1% and 0.1% false positives."""
    return {"auc": roc_auc(members, non_members), "tpr_at_1pct_fpr": tpr_at_fpr(members, non_members, 0.01),
            "tpr_at_0.1pct_fpr": tpr_at_fpr(members, non_members, 0.001)}


def loss_attack(model, members: tuple[torch.Tensor, torch.Tensor], non_members: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Loss-threshold membership inference: a lower loss means "member"."""
    return attack_scores(-losses_of(model, *members), -losses_of(model, *non_members))


@torch.no_grad()
def true_class_logit(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """LiRA's statistic: log p_y − log(1 − p_y) of the true class y, computed stably from logits."""
    model.eval()
    out = []
    for x, y in zip(images.split(batch), labels.split(batch)):
        z = model(x).float()
        own = z.gather(1, y[:, None])[:, 0]
        others = z.scatter(1, y[:, None], float("-inf")).logsumexp(1)
        out.append(own - others)
    return torch.cat(out)


def train_shadow(arch: dict, recipe: dict, images: torch.Tensor, labels: torch.Tensor, seed: int) -> torch.nn.Module:
    """A shadow model: the teacher's architecture, optimizer, batch size, epochs and learning-rate
    schedule (from its model file's config), trained with cross-entropy on ``images`` (without
    the teacher's augmentation)."""
    from .config import OptimConfig, SchedConfig
    from .models import create_model
    from .players import build_optimizer, lr_factor

    torch.manual_seed(seed)
    arch = dict(arch)
    model = create_model(arch.pop("name"), **arch.pop("kwargs", {}), **{k: v for k, v in arch.items() if k != "quant"})
    optim = recipe["players"]["model"]["optim"]
    sched = SchedConfig(**recipe["players"]["model"].get("sched", {}))
    optimizer = build_optimizer(model.parameters(), OptimConfig(**optim))
    batch, epochs = min(recipe["data"]["batch_size"], len(images)), recipe["train"]["epochs"]
    steps, total = 0, epochs * max(1, len(images) // batch)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images))
        for i in range(0, len(images) - batch + 1, batch):
            index = order[i:i + batch]
            for group in optimizer.param_groups:
                group["lr"] = optim["lr"] * lr_factor(sched, steps, total, optim["lr"])
            loss = F.cross_entropy(model(images[index]), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            steps += 1
    return model.eval()


def lira_offline(targets: dict, shadows: list, members: tuple, non_members: tuple) -> dict:
    """Offline LiRA (Carlini et al. 2022): each sample's statistic under the target, standardized by
    its mean and spread under shadow models that never trained on it (members and non-members
    alike are outside every shadow's data); a high score means "member"."""
    def per_sample(images, labels):
        values = torch.stack([true_class_logit(s, images, labels) for s in shadows])
        return values.mean(0), values.std(0).clamp_min(1e-3)

    out = {}
    stats = {"in": per_sample(*members), "out": per_sample(*non_members)}
    for who, model in targets.items():
        scores = {k: (true_class_logit(model, *(members if k == "in" else non_members)) - mu) / sd
                  for k, (mu, sd) in stats.items()}
        out[who] = attack_scores(scores["in"], scores["out"])
    return out


def lira_online(targets: dict, shadows: list, keep: torch.Tensor, pool: tuple, members: torch.Tensor,
                non_members: torch.Tensor) -> dict:
    """Online LiRA (Carlini et al. 2022): every pool sample trained ``keep[i, j]`` shadow i on it
    (each in exactly half of them); its statistic under the target is compared with Gaussians fitted
    to it under the shadows that trained on it (IN) and those that did not (OUT). Per-sample means
    and, as Carlini et al. advise for few shadow models, one variance per side shared by all
    samples; the log-likelihood ratio IN/OUT is the score. ``members``/``non_members``: indices
    into ``pool`` of the evaluated target members and non-members."""
    values = torch.stack([true_class_logit(s, *pool) for s in shadows]).double()   # (shadows, pool)
    keep = keep.double()
    mu_in = (values * keep).sum(0) / keep.sum(0)
    mu_out = (values * (1 - keep)).sum(0) / (1 - keep).sum(0)
    sd_in = ((values - mu_in) ** 2 * keep).sum().div(keep.sum()).sqrt().clamp_min(1e-3)
    sd_out = ((values - mu_out) ** 2 * (1 - keep)).sum().div((1 - keep).sum()).sqrt().clamp_min(1e-3)
    out = {}
    for who, model in targets.items():
        x = true_class_logit(model, *pool).double()
        score = (-0.5 * ((x - mu_in) / sd_in) ** 2 - sd_in.log()) - (-0.5 * ((x - mu_out) / sd_out) ** 2 - sd_out.log())
        out[who] = attack_scores(score[members], score[non_members])
    return out


def teacher_members(train, recipe: dict | None):
    """The images the teacher trained on: its training split (less the part it held out for
    validation, if it did), or the stratified labeled subset its recorded config drew when it
    trained on 'labeled' batches."""
    from .data import hold_out, labeled_subset

    if not recipe:
        return train
    if (recipe.get("data") or {}).get("validation"):
        train = hold_out(train, recipe["data"]["validation"])[0]
    fraction = (recipe.get("data") or {}).get("labeled_fraction", 1.0)
    labeled = any(p.get("batch") == "labeled" for p in recipe.get("phases") or [])
    return labeled_subset(train, fraction, recipe.get("seed", 0)) if labeled and fraction < 1 else train


@torch.no_grad()
def embeddings(teacher: torch.nn.Module, images: torch.Tensor, batch: int = 500) -> torch.Tensor:
    teacher.eval()
    out = []
    with FeatureTap(teacher, [EMBEDDING]) as tap:
        for x in images.split(batch):
            teacher(x)
            out.append(tap.features[EMBEDDING].flatten(1).clone())
    return torch.cat(out)


# ----------------------------------------------------------------------------- the run
def _synthetic_samples(run_dir: Path, config, state: dict, info, n: int) -> tuple[torch.Tensor, str]:
    """The run's synthetic samples: its saved image pool, else ``n`` fresh samples of its generator."""
    pool = (state.get("synthesis") or {}).get("pool")
    if pool is not None and len(pool["images"]):
        images = pool["images"].float()
        return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:n]], "pool"
    generators = [name for name, pc in config.players.items() if pc.kind == "generator"]
    if not generators:
        raise ConfigError(f"{run_dir}: the run kept no synthetic samples (no image pool in ckpt/last.pt) and has no "
                          f"generator to draw them from; nothing to audit for memorization")
    from .synthesis import build_generator

    name = generators[0]
    generator = build_generator(config.players[name].net, info, torch.device("cpu"))
    saved = state["players"][name]
    generator.load_state_dict(saved.get("ema") or saved["model"])
    draws = torch.Generator().manual_seed(0)  # the same samples every audit, the process's RNG untouched
    labels = torch.randint(info.num_classes, (n,), generator=draws) if getattr(generator, "conditional", False) else None
    with torch.no_grad():  # train mode, as generators run: their last BatchNorm uses batch statistics
        images = generator.train()(torch.randn(n, generator.nz, generator=draws), labels)
    return images, f"generator '{name}'"


def _checked_teacher(config, state: dict, run_dir: Path):
    if config.teacher is None or not config.teacher.checkpoints:
        raise ConfigError(f"{run_dir}: the run has no teacher to audit against")
    path = config.teacher.checkpoints[0]
    if not Path(path).is_file():
        raise CheckpointError(f"{run_dir}: its teacher {path} is missing")
    recorded = (state.get("teacher_sha256") or [None])[0]
    teacher, meta = ckpt_io.load_model(path)
    if recorded is not None and meta.get("sha256") != recorded:
        raise CheckpointError(f"{run_dir}: its teacher {path} changed since the run (SHA-256 {str(meta.get('sha256'))[:12]}, "
                              f"the run recorded {recorded[:12]})")
    return teacher, path, meta


def canary_exposure(models: dict, canaries: tuple[torch.Tensor, torch.Tensor],
                    reference: tuple[torch.Tensor, torch.Tensor], fpr: float = 0.01) -> dict:
    """How many planted canaries (training images relabeled to another class) each model gives a
    loss below what only ``fpr`` of ``reference`` samples get: unseen test images, each under a
    random wrong label, as the canaries would be under their planted ones had they not been seen."""
    found = {}
    for who, model in models.items():
        canary_scores, reference_scores = -losses_of(model, *canaries), -losses_of(model, *reference)
        threshold = torch.quantile(reference_scores.double(), 1 - fpr)
        found[who] = int((canary_scores.double() > threshold).sum())
    return {"planted": len(canaries[1]), "fpr": fpr, "found": found}


def audit(run_dir: str | Path, samples: int = 500, references: int = 2000, k: int = 8, margin: float = 0.1,
          root: str | None = None, shadows: int = 4, lira: str = "offline") -> dict:
    run_dir = Path(run_dir)
    files = {"config": run_dir / "config.yaml", "state": run_dir / "ckpt" / "last.pt",
             "student": run_dir / "ckpt" / "final.pt"}
    for what, path in files.items():
        if not path.is_file():
            raise ConfigError(f"{run_dir}: not a finished run folder ({path.name} of the {what} is missing)")
    config = load_config(str(files["config"]))
    state = ckpt_io.safe_load(files["state"])
    teacher, teacher_path, teacher_meta = _checked_teacher(config, state, run_dir)
    student, _ = ckpt_io.load_model(files["student"])
    info = dataset_info(config.data.name)
    if config.data.modality or config.data.pairs:
        raise ConfigError(f"{run_dir}: a cross-modal student sees another modality; the audit compares images "
                          f"of the teacher's dataset")
    print(f"dfkd audit: reads the training split of '{info.name}' (the teacher's training data) to measure "
          f"what the run reveals of it", file=sys.stderr)
    if lira not in ("offline", "online"):
        raise ConfigError(f"--lira must be 'offline' or 'online', got '{lira}'")
    if shadows and (shadows < 2 or lira == "online" and shadows % 2):
        raise ConfigError(f"--shadows must be 0 (no LiRA) or >= 2 (a spread per sample needs two), and even for "
                          f"online LiRA (each sample in half of them); got {shadows}")
    recipe = teacher_meta.get("config")
    if shadows and (not recipe or "model" not in recipe.get("players", {})):
        raise ConfigError(f"{teacher_path} records no teacher-training config to train shadow models with; "
                          f"use --shadows 0")
    # members: what the teacher trained on (all of the split, or the labeled part it drew)
    full_train = load_dataset(info.name, "train", root or config.data.root)
    train = teacher_members(full_train, recipe)
    test = load_dataset(info.name, "test", root or config.data.root)
    g = torch.Generator().manual_seed(0)
    m = min(references, len(train), len(test))
    train_index, test_index = torch.randperm(len(train), generator=g)[:m], torch.randperm(len(test), generator=g)[:m]
    members = (train.normalize(train.images[train_index]), train.labels[train_index])
    non_members = (test.normalize(test.images[test_index]), test.labels[test_index])

    report: dict = {"run_dir": str(run_dir), "teacher": teacher_path, "dataset": info.name, "references": m,
                    "margin": margin, "data_free": config.synthesis.kind != "none"}
    report["membership"] = {"teacher": loss_attack(teacher, members, non_members),
                            "student": loss_attack(student, members, non_members)}
    if shadows and lira == "online":
        report["lira"] = {"kind": "online", "shadows": shadows,
                          **_online(teacher, student, teacher_meta, recipe, train, test, shadows, m, g)}
    elif shadows:
        # shadow data: the test images outside the references, a random half for each shadow
        pool = torch.randperm(len(test), generator=g)
        pool = pool[~torch.isin(pool, test_index)]
        if len(pool) < 20:
            raise ConfigError(f"{info.name}/test has {len(pool)} images outside the {m} references: too few to train "
                              f"shadow models; lower --references")
        models = []
        for i in range(shadows):
            half = pool[torch.randperm(len(pool), generator=g)[:len(pool) // 2]]
            models.append(train_shadow(teacher_meta["arch"], recipe, test.normalize(test.images[half]),
                                       test.labels[half], seed=i))
        report["lira"] = {"kind": "offline", "shadows": shadows, "shadow_images": len(pool) // 2,
                          **lira_offline({"teacher": teacher, "student": student}, models, members, non_members)}
    planted = teacher_meta.get("canaries")
    if planted is not None:
        wrong = (non_members[1] + torch.randint(1, info.num_classes, (m,), generator=g)) % info.num_classes
        report["canaries"] = canary_exposure(
            {"teacher": teacher, "student": student},
            (full_train.normalize(full_train.images[planted["index"]]), planted["label"]), (non_members[0], wrong))
    pairs_image = None
    if config.synthesis.kind != "none":
        synthetic, source = _synthetic_samples(run_dir, config, state, info, samples)
        pixel = memorization(synthetic, members[0], non_members[0], margin)
        reference_features = embeddings(teacher, members[0]), embeddings(teacher, non_members[0])
        feature = memorization(embeddings(teacher, synthetic), *reference_features, margin)
        closest = pixel["_d_train"].argsort()[:k]
        pairs_image = torch.stack([torch.stack([denormalize(synthetic[i], info),
                                                denormalize(members[0][pixel["_nearest"][i]], info)])
                                   for i in closest]).flatten(0, 1)
        # the null: unseen test images outside the references, measured the same way
        held_out = torch.randperm(len(test), generator=g)
        held_out = held_out[~torch.isin(held_out, test_index)][:len(synthetic)]
        unseen = test.normalize(test.images[held_out])
        null = {"pixel": memorization(unseen, members[0], non_members[0], margin),
                "feature": memorization(embeddings(teacher, unseen), *reference_features, margin)}
        plain = lambda d: {k_: v for k_, v in d.items() if not k_.startswith("_")}  # noqa: E731
        report["synthetic"] = {"source": source, "samples": len(synthetic),
                               "pixel": plain(pixel), "feature": plain(feature),
                               "unseen_test_images": {"samples": len(unseen), "pixel": plain(null["pixel"]),
                                                      "feature": plain(null["feature"])}}
        ratios = {"pixel": pixel["_ratio"], "feature": feature["_ratio"]}
    else:
        ratios = {}
    _write(run_dir, report, pairs_image, ratios)
    return report


def _online(teacher, student, teacher_meta: dict, recipe: dict, train, test, shadows: int, m: int, g) -> dict:
    """Online LiRA's shadows and scores: the pool is as many of the teacher's training images as
    of test images (each side as large as the teacher's training set allows), every shadow trains
    with the teacher's recipe on a random half of it, so a shadow's data is as large as the
    teacher's was when the pool holds all of it; ``m`` members and non-members are evaluated."""
    size = min(len(train), len(test))
    inside = torch.randperm(len(train), generator=g)[:size]
    outside = torch.randperm(len(test), generator=g)[:size]
    images = torch.cat([train.normalize(train.images[inside]), test.normalize(test.images[outside])])
    labels = torch.cat([train.labels[inside], test.labels[outside]])
    # each pool sample is in exactly half of the shadows' data (a random half, per sample)
    keep = torch.rand(shadows, 2 * size, generator=g).argsort(0) < shadows // 2
    models = [train_shadow(teacher_meta["arch"], recipe, images[keep[i]], labels[keep[i]], seed=i)
              for i in range(shadows)]
    members, non_members = torch.arange(min(m, size)), size + torch.arange(min(m, size))
    return {"shadow_images": int(keep[0].sum()), "pool": 2 * size,
            **lira_online({"teacher": teacher, "student": student}, models, keep, (images, labels), members,
                          non_members)}


def _write(run_dir: Path, report: dict, pairs_image: torch.Tensor | None, ratios: dict) -> None:
    from torchvision.utils import make_grid, save_image

    ckpt_io.atomic_write_text(run_dir / "audit.json", json.dumps(report, indent=2))
    ckpt_io.atomic_write_text(run_dir / "audit.md", render(report))
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(run_dir / "audit"))
    for who, scores in report["membership"].items():
        for key, value in scores.items():
            writer.add_scalar(f"audit/membership/{who}/{key}", value, 0)
    for who in ("teacher", "student"):
        for key, value in report.get("lira", {}).get(who, {}).items():
            writer.add_scalar(f"audit/lira/{who}/{key}", value, 0)
    for space, ratio in ratios.items():
        writer.add_histogram(f"audit/synthetic/{space}_ratio_train_over_test", ratio, 0)
        writer.add_scalar(f"audit/synthetic/{space}_closer_to_train", report["synthetic"][space]["closer_to_train"], 0)
    if pairs_image is not None:
        grid = make_grid(pairs_image, nrow=2, padding=2, pad_value=0.5)
        grid = F.interpolate(grid.unsqueeze(0), scale_factor=3, mode="nearest")[0]
        save_image(grid, run_dir / "audit_pairs.png")
        writer.add_image("audit/closest_pairs", grid, 0, dataformats="CHW")
        writer.add_text("audit/closest_pairs", "each row: a synthetic sample (left) and its nearest training image "
                                               "(right), the k pairs closest in pixel space", 0)
    writer.close()


def render(report: dict) -> str:
    lines = [f"# Privacy audit of {report['run_dir']}", "",
             f"Teacher {report['teacher']}, dataset {report['dataset']}; {report['references']} of the images the "
             f"teacher trained on (members) and as many test images (non-members).", "",
             "## Membership inference (loss threshold)", "", "| model | AUC | TPR @ 1% FPR | TPR @ 0.1% FPR |",
             "|---|---|---|---|"]
    for who, s in report["membership"].items():
        lines.append(f"| {who} | {s['auc']:.3f} | {100 * s['tpr_at_1pct_fpr']:.2f}% | {100 * s['tpr_at_0.1pct_fpr']:.2f}% |")
    if "lira" in report:
        lira = report["lira"]
        where = f"{lira['shadow_images']} held-out test images each" if lira.get("kind") != "online" else \
            f"random halves of a pool of {lira['pool']} training and test images, each sample in half of them"
        lines += ["", f"## Membership inference ({lira.get('kind', 'offline')} LiRA, {lira['shadows']} shadow models "
                      f"on {where})", "",
                  "| model | AUC | TPR @ 1% FPR | TPR @ 0.1% FPR |", "|---|---|---|---|"]
        for who in ("teacher", "student"):
            s = lira[who]
            lines.append(f"| {who} | {s['auc']:.3f} | {100 * s['tpr_at_1pct_fpr']:.2f}% | "
                         f"{100 * s['tpr_at_0.1pct_fpr']:.2f}% |")
    if "canaries" in report:
        c = report["canaries"]
        lines += ["", f"## Canaries ({c['planted']} training images relabeled when the teacher was trained)", "",
                  f"Found: a canary's loss under its planted label is lower than all but {100 * c['fpr']:.0f}% of unseen "
                  f"test images' under a random wrong label.", "", "| model | canaries found |", "|---|---|"]
        lines += [f"| {who} | {n} of {c['planted']} |" for who, n in c["found"].items()]
    if "synthetic" in report:
        syn = report["synthetic"]
        lines += ["", f"## Synthetic samples ({syn['samples']}, from the {syn['source']})", "",
                  "d_train / d_test: distance to the nearest training image over the distance to the nearest test "
                  "image; about 1 when synthesis copies nothing of the training set. Unseen test images (outside "
                  "the references), measured the same way, are the null to compare with.", "",
                  f"| space | median ratio | 1% quantile | mean | closer to train by > {100 * report['margin']:.0f}% |",
                  "|---|---|---|---|---|"]
        null = syn.get("unseen_test_images")
        for space in ("pixel", "feature"):
            for who, s in [("synthetic", syn[space])] + ([("unseen test images", null[space])] if null else []):
                lines.append(f"| {space}, {who} | {s['ratio_median']:.3f} | {s['ratio_q01']:.3f} | {s['ratio_mean']:.3f} | "
                             f"{100 * s['closer_to_train']:.1f}% |")
        lines += ["", "The closest synthetic/training pairs: `audit_pairs.png`."]
    return "\n".join(lines) + "\n"
