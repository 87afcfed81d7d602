"""What an audit writes into the run folder it names: ``audit.json``, ``audit.md``,
``audit_pairs.png`` and TensorBoard panels under ``audit/``."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from dfkd.core.io import atomic_path, atomic_write_text


def write(run_dir: Path, report: dict, pairs_image: torch.Tensor | None, ratios: dict) -> None:
    from torch.utils.tensorboard import SummaryWriter
    from torchvision.utils import make_grid, save_image

    atomic_write_text(run_dir / "audit.json", json.dumps(report, indent=2))
    atomic_write_text(run_dir / "audit.md", render(report))

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
        with atomic_path(run_dir / "audit_pairs.png") as tmp:
            save_image(grid, tmp, format="png")
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
        names = {"pixel": "pixel", "feature": "teacher logits" if syn.get("feature_space") == "logits" else "feature"}
        for space in ("pixel", "feature"):
            for who, s in [("synthetic", syn[space])] + ([("unseen test images", null[space])] if null else []):
                lines.append(f"| {names[space]}, {who} | {s['ratio_median']:.3f} | {s['ratio_q01']:.3f} | {s['ratio_mean']:.3f} | "
                             f"{100 * s['closer_to_train']:.1f}% |")
        lines += ["", "The closest synthetic/training pairs: `audit_pairs.png`."]
    return "\n".join(lines) + "\n"
