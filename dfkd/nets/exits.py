"""Be Your Own Teacher's exits on any classifier, attached by hooks: the ``exits`` model wrapper
(``net.kwargs: {exits: {layers: [...]}}``), which a model file's ``arch`` records like any option."""
from __future__ import annotations

import torch
import torch.nn as nn

from dfkd.nets.models import MODEL_WRAPPERS
from dfkd.nets.taps import embedding_layer, resolve_module
from dfkd_base.errors import ConfigError, ShapeError


class _Exit(nn.Module):
    """An auxiliary exit: a 1x1 bottleneck (conv, BN, ReLU) to ``width`` channels, global average
    pooling (its feature vector), and a linear classifier."""

    def __init__(self, channels: int, width: int, num_classes: int):
        super().__init__()
        self.bottleneck = nn.Sequential(nn.Conv2d(channels, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feature = self.bottleneck(x).mean((2, 3))
        return self.fc(feature), feature


class ExitNet(nn.Module):
    """Be Your Own Teacher's structure (Zhang et al. 2019) on any classifier: auxiliary exits on
    the stages at ``layers`` (module paths, shallow to deep), attached by forward hooks, so the
    network is not edited; each exit's feature has an adapter (Linear) to the network's own
    penultimate features, which the deepest classifier reads. ``forward`` returns the network's
    logits, as any classifier's, and leaves the exits' ``exit_logits``, ``exit_features`` and the
    ``deep_feature`` of the same batch on the module. ``net.kwargs: {exits: {layers: [...],
    width: W}}`` builds it (``width`` defaults to the penultimate features' size)."""

    def __init__(self, network: nn.Module, option: dict | list, input_shape: tuple[int, int, int]):
        super().__init__()
        option = {"layers": option} if isinstance(option, list) else dict(option)
        layers, width = option.pop("layers", None), option.pop("width", None)
        if not layers or option:
            raise ConfigError(f"exits takes 'layers' (module paths, shallow to deep) and optionally 'width'; got "
                              f"{dict(option, layers=layers)}")
        self.network, self.layers = network, list(layers)
        self._maps: dict[str, torch.Tensor] = {}
        for path in self.layers:
            resolve_module(network, path).register_forward_hook(self._keep(path))
        classifier = resolve_module(network, embedding_layer(network))
        classifier.register_forward_hook(lambda m, inputs, output: self._maps.__setitem__("<deep>", inputs[0]))
        was_training = network.training
        with torch.no_grad():
            network.eval()(torch.zeros(1, *input_shape))
        network.train(was_training)
        deep = classifier.in_features
        width = width or deep
        self.exits = nn.ModuleList(_Exit(self._maps[p].shape[1], width, classifier.out_features) for p in self.layers)
        self.adapters = nn.ModuleList(nn.Linear(width, deep) for _ in self.layers)
        self.exit_logits: list[torch.Tensor] = []
        self.exit_features: list[torch.Tensor] = []
        self.deep_feature: torch.Tensor | None = None

    def _keep(self, path: str):
        def hook(module, inputs, output):
            if output.dim() != 4:
                raise ShapeError(f"exits: '{path}' gives {tuple(output.shape[1:])}, not a feature map (C, H, W)")
            self._maps[path] = output
        return hook

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.network(x)
        outputs = [exit(self._maps[p]) for exit, p in zip(self.exits, self.layers)]
        self.exit_logits = [z for z, _ in outputs]
        self.exit_features = [f for _, f in outputs]
        self.deep_feature = self._maps["<deep>"].flatten(1)
        self._maps = {}
        return logits


MODEL_WRAPPERS.register("exits")(ExitNet)
