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

from dfkd.core.io import atomic_write_text, open_append
from dfkd_base.errors import DfkdError, RunInUseError


def _environment_int(name: str, default: int, low: int) -> int:
    """An integer torchrun sets in the environment, checked: a malformed one is a one-line error."""
    text = os.environ.get(name)
    try:
        value = default if text is None else int(text)
    except ValueError:
        raise DfkdError(f"{name}={text!r} in the environment is not an integer (torchrun sets it)") from None
    if value < low:
        raise DfkdError(f"{name}={value} in the environment must be >= {low}")
    return value


def rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return _environment_int("RANK", 0, 0)


def world_size() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return _environment_int("WORLD_SIZE", 1, 1)


def mean_across_ranks(grad: torch.Tensor) -> torch.Tensor:
    """A gradient averaged over the processes of a torchrun job, as DDP averages its modules'."""
    grad = grad.clone()
    torch.distributed.all_reduce(grad)
    return grad / world_size()


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


# what dfkd writes in a run folder: none of it may be a link planted there (a folder received from
# someone else must not make dfkd write outside it)
RUN_FILES = ("config.yaml", "summary.json", "metrics.jsonl", ".lock", "ckpt", "audit", "audit.json", "audit.md",
             "audit_pairs.png", "figures", "teacher-reference", "samples-seen")


def check_run_folder(run_dir: Path) -> None:
    """A one-line error when something dfkd writes in ``run_dir`` is a symbolic link there."""
    for name in RUN_FILES:
        if (run_dir / name).is_symlink():
            raise DfkdError(f"{run_dir / name} is a symbolic link; dfkd does not write through links in a run "
                            f"folder (remove it)")


class RunLock:
    """A process's exclusive claim on a run folder while it trains there: ``flock`` on its ``.lock``
    file (the OS drops it when the process dies, so a killed run never leaves the folder locked).
    Claiming also removes what a kill during a checkpoint write left behind (``ckpt/.*.tmp``)."""

    def __init__(self, run_dir: Path | None):
        self.file = None
        if run_dir is None:
            return
        import fcntl

        self.file = open_append(run_dir / ".lock", "a+")
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
        self.purge_step = purge_step  # a resumed run's: what was logged from this step on is dropped
        self.descriptions: dict[str, str] = {}  # a chart's description, written with its first point
        self._described: set[str] = set()
        self._captioned: set[str] = set()
        if not self.enabled:
            return
        if purge_step is not None:  # a resumed run: drop what the killed run logged after its checkpoint
            _truncate_metrics(run_dir / "metrics.jsonl", purge_step)
        self._jsonl = open_append(run_dir / "metrics.jsonl")
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
                if tag in JSONL_ONLY:
                    continue
                if tag in self.descriptions and tag not in self._described:
                    self._described.add(tag)
                    self.writer._get_file_writer().add_summary(
                        _described_scalar(tag, float(value), self.descriptions[tag]), step)
                else:
                    self.writer.add_scalar(tag, float(value), step)

    def scalars_to(self, writer, step: int, values: dict[str, float]) -> None:
        """Scalars to another TensorBoard writer (a reference run beside this one), with the
        descriptions of their tags."""
        for tag, value in values.items():
            writer._get_file_writer().add_summary(_described_scalar(tag, float(value), self.descriptions.get(tag, "")),
                                                  step)

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

    def caption(self, tag: str, text: str) -> None:
        """A text that explains a chart: logged once per run (at step 0), not at each of its steps."""
        if self.writer is not None and tag not in self._captioned:
            self._captioned.add(tag)
            self.writer.add_text(tag, text, 0)

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


def _described_scalar(tag: str, value: float, description: str):
    """A scalar summary that carries its chart's description (TensorBoard shows it on the card)."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata

    return Summary(value=[Summary.Value(tag=tag, simple_value=value,
                                        metadata=SummaryMetadata(summary_description=description))])


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
    atomic_write_text(path, "".join(kept))


def read_metrics(run_dir: str | os.PathLike) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
