"""Quantized students: any network's convolutions and linear layers replaced by brevitas'
quantized layers, so a run trains, evaluates and exports a low-bit model.

Activations are quantized where they enter a weighted layer (brevitas' ``input_quant``), which
covers every architecture alike, whether its ReLUs are modules or functional calls. A layer whose
input is never negative (it follows a ReLU, found by one probe forward) gets an unsigned
quantizer, so its b bits give 2^b levels over [0, clip] instead of wasting half on negatives.

Quantizers (``quant.quantizer``):

* ``lsq``: learned step sizes (Esser et al. 2020) for weights and activations; weight steps start
  from max|w| (per output channel with ``per_channel``), activation steps from the 99.999th
  percentile of the first ``stats_steps`` training batches; brevitas' parameter-from-stats scaling.
* ``pact``: a learned activation clip value α (Choi et al. 2018) starting at ``clip_init``;
  weights scaled by their current max|w|, as PACT's DoReFa-style weights are not learned.
* ``minmax``: asymmetric min/max ranges with a zero point (ZeroQ's and GDFQ's quantizer):
  recomputed from the weights at each step (per output channel); for activations, the mean of
  the batch minima and maxima over the first ``stats_steps`` batches (or the calibration
  batches), then held fixed. GDFQ keeps updating the activation range as a moving average while
  it trains; brevitas has no running-statistics zero point, and a fixed range after the first
  batches is what post-training calibration gives.

Biases are kept at 32 bits with scale = input scale × weight scale, as integer inference engines
need. ``keep_first_last`` holds the first and last weighted layers (and their inputs) at that
many bits, the usual convention for 2- and 4-bit networks.
``quantize_input: false`` leaves the network's input, the first weighted layer's, in float (and
that layer's bias, which has no input step to be an integer of): ZeroQ's, GDFQ's and Qimera's
code quantize activations after the ReLUs only, so their first convolution sees the float image.

brevitas keeps the progress of its statistics (how many batches a range has seen, whether a
weight step was initialized) in plain attributes, not in the state dict; :func:`_track_progress`
saves them with the weights, so a resumed run continues exactly and a loaded model file never
re-initializes a learned step.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn

from dfkd.core.schema import check_quant
from dfkd_base.errors import ConfigError

# brevitas notes on every call that it computes no zero point for the accumulator it never
# returns here (return_quant_tensor is off), and calls a deprecated state_dict signature
warnings.filterwarnings("ignore", message="Computing zero point of output accumulator", module="brevitas")
warnings.filterwarnings("ignore", message="Positional args are being deprecated", category=FutureWarning)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm)


def _brevitas():
    # brevitas warns about optional kernels at import, and through torch's C++-extension module
    # logs that no CUDA runtime is found: neither concerns a user, so neither reaches their terminal
    extension_log = logging.getLogger("torch.utils.cpp_extension")
    level = extension_log.level
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extension_log.setLevel(logging.ERROR)
        try:
            import brevitas.nn as qnn
        finally:
            extension_log.setLevel(level)
        from brevitas import quant as bq
        from brevitas.inject.enum import ScalingImplType
    return qnn, bq, ScalingImplType


def _weight_quant(quantizer: str, bits: int, per_channel: bool):
    _, bq, Scaling = _brevitas()
    if quantizer == "minmax":
        base = bq.ShiftedUint8WeightPerChannelFloat if per_channel else bq.ShiftedUint8WeightPerTensorFloat
        return base.let(bit_width=bits)
    base = bq.Int8WeightPerChannelFloat if per_channel else bq.Int8WeightPerTensorFloat
    if bits == 1:  # a narrow 1-bit range holds only 0; the full one holds -1 and 0 (brevitas' integer grid)
        base = base.let(narrow_range=False)
    if quantizer == "lsq":
        return base.let(bit_width=bits, scaling_impl_type=Scaling.PARAMETER_FROM_STATS)
    return base.let(bit_width=bits)


def _act_quant(quantizer: str, bits: int, signed: bool, stats_steps: int, clip_init: float):
    _, bq, Scaling = _brevitas()
    if quantizer == "pact":
        if signed:
            return bq.Int8ActPerTensorFloatMinMaxInit.let(bit_width=bits, min_val=-clip_init, max_val=clip_init)
        return bq.Uint8ActPerTensorFloatMaxInit.let(bit_width=bits, max_val=clip_init)
    if quantizer == "minmax":
        from brevitas.core.stats import NegativeMinOrZero
        from brevitas.inject.enum import StatsOp
        return bq.ShiftedUint8ActPerTensorFloat.let(
            bit_width=bits, scaling_stats_op=StatsOp.MIN_MAX, zero_point_stats_impl=NegativeMinOrZero,
            collect_stats_steps=stats_steps)
    base = bq.Int8ActPerTensorFloat if signed else bq.Uint8ActPerTensorFloat
    return base.let(bit_width=bits, collect_stats_steps=stats_steps)


def _input_signs(model: nn.Module, input_shape: tuple[int, ...]) -> dict[str, bool]:
    """Whether each weighted layer's input can be negative, from one forward of a standard-normal
    batch in eval mode (nothing moves): a layer after a ReLU sees no negative value whatever the
    data, any other layer sees many."""
    signed, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            hooks.append(module.register_forward_pre_hook(
                lambda m, args, name=name: signed.__setitem__(name, signed.get(name, False) or bool((args[0] < 0).any()))))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.randn(8, *input_shape, generator=torch.Generator().manual_seed(0)))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return signed


def _check_quantizable(model: nn.Module) -> list[str]:
    """The paths of the weighted layers to quantize; a ConfigError naming the first module with
    weights of its own that no quantized layer replaces."""
    layers = []
    for name, module in model.named_modules():
        if type(module) in (nn.Conv2d, nn.Linear):
            layers.append(name)
        elif any(True for _ in module.parameters(recurse=False)) and not isinstance(module, _NORMS):
            raise ConfigError(f"quant: cannot quantize {name or 'the model'} ({type(module).__name__}); "
                              f"quantized layers exist for Conv2d and Linear (norm layers stay float)")
    if not layers:
        raise ConfigError("quant: the model has no Conv2d or Linear layer to quantize")
    return layers


def fold_batchnorm(model: nn.Module) -> int:
    """Fold each BatchNorm that directly follows a convolution (and is that convolution's only
    reader) into the convolution's weights and bias, replacing the BatchNorm by an identity.
    Pairs are found on an FX trace, so any traceable network folds. Returns the number folded."""
    import torch.fx
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # noqa: BLE001 — any tracing failure means: this network can't fold
        raise ConfigError(f"quant.fold_bn: the model can't be traced to find its conv-BN pairs "
                          f"({type(exc).__name__}); set fold_bn false") from None
    modules = dict(model.named_modules())
    folded = 0
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        source = node.args[0]
        if getattr(source, "op", None) != "call_module" or type(modules.get(source.target)) is not nn.Conv2d \
                or len(source.users) != 1:
            continue
        conv, bn = modules[source.target], modules[node.target]
        fused = fuse_conv_bn_eval(conv.eval(), bn.eval())
        conv.weight, conv.bias = fused.weight, fused.bias
        parent, _, leaf = node.target.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, nn.Identity())
        folded += 1
    return folded


class _EvalModeBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm that always normalizes with its running statistics and never updates them
    (GDFQ trains its quantized copy of the teacher in eval mode, keeping the teacher's statistics)."""

    def train(self, mode: bool = True):
        return super().train(False)


_PROGRESS_KEY = "quant_progress"


def _progress_fields(model: nn.Module):
    """brevitas' statistics progress: each quantizer's batch counter and whether its step was
    initialized, plain attributes that brevitas leaves out of the state dict."""
    for module in model.modules():
        for attr in ("counter", "init_done"):
            if isinstance(getattr(module, attr, None), (bool, int)):
                yield module, attr


def _unsaved_values(model: nn.Module, prefix: str):
    """(state-dict key, parameter) of each statistics-initialized step that has seen no batch
    yet: brevitas leaves it out of the state dict, so the file could not be loaded strictly."""
    for name, module in model.named_modules(prefix=prefix.rstrip(".")):
        fresh = getattr(module, "counter", None) == 0 or getattr(module, "init_done", None) is False
        if fresh and isinstance(getattr(module, "value", None), nn.Parameter):
            yield f"{name}.value" if name else "value", module.value


def _track_progress(model: nn.Module) -> None:
    """Save the progress fields with the weights (an int64 tensor under ``quant_progress``) and
    restore them after a load, so that a resumed run continues exactly and a loaded model never
    re-initializes a learned step (brevitas marks every loaded step as initialized). A range still
    collecting statistics also keeps its running buffer and its parameter as they are: brevitas
    saves the buffer in the parameter's place, which loses the parameter and restarts the mean."""
    def collecting(m) -> bool:
        return hasattr(m, "buffer") and isinstance(getattr(m, "value", None), nn.Parameter) \
            and 0 < m.counter <= m.collect_stats_steps

    def save(module, state_dict, prefix, local_metadata):
        fields = list(_progress_fields(module))
        state_dict[prefix + _PROGRESS_KEY] = torch.tensor([int(getattr(m, a)) for m, a in fields], dtype=torch.int64)
        for i, (m, attr) in enumerate(fields):
            if attr == "counter" and collecting(m):
                state_dict[f"{prefix}{_PROGRESS_KEY}.{i}.buffer"] = m.buffer.detach().clone()
                state_dict[f"{prefix}{_PROGRESS_KEY}.{i}.value"] = m.value.detach().clone()
        for key, value in _unsaved_values(module, prefix):
            state_dict.setdefault(key, value.detach().clone())

    pending = {}

    def take(module, state_dict, prefix, *args):
        for key in [k for k in state_dict if k.startswith(prefix + _PROGRESS_KEY)]:
            pending[key[len(prefix + _PROGRESS_KEY):]] = state_dict.pop(key)

    def restore(module, incompatible_keys):
        values = pending.pop("", None)
        if values is None:
            return
        fields = list(_progress_fields(module))
        for (m, attr), v in zip(fields, values.tolist()):
            setattr(m, attr, type(getattr(m, attr))(v))
        if module.quant["quantizer"] == "minmax":  # the rebuilt activation ranges are held fixed again
            for _, layer in quantized_layers(module):
                layer.input_quant.requires_grad_(False)
        with torch.no_grad():
            for i, (m, attr) in enumerate(fields):
                if f".{i}.buffer" in pending:
                    m.buffer.copy_(pending.pop(f".{i}.buffer"))
                    m.value.copy_(pending.pop(f".{i}.value"))
        pending.clear()

    model.register_state_dict_post_hook(save)
    model.register_load_state_dict_pre_hook(take)
    model.register_load_state_dict_post_hook(restore)


def quantize(model: nn.Module, quant: dict[str, Any], input_shape: tuple[int, ...]) -> nn.Module:
    """Replace ``model``'s Conv2d and Linear layers (in place) by brevitas' quantized layers as
    ``quant`` says (see the module docstring), keeping their weights; returns the model, which
    records its settings as ``model.quant``."""
    check_quant(quant, "quant")
    qnn, bq, _ = _brevitas()
    if quant.get("fold_bn"):
        fold_batchnorm(model)
    layers = _check_quantizable(model)
    signed = _input_signs(model, input_shape)
    ends = {layers[0], layers[-1]}
    for path in layers:
        float_layer = model.get_submodule(path)
        bits = quant["weights"], quant["acts"]
        if path in ends and quant.get("keep_first_last"):
            bits = quant["keep_first_last"], quant["keep_first_last"]
        kwargs = dict(weight_quant=_weight_quant(quant["quantizer"], bits[0], quant["per_channel"]),
                      input_quant=_act_quant(quant["quantizer"], bits[1], signed.get(path, True),
                                             quant["stats_steps"], quant["clip_init"]),
                      bias_quant=bq.Int32Bias if float_layer.bias is not None else None)
        if path == layers[0] and not quant.get("quantize_input", True):
            kwargs.update(input_quant=None, bias_quant=None)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if isinstance(float_layer, nn.Conv2d):
                layer = qnn.QuantConv2d(
                    float_layer.in_channels, float_layer.out_channels, float_layer.kernel_size,
                    stride=float_layer.stride, padding=float_layer.padding, dilation=float_layer.dilation,
                    groups=float_layer.groups, bias=float_layer.bias is not None,
                    padding_mode=float_layer.padding_mode, **kwargs)
            else:
                layer = qnn.QuantLinear(float_layer.in_features, float_layer.out_features,
                                        bias=float_layer.bias is not None, **kwargs)
        with torch.no_grad():
            layer.weight.copy_(float_layer.weight)
            if float_layer.bias is not None:
                layer.bias.copy_(float_layer.bias)
        if quant["quantizer"] == "minmax":  # activation ranges stay where their statistics put them
            layer.input_quant.requires_grad_(False)
        layer.to(float_layer.weight.device)
        parent, _, leaf = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, leaf, layer)
    if quant.get("freeze_bn"):
        for path, module in list(model.named_modules()):
            if type(module) is nn.BatchNorm2d:
                frozen = _EvalModeBatchNorm2d(module.num_features, module.eps, module.momentum, module.affine,
                                              module.track_running_stats).to(next(module.buffers()).device)
                frozen.load_state_dict(module.state_dict())
                parent, _, leaf = path.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, leaf, frozen)
    _track_progress(model)
    model.quant = dict(quant)
    return model


def quantized_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    qnn, _, _ = _brevitas()
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (qnn.QuantConv2d, qnn.QuantLinear))]


def is_quantized(model: nn.Module) -> bool:
    return getattr(model, "quant", None) is not None


def model_bytes(model: nn.Module) -> tuple[int, int]:
    """(bytes at the model's bit widths, bytes in float32): quantized weights at their bit width,
    everything else (biases at 32 bits, norm layers, learned steps) at 4 bytes per value."""
    float_bytes = 4 * sum(p.numel() for p in model.parameters())
    if not is_quantized(model):
        return float_bytes, float_bytes
    weight_bits = {id(m.weight): m.weight_quant.bit_width() for _, m in quantized_layers(model)}
    total_bits = sum(p.numel() * int(weight_bits[id(p)]) if id(p) in weight_bits else 32 * p.numel()
                     for p in model.parameters())
    return (total_bits + 7) // 8, float_bytes


@torch.no_grad()
def calibrate(model: nn.Module, batches) -> int:
    """Post-training calibration: the activation ranges from ``batches`` (an iterable of input
    tensors) with quantization off while they are collected, then fixed (brevitas'
    calibration mode). Weight ranges come from the weights themselves. Returns the batch count."""
    from brevitas.graph.calibrate import calibration_mode

    was_training = model.training
    model.eval()
    n = 0
    with calibration_mode(model):
        for x in batches:
            model(x)
            n += 1
    model.train(was_training)
    return n


def quant_summary(quant: dict[str, Any] | None) -> str:
    if not quant:
        return "float32"
    ends = f", first/last {quant['keep_first_last']}-bit" if quant.get("keep_first_last") else ""
    if not quant.get("quantize_input", True):
        ends += ", float input"
    return f"W{quant['weights']}A{quant['acts']} {quant['quantizer']}{ends}"


@torch.no_grad()
def quant_inspection(model: nn.Module, x: torch.Tensor) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """What TensorBoard shows of a quantized model on batch ``x``: per layer, the weight and input
    steps (scales), the input clip value (the largest representable input), the fraction of inputs
    clipped; and histograms of the weight and input quantization errors (quantized − float)."""
    scalars, histograms, seen = {}, {}, {}
    hooks = []
    layers = quantized_layers(model)
    for path, layer in layers:
        def keep(module, args, output, path=path):
            seen[path] = (args[0].detach(), (output.value if hasattr(output, "value") else output).detach())
        hooks.append(layer.input_quant.register_forward_hook(keep))
    was_training = model.training
    model.eval()
    try:
        model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    for path, layer in layers:
        qw = layer.quant_weight()
        scalars[f"quant/weight_step/{path}"] = float(qw.scale.float().mean())
        histograms[f"quant/weight_error/{path}"] = (qw.value - layer.weight).detach().flatten()
        if path in seen and layer.input_quant.is_quant_enabled:
            inp, out = seen[path]
            scale = layer.input_quant.scale()
            zero = layer.input_quant.zero_point()
            bits = layer.input_quant.bit_width()
            signed = layer.input_quant.is_signed
            top = (2 ** (bits - 1) - 1) if signed else (2 ** bits - 1)
            clip = float((top - zero) * scale)
            scalars[f"quant/input_step/{path}"] = float(scale)
            scalars[f"quant/input_clip/{path}"] = clip
            error = out - inp
            scalars[f"quant/clipped_fraction/{path}"] = float((error.abs() > scale / 2 + 1e-6).float().mean())
            histograms[f"quant/input_error/{path}"] = error.flatten()
    return scalars, histograms
