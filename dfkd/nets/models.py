"""``create_model(name, ...)``: any network a run trains or distils, by name. Names are those
registered in :data:`MODELS` (the zoo, :mod:`dfkd.nets.zoo`), ``wrn<depth>_<width>``,
``tv:<torchvision name>``, ``timm:<timm name>``, or a user's own class or factory,
``package.module:Name`` (or ``path/to/file.py:Name``), which is imported only with consent
(``allow_code``); options named after a registered wrapper (:data:`MODEL_WRAPPERS`, such as
``exits``) wrap the built network.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import sys
from functools import partial
from typing import Any, Callable

import torch.nn as nn
import torchvision

from dfkd_base.errors import ConfigError, UnknownNameError
from dfkd_base.registry import Registry, unknown_name_message

MODELS = Registry("model", locations=("dfkd.nets.zoo",))
# Model wrappers by option name: ``create_model(name, ..., <option>=value)`` builds the network,
# then ``wrapper(model, value)`` (a multi-exit student, say). The option is one of the
# model's kwargs, so a model file's ``arch`` records it and ``load_model`` rebuilds the wrapped
# network: a new student form is a registered wrapper, with no edit to the loop or checkpoints.
MODEL_WRAPPERS: Registry[Callable[[nn.Module, Any], nn.Module]] = Registry("model wrapper",
                                                                          locations=("dfkd.nets.exits",))

TORCHVISION_PREFIX = "tv:"
TIMM_PREFIX = "timm:"
WRN_PATTERN = re.compile(r"wrn[_-]?(\d+)[_-](\d+)")  # wrn16_2, wrn_16_2, wrn-16-2


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out) convolutions and identity BatchNorm, as in the ResNet papers."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _torchvision_model(name: str, in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
                       **options) -> nn.Module:
    """A torchvision classifier built without weights unless ``weights=`` is given; if ``in_channels``
    differs from the model's, its first convolution is replaced by a freshly initialised one
    (pretrained first-layer weights cannot carry over to another channel count).
    """
    available = torchvision.models.list_models(module=torchvision.models)  # classifiers only
    if name not in available:
        raise UnknownNameError(unknown_name_message("torchvision model", name, available))
    options.setdefault("weights", None)
    model = torchvision.models.get_model(name, num_classes=num_classes, **options)
    # Every torchvision classifier starts with a Conv2d (a stem or a ViT/Swin patch embedding).
    path, first = next((p, m) for p, m in model.named_modules() if isinstance(m, nn.Conv2d))
    if first.in_channels != in_channels:
        replacement = nn.Conv2d(in_channels, first.out_channels, first.kernel_size, first.stride, first.padding,
                                first.dilation, first.groups, first.bias is not None, first.padding_mode)
        init_weights(replacement)
        parent, _, attribute = path.rpartition(".")
        setattr(model.get_submodule(parent), attribute, replacement)
    return model


def _timm_model(name: str, in_channels: int = 3, num_classes: int = 10, image_size: int = 32, **options) -> nn.Module:
    """A timm model, never with downloaded weights: ``timm.create_model(name, pretrained=False,
    num_classes, in_chans)``; its weights come from a model file or an import."""
    import timm

    if name not in timm.list_models():
        raise UnknownNameError(unknown_name_message("timm model", name, timm.list_models()))
    if options.pop("pretrained", False):
        raise ConfigError(f"timm:{name}: pretrained weights are never downloaded here; import your weights instead")
    try:
        return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_channels, **options)
    except TypeError as error:
        raise ConfigError(f"timm:{name}: {error}") from None


def is_code(name: str) -> bool:
    """Whether ``name`` names a user's class or factory (``module:Name``) rather than a known model."""
    return ":" in name and not name.startswith((TORCHVISION_PREFIX, TIMM_PREFIX))


def code_object(spec: str, allow_code: bool):
    """The class or factory ``spec`` names: ``package.module:Name`` (importable, the current folder
    included) or ``path/to/file.py:Name``. Importing it runs the user's code, so it needs consent."""
    if not allow_code:
        raise ConfigError(f"'{spec}' names code to import, which runs it; importing a user's module is an explicit "
                          f"act: give --allow-code (teacher.allow_code: true in a config) if you trust it")
    where, _, attribute = spec.rpartition(":")
    try:
        if where.endswith(".py"):
            if not os.path.isfile(where):
                raise ModuleNotFoundError(f"no file {where}")
            module_spec = importlib.util.spec_from_file_location(os.path.basename(where)[:-3], where)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:  # as `python -m` would find it
                sys.path.append(os.getcwd())
            module = importlib.import_module(where)
        obj = module
        for part in attribute.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError, SyntaxError) as error:
        raise ConfigError(f"'{spec}' does not resolve: {type(error).__name__}: {error}") from None
    if not callable(obj):
        raise ConfigError(f"'{spec}' is a {type(obj).__name__}, not a class or factory")
    return obj


def _code_model(spec: str, in_channels: int, num_classes: int, image_size: int, allow_code: bool,
                **options) -> nn.Module:
    """A user's network: ``Name(**options)``, given the input's channels, classes and size too under
    whichever of the names ``in_channels``, ``in_chans``, ``num_classes`` and ``image_size`` it takes."""
    factory = code_object(spec, allow_code)
    try:
        accepted = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        accepted = {}
    given = {"in_channels": in_channels, "in_chans": in_channels, "num_classes": num_classes, "image_size": image_size}
    kwargs = {k: v for k, v in given.items() if k in accepted and k not in options}
    try:
        model = factory(**kwargs, **options)
    except TypeError as error:
        raise ConfigError(f"'{spec}': {error}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"'{spec}' made a {type(model).__name__}, not a torch.nn.Module")
    return model


def list_models() -> list[str]:
    """Registered names plus the parsed families."""
    return MODELS.names() + ["wrn<depth>_<width>", f"{TORCHVISION_PREFIX}<torchvision name>",
                             f"{TIMM_PREFIX}<timm name>", "<package.module>:<Name> (with --allow-code)"]


def create_model(name: str, in_channels: int = 3, num_classes: int = 10, image_size: int = 32,
                 allow_code: bool = False, **kwargs) -> nn.Module:
    """Build a model by name: a registered name, ``wrn<depth>_<width>``, ``tv:<torchvision name>``,
    ``timm:<timm name>`` or a user's ``module:Name`` (imported only when ``allow_code``).

    ``kwargs`` are model options (``width_mult``, ``dropout``, ``weights`` ...); an option the
    model does not take is a ConfigError. Options named after a registered wrapper
    (``MODEL_WRAPPERS``) wrap the built network, in the order given.
    """
    wrappers = {key: kwargs.pop(key) for key in list(kwargs) if key in MODEL_WRAPPERS}
    if is_code(name):
        model = _code_model(name, in_channels, num_classes, image_size, allow_code, **kwargs)
    else:
        model = _create_network(name, in_channels, num_classes, image_size, **kwargs)
    for key, option in wrappers.items():
        wrapper = MODEL_WRAPPERS.get(key)
        # a wrapper that sizes layers by probing the network says so by taking the input's shape
        shape = {"input_shape": (in_channels, image_size, image_size)} \
            if "input_shape" in inspect.signature(wrapper).parameters else {}
        model = wrapper(model, option, **shape)
    return model


def _create_network(name: str, in_channels: int, num_classes: int, image_size: int, **kwargs) -> nn.Module:
    if name.startswith(TORCHVISION_PREFIX):
        return _torchvision_model(name[len(TORCHVISION_PREFIX):], in_channels, num_classes, image_size, **kwargs)
    if name.startswith(TIMM_PREFIX):
        return _timm_model(name[len(TIMM_PREFIX):], in_channels, num_classes, image_size, **kwargs)
    wrn = WRN_PATTERN.fullmatch(name)
    if wrn:
        factory = partial(MODELS.get("wrn"), int(wrn[1]), int(wrn[2]))
    elif name in MODELS:
        factory = MODELS.get(name)
    else:
        raise UnknownNameError(unknown_name_message("model", name, list_models()))
    arguments = dict(in_channels=in_channels, num_classes=num_classes, image_size=image_size, **kwargs)
    try:
        inspect.signature(factory).bind(**arguments)
    except TypeError as error:
        raise ConfigError(f"model '{name}': {error}") from None
    return factory(**arguments)
