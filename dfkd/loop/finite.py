"""Non-finite losses, caught before they are saved: ``runtime.finite_check``."""
from __future__ import annotations

import torch

from dfkd.core.runs import world_size


def _agree(flags: torch.Tensor) -> torch.Tensor:
    """The minimum over ranks: every rank must take the same branch, or the next collective hangs."""
    if world_size() > 1:
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MIN)
    return flags


class FiniteCheck:
    """``step`` mode reads each phase step's total before its update (the host waits for the
    device each time); ``flush`` mode keeps, per phase and its terms, a flag on the device of
    whether every value since the last read was finite, and reads them all in one transfer."""

    def __init__(self, mode: str):
        self.mode = mode
        self.flags: dict[tuple[str, tuple[str, ...]], torch.Tensor] = {}
        self.since = 0  # the first iteration the flags cover

    def step(self, phase: str, values: dict[str, torch.Tensor], total: torch.Tensor) -> str | None:
        """After a phase step's loss: the problem to raise now, or None."""
        if self.mode == "flush":
            key = (phase, (*values, "total"))
            flags = torch.isfinite(torch.stack([*(v.detach().float() for v in values.values()), total.detach().float()]))
            seen = self.flags.get(key)
            self.flags[key] = flags if seen is None else seen & flags
            return None
        if _agree(torch.isfinite(total.detach()).float()):
            return None
        bad = [k for k, v in values.items() if not torch.isfinite(v)]
        return f"phase '{phase}': loss {', '.join(bad) or 'total'} is {float(total.detach())}"

    def read(self, step: int) -> str | None:
        """The flags since the last read (``step`` is the iteration being checked): the problem, or None."""
        keys, flags = list(self.flags), list(self.flags.values())
        self.flags, since, self.since = {}, self.since, step + 1
        if not keys:
            return None
        finite, offset = _agree(torch.cat(flags).float()).tolist(), 0
        for phase, names in keys:
            bad = [name for name, ok in zip(names, finite[offset:offset + len(names)]) if not ok]
            offset += len(names)
            if bad:
                named = [name for name in bad if name != "total"] or bad
                return (f"phase '{phase}': loss {', '.join(named)} was not finite at an iteration from {since} on "
                        "(runtime.finite_check=flush reads it every log_every iterations)")
        return None

    def reset(self, step: int) -> None:
        """After a rollback to iteration ``step``."""
        self.flags, self.since = {}, step
