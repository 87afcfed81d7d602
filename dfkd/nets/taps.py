"""Forward hooks addressed by module path, so methods read features without editing models.

Paths are those of ``model.named_modules()``: ``"layer3"``, ``"layer3.1.bn2"``, ``"fc"``; the
path :data:`EMBEDDING` is the input of the model's last Linear layer (its penultimate features,
whatever the architecture calls them). Recorded tensors keep their autograd graph, so losses
computed from them backpropagate.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn

from dfkd_base.errors import ConfigError
from dfkd_base.registry import nearest

EMBEDDING = "<embedding>"  # tap path: the input of the last nn.Linear, a classifier's penultimate features
# tap path: per-sample channel means of the input of every BatchNorm2d, concatenated in module order
# (CMI's features for contrastive inversion)
BN_INPUT_MEANS = "<bn-input-means>"


def embedding_layer(model: nn.Module) -> str:
    """The path of ``model``'s last Linear layer, whose input is its embedding."""
    linear = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linear:
        raise ConfigError(f"{type(model).__name__} has no Linear layer, so no penultimate embedding to tap; "
                          f"name the layer to read ('layer: PATH')")
    return linear[-1]


def has_embedding(model: nn.Module) -> bool:
    """Whether ``model`` has a Linear layer whose input :func:`embed` can read (a black-box
    program has none)."""
    return any(isinstance(m, nn.Linear) for m in model.modules())


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """The submodule at ``path``; an unknown path is a ConfigError naming the nearest valid paths."""
    modules = {name: module for name, module in model.named_modules() if name}
    if path in modules:
        return modules[path]
    close = nearest(path, modules) or [name for name, _ in model.named_children()]
    raise ConfigError(f"no module '{path}' in {type(model).__name__}; nearest: {', '.join(close)}")


class _Hooks:
    """Owns hook handles; ``remove()`` or leaving a ``with`` block detaches them."""

    def __init__(self) -> None:
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()


class FeatureTap(_Hooks):
    """Records the outputs of the modules at ``paths`` in ``features[path]``, replaced on every forward.

    >>> with FeatureTap(model, ["layer2", "layer3"]) as tap:
    ...     logits = model(x)
    ...     f3 = tap.features["layer3"]
    """

    def __init__(self, model: nn.Module, paths: list[str]):
        super().__init__()
        # Resolve every path before hooking any, so a typo leaves the model untouched.
        modules = {path: model if path == BN_INPUT_MEANS else
                   resolve_module(model, embedding_layer(model) if path == EMBEDDING else path) for path in paths}
        bn_layers = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
        if BN_INPUT_MEANS in modules and not bn_layers:
            raise ConfigError(f"{type(model).__name__} has no BatchNorm2d layer, whose input means contrastive "
                              f"inversion reads")
        self.paths = list(modules)
        self.features: dict[str, torch.Tensor] = {}
        self._means: list[torch.Tensor | None] = []
        for path, module in modules.items():
            if path == BN_INPUT_MEANS:
                self._means = [None] * len(bn_layers)
                for i, bn in enumerate(bn_layers):
                    self._handles.append(bn.register_forward_pre_hook(self._mean_recorder(i)))
                self._handles.append(model.register_forward_hook(self._recorder_of_means(path)))
            elif path == EMBEDDING:
                self._handles.append(module.register_forward_pre_hook(self._input_recorder(path)))
            else:
                self._handles.append(module.register_forward_hook(self._recorder(path)))

    def _recorder(self, path: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self.features[path] = output
        return hook

    def _mean_recorder(self, index: int):
        def hook(module: nn.Module, inputs: tuple) -> None:
            self._means[index] = inputs[0].mean(dim=(2, 3))
        return hook

    def _recorder_of_means(self, path: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            self.features[path] = torch.cat([m for m in self._means if m is not None], dim=1)
        return hook

    def _input_recorder(self, path: str):
        def hook(module: nn.Module, inputs: tuple) -> None:
            self.features[path] = inputs[0]
        return hook

    def clear(self) -> None:
        self.features.clear()


class BNStats(NamedTuple):
    name: str
    mean: torch.Tensor  # per-channel batch mean of the layer's input (with graph)
    var: torch.Tensor  # per-channel biased batch variance of the layer's input (with graph)
    running_mean: torch.Tensor
    running_var: torch.Tensor


class BNStatsTap(_Hooks):
    """Per-channel batch statistics of the input of every BatchNorm layer that tracks running stats,
    next to those running stats: what DeepInversion-style BN-statistics losses compare.

    ``stats`` lists the layers in module order, each as of its latest forward. Set ``enabled = False``
    to skip the computation in forwards that do not need it (the previous stats then stay).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        # Only layers with running statistics have something to match the batch against.
        bn_layers = [(name, module) for name, module in model.named_modules()
                     if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)) and module.running_mean is not None]
        if not bn_layers:
            raise ConfigError(f"model {type(model).__name__} has no BatchNorm layers; "
                              "the BN-statistics loss needs a teacher with BatchNorm")
        self.layers = [name for name, _ in bn_layers]
        self.enabled = True
        # Indexed by layer rather than appended, so the order is module order whatever the execution order.
        self._stats: list[BNStats | None] = [None] * len(bn_layers)
        for index, (name, module) in enumerate(bn_layers):
            self._handles.append(module.register_forward_pre_hook(self._recorder(index, name)))

    def _recorder(self, index: int, name: str):
        def hook(module: nn.BatchNorm1d | nn.BatchNorm2d, inputs: tuple) -> None:
            if not self.enabled:
                return
            x = inputs[0]
            dims = [d for d in range(x.dim()) if d != 1]  # all but channels: (N,), (N, L) or (N, H, W)
            var, mean = torch.var_mean(x, dims, correction=0)
            self._stats[index] = BNStats(name, mean, var, module.running_mean, module.running_var)
        return hook

    @property
    def stats(self) -> list[BNStats]:
        return [s for s in self._stats if s is not None]

    def clear(self) -> None:
        self._stats = [None] * len(self.layers)


@torch.no_grad()
def probe(module: nn.Module, inputs: torch.Tensor, forward=None, tap: FeatureTap | None = None,
          eval_mode: bool = True) -> tuple[torch.Tensor, dict[str, tuple[int, ...]]]:
    """One forward of a dummy batch, to learn shapes: ``module``'s output and the shapes
    (without the batch) of what ``tap`` records. In eval mode by default, so that no BatchNorm
    running statistic is touched; the module's mode is restored afterwards."""
    was_training = module.training
    if eval_mode:
        module.eval()
    try:
        output = (forward or (lambda m, x: m(x)))(module, inputs)
    finally:
        module.train(was_training)
    return output, ({path: tuple(f.shape[1:]) for path, f in tap.features.items()} if tap else {})


@torch.no_grad()
def embed(model: nn.Module, images: torch.Tensor, forward=None, batch: int | None = None
          ) -> tuple[torch.Tensor, torch.Tensor]:
    """``model``'s embedding of ``images`` (the input of its last Linear layer, as float32 rows)
    and its logits, from one forward pass per ``batch`` images (all at once by default);
    ``forward(model, x)`` runs the model (the run's AMP and memory format), by default it is called
    directly. The model's mode is the caller's."""
    features, logits = [], []
    with FeatureTap(model, [EMBEDDING]) as tap:
        for x in images.split(batch) if batch else (images,):
            logits.append(forward(model, x) if forward else model(x))
            features.append(tap.features[EMBEDDING].flatten(1).float())
    return torch.cat(features), torch.cat(logits)
