"""``dfkd audit RUN_DIR``: the run's teacher, student and synthetic samples against the
teacher's training and test splits (see :mod:`dfkd.tools.audit`)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

from dfkd.core.checkpoint import safe_load
from dfkd.core.config import load_config
from dfkd.core.io import check_output_folder
from dfkd.core.runs import check_run_folder
from dfkd.data.card import info_from_card
from dfkd.data.datasets import denormalize, load_dataset
from dfkd.loop.teachers import teacher_card
from dfkd.methods.synthesis.base import build_generator
from dfkd.nets.arch import load_model
from dfkd.nets.taps import embed, has_embedding
from dfkd.tools.audit.attacks import canary_exposure, lira_offline, lira_online, loss_attack, memorization
from dfkd.tools.audit.report import write
from dfkd.tools.audit.shadows import teacher_members, train_shadow
from dfkd_base.errors import CheckpointError, ConfigError


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
    name = generators[0]
    generator = build_generator(config.players[name].net, info, torch.device("cpu"))
    saved = state["players"][name]
    generator.load_state_dict(saved.get("ema") or saved["model"])
    draws = torch.Generator().manual_seed(0)  # the same samples every audit, the process's RNG untouched
    labels = torch.randint(info.num_classes, (n,), generator=draws) if getattr(generator, "conditional", False) else None
    with torch.no_grad():  # train mode, as generators run: their last BatchNorm uses batch statistics
        images = generator.train()(torch.randn(n, generator.nz, generator=draws), labels)
    return images, f"generator '{name}'"


def _checked_teacher(config, state: dict, run_dir: Path, allow_code: bool):
    if config.teacher is None or not config.teacher.checkpoints:
        raise ConfigError(f"{run_dir}: the run has no teacher to audit against")
    path = config.teacher.checkpoints[0]
    if not Path(path).is_file():
        raise CheckpointError(f"{run_dir}: its teacher {path} is missing")
    recorded = (state.get("teacher_sha256") or [None])[0]
    teacher, meta = load_model(path, allow_code=allow_code)
    if recorded is not None and meta.get("sha256") != recorded:
        raise CheckpointError(f"{run_dir}: its teacher {path} changed since the run (SHA-256 {str(meta.get('sha256'))[:12]}, "
                              f"the run recorded {recorded[:12]})")
    return teacher, path, meta


# synthetic samples drawn for the audit at most: each is compared with every reference image
MAX_SAMPLES = 100_000


def _check_counts(samples: int, references: int | None, k: int, margin: float, shadows: int, lira: str) -> None:
    """The audit's numbers checked before anything is read or written: an out-of-range one is a
    one-line error, not a report built from it."""
    if not 1 <= samples <= MAX_SAMPLES:
        raise ConfigError(f"--samples must be in [1, {MAX_SAMPLES}], got {samples}")
    if references is not None and references < 1:
        raise ConfigError(f"--references must be >= 1, got {references}")
    if not 0 <= k <= samples:
        raise ConfigError(f"--pairs must be in [0, --samples={samples}], got {k}")
    if not (math.isfinite(margin) and 0 <= margin < 1):
        raise ConfigError(f"--margin must be in [0, 1), got {margin}")
    if lira not in ("offline", "online"):
        raise ConfigError(f"--lira must be 'offline' or 'online', got '{lira}'")
    if shadows < 0 or shadows and (shadows < 2 or lira == "online" and shadows % 2):
        raise ConfigError(f"--shadows must be 0 (no LiRA) or >= 2 (a spread per sample needs two), and even for "
                          f"online LiRA (each sample in half of them); got {shadows}")


def audit(run_dir: str | Path, samples: int = 500, references: int | None = None, k: int = 8, margin: float = 0.1,
          root: str | None = None, shadows: int = 4, lira: str = "offline", data: str | None = None,
          allow_code: bool = False) -> dict:
    """The audit of the run in ``run_dir`` against the teacher's training split and its test split:
    those of ``data`` at ``root`` when given (a user's own images: ``folder`` or ``arrays`` with
    ``train`` and ``test`` inside), else of the run's dataset. ``references`` members and as many
    non-members are compared; by default 2000, or half of the test split when that is smaller (the
    other half trains offline LiRA's shadows and is the memorization measures' null)."""
    run_dir = Path(run_dir)
    _check_counts(samples, references, k, margin, shadows, lira)
    files = {"config": run_dir / "config.yaml", "state": run_dir / "ckpt" / "last.pt",
             "student": run_dir / "ckpt" / "final.pt"}
    for what, path in files.items():
        if not path.is_file():
            raise ConfigError(f"{run_dir}: not a finished run folder ({path.name} of the {what} is missing)")
    check_run_folder(run_dir)  # the audit writes its report here: never through a planted link
    check_output_folder(run_dir)
    config = load_config(str(files["config"]))
    state = safe_load(files["state"])
    teacher, teacher_path, teacher_meta = _checked_teacher(config, state, run_dir, allow_code)
    student, _ = load_model(files["student"], allow_code=allow_code)
    name, root = data or config.data.name, root or config.data.root
    card = teacher_card(teacher_meta, teacher_path)
    like = info_from_card(card, name) if card is not None else None
    if config.data.modality or config.data.pairs:
        raise ConfigError(f"{run_dir}: a cross-modal student sees another modality; the audit compares images "
                          f"of the teacher's dataset")
    print(f"dfkd audit: reads the training split of '{name}' (the teacher's training data) to measure "
          f"what the run reveals of it", file=sys.stderr)
    recipe = teacher_meta.get("config")
    if shadows and (not recipe or "model" not in recipe.get("players", {})):
        raise ConfigError(f"{teacher_path} records no teacher-training config to train shadow models with; "
                          f"use --shadows 0")
    # members: what the teacher trained on (all of the split, or the labeled part it drew)
    full_train = load_dataset(name, "train", root, card=like)
    train = teacher_members(full_train, recipe)
    test = load_dataset(name, "test", root, card=like)
    info = test.info
    if references is None:  # the other half of the test split: the shadows' data, and the null's
        references = min(2000, len(test) // 2)
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
                          **_online(teacher, student, recipe, train, test, shadows, m, g)}
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
            models.append(train_shadow(recipe, test.images[half], test.labels[half], seed=i))
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
        reference_features = features(teacher, members[0]), features(teacher, non_members[0])
        feature = memorization(features(teacher, synthetic), *reference_features, margin)
        closest = pixel["_d_train"].argsort()[:k]
        pairs_image = torch.stack([torch.stack([denormalize(synthetic[i], info),
                                                denormalize(members[0][pixel["_nearest"][i]], info)])
                                   for i in closest]).flatten(0, 1)
        # the null: unseen test images outside the references, measured the same way
        held_out = torch.randperm(len(test), generator=g)
        held_out = held_out[~torch.isin(held_out, test_index)][:len(synthetic)]
        unseen = test.normalize(test.images[held_out])
        plain = lambda d: {k_: v for k_, v in d.items() if not k_.startswith("_")}  # noqa: E731
        report["synthetic"] = {"source": source, "samples": len(synthetic),
                               "feature_space": "embedding" if has_embedding(teacher) else "logits",
                               "pixel": plain(pixel), "feature": plain(feature), "unseen_test_images": None}
        if len(unseen):  # none when the references took every test image (then the report has no null row)
            report["synthetic"]["unseen_test_images"] = {
                "samples": len(unseen), "pixel": plain(memorization(unseen, members[0], non_members[0], margin)),
                "feature": plain(memorization(features(teacher, unseen), *reference_features, margin))}
        ratios = {"pixel": pixel["_ratio"], "feature": feature["_ratio"]}
    else:
        ratios = {}
    write(run_dir, report, pairs_image, ratios)
    return report


def _online(teacher, student, recipe: dict, train, test, shadows: int, m: int, g) -> dict:
    """Online LiRA's shadows and scores: the pool is as many of the teacher's training images as
    of test images (each side as large as the teacher's training set allows), every shadow trains
    with the teacher's recipe on a random half of it, so a shadow's data is as large as the
    teacher's was when the pool holds all of it; ``m`` members and non-members are evaluated."""
    size = min(len(train), len(test))
    inside = torch.randperm(len(train), generator=g)[:size]
    outside = torch.randperm(len(test), generator=g)[:size]
    pixels = torch.cat([train.images[inside], test.images[outside]])
    images, labels = train.normalize(pixels), torch.cat([train.labels[inside], test.labels[outside]])
    # each pool sample is in exactly half of the shadows' data (a random half, per sample)
    keep = torch.rand(shadows, 2 * size, generator=g).argsort(0) < shadows // 2
    models = [train_shadow(recipe, pixels[keep[i]], labels[keep[i]], seed=i) for i in range(shadows)]
    members, non_members = torch.arange(min(m, size)), size + torch.arange(min(m, size))
    return {"shadow_images": int(keep[0].sum()), "pool": 2 * size,
            **lira_online({"teacher": teacher, "student": student}, models, keep, (images, labels), members,
                          non_members)}


def features(teacher: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The teacher's embedding of ``images`` (the input of its last Linear layer), in eval mode;
    its logits when it has no embedding to read (a black-box program)."""
    if not has_embedding(teacher):
        with torch.no_grad():
            return torch.cat([teacher.eval()(x).float() for x in images.split(500)])
    return embed(teacher.eval(), images, batch=500)[0]
