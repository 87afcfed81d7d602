"""``dfkd inspect MODEL``: what dfkd can do with one teacher. Its size (parameters, and FLOPs of one
input of its card's shape), its BatchNorm layers and where its embedding is, which shipped
data-free methods apply to it and which refuse and why (read from the methods' own loss terms), and
the recipe to start from, with the measured evidence for it."""
from __future__ import annotations

from torch import nn

from dfkd.core.config import load_config
from dfkd.data.card import card_of, check_card, info_from_card
from dfkd.loop.needs import config_terms, data_free_recipes, refusals
from dfkd.nets.arch import is_black_box, load_model
from dfkd.nets.models import count_parameters, is_code
from dfkd.nets.taps import embedding_layer, resolve_module
from dfkd_base.errors import CheckpointError, ConfigError

# the recipe to start from, by what the teacher gives, and the measurements behind it (docs/results.md)
RECIPES = {
    "bn": ("datafree/dfq-digits",
           "of the fast variants, the one measured to hold across teacher architectures: final test accuracy "
           "96.6-99.2% (96.8-99.6% of the teacher) from LeNet-5, resnet8, resnet20 and wrn16_2 teachers on digits, "
           "3 seeds each (docs/results.md, \"Teachers of other architectures\")"),
    "outputs": ("datafree/dfq-outputs-digits",
                "needs only the teacher's outputs (a black box, or a network without BatchNorm): DFQ's loop "
                "without its BatchNorm-statistics term; from a user's CNN compiled with TorchScript (99.11%) on "
                "digits it ended at 76.30 +- 10.71% (3 seeds) where DFAD ended at 12.37 +- 2.68% "
                "(docs/results.md, \"Teachers from elsewhere\")"),
}


def student_for(shape: tuple[int, int, int]) -> str:
    """The student network to start from for an input of ``shape``: the recipes' LeNet-5-half where
    LeNet takes it (28 to 32 pixels), a CIFAR ResNet-8 for other small inputs, torchvision's
    ResNet-18 (an ImageNet stem, which shrinks large inputs early) from 64 pixels up."""
    height = min(shape[1:])
    if 28 <= height <= 32 and shape[1] == shape[2]:
        return "lenet5_half"
    return "resnet8" if height < 64 else "tv:resnet18"


def batchnorm_layers(model: nn.Module) -> list[tuple[str, int]]:
    return [(name, m.num_features) for name, m in model.named_modules()
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) and m.running_mean is not None]


def flops(model: nn.Module, shape: tuple[int, ...]) -> int | None:
    """FLOPs of one input of ``shape`` (torch's counter: 2 per multiply-add), None where uncountable."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    try:
        with counter, torch.no_grad():
            model(torch.zeros(1, *shape))
    except Exception:  # noqa: BLE001 — a program the counter cannot follow: report no count
        return None
    return int(counter.get_total_flops())


def inspect_model(path: str, allow_code: bool = False) -> dict:
    model, meta = load_model(path, allow_code=allow_code)
    card = card_of(meta)
    if card is None:
        raise CheckpointError(f"{path} records no input card (import it with dfkd import, which writes one)")
    card = check_card(card, path)
    info = info_from_card(card)
    black = is_black_box(model)
    bn = [] if black else batchnorm_layers(model)
    try:
        embedding = None if black else embedding_layer(model)
        features = resolve_module(model, embedding).in_features if embedding else None
    except ConfigError:
        embedding = features = None
    methods = []
    for name in data_free_recipes():
        problems = refusals(config_terms(load_config(name)), model, black)
        methods.append({"config": name, "applies": not problems, "why": problems[0] if problems else None})
    recipe, evidence = RECIPES["bn" if any(m["applies"] and m["config"] == RECIPES["bn"][0] for m in methods)
                               else "outputs"]
    student = student_for(info.shape)
    overrides = [] if student == "lenet5_half" else [f"players.student.net.name={student}"]
    code = " --allow-code" if is_code(meta["arch"]["name"]) else ""
    command = (f"dfkd distill --config {recipe} --teacher {path}{code} data.name=folder data.root=YOUR_IMAGES "
               f"{' '.join(overrides)}".rstrip())
    return {"model_file": path, "arch": meta["arch"]["name"], "black_box": black,
            "params": count_parameters(model), "flops": flops(model, info.shape), "card": card,
            "batchnorm": {"layers": len(bn), "channels": sum(c for _, c in bn), "first": bn[0][0] if bn else None,
                          "last": bn[-1][0] if bn else None},
            "embedding": {"path": embedding, "features": features} if embedding else None,
            "methods": methods, "recipe": {"config": recipe, "student": student, "command": command,
                                           "without_labeled_images": command.split(" data.name")[0] +
                                           " data.eval=false " + " ".join(overrides),
                                           "evidence": evidence}}


def render(report: dict) -> str:
    card = report["card"]
    size = "x".join(map(str, card["shape"]))
    flops_text = f"{report['flops'] / 1e6:,.1f} MFLOPs" if report["flops"] is not None else "FLOPs not countable"
    lines = [f"{report['model_file']}: {report['arch']}" + (" (a black box: outputs only)" if report["black_box"]
                                                            else ""),
             f"  {report['params']:,} parameters; {flops_text} per {size} input; {card['classes']} classes; "
             f"normalized with mean {card['mean']}, std {card['std']}"]
    bn = report["batchnorm"]
    lines.append(f"  BatchNorm: {bn['layers']} layers, {bn['channels']} channels ({bn['first']} ... {bn['last']})"
                 if bn["layers"] else "  BatchNorm: none with running statistics")
    emb = report["embedding"]
    lines.append(f"  embedding: the input of {emb['path']} ({emb['features']} features)" if emb else
                 "  embedding: none found (no last Linear layer)")
    lines.append("  data-free methods:")
    for m in report["methods"]:
        lines.append(f"    {'applies ' if m['applies'] else 'refuses '} {m['config']}" +
                     ("" if m["applies"] else f": {m['why']}"))
    recipe = report["recipe"]
    lines += [f"  start from {recipe['config']} with a {recipe['student']} student: {recipe['evidence']}",
              f"    {recipe['command']}", f"    (no labeled images: {recipe['without_labeled_images'].strip()})"]
    return "\n".join(lines) + "\n"
