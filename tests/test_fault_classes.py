"""Faults of the newer surfaces (export, audit, search, chain, quantized students, resume), one
section per class: writes that could destroy what they land on, unbounded input, input that used
to give a traceback, results that used to be silently wrong, a wait without end, defaults that did
not fit the default dataset, and smaller ones. Each case fails on the behaviour it replaced."""
import dataclasses
import errno
import sqlite3
import subprocess
import sys

import pytest
import torch

from dfkd.cli import main
from dfkd.core.config import load_config
from dfkd.loop.engine import Engine
from dfkd_base.errors import CheckpointError, ConfigError, DfkdError, DivergenceError

TINY = ["train.iters_per_epoch=2", "runtime.num_threads=1", "output.tensorboard=false"]


def one_line_error(capsys, *fragments: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("dfkd: error: "), err
    assert "Traceback" not in err and all(f in err for f in fragments), err
    return err


def teacher_run(root, *overrides) -> Engine:
    return Engine(load_config("teacher/lenet5-digits", [f"output.root={root}", *TINY, *overrides]))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished one-epoch run: its folder, its model file and its training state."""
    engine = teacher_run(tmp_path_factory.mktemp("finished"), "train.epochs=1")
    summary = engine.fit()
    return engine.run_dir, engine.run_dir / "ckpt" / "final.pt", engine.run_dir / "ckpt" / "last.pt", summary


# ---------------------------------------------------------------- writes replace only what the command owns
def test_export_replaces_an_existing_file_only_when_forced_and_never_a_link_or_a_folder(tmp_path, finished, capsys):
    _, model, _, _ = finished
    other = tmp_path / "someone.onnx"
    other.write_text("another model")
    assert main(["export", str(model), "--out", str(other), "--no-check"]) == 2
    one_line_error(capsys, "exists; give --force to replace it")
    link = tmp_path / "link.onnx"
    link.symlink_to(other)
    assert main(["export", str(model), "--out", str(link), "--no-check", "--force"]) == 2
    one_line_error(capsys, "is a symbolic link")
    (tmp_path / "folder.onnx").mkdir()
    assert main(["export", str(model), "--out", str(tmp_path / "folder.onnx"), "--no-check", "--force"]) == 2
    one_line_error(capsys, "is not a regular file")
    assert other.read_text() == "another model" and link.is_symlink()
    assert main(["export", str(model), "--out", str(other), "--no-check", "--force"]) == 0
    assert other.read_bytes()[:4] != b"anot"  # replaced by the graph, as asked


def test_a_link_planted_in_a_run_folder_is_never_written_through(tmp_path, fit_until_killed):
    engine = teacher_run(tmp_path, "train.epochs=2")
    fit_until_killed(engine, 1)
    outside = tmp_path / "outside.json"
    outside.write_text("not the run's")
    (engine.run_dir / "summary.json").symlink_to(outside)
    config = load_config(str(engine.run_dir / "config.yaml"))
    with pytest.raises(DfkdError, match="summary.json is a symbolic link; dfkd does not write through links"):
        Engine(config, resume=engine.run_dir / "ckpt" / "last.pt")
    assert outside.read_text() == "not the run's"


def test_resuming_into_a_folder_that_holds_another_run_is_refused(tmp_path, finished, fit_until_killed):
    other_run, _, _, _ = finished
    engine = teacher_run(tmp_path, "train.epochs=2", "seed=5")
    fit_until_killed(engine, 1)
    before = (other_run / "config.yaml").read_text()
    with pytest.raises(CheckpointError, match="holds another run's config.yaml"):
        Engine(engine.run.config, resume=engine.run_dir / "ckpt" / "last.pt", run_dir=other_run)
    assert (other_run / "config.yaml").read_text() == before


def test_search_storage_refuses_a_database_that_is_not_an_optuna_studys(tmp_path, digits_teacher, capsys):
    db = tmp_path / "app.db"
    with sqlite3.connect(db) as connection:
        connection.execute("create table users (name text)")
        connection.execute("insert into users values ('ada')")
    before = db.read_bytes()
    code = main(["search", "--config", "search/lenet5-digits", "--teacher", str(digits_teacher[0]), "--out",
                 str(tmp_path / "runs"), "--storage", f"sqlite:///{db}"])
    assert code == 2
    one_line_error(capsys, "holds tables that are not an Optuna study's (users)")
    assert db.read_bytes() == before and not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- unbounded input
@pytest.mark.parametrize("text, message", [
    # nine levels of nine aliases: 9**9 values once expanded ("billion laughs")
    ("a0: &a0 [x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]\n" for i in range(1, 9)), "more than 100,000 values"),
    ("loop: &loop [*loop]\n", "refers to a value that holds it"),
    ("_base_: [1, 2]\n", "_base_ must name configs"),
])
def test_a_config_that_expands_without_bound_or_names_no_base_is_refused(text, message, tmp_path, capsys):
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    assert main(["teacher", "--config", str(path), "--out", str(tmp_path / "runs")]) == 2
    one_line_error(capsys, message)
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- input that gave a traceback
@pytest.mark.parametrize("override, message", [
    ("seed=99999999999999999999", "seed must be >= 0 and below 2**63"),
    ("data.batch_size=1", "data.batch_size must be >= 2"),
    ("runtime.rendezvous_timeout_s=0", "runtime.rendezvous_timeout_s must be a positive number"),
    ("train.max_weight_growth=.nan", "train.max_weight_growth must be >= 0 (and finite)"),
    ("data.agreement_samples=0", "data.agreement_samples must be >= 1, got 0"),
])
def test_values_that_gave_tracebacks_or_turned_guards_off_are_one_line_errors(override, message, tmp_path, capsys):
    assert main(["teacher", "--config", "teacher/lenet5-digits", "--out", str(tmp_path), override]) == 2
    one_line_error(capsys, message)
    assert not any(tmp_path.iterdir())


def test_a_device_this_machine_lacks_and_a_malformed_world_size_are_one_line_errors(tmp_path, capsys, monkeypatch):
    if not torch.backends.mps.is_available():
        assert main(["teacher", "--config", "teacher/lenet5-digits", "--out", str(tmp_path), "runtime.device=mps"]) == 2
        one_line_error(capsys, "runtime.device 'mps' asked for, but this torch build or machine has no MPS device")
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert main(["teacher", "--config", "teacher/lenet5-digits", "--out", str(tmp_path)]) == 2
    one_line_error(capsys, "WORLD_SIZE='two' in the environment is not an integer")
    assert not any(tmp_path.iterdir())


def test_a_training_state_of_another_shape_is_refused_before_the_folder_is_touched(tmp_path, fit_until_killed):
    engine = teacher_run(tmp_path, "train.epochs=2")
    fit_until_killed(engine, 1)
    last = engine.run_dir / "ckpt" / "last.pt"
    state = torch.load(last, weights_only=True)
    state["players"]["model"]["model"]["fc2.weight"] = torch.zeros(3, 3)  # damaged, or edited by hand
    torch.save(state, last)
    config_before = (engine.run_dir / "config.yaml").read_text()
    with pytest.raises(CheckpointError, match="not a training state of this run's shape"):
        Engine(engine.run.config, resume=last)
    assert (engine.run_dir / "config.yaml").read_text() == config_before


def test_damaged_chain_and_search_folders_are_one_line_errors(tmp_path, capsys):
    for command, name in (("chain", "chain.json"), ("search", "search.json")):
        folder = tmp_path / command
        folder.mkdir()
        (folder / name).write_text('{"config": {"stages": [')
        assert main([command, "--resume", str(folder)]) == 2
        one_line_error(capsys, f"{name} is damaged", "cannot be resumed")


def test_export_to_a_folder_a_one_bit_model_and_a_full_disk_are_one_line_errors(tmp_path, finished, capsys,
                                                                             monkeypatch):
    from dfkd.core.checkpoint import save_model
    from dfkd.core.schema import QuantConfig
    from dfkd.nets.models import create_model
    from dfkd.nets.quant import quantize

    _, model, _, _ = finished
    assert main(["export", str(model), "--out", str(tmp_path), "--no-check"]) == 2
    one_line_error(capsys, "is not a regular file")
    quant = dataclasses.asdict(QuantConfig(weights=1, acts=2, keep_first_last=8))
    arch = {"name": "lenet5", "in_channels": 1, "num_classes": 10, "image_size": 32, "kwargs": {}, "quant": quant}
    binary = quantize(create_model("lenet5", 1, 10, 32), quant, (1, 32, 32))
    save_model(tmp_path / "binary.pt", binary, arch)
    assert main(["export", str(tmp_path / "binary.pt"), "--out", str(tmp_path / "b.onnx"), "--no-check"]) == 2
    one_line_error(capsys, "ONNX integer export needs bit widths >= 2; this model has 1-bit layers")
    import shutil

    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9, 1000))
    assert main(["export", str(model), "--out", str(tmp_path / "m.onnx"), "--no-check"]) == 2
    one_line_error(capsys, "MiB free on its disk")
    assert not (tmp_path / "m.onnx").exists()


def test_a_disk_that_fills_during_a_run_is_one_line_and_the_last_checkpoint_stays_whole(tmp_path, capsys,
                                                                                       monkeypatch):
    from dfkd.core.checkpoint import safe_load

    saves, original = [], torch.save

    def save(obj, f, *args, **kwargs):
        saves.append(1)
        if len(saves) == 3:  # epoch 2's state, after epoch 1's state and model were written
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    assert main(["teacher", "--config", "teacher/lenet5-digits", "--out", str(tmp_path), "train.epochs=3", *TINY]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("run folder: ") and err[1:] == ["dfkd: error: No space left on device"], err
    run_dir = next((tmp_path / "teacher-lenet5-digits").iterdir())
    assert safe_load(run_dir / "ckpt" / "last.pt")["step"] == 2 and not list((run_dir / "ckpt").glob(".*.tmp"))


def test_audit_counts_out_of_range_are_one_line_errors_before_anything_is_read(tmp_path, capsys):
    for flags, message in ((["--samples", "0"], "--samples must be in [1, 100000], got 0"),
                           (["--samples", "1000000000"], "--samples must be in [1, 100000]"),
                           (["--references", "-5"], "--references must be >= 1, got -5"),
                           (["--pairs", "-1"], "--pairs must be in [0, --samples=500], got -1"),
                           (["--margin", "-0.5"], "--margin must be in [0, 1), got -0.5"),
                           (["--margin", "nan"], "--margin must be in [0, 1), got nan")):
        assert main(["audit", str(tmp_path / "no-such-run"), *flags]) == 2
        one_line_error(capsys, message)


def test_unlabeled_pairs_as_test_pairs_and_empty_pairs_name_the_problem(tmp_path):
    import numpy as np

    from dfkd.data.datasets import dataset_info
    from dfkd.data.pairs import load_pairs

    digits = dataset_info("digits")
    a = np.random.default_rng(0).random((6, 1, 32, 32), dtype=np.float32)
    np.savez(tmp_path / "unlabeled.npz", a=a, b=a[:, :, :28, :28])
    np.savez(tmp_path / "empty.npz", a=a[:0], b=a[:0])
    assert len(load_pairs([str(tmp_path / "unlabeled.npz")], digits, "train")) == 6  # unlabeled pairs train
    with pytest.raises(ConfigError, match="6 of 6 test pairs have no label; data.pairs_test needs labeled pairs"):
        load_pairs([str(tmp_path / "unlabeled.npz")], digits, "test")
    with pytest.raises(ConfigError, match="empty.npz: no samples"):
        load_pairs([str(tmp_path / "empty.npz")], digits, "train")


def test_a_damaged_middle_line_of_a_sweeps_results_is_named(tmp_path, capsys):
    sys.path.insert(0, "scripts")
    try:
        import sweep
    finally:
        sys.path.remove("scripts")
    results = tmp_path / "results.jsonl"
    results.write_text('{"seed": 0}\nnot json\n{"seed": 1}\n')
    assert sweep.main(["--from-jsonl", str(results)]) == 2
    assert capsys.readouterr().err.strip() == f"sweep: error: {results}: line 2 is not a JSON row"


# ---------------------------------------------------------------- results that were silently wrong
def test_a_first_epoch_that_blows_up_fails_against_the_starting_weights(tmp_path, monkeypatch):
    original = Engine.end_of_epoch

    def blow_up(self, epoch):
        with torch.no_grad():
            for p in self.players["model"].module.parameters():
                p.mul_(1e4)
        original(self, epoch)

    monkeypatch.setattr(Engine, "end_of_epoch", blow_up)
    engine = teacher_run(tmp_path, "train.epochs=2")
    with pytest.raises(DivergenceError, match="grew more than 100x since the last good state; no good state was "
                                              "saved before it"):
        engine.fit()
    assert not (engine.run_dir / "ckpt" / "last.pt").exists()  # nothing diverged became the rollback target


def test_a_state_with_non_finite_weights_is_not_resumed(tmp_path, fit_until_killed):
    engine = teacher_run(tmp_path, "train.epochs=2")
    fit_until_killed(engine, 1)
    last = engine.run_dir / "ckpt" / "last.pt"
    state = torch.load(last, weights_only=True)
    state["players"]["model"]["model"]["fc2.weight"].fill_(float("nan"))
    torch.save(state, last)
    with pytest.raises(CheckpointError, match="the weights of model in this state are not finite; it cannot be "
                                              "resumed"):
        Engine(engine.run.config, resume=last)


def test_resuming_a_finished_run_keeps_its_recorded_time(finished, tmp_path):
    import shutil

    from dfkd.core.checkpoint import safe_load

    run_dir, _, _, summary = finished
    copy = shutil.copytree(run_dir, tmp_path / "copy")
    trained = safe_load(copy / "ckpt" / "last.pt")["wall_s"]  # the session that trained it, up to its last save
    again = Engine(load_config(str(copy / "config.yaml")), resume=copy / "ckpt" / "last.pt", run_dir=copy).fit()
    assert again["steps"] == summary["steps"]
    assert again["time_total_s"] >= round(trained, 2) > 0  # not reset to the resumed session's 0 s


def test_a_search_of_a_teacher_recipe_is_refused(tmp_path):
    from dfkd.tools.search.config import load_search

    with pytest.raises(ConfigError, match="is a teacher config \\(it trains on labels\\); a search distils"):
        load_search("search/lenet5-digits", ["config=teacher/lenet5-digits"])


def test_workers_sharing_a_study_draw_their_own_samples_and_stop_at_its_trial_count(tmp_path, digits_teacher):
    from dfkd.tools.search.config import load_search
    from dfkd.tools.search.study import Search

    storage = f"sqlite:///{tmp_path}/shared.db"
    overrides = [f"teacher={digits_teacher[0]}", "trials=1", "proxy.candidates=0", "retrain.top_k=0",
                 "references=[]", "set=[output.tensorboard=false, runtime.num_threads=1]"]
    a = Search(load_search("search/lenet5-digits", [f"root={tmp_path / 'a'}", *overrides]), storage=storage)
    b = Search(load_search("search/lenet5-digits", [f"root={tmp_path / 'b'}", *overrides]), storage=storage)
    a.study(), b.study()
    assert a.sampler_seed != b.sampler_seed  # one seed would propose the same architectures to both
    own = Search(load_search("search/lenet5-digits", [f"root={tmp_path / 'own'}", *overrides, "seed=3"]))
    own.study()
    assert own.sampler_seed == 3  # the folder's own study: the config's seed, reproducible
    # worker a is training the study's one trial; b takes nothing more
    study = a.study()
    busy = study.ask()
    busy.set_user_attr("folder", "0")
    state = b.run(trials_only=True)
    assert {t["state"] for t in state["trials"]} == {"PRUNED"}  # over the budget, or one too many
    assert not (b.folder / "trials").exists()
    assert any(t.user_attrs.get("surplus") for t in study.get_trials())


def test_a_moved_chain_folder_reads_its_own_stages(tmp_path):
    from dfkd.tools.chain import Chain, ChainConfig, StageConfig

    chain = Chain(ChainConfig(root=str(tmp_path), stages=[StageConfig(name="t", config="teacher/lenet5-digits")]))
    chain.state["stages"]["t"] = {"model": "0-t/ckpt/final.pt"}
    chain._save()
    moved = chain.folder.rename(tmp_path / "moved")
    assert Chain.resume(moved).model_of("t") == str(moved / "0-t" / "ckpt" / "final.pt")


# ---------------------------------------------------------------- a wait without end
@pytest.mark.slow
def test_a_rendezvous_without_its_peer_times_out_in_one_line(tmp_path):
    env = {**__import__("os").environ, "WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29571"}
    result = subprocess.run([sys.executable, "-m", "dfkd", "teacher", "--config", "teacher/lenet5-digits", "--out",
                             str(tmp_path / "runs"), "runtime.rendezvous_timeout_s=2"], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert "the process group at 127.0.0.1:29571 did not form within 2 s" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- smaller ones
def test_input_errors_of_a_chain_leave_no_folder(tmp_path, capsys):
    assert main(["chain", "--config", "chain/takd-digits", "--out", str(tmp_path), "teacher=/no/such/teacher.pt"]) == 2
    one_line_error(capsys, "checkpoint not found: /no/such/teacher.pt")
    assert not any(tmp_path.iterdir())


def test_a_quant_value_from_the_command_line_is_blamed_on_the_command_line(tmp_path, capsys):
    assert main(["distill", "--config", "quant/qat-kd-digits", "--out", str(tmp_path),
                 "players.student.quant.calibrate=-3"]) == 2
    one_line_error(capsys, "command line: players.student.quant.calibrate: must be >= 0")


def test_a_unicode_experiment_name_is_a_name(tmp_path):
    from dfkd.core.runs import new_run_dir

    config = load_config("teacher/lenet5-digits", ["experiment=Ölçüm-ψ_1", f"output.root={tmp_path}"])
    assert new_run_dir(config.output.root, config.experiment, 0).parent == tmp_path / "Ölçüm-ψ_1"
