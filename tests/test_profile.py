"""dfkd profile: the loop's work as ranges, each counted once, per phase and per kind; the trace
and the table in the run folder."""
import json
from types import SimpleNamespace

import pytest

from dfkd.cli import main
from dfkd.tools.profile import time_table


def event(name: str, us: float, parent=None):
    return SimpleNamespace(name=name, time_range=SimpleNamespace(elapsed_us=lambda: us), cpu_parent=parent)


def test_each_range_counts_its_own_time_once_in_its_phase_or_outer_work():
    phase = event("dfkd:phase student", 1000)
    terms = event("dfkd:loss terms", 300, phase)
    teacher = event("dfkd:teacher forward", 200, event("aten::linear", 250, terms))  # an op between the ranges
    backward = event("dfkd:backward", 400, phase)
    epoch = event("dfkd:end of epoch (checkpoints, pictures)", 500)
    evaluation = event("dfkd:evaluation", 120, epoch)
    item = event("aten::item", 5, backward)
    table = time_table([phase, terms, teacher, backward, epoch, evaluation, item, item], iterations=2)
    assert table["ms_per_iteration"] == {
        "phase student": {"rest": 0.15, "loss terms": 0.05, "teacher forward": 0.1, "backward": 0.2},
        "end of epoch (checkpoints, pictures)": {"rest": 0.19, "evaluation": 0.06}}
    assert table["total_ms_per_iteration"] == pytest.approx(0.75)  # the outermost ranges' time, nothing twice
    assert table["host_reads_per_iteration"] == 1.0


@pytest.mark.slow
def test_dfkd_profile_writes_the_trace_and_a_table_of_a_dfq_iteration(tmp_path, digits_teacher, capsys):
    assert main(["profile", "--config", "datafree/dfq-digits", "--teacher", str(digits_teacher[0]), "--out",
                 str(tmp_path), "--profile", "3", "--profile-warmup", "1", "train.iters_per_epoch=2",
                 "phases.1.steps=2", "synthesis.batch_size=16", "runtime.num_threads=1",
                 "output.quality_samples=0"]) == 0
    out = capsys.readouterr().out
    assert "ms per iteration, over 3 iterations after 1 (cpu)" in out and "phase student" in out
    run_dir = next((tmp_path / "dfq-digits").iterdir())
    table = json.loads((run_dir / "profile.json").read_text())
    student = table["ms_per_iteration"]["phase student"]
    assert {"generator forward", "student forward", "teacher forward", "loss terms", "backward",
            "optimizer"} <= set(student), student
    assert {"teacher forward", "generator forward", "backward", "optimizer"} <= set(
        table["ms_per_iteration"]["phase generator"])
    assert "end of epoch (checkpoints, pictures)" in table["ms_per_iteration"]  # epoch 2 ends in the window
    assert table["host_reads_per_iteration"] > 0
    trace = json.loads((run_dir / "profile_trace.json").read_text())
    assert any(e.get("name") == "dfkd:phase student" for e in trace["traceEvents"])


def test_profile_bad_counts_are_one_line_errors_and_a_short_run_is_profiled_whole(tmp_path, digits_teacher, capsys):
    assert main(["profile", "--config", "datafree/dfq-digits", "--teacher", str(digits_teacher[0]), "--out",
                 str(tmp_path), "--profile", "0"]) == 2
    assert "--profile must be >= 1 and --profile-warmup >= 0, got 0 and 5" in capsys.readouterr().err
    assert not tmp_path.joinpath("dfq-digits").exists()
    assert main(["profile", "--config", "datafree/dfq-digits", "--teacher", str(digits_teacher[0]), "--out",
                 str(tmp_path), "--profile", "5", "train.epochs=1", "train.iters_per_epoch=2", "phases.1.steps=1",
                 "synthesis.batch_size=8", "runtime.num_threads=1", "output.tensorboard=false"]) == 0
    assert "over 2 iterations after 0" in capsys.readouterr().out  # the run's 2 iterations, no warm-up
