"""Evaluation on a labeled split, shared by training runs and ``dfkd eval``."""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from dfkd.data.batch import Batch
from dfkd.data.card import card_of, check_card, info_from_card
from dfkd.data.datasets import DatasetInfo, load_dataset
from dfkd.nets.taps import resolve_module
from dfkd_base.errors import ConfigError


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable, forward: Callable[[nn.Module, torch.Tensor], torch.Tensor] | None = None,
             modality: Callable | None = None, info: DatasetInfo | None = None, student: bool = True,
             predictions: bool = False) -> dict:
    """Top-1 accuracy (%), mean cross-entropy and count over ``loader``'s (images, labels[, paired])
    batches, in eval mode (the model's mode is restored). A ``student`` of another modality is
    evaluated on it: the stored ``paired`` images of a user's pairs, or ``modality(images, info)``
    of the built-in ones; a teacher (``student=False``) sees the images themselves.
    ``forward(model, images)`` runs the model (the run's AMP and memory format); by default it is
    called directly. ``predictions``: also return every sample's ``predicted`` class and ``labels``."""
    forward = forward or (lambda m, x: m(x))
    was_training = model.training
    model.eval()
    exits = exits_of(model)
    correct, loss_sum, n = 0, 0.0, 0
    exit_correct: list[int] = []
    predicted, seen = [], []
    for images, labels, *paired in loader:
        if student and paired:  # a user's pairs: the student's modality is stored
            images = paired[0]
        elif student and modality is not None:
            images = modality(images, info)
        logits = forward(model, images).float()
        loss_sum += float(F.cross_entropy(logits, labels, reduction="sum"))
        correct += int((logits.argmax(1) == labels).sum())
        n += labels.numel()
        if predictions:
            predicted.append(logits.argmax(1).cpu())
            seen.append(labels.cpu())
        if exits is not None:  # each exit, then BYOT's ensemble: the mean of every classifier's logits
            outputs = [z.float() for z in exits.exit_logits]
            outputs.append(sum(outputs + [logits]) / (len(outputs) + 1))
            hits = [int((z.argmax(1) == labels).sum()) for z in outputs]
            exit_correct = [a + b for a, b in zip(exit_correct, hits)] if exit_correct else hits
    model.train(was_training)
    result = {"acc": 100.0 * correct / n, "loss": loss_sum / n, "n": n}
    if predictions:
        result["predicted"], result["labels"] = torch.cat(predicted), torch.cat(seen)
    if exit_correct:
        result["exits"] = [100.0 * c / n for c in exit_correct[:-1]]
        result["exit_ensemble"] = 100.0 * exit_correct[-1] / n
    return result


@torch.no_grad()
def agreement(student: nn.Module, teacher: nn.Module, images: torch.Tensor, forward: Callable,
              student_images: torch.Tensor | None = None, batch: int = 256) -> float:
    """The share (%) of ``images`` on which ``student`` (seeing ``student_images``, another modality
    of them, when given) predicts the class ``teacher`` predicts: a run's progress when it has no
    labeled image. Both in eval mode (their modes are restored)."""
    modes = student.training, teacher.training
    student.eval(), teacher.eval()
    same = 0
    views = student_images if student_images is not None else images
    for x, v in zip(images.split(batch), views.split(batch)):
        same += int((forward(student, v).argmax(1) == forward(teacher, x).argmax(1)).sum())
    student.train(modes[0]), teacher.train(modes[1])
    return 100.0 * same / len(images)


def evaluation_split(meta: dict, path: str, data: str | None, split: str, root: str | None):
    """The labeled split a model file is evaluated on: ``data`` (a registered dataset, or the user's
    own images, ``folder`` or ``arrays`` at ``root``), else the dataset it was trained on; read as
    the model's input card says (normalized with its statistics, converted to its shape)."""
    name = data or meta.get("dataset")
    if name is None:
        raise ConfigError(f"{path} names no dataset it was trained on (an imported teacher): give --data (a dataset, "
                          f"or folder / arrays with --root)")
    card = card_of(meta)
    return load_dataset(name, split, root, card=info_from_card(check_card(card, path), name) if card else None)


def held_out_agreement(run) -> float | None:
    """A run's student against its teacher on the synthetic samples it holds out (see
    :meth:`~dfkd.methods.synthesis.base.Synthesizer.hold_out`); None before any was made."""
    generator_name = getattr(run.config.synthesis, "generator", None)
    generator = run.players.module(generator_name) if generator_name in run.players else None
    images = run.synth.held_out(generator)
    if images is None:
        return None
    views = run.student_view(Batch(images)).images if run.modality is not None else None
    return agreement(run.student.eval_module, run.teachers.evaluation_model(), images, run.runtime.forward, views)


def exits_of(model: nn.Module) -> nn.Module | None:
    """The network with exits (an ``ExitNet``) inside ``model``, if any."""
    return next((m for m in model.modules() if hasattr(m, "exit_logits")), None)


def exit_scalars(result: dict) -> dict[str, float]:
    """TensorBoard scalars of each exit's accuracy and their ensemble's, when the model has exits."""
    scalars = {f"eval/acc_exit{i + 1}": acc for i, acc in enumerate(result.get("exits", []))}
    if "exit_ensemble" in result:
        scalars["eval/acc_exit_ensemble"] = result["exit_ensemble"]
    return scalars


class _Stop(Exception):
    pass


@torch.no_grad()
def exit_costs(net: nn.Module, input_shape: tuple[int, ...]) -> tuple[list[float], float]:
    """FLOPs of one sample that leaves at each exit (the network up to that exit's stage, and every
    exit head up to it, all of which ran to decide), then of one that reaches the end; and the
    FLOPs of the network alone."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, *input_shape)
    heads, trunks = [], []
    was_training = net.training
    net.eval()
    for path, head in zip(net.layers, net.exits):
        def stop(module, inputs, output):
            raise _Stop
        handle = resolve_module(net.network, path).register_forward_hook(stop)
        with FlopCounterMode(display=False) as counter:
            try:
                net.network(x)
            except _Stop:
                pass
        handle.remove()
        trunks.append(counter.get_total_flops())
        with FlopCounterMode(display=False) as counter:
            head(net._maps[path])
        heads.append(counter.get_total_flops())
    with FlopCounterMode(display=False) as counter:
        net.network(x)
    net._maps = {}
    net.train(was_training)
    network = counter.get_total_flops()
    return [trunk + sum(heads[: i + 1]) for i, trunk in enumerate(trunks)] + [network + sum(heads)], network


@torch.no_grad()
def early_exit(model: nn.Module, loader: Iterable, thresholds: list[float], input_shape: tuple[int, ...]) -> list[dict]:
    """Early-exit inference: each sample leaves at the first exit (shallow to deep) whose top
    softmax probability reaches the threshold, else at the network's end. Per threshold: accuracy,
    mean FLOPs per sample as a fraction of the network's alone (heads included, so it passes 1 when
    few samples leave early), and the share leaving at each exit (the network's end last)."""
    net = exits_of(model)
    if net is None:
        raise ValueError("early-exit inference needs a model with exits (net.kwargs: {exits: ...})")
    was_training = model.training
    model.eval()
    costs, full = exit_costs(net, input_shape)
    batches = [(model(images).float(), [z.float() for z in net.exit_logits], labels) for images, labels, *_ in loader]
    model.train(was_training)
    rows = []
    for threshold in thresholds:
        correct, cost, n, left = 0, 0.0, 0, [0] * len(costs)
        for logits, exit_logits, labels in batches:
            outputs = exit_logits + [logits]
            where = torch.full_like(labels, len(outputs) - 1)
            for i in reversed(range(len(exit_logits))):  # the shallowest confident exit wins
                where = torch.where(outputs[i].softmax(1).max(1).values >= threshold, i, where)
            chosen = torch.stack(outputs)[where, torch.arange(len(labels))]
            correct += int((chosen.argmax(1) == labels).sum())
            cost += sum(costs[int(i)] for i in where)
            n += len(labels)
            for i in where.tolist():
                left[i] += 1
        rows.append({"threshold": threshold, "acc": 100.0 * correct / n, "flops": cost / n / full,
                     "exits": [c / n for c in left]})
    return rows
