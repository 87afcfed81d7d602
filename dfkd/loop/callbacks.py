"""Extension points of the loop: a :class:`Callback` is told of the loop's events and may act on
them (report to a hyperparameter search and prune, stop a run, log more), without subclassing
the engine. Callbacks run in the order given, on every process."""
from __future__ import annotations


class Callback:
    """Override the events you need; each gets the :class:`~dfkd.loop.engine.Engine`. An exception
    raised here stops the run as one raised by the loop would (its last checkpoint stays)."""

    def on_iteration_end(self, engine) -> None:
        """After each iteration (``engine.step`` iterations done), its epoch's end included; a
        profiler steps here."""

    def on_evaluation(self, engine, epoch: int, result: dict) -> None:
        """After the evaluation at the end of ``epoch`` (0-based count of epochs done, minus one):
        ``result`` holds ``acc``, ``loss`` and ``n`` (and per-exit accuracies for a model with exits)."""

    def on_checkpoint(self, engine, epoch: int) -> None:
        """After ``ckpt/last.pt`` was written for ``epoch`` (rank 0, in runs with a folder)."""

    def on_epoch_end(self, engine, epoch: int, record: dict) -> None:
        """When ``epoch`` is done: evaluated, checked, saved. ``record`` is its row of the run's
        history (``epoch``, ``step``, and ``acc`` when it was evaluated)."""
