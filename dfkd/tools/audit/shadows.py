"""Shadow models for LiRA, trained by the loop with the teacher's own recipe (its recorded
config) on the images each shadow may see, and which images the teacher itself trained on."""
from __future__ import annotations

import torch

from dfkd.core.validate import config_from_dict
from dfkd.data.datasets import ImageTensorDataset, dataset_info
from dfkd.data.splits import hold_out, labeled_subset
from dfkd.loop.engine import Engine


def teacher_members(train, recipe: dict | None):
    """The images the teacher trained on: its training split (less the part it held out for
    validation, if it did), or the stratified labeled subset its recorded config drew when it
    trained on 'labeled' batches."""
    if not recipe:
        return train
    if (recipe.get("data") or {}).get("validation"):
        train = hold_out(train, recipe["data"]["validation"])[0]
    fraction = (recipe.get("data") or {}).get("labeled_fraction", 1.0)
    labeled = any(p.get("batch") == "labeled" for p in recipe.get("phases") or [])
    return labeled_subset(train, fraction, recipe.get("seed", 0)) if labeled and fraction < 1 else train


def train_shadow(recipe: dict, images: torch.Tensor, labels: torch.Tensor, seed: int) -> torch.nn.Module:
    """A shadow model trained by the loop as the teacher was: its recorded config (architecture,
    optimizer, schedule, batch size, epochs, augmentation) with seed ``seed``, on ``images`` (uint8,
    as the dataset holds them) and ``labels`` in place of its training split; no run folder, no
    evaluation, no validation hold-out and no canaries. Returned on the CPU, in eval mode."""
    config = config_from_dict({**recipe, "seed": seed,
                               "data": {**recipe["data"], "eval": False, "validation": 0.0, "canaries": 0},
                               "runtime": {**recipe.get("runtime", {}), "progress": False},
                               "output": {**recipe.get("output", {}), "tensorboard": False}})
    split = ImageTensorDataset(images, labels, dataset_info(config.data.name), "shadow")
    engine = Engine(config, write=False, train_split=split)
    engine.fit()
    return engine.student.eval_module.cpu().eval()
