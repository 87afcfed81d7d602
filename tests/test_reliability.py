"""Faults a run must survive without losing its last good state: weights that blow up while the
losses stay finite, an evaluation that turns NaN, divergence before anything good was saved."""
import pytest
import torch

from dfkd.core.checkpoint import safe_load
from dfkd.core.config import load_config
from dfkd.loop.engine import DivergenceError, Engine


def run(tmp_path, *overrides):
    return Engine(load_config("teacher/lenet5-digits", [f"output.root={tmp_path}", "train.iters_per_epoch=2",
                                                        "runtime.num_threads=1", "output.tensorboard=false",
                                                        *overrides]))


def blow_up_at(monkeypatch, epoch, factor=1e4):
    """The first time ``epoch`` ends, scale the model's weights by ``factor`` just before."""
    original, done = Engine.end_of_epoch, []

    def end_of_epoch(self, e):
        if e == epoch and not done:
            done.append(e)
            with torch.no_grad():
                for p in self.players["model"].module.parameters():
                    p.mul_(factor)
        original(self, e)

    monkeypatch.setattr(Engine, "end_of_epoch", end_of_epoch)


def test_weights_that_blow_up_are_never_saved_as_the_last_good_state(tmp_path, monkeypatch):
    engine = run(tmp_path, "train.epochs=3")
    blow_up_at(monkeypatch, 2)
    with pytest.raises(DivergenceError) as err:
        engine.fit()
    message = str(err.value)
    assert "iteration 4" in message and "weight norm of model" in message and "grew more than 100x" in message
    assert "the last good state is" in message and "iteration 2" in message
    assert safe_load(engine.run_dir / "ckpt" / "last.pt")["step"] == 2  # epoch 1's state, untouched
    best = safe_load(engine.run_dir / "ckpt" / "best.pt")
    assert best["epoch"] == 1 and not (engine.run_dir / "ckpt" / "final.pt").exists()


def test_rollback_returns_to_the_newest_good_state_and_says_which(tmp_path, monkeypatch, capsys):
    engine = run(tmp_path, "train.epochs=3", "train.on_nan=rollback")
    blow_up_at(monkeypatch, 2)
    summary = engine.fit()
    assert summary["steps"] == 6 and engine.rollbacks == 1
    assert "rolled back to iteration 2 (1/3)" in capsys.readouterr().err
    assert safe_load(engine.run_dir / "ckpt" / "last.pt")["step"] == 6


def test_a_nan_evaluation_loss_fails_the_health_check(tmp_path, monkeypatch):
    engine = run(tmp_path, "train.epochs=2")
    original = Engine.evaluate

    def evaluate(self, model, loader=None, student=False):
        result = original(self, model, loader, student)
        return {**result, "loss": float("nan")} if student and self.step == 4 else result

    monkeypatch.setattr(Engine, "evaluate", evaluate)
    with pytest.raises(DivergenceError, match="iteration 4, the evaluation loss is nan; the last good state is .*"
                                              "iteration 2"):
        engine.fit()


def test_divergence_before_any_good_state_says_so(tmp_path, monkeypatch):
    engine = run(tmp_path, "train.epochs=2")
    blow_up_at(monkeypatch, 1, factor=float("inf"))
    with pytest.raises(DivergenceError, match="iteration 2, the weights of model are not finite; no good state was "
                                              "saved before it"):
        engine.fit()
    assert not (engine.run_dir / "ckpt" / "last.pt").exists()


# ---------------------------------------------------------------- the run folder is the run's own
def test_a_state_copied_out_of_its_run_never_makes_a_run_write_where_it_lies(tmp_path, fit_until_killed):
    import shutil

    from dfkd_base.errors import CheckpointError

    engine = run(tmp_path / "runs", "train.epochs=2")
    fit_until_killed(engine, 1)
    elsewhere = tmp_path / "somewhere" / "else"
    elsewhere.mkdir(parents=True)
    shutil.copy(engine.run_dir / "ckpt" / "last.pt", elsewhere / "last.pt")
    before = sorted(p.name for p in (tmp_path / "somewhere").iterdir())
    config = load_config("teacher/lenet5-digits", [f"output.root={tmp_path / 'runs'}", "train.iters_per_epoch=2",
                                                   "runtime.num_threads=1", "output.tensorboard=false", "train.epochs=2"])
    with pytest.raises(CheckpointError, match="was saved in .*; to continue that run elsewhere, name its folder "
                                              "with --run-dir DIR"):
        Engine(config, resume=elsewhere / "last.pt")
    assert sorted(p.name for p in (tmp_path / "somewhere").iterdir()) == before  # nothing written there
    target = tmp_path / "continued"
    resumed = Engine(config, resume=elsewhere / "last.pt", run_dir=target)
    assert resumed.fit()["steps"] == 4 and (target / "ckpt" / "final.pt").exists()


def test_experiment_is_a_name_not_a_path(tmp_path):
    from dfkd_base.errors import ConfigError

    for bad in ("../outside", "/tmp/abs", "a/b", ".."):
        with pytest.raises(ConfigError, match="experiment must be a name"):
            load_config("teacher/lenet5-digits", [f"experiment={bad}"])


def test_a_second_process_is_kept_off_a_running_run_and_a_resume_trims_the_log(tmp_path, fit_until_killed):
    from dfkd.core.runs import RunLock, read_metrics
    from dfkd_base.errors import RunInUseError

    engine = run(tmp_path, "train.epochs=2", "train.log_every=1")
    fit_until_killed(engine, 1)
    (engine.run_dir / "ckpt" / ".last.pt.abc.tmp").write_bytes(b"half a checkpoint")
    with open(engine.run_dir / "metrics.jsonl", "a") as f:  # rows a killed run logged after its checkpoint
        f.write('{"step": 3, "loss/model/ce": 1.0}\n{"step": 4, "lo')
    held = RunLock(engine.run_dir)  # another process training there
    config = load_config("teacher/lenet5-digits", [f"output.root={tmp_path}", "train.iters_per_epoch=2",
                                                   "runtime.num_threads=1", "output.tensorboard=false",
                                                   "train.epochs=2", "train.log_every=1"])
    with pytest.raises(RunInUseError, match=f"{engine.run_dir} is in use by process"):
        Engine(config, resume=engine.run_dir / "ckpt" / "last.pt")
    held.release()
    resumed = Engine(config, resume=engine.run_dir / "ckpt" / "last.pt")
    assert not list((engine.run_dir / "ckpt").glob(".*.tmp"))  # a killed save's leftovers are gone
    resumed.fit()
    steps = [m["step"] for m in read_metrics(engine.run_dir) if "loss/model/ce" in m]
    assert steps == [1, 2, 3, 4]  # the stale rows of steps 3 and 4 were dropped, then logged again


def test_a_teacher_replaced_at_the_same_path_stops_the_resume(tmp_path, digits_teacher, fit_until_killed):
    import shutil

    from dfkd.core.checkpoint import save_model
    from dfkd.nets.arch import load_model
    from dfkd_base.errors import CheckpointError

    teacher = tmp_path / "teacher.pt"
    shutil.copy(digits_teacher[0], teacher)
    overrides = [f"output.root={tmp_path}", f"teacher.checkpoint={teacher}", "train.epochs=2", "train.iters_per_epoch=2",
                 "runtime.num_threads=1", "output.tensorboard=false"]
    engine = Engine(load_config("kd/kd-digits", overrides))
    fit_until_killed(engine, 1)
    model, meta = load_model(teacher)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)  # retrained, or swapped for another file, under the same name
    save_model(teacher, model, meta["arch"], dataset="digits")
    with pytest.raises(CheckpointError, match="the teacher's weights changed since this state was saved"):
        Engine(load_config("kd/kd-digits", overrides), resume=engine.run_dir / "ckpt" / "last.pt")


def test_a_teacher_trained_on_another_dataset_is_named_in_a_warning(tmp_path, capsys):
    from dfkd.core.checkpoint import save_model
    from dfkd.nets.models import create_model

    path = tmp_path / "t.pt"
    save_model(path, create_model("lenet5", in_channels=1, num_classes=10, image_size=32),
               {"name": "lenet5", "in_channels": 1, "num_classes": 10, "image_size": 32, "kwargs": {}}, dataset="mnist")
    Engine(load_config("kd/kd-digits", [f"output.root={tmp_path}", f"teacher.checkpoint={path}"]), write=False)
    assert f"teacher {path} was trained on 'mnist'; this run's data is 'digits'" in capsys.readouterr().err


def test_a_state_with_a_negative_step_is_refused_in_one_line(tmp_path):
    from dfkd_base.errors import CheckpointError

    engine = run(tmp_path, "train.epochs=1")
    engine.fit()
    last = engine.run_dir / "ckpt" / "last.pt"
    state = safe_load(last)
    state["step"] = -3
    torch.save(state, last)
    with pytest.raises(CheckpointError) as err:
        Engine(engine.config, resume=last)
    assert str(err.value) == f"{last}: its iteration -3 is not a step count"


def test_an_explicit_data_root_is_read_and_never_replaced_by_the_system_copy(tmp_path):
    from dfkd.data.datasets import load_dataset
    from dfkd_base.errors import DatasetNotFoundError

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DatasetNotFoundError) as err:  # even where Debian's copy is installed
        load_dataset("fashion-mnist", "test", str(empty))
    assert str(empty) in str(err.value) and "/usr/share/datasets" not in str(err.value)


def test_rollbacks_are_counted_across_resumes(tmp_path, monkeypatch):
    engine = run(tmp_path, "train.epochs=3", "train.on_nan=rollback", "train.max_rollbacks=1")
    blow_up_at(monkeypatch, 2)
    engine.fit()
    last = engine.run_dir / "ckpt" / "last.pt"
    assert engine.rollbacks == 1 and safe_load(last)["rollbacks"] == 1
    longer = load_config("teacher/lenet5-digits", [f"output.root={tmp_path}", "train.iters_per_epoch=2",
                                                   "runtime.num_threads=1", "output.tensorboard=false",
                                                   "train.epochs=5", "train.on_nan=rollback", "train.max_rollbacks=1"])
    resumed = Engine(longer, resume=last)
    assert resumed.rollbacks == 1  # the one spent before the resume still counts
    blow_up_at(monkeypatch, 4)
    with pytest.raises(DivergenceError, match="iteration 8"):
        resumed.fit()
    assert safe_load(last)["step"] == 6  # the last good state stays the one before the new divergence
