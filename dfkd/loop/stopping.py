"""When a run may end before its last iteration (``train.stop_at``).

A recipe's budget is sized for the hardest teacher it is meant for (a ResNet teacher needs many
more iterations of DFQ than a LeNet-5 does); a rule here ends a run once more iterations would buy
nothing for *this* teacher:

* ``teacher_share``: the evaluated model's accuracy on the evaluation split has reached this share
  of the teacher's (0.99: within 1% of it);
* ``patience``: that many evaluations in a row did not improve on the best before them: the
  accuracy, or, in a run that reads no labeled image, the agreement with the teacher on held-out
  synthetic samples.

A stopped run ends as a finished one does: its last state and ``final.pt`` saved at the
evaluation that stopped it, ``summary.json`` saying why (``stopped``). Resuming it does nothing more.
"""
from __future__ import annotations

from dfkd.core.schema import StopConfig


def stop_reason(rule: StopConfig, history: list[dict], teacher_acc: float | None) -> str | None:
    """Why the run should end after the newest row of ``history``, or None. Only an evaluated
    row (one with ``acc`` or ``agreement``) can end it."""
    newest = history[-1]
    if rule.teacher_share is not None and teacher_acc and newest.get("acc") is not None \
            and newest["acc"] >= rule.teacher_share * teacher_acc:
        return (f"stopped at {newest['acc']:.2f}%, at least {100 * rule.teacher_share:g}% of the teacher's "
                f"{teacher_acc:.2f}% (train.stop_at.teacher_share)")
    measure = "acc" if newest.get("acc") is not None else "agreement"
    if rule.patience is None or newest.get(measure) is None:
        return None
    values = [h[measure] for h in history if h.get(measure) is not None]
    if len(values) > rule.patience and max(values[-rule.patience:]) <= max(values[:-rule.patience]):
        what = "accuracy" if measure == "acc" else "agreement with the teacher on held-out synthetic samples"
        return (f"stopped: {rule.patience} evaluations without a better {what} than "
                f"{max(values[:-rule.patience]):.2f}% (train.stop_at.patience)")
    return None
