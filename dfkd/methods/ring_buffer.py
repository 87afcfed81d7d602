"""The one ring buffer: rows kept across steps for replay, the newest replacing the oldest once
it is full (FIFO). Synthesis keeps its images and their classes in one (the image pool),
SpaceshipNet the generator features of every level, CMI's contrastive term its memory bank."""
from __future__ import annotations

import torch


class RingBuffer:
    """``capacity`` rows of named columns on ``device``. A column's storage is made at its first
    rows, with their shape (float32 for floating point, else their own dtype); a column given as
    None is filled with -1 (the class of an unlabeled row)."""

    def __init__(self, capacity: int, device: torch.device | str):
        self.capacity, self.device = capacity, torch.device(device)
        self.columns: dict[str, torch.Tensor] = {}
        self.count = 0      # filled rows
        self.cursor = 0     # the next row to write

    def __len__(self) -> int:
        return self.count

    def add(self, **rows: torch.Tensor | None) -> None:
        """Append rows (the same number in every column given; the newest ``capacity`` when more)."""
        n = min(min(len(x) for x in rows.values() if x is not None), self.capacity)
        index = (self.cursor + torch.arange(n, device=self.device)) % self.capacity
        for name, x in rows.items():
            if x is None:
                self._column(name, (), torch.long, fill=-1)[index] = -1
                continue
            x = x.detach()[-n:]
            column = self._column(name, tuple(x.shape[1:]), torch.float if x.is_floating_point() else x.dtype)
            column[index] = x.to(self.device, column.dtype)
        self.cursor = (self.cursor + n) % self.capacity
        self.count = min(self.capacity, self.count + n)

    def _column(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, fill: int | None = None) -> torch.Tensor:
        if name not in self.columns:
            size = (self.capacity, *shape)
            self.columns[name] = torch.empty(size, dtype=dtype, device=self.device) if fill is None \
                else torch.full(size, fill, dtype=dtype, device=self.device)
        return self.columns[name]

    def random_index(self, n: int) -> torch.Tensor:
        """``n`` filled rows drawn uniformly, with replacement."""
        return torch.randint(self.count, (n,), device=self.device)

    def rows(self, name: str, index: torch.Tensor) -> torch.Tensor:
        return self.columns[name][index]

    def state_dict(self) -> dict:
        return {**{name: column[: self.count].cpu() for name, column in self.columns.items()}, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        columns = {name: x for name, x in state.items() if name != "cursor"}
        n = 0
        for name, x in columns.items():
            self._column(name, tuple(x.shape[1:]), x.dtype)[: len(x)] = x.to(self.device)
            n = len(x)
        self.count, self.cursor = n, state["cursor"]
