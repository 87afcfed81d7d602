"""Run folders and metric logging.

A run lives in ``runs/<experiment>/<YYYYmmdd-HHMMSS>_s<seed>/``::

    config.yaml      the resolved config (after _base_ and overrides)
    metrics.jsonl    one JSON object per logging event: {"step": ..., "<tag>": value, ...}
    events.out.*     TensorBoard events (scalars, sample grids, histograms)
    ckpt/last.pt     full training state (resume); ckpt/final.pt, ckpt/best.pt: model files

Only rank 0 of a torchrun job writes; other ranks get a logger that drops everything.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from dfkd_base.errors import RunInUseError


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main_process() -> bool:
    return rank() == 0


def new_run_dir(root: str | os.PathLike, experiment: str, seed: int) -> Path:
    """A fresh, unique run folder; never reuses (and so never overwrites) an existing one."""
    base = Path(root) / experiment
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(1000):
        path = base / (f"{stamp}_s{seed}" if i == 0 else f"{stamp}-{i}_s{seed}")
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"could not create a run folder under {base}")


class RunLock:
    """A process's exclusive claim on a run folder while it trains there: ``flock`` on its ``.lock``
    file (the OS drops it when the process dies, so a killed run never leaves the folder locked).
    Claiming also removes what a kill during a checkpoint write left behind (``ckpt/.*.tmp``)."""

    def __init__(self, run_dir: Path | None):
        self.file = None
        if run_dir is None:
            return
        import fcntl

        self.file = open(run_dir / ".lock", "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise RunInUseError(f"{run_dir} is in use by {holder}; wait for it to finish or stop it first") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"process {os.getpid()}")
        self.file.flush()
        for leftover in (run_dir / "ckpt").glob(".*.tmp"):
            leftover.unlink(missing_ok=True)

    def release(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


# Kept in metrics.jsonl (to find an epoch's row) but not drawn: against the step it is a straight line.
JSONL_ONLY = {"epoch"}


class MetricLogger:
    """Writes scalars to ``metrics.jsonl`` and TensorBoard, images and histograms to TensorBoard.

    Every call takes the global step explicitly: nothing is logged against an implicit counter.
    """

    def __init__(self, run_dir: Path | None, tensorboard: bool = True, purge_step: int | None = None):
        self.run_dir = run_dir
        self.enabled = run_dir is not None and is_main_process()
        self.writer = None
        self._jsonl = None
        if not self.enabled:
            return
        if purge_step is not None:  # a resumed run: drop what the killed run logged after its checkpoint
            _truncate_metrics(run_dir / "metrics.jsonl", purge_step)
        self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote after its last checkpoint
            self.writer = SummaryWriter(log_dir=str(run_dir), purge_step=purge_step)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled or not values:
            return
        clean = {k: (float(v) if math.isfinite(float(v)) else str(float(v))) for k, v in values.items()}
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        if self.writer is not None:
            for tag, value in values.items():
                if tag not in JSONL_ONLY:
                    self.writer.add_scalar(tag, float(value), step)

    def image_grid(self, step: int, tag: str, images: torch.Tensor, nrow: int = 8) -> None:
        """``images`` in [0, 1], (N, C, H, W)."""
        if self.writer is None:
            return
        from torchvision.utils import make_grid

        grid = make_grid(images.detach().float().clamp(0, 1).cpu(), nrow=nrow, padding=1, pad_value=1.0)
        self.writer.add_image(tag, grid, step)

    def histogram(self, step: int, tag: str, values: torch.Tensor, bins: Any = "auto") -> None:
        if self.writer is not None:
            self.writer.add_histogram(tag, values.detach().float().cpu(), step, bins=bins)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self._jsonl is not None:
            self._jsonl.close()
            self._jsonl = None


def _truncate_metrics(path: Path, purge_step: int) -> None:
    """Keep the rows logged before ``purge_step`` (and no half-written last line)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] < purge_step:
                kept.append(line + "\n")
        except (ValueError, KeyError):
            continue
    from dfkd.core.io import atomic_write_text

    atomic_write_text(path, "".join(kept))


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
