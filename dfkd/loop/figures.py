"""The charts a run shows, drawn with matplotlib: class counts, per-class accuracy and agreement,
confusion matrices, labeled sample grids, what the teacher responds to, and the search's Pareto
front. Each function takes plain numbers or image tensors and returns a ``Figure`` (no pyplot
state); :func:`figure_to_png` renders one. They are sized to stay legible in a TensorBoard image
card (350 px wide by default): 350-450 px, few columns, large type.
"""
from __future__ import annotations

import functools
import io
import textwrap
from typing import Sequence

import torch
from matplotlib.figure import Figure

FONT = 13          # points: legible after TensorBoard scales a figure into its card (350 px by default)
DPI = 80
TEACHER_COLOUR, STUDENT_COLOUR, AGREEMENT_COLOUR = "#7f7f7f", "#1f77b4", "#ff7f0e"


def _figure(width: float, height: float, left: float = 0.13, bottom: float = 0.14) -> Figure:
    """A figure with fixed margins (a layout engine costs more than the drawing of these charts)."""
    figure = Figure(figsize=(width, height), dpi=DPI)
    figure.subplots_adjust(left=left, right=0.97, bottom=bottom, top=0.86)
    return figure


MANY_CLASSES = 40  # past this many, names under an axis are unreadable (and slow to draw): indices instead


def _class_ticks(axes, names: Sequence[str]) -> None:
    """Class names under the x axis, slanted when they are words rather than digits; class indices
    when there are too many classes to name."""
    if len(names) > MANY_CLASSES:
        axes.set_xlabel(f"class index (of {len(names)})", fontsize=FONT - 2)
        return
    long = max((len(n) for n in names), default=0) > 3 or len(names) > 12
    axes.set_xticks(list(range(len(names))), [short(n, 10) for n in names], fontsize=FONT - 2,
                    rotation=35 if long else 0, ha="right" if long else "center", rotation_mode="anchor")


def _bottom(names: Sequence[str]) -> float:
    if len(names) > MANY_CLASSES:
        return 0.15
    return 0.27 if max((len(n) for n in names), default=0) > 3 or len(names) > 12 else 0.13


def short(name: str, length: int = 14) -> str:
    return name if len(name) <= length else name[: length - 1] + "…"


@functools.lru_cache(maxsize=None)
def colormap(name: str | None = None):
    """The colormap ``name`` (default: matplotlib's), resolved once: ``imshow`` given a name copies the
    colormap at every call (3 ms each), most of the time of a grid of 100 small pictures."""
    import matplotlib

    return matplotlib.colormaps[name or matplotlib.rcParams["image.cmap"]]


def _picture(axes, image: torch.Tensor, cmap: str | None = None) -> None:
    """One (C, H, W) image in [0, 1] (or an (H, W) map) without ticks or frame."""
    x = image.detach().float().cpu().clamp(0, 1)
    if x.dim() == 3:  # one channel grey, three in colour, any other count: its first channel
        x = x.permute(1, 2, 0) if x.shape[0] == 3 else x[0]
    axes.imshow(x.numpy(), cmap=colormap(cmap or ("gray" if x.dim() == 2 else None)), vmin=0, vmax=1,
                interpolation="nearest")
    axes.set_xticks([]), axes.set_yticks([])
    for spine in axes.spines.values():
        spine.set_visible(False)


def class_counts(counts: Sequence[int], names: Sequence[str], title: str) -> Figure:
    """A labeled bar per class: how many samples of a batch the teacher assigns to it."""
    figure = _figure(5.5, 3.8, bottom=_bottom(names))
    axes = figure.add_subplot()
    axes.bar(range(len(counts)), counts, color=STUDENT_COLOUR)
    _class_ticks(axes, names)
    axes.set_ylabel("samples", fontsize=FONT)
    axes.set_title(title, fontsize=FONT, wrap=True)
    axes.tick_params(labelsize=FONT - 2)
    return figure


def per_class_scores(accuracy: Sequence[float], agreement: Sequence[float] | None, names: Sequence[str],
                     title: str) -> Figure:
    """Per class (of the true label): the student's accuracy and, beside it, how often it predicts
    what the teacher predicts, in %."""
    figure = _figure(5.5, 3.8, bottom=_bottom(names))
    axes = figure.add_subplot()
    width = 0.4 if agreement is not None else 0.8
    positions = torch.arange(len(accuracy)).float()
    axes.bar((positions - width / 2 if agreement is not None else positions).tolist(), accuracy, width,
             color=STUDENT_COLOUR, label="accuracy")
    if agreement is not None:
        axes.bar((positions + width / 2).tolist(), agreement, width, color=AGREEMENT_COLOUR,
                 label="agrees with the teacher")
        axes.legend(fontsize=FONT - 3, loc="upper center", ncols=2, frameon=False)
    _class_ticks(axes, names)
    axes.set_ylim(0, 115 if agreement is not None else 100)  # room for the legend above 100%
    axes.set_yticks(range(0, 101, 20))
    axes.set_ylabel("%", fontsize=FONT)
    axes.set_title(title, fontsize=FONT, wrap=True)
    axes.tick_params(labelsize=FONT - 2)
    return figure


def confusion(matrix: torch.Tensor, names: Sequence[str], title: str) -> Figure:
    """A confusion matrix (rows: true class, columns: predicted), each row as % of its class,
    the counts written in the cells when there are few classes."""
    long = max((len(n) for n in names), default=0) > 3
    figure = _figure(5.6, 5.4, left=0.27 if long else 0.14, bottom=_bottom(names))
    axes = figure.add_subplot()
    rows = matrix.float() / matrix.sum(1, keepdim=True).clamp_min(1)
    shown = axes.imshow((100 * rows).numpy(), cmap=colormap("Blues"), vmin=0, vmax=100)
    ticks = list(range(len(names)))
    _class_ticks(axes, names)
    axes.set_yticks(ticks, [short(n, 10) for n in names], fontsize=FONT - 2)
    axes.set_xlabel("predicted", fontsize=FONT)
    axes.set_ylabel("true class", fontsize=FONT)
    axes.set_title(title, fontsize=FONT, wrap=True)
    if len(names) <= 12:
        for i in ticks:
            for j in ticks:
                if matrix[i, j]:
                    axes.text(j, i, str(int(matrix[i, j])), ha="center", va="center", fontsize=FONT - 4,
                              color="white" if rows[i, j] > 0.5 else "black")
    figure.colorbar(shown, ax=axes, shrink=0.8, label="% of the true class")
    return figure


EMPTY = "empty"   # a cell of a table drawn dark: a class with fewer samples than columns


def _rgb(cell):
    """A table cell as an RGB array: a (C, H, W) image in [0, 1] (grey, colour, or its first
    channel), an (H, W) saliency map as a heat map, or EMPTY as dark grey."""
    import matplotlib
    import numpy as np

    if isinstance(cell, str):
        return np.full((4, 4, 3), 0.25)
    x = cell.detach().float().cpu().clamp(0, 1)
    if x.dim() == 2:
        return matplotlib.colormaps["inferno"](x.numpy())[..., :3]
    x = x.permute(1, 2, 0) if x.shape[0] == 3 else x[0].unsqueeze(-1).expand(-1, -1, 3)
    return x.numpy()


def table(cells: Sequence[Sequence], title: str, row_labels: Sequence[str] | None = None,
          column_labels: Sequence[str] | None = None, captions: Sequence[Sequence[str]] | None = None,
          cell: int = 64) -> Figure:
    """A table of pictures drawn at ``cell`` px each, one axes in pixel coordinates (fast, and
    nothing rescaled but the pictures): a title, optional column titles, row labels on the left
    and a caption under each cell. A cell is a (C, H, W) image, an (H, W) map, EMPTY or None
    (nothing drawn)."""
    pad, columns = 6, max(len(row) for row in cells)
    lines = max((caption.count("\n") + 1 for row in captions or [] for caption in row), default=0)
    caption_h = 4 + 15 * lines
    label_w = 12 + 8 * max(len(label) for label in row_labels) if row_labels else 0
    width = max(label_w + pad + columns * (cell + pad), 240)
    title_lines = textwrap.wrap(title, max(20, (width - 12) // 8))
    head = 10 + 18 * len(title_lines) + (22 if column_labels else 0)
    height = head + len(cells) * (cell + caption_h + pad) + pad
    figure = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    axes = figure.add_axes((0, 0, 1, 1))
    axes.text(width / 2, 6, "\n".join(title_lines), ha="center", va="top", fontsize=FONT, linespacing=1.1)
    for c, label in enumerate(column_labels or []):
        axes.text(label_w + pad + c * (cell + pad) + cell / 2, head - 11, label, ha="center", va="center",
                  fontsize=FONT - 2)
    for r, row in enumerate(cells):
        top = head + r * (cell + caption_h + pad)
        if row_labels:
            axes.text(label_w - 6, top + cell / 2, row_labels[r], ha="right", va="center", fontsize=FONT)
        for c, picture in enumerate(row):
            if picture is None:
                continue
            left = label_w + pad + c * (cell + pad)
            axes.imshow(_rgb(picture), extent=(left, left + cell, top + cell, top), interpolation="nearest",
                        cmap=colormap())
            if captions and captions[r][c]:
                axes.text(left + cell / 2, top + cell + 2, captions[r][c], ha="center", va="top",
                          fontsize=FONT - 2, linespacing=1.0)
    axes.set_xlim(0, width)
    axes.set_ylim(height, 0)
    axes.axis("off")
    return figure


def sample_grid(images: torch.Tensor, captions: Sequence[str], title: str, columns: int = 5) -> Figure:
    """Images (N, C, H, W in [0, 1]) in rows of ``columns``, a caption under each."""
    rows = [list(images[i:i + columns]) for i in range(0, len(images), columns)]
    return table(rows, title, captions=[list(captions[i:i + columns]) for i in range(0, len(images), columns)])


def class_rows(rows: Sequence[torch.Tensor], labels: Sequence[str], title: str, columns: int = 5) -> Figure:
    """One row per class: its label on the left, up to ``columns`` of its images (N, C, H, W in
    [0, 1]); empty cells are dark, so a short row reads as one."""
    return table([list(images[:columns]) + [EMPTY] * (columns - len(images[:columns])) for images in rows], title,
                 row_labels=labels)


def evidence(rows: Sequence[Sequence[torch.Tensor | None]], row_labels: Sequence[str], column_labels: Sequence[str],
             title: str) -> Figure:
    """Per row (a class), samples beside their saliency maps ((H, W) in [0, 1], drawn as heat
    maps); None leaves a cell empty."""
    return table(rows, title, row_labels=row_labels, column_labels=column_labels)


def pareto(rows: Sequence[dict], x: str, x_label: str, log_x: bool = True) -> Figure:
    """Final accuracy (mean ± std over seeds) against a cost, the non-dominated students marked
    and joined by the front."""
    figure = _figure(9, 5.5, left=0.09, bottom=0.12)
    axes = figure.add_subplot()
    for row in rows:
        marker, colour = ("o", STUDENT_COLOUR) if row["label"].startswith("searched") else ("s", TEACHER_COLOUR)
        axes.errorbar(row[x], row["final"], yerr=row["std"], fmt=marker, color=colour, markersize=9, capsize=4,
                      markerfacecolor=colour if row.get("pareto") else "white")
        axes.annotate(short(row["label"], 24), (row[x], row["final"]), textcoords="offset points", xytext=(6, 6),
                      fontsize=FONT - 2)
    front = sorted((r for r in rows if r.get("pareto")), key=lambda r: r[x])
    if len(front) > 1:
        axes.plot([r[x] for r in front], [r["final"] for r in front], "--", color=STUDENT_COLOUR, alpha=0.6)
    if log_x:
        axes.set_xscale("log")
    axes.set_xlabel(x_label, fontsize=FONT)
    axes.set_ylabel("final test accuracy (%), mean ± std over seeds", fontsize=FONT)
    axes.set_title("searched (circles) and reference (squares) students; filled: on the Pareto front",
                   fontsize=FONT - 1)
    axes.tick_params(labelsize=FONT - 2)
    axes.grid(alpha=0.3)
    return figure


def figure_to_png(figure: Figure) -> bytes:
    """The figure rendered as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()
