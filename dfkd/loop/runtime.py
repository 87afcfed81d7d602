"""Where and how networks run: device, process group, mixed precision, memory format, seeds.

One :class:`Runtime` per run is the service every part uses to run a network (``forward``) and
to place one (``prepare``), so AMP and channels_last are decided in one place.
"""
from __future__ import annotations

import atexit
import contextlib
import datetime
import os
import random

import torch
from torch import nn

from dfkd.core.runs import rank, world_size
from dfkd.core.schema import RuntimeConfig
from dfkd_base.errors import ConfigError, DfkdError, first_line


def resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device '{spec}' asked for, but CUDA is not available on this machine")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"runtime.device '{spec}': this machine has {torch.cuda.device_count()} CUDA devices")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"runtime.device '{spec}' asked for, but this torch build or machine has no MPS device")
    return device


def amp_dtype(spec: str, device: torch.device) -> torch.dtype | None:
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[spec]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA too


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def init_distributed(device: torch.device, timeout_s: float = 300.0) -> torch.device:
    """Join the process group that torchrun describes in the environment (WORLD_SIZE, RANK,
    LOCAL_RANK, MASTER_ADDR/PORT), one GPU per process, gloo on CPU. Returns this process's
    device (``cuda:LOCAL_RANK`` under torchrun on CUDA). Peers that have not joined within
    ``timeout_s`` are a one-line error, not a wait without end."""
    if world_size() == 1 or torch.distributed.is_initialized():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    try:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(seconds=timeout_s))
    except (torch.distributed.DistError, ValueError) as error:
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        raise DfkdError(f"rank {rank()} of {world_size()}: the process group at {where} did not form within "
                        f"{timeout_s:g} s ({first_line(error)[:120]}); start every rank with torchrun") from None
    # one group for the life of the process: a second engine in the same job (teacher, then
    # student) reuses it, since re-creating a group against torchrun's store hangs
    atexit.register(torch.distributed.destroy_process_group)
    return device


def broadcast_from_rank0(value):
    """Rank 0's ``value`` on every rank (a picklable object); the value itself in one process."""
    if world_size() == 1:
        return value
    shared = [value]
    torch.distributed.broadcast_object_list(shared, src=0)
    return shared[0]


class Runtime:
    """The device and numerics of a run. ``synthesis`` tells the channels_last default: on CUDA,
    and on CPU for synthesis, where the generator's upsampling convs run 2-4x faster in it
    (measured with oneDNN); plain LeNet training gains nothing from it on CPU."""

    def __init__(self, cfg: RuntimeConfig, synthesis: bool = False):
        self.device = init_distributed(resolve_device(cfg.device), cfg.rendezvous_timeout_s)
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        if cfg.deterministic:
            torch.use_deterministic_algorithms(True)
        self.amp_dtype = amp_dtype(cfg.amp, self.device)
        self.channels_last = (self.device.type == "cuda" or synthesis) if cfg.channels_last == "auto" \
            else cfg.channels_last
        # on CPU reading a flag costs nothing; on an accelerator it stalls the queue of launched work
        self.finite_check = cfg.finite_check if cfg.finite_check != "auto" else \
            "step" if self.device.type == "cpu" else "flush"

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def forward(self, module: nn.Module, images: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            return module(images)

    def prepare(self, module: nn.Module) -> nn.Module:
        """``module`` on the device, in the run's memory format."""
        module = module.to(self.device)
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling, on for fp16 only (bf16 has float32's range)."""
        return torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
