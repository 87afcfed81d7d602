"""train.stop_at: a run ends once more iterations buy nothing (a share of the teacher reached, or
no better evaluation for a while), saved as a finished run; resuming it does nothing more."""
import pytest

from dfkd.core.checkpoint import safe_load
from dfkd.core.config import load_config
from dfkd.core.schema import StopConfig
from dfkd.loop.engine import Engine
from dfkd.loop.stopping import stop_reason
from dfkd_base.errors import ConfigError


def test_a_share_of_the_teacher_stops_at_the_first_evaluation_that_reaches_it():
    rule = StopConfig(teacher_share=0.99)
    assert stop_reason(rule, [{"acc": 97.9}], 99.0) is None           # 98.01 needed
    assert "98.02%, at least 99% of the teacher's 99.00%" in stop_reason(rule, [{"acc": 98.02}], 99.0)
    assert stop_reason(rule, [{"epoch": 3, "step": 30}], 99.0) is None  # not evaluated: nothing to judge
    assert stop_reason(rule, [{"acc": 99.5}], None) is None            # no teacher accuracy to compare with


def test_patience_counts_evaluations_without_a_better_one():
    rule = StopConfig(patience=2)
    rows = [{"acc": 50.0}, {"acc": 60.0}, {"acc": 59.0}]
    assert stop_reason(rule, rows, None) is None                         # one evaluation without progress
    assert "2 evaluations without a better accuracy than 60.00%" in stop_reason(rule, [*rows, {"acc": 60.0}], None)
    assert stop_reason(rule, [*rows, {"acc": 60.1}], None) is None
    held_out = [{"agreement": 70.0}, {"agreement": 69.0}, {"agreement": 68.0}]  # a run without labeled images
    assert "agreement with the teacher on held-out synthetic samples" in stop_reason(rule, held_out, None)


@pytest.mark.parametrize("override, message", [
    ("train.stop_at.teacher_share=0", "train.stop_at.teacher_share must be a share of the teacher's accuracy"),
    ("train.stop_at.patience=0", "train.stop_at.patience must be >= 1 evaluations, got 0"),
])
def test_bad_stopping_rules_are_one_line_errors(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("teacher/lenet5-digits", [override])


@pytest.mark.slow
def test_a_run_stopped_at_a_share_of_its_teacher_ends_as_a_finished_one(tmp_path, digits_teacher, capsys):
    config = load_config("kd/kd-digits", [f"teacher.checkpoint={digits_teacher[0]}", f"output.root={tmp_path}",
                                          "train.stop_at.teacher_share=0.9", "runtime.num_threads=1",
                                          "output.tensorboard=false", "train.epochs=20"])
    engine = Engine(config)
    summary = engine.fit()
    assert 0 < summary["steps"] < engine.total_iters  # ended before its budget
    assert summary["final_acc"] >= 0.9 * summary["teacher_acc"] and "teacher_share" in summary["stopped"]
    assert f"the run ends at iteration {summary['steps']}" in capsys.readouterr().err
    final = safe_load(engine.run_dir / "ckpt" / "final.pt")
    assert final["step"] == summary["steps"] and final["accuracy"] == summary["final_acc"]
    last = engine.run_dir / "ckpt" / "last.pt"
    assert safe_load(last)["stopped"] == summary["stopped"]
    again = Engine(config, resume=last).fit()  # a stopped run is finished: nothing more trains
    assert again["steps"] == summary["steps"] and again["final_acc"] == summary["final_acc"]
