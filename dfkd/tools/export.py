"""ONNX export of a model file, a quantized one as an integer QDQ graph (brevitas' export), and
its check in ONNX Runtime beside the model: accuracy of each, agreement, largest logit difference
and CPU latency, beside the float network's."""
from __future__ import annotations

import warnings

import torch
from torch import nn

from dfkd.core.io import atomic_path
from dfkd.nets.arch import model_from_arch
from dfkd.nets.quant import fold_batchnorm, is_quantized
from dfkd_base.errors import ConfigError


def export_onnx(model: nn.Module, path, example: torch.Tensor) -> None:
    """Export ``model`` to ONNX at ``path``, atomically, with a dynamic batch size: a quantized
    model as QuantizeLinear/DequantizeLinear graphs (brevitas' QCDQ export), which ONNX Runtime
    runs with integer kernels on a CPU (every bit width must be ≤ 8); a float one as it is."""
    if is_quantized(model):
        bits = [model.quant["weights"], model.quant["acts"]] + [b for b in [model.quant.get("keep_first_last")] if b]
        if max(bits) > 8:
            raise ConfigError(f"ONNX integer export needs bit widths <= 8; this model has {max(bits)}-bit layers")
        if min(bits) < 2:  # brevitas exports no binary quantizer to QDQ
            raise ConfigError(f"ONNX integer export needs bit widths >= 2; this model has {min(bits)}-bit layers")
    names = dict(input_names=["images"], output_names=["logits"], keep_initializers_as_inputs=False,
                 dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    was_training = model.training
    model.eval().cpu()
    try:
        with atomic_path(path) as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if is_quantized(model):
                from brevitas.export import export_onnx_qcdq

                # the TorchScript exporter: brevitas' dynamo path does not export quantized biases
                export_onnx_qcdq(model, args=example[:1].cpu(), export_path=str(tmp), dynamo=False, **names)
            else:
                torch.onnx.export(model, (example[:1].cpu(),), str(tmp), dynamo=False, **names)
    finally:
        model.train(was_training)


def float_copy(model: nn.Module, arch: dict, allow_code: bool = False) -> nn.Module:
    """The float32 network with a quantized model's (latent) float weights: the fp32 reference
    its integer export is timed against."""
    copy = model_from_arch(arch, quantized=False, allow_code=allow_code)
    if model.quant.get("fold_bn"):
        fold_batchnorm(copy)
    copy.load_state_dict({k: v for k, v in model.state_dict().items() if k in copy.state_dict()})
    return copy.eval()


def onnx_check(path, model: nn.Module, loader, repeats: int = 20) -> dict:
    """Run the export at ``path`` in ONNX Runtime on every batch of ``loader`` beside ``model``, twice:
    as the graph says (graph optimizations off: QuantizeLinear, DequantizeLinear and float operators,
    the model's own arithmetic) and as ONNX Runtime deploys it (optimizations on: quantized graphs
    fused into integer kernels). For each: accuracy, the share of predictions that agree with the
    model's, the largest logit difference; and the deployed graph's median CPU latency for one batch
    (the loader's batch size) over ``repeats`` runs. The two can differ where ONNX Runtime's integer
    kernels saturate: its uint8 × int8 products pair up in 16-bit sums on x86-64 CPUs without VNNI,
    which its documentation names (and which reduced-range weights avoid)."""
    import time

    import onnxruntime as ort

    def session(level) -> "ort.InferenceSession":
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.log_severity_level = 3  # errors only
        options.graph_optimization_level = level
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    sessions = {"graph": session(ort.GraphOptimizationLevel.ORT_DISABLE_ALL),
                "deployed": session(ort.GraphOptimizationLevel.ORT_ENABLE_ALL)}
    model = model.eval().cpu()
    counts = {k: {"agree": 0, "correct": 0, "worst": 0.0} for k in sessions}
    correct_model = n = 0
    first = None
    with torch.no_grad():
        for images, labels, *_ in loader:
            images, labels = images.cpu(), labels.cpu()
            first = images if first is None else first
            ours = model(images)
            correct_model += int((ours.argmax(1) == labels).sum())
            n += len(labels)
            for kind, sess in sessions.items():
                theirs = torch.from_numpy(sess.run(None, {"images": images.numpy()})[0])
                c = counts[kind]
                c["worst"] = max(c["worst"], float((ours - theirs).abs().max()))
                c["agree"] += int((ours.argmax(1) == theirs.argmax(1)).sum())
                c["correct"] += int((theirs.argmax(1) == labels).sum())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        sessions["deployed"].run(None, {"images": first.numpy()})
        times.append(time.perf_counter() - t0)
    graph, deployed = counts["graph"], counts["deployed"]
    return {"n": n, "acc_torch": 100 * correct_model / n,
            "acc_onnx": 100 * graph["correct"] / n, "agreement": 100 * graph["agree"] / n,
            "max_logit_diff": graph["worst"],
            "acc_onnx_deployed": 100 * deployed["correct"] / n, "agreement_deployed": 100 * deployed["agree"] / n,
            "max_logit_diff_deployed": deployed["worst"],
            "latency_ms": 1000 * sorted(times)[len(times) // 2], "batch": len(first)}
