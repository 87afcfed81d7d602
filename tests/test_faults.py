"""Bad input against the command line, in subprocesses: exit status 2, one line on stderr naming the
problem, no traceback, and nothing already in the output folder touched."""
import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

BAD_CONFIG_VALUES = [
    ("players.model.optim.lr=-0.1", "players.model.optim.lr must be >= 0"),
    ("players.model.optim.momentum=-1", "players.model.optim.momentum must be >= 0"),
    ("players.model.optim.weight_decay=-5e-4", "players.model.optim.weight_decay must be >= 0"),
    ("players.model.optim.betas=[0.9]", "players.model.optim.betas must be two numbers in [0, 1)"),
    ("players.model.optim.grad_clip=-1", "players.model.optim.grad_clip must be > 0"),
    ("players.model.sched.milestones=[1.5]", "milestones fractions in (0, 1)"),
    ("train.log_every=0", "train.log_every must be >= 1"),
    ("train.eval_every=0", "train.eval_every must be >= 1"),
    ("output.save_every=0", "output.save_every must be >= 1"),
    ("train.iters_per_epoch=0", "train.iters_per_epoch must be >= 1"),
    ("runtime.device=gpu0", "runtime.device must be auto, cpu, cuda, cuda:N or mps"),
    ("seed=-1", "seed must be >= 0"),
    ("phases=[]", "a config needs at least one phase"),
    ("experiment=../elsewhere", "experiment must be a name"),
    ("train.epoch=3", "unknown key 'train.epoch' (did you mean 'epochs'?)"),
]


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def dfkd(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dfkd", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def output_root(tmp_path_factory):
    """An output folder that already holds a finished run, which no bad command may touch."""
    from dfkd.cli import main

    root = tmp_path_factory.mktemp("runs")
    assert main(["teacher", "--config", "teacher/lenet5-digits", "--out", str(root), "train.epochs=1",
                 "train.iters_per_epoch=1", "runtime.num_threads=1", "output.tensorboard=false"]) == 0
    return root


@pytest.mark.parametrize("override, message", BAD_CONFIG_VALUES, ids=[o for o, _ in BAD_CONFIG_VALUES])
def test_bad_config_values_are_one_line_errors_before_any_work(override, message, output_root, capsys):
    from dfkd.cli import main

    before = snapshot(output_root)
    capsys.readouterr()
    assert main(["teacher", "--config", "teacher/lenet5-digits", "--out", str(output_root), override]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert snapshot(output_root) == before


@pytest.mark.slow
def test_in_a_real_process_bad_input_shows_one_line_and_no_traceback(tmp_path):
    (tmp_path / "runs").write_text("not a folder")
    result = dfkd("teacher", "--config", "teacher/lenet5-digits", "--out", str(tmp_path / "runs" / "sub"))
    assert result.returncode == 2 and "is a file, not a folder" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and (tmp_path / "runs").read_text() == "not a folder"


# ---------------------------------------------------------------- model files
@pytest.fixture
def model_file(tmp_path):
    import torch

    from dfkd.core.checkpoint import save_model
    from dfkd.nets.models import create_model

    path = tmp_path / "m.pt"
    save_model(path, create_model("lenet5", in_channels=1, num_classes=10, image_size=32),
               {"name": "lenet5", "in_channels": 1, "num_classes": 10, "image_size": 32, "kwargs": {}}, dataset="digits")
    return path, torch.load(path, weights_only=True)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c["arch"].pop("num_classes"), "arch.num_classes must be int, got None"),
    (lambda c: c["arch"].update(image_size="32"), "arch.image_size must be int, got '32'"),
    (lambda c: c.pop("state_dict"), "needs 'arch' and 'state_dict' mappings"),
    (lambda c: c["arch"].update(kwargs=[1]), "arch.kwargs must be a mapping"),
    (lambda c: c.pop("sha256"), "records no SHA-256 of its weights"),
    (lambda c: c["arch"]["kwargs"].update(weights="IMAGENET1K_V1"), "never downloads anything"),
    # an edit that keeps the fields well-formed: the weights' hash alone would pass it
    (lambda c: c["arch"].update(name="lenet5_half"), "architecture, input card or dataset do not match"),
    (lambda c: c.update(card={"shape": [1, 32, 32], "mean": [0.2], "std": [0.5], "classes": 10}),
     "architecture, input card or dataset do not match"),
])
def test_damaged_or_unsafe_model_files_are_one_line_errors(edit, message, model_file, capsys):
    import torch

    from dfkd.cli import main

    path, content = model_file
    edit(content)
    torch.save(content, path)
    assert main(["eval", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_an_unhashed_model_file_loads_when_asked_and_a_misfit_dataset_is_named(model_file, capsys):
    import json

    import torch

    from dfkd.cli import main

    path, content = model_file
    content.pop("sha256")
    torch.save(content, path)
    assert main(["eval", str(path), "--allow-unhashed"]) == 0
    assert json.loads(capsys.readouterr().out)["n"] == 450
    from dfkd.data.datasets import dataset_info, load_dataset

    fmnist = dataset_info("fashion-mnist")
    try:
        load_dataset("fashion-mnist", "test")
    except Exception:
        pytest.skip("Fashion-MNIST is not on this machine (Debian's dataset-fashion-mnist)")
    assert main(["eval", str(path), "--allow-unhashed", "--data", "fashion-mnist"]) == 2
    err = capsys.readouterr().err.strip()
    assert "dataset 'fashion-mnist' gives 1x28x28 images of 10 classes; the input card of" in err, err
    assert "takes 1x32x32 images of 10 classes" in err and len(err.splitlines()) == 1 and fmnist.shape == (1, 28, 28)


# ---------------------------------------------------------------- a user's pairs
@pytest.mark.parametrize("write, message", [
    (lambda p: p.write_bytes(b"PK\x03\x04 truncated"), "not readable"),
    (lambda p: __import__("numpy").savez(p, a=__import__("numpy").zeros((4, 32, 32)),
                                         b=__import__("numpy").zeros((4,))), "'b' must be images"),
    (lambda p: __import__("numpy").savez(p, a=__import__("numpy").zeros((4, 32, 32), "uint8"),
                                         b=__import__("numpy").zeros((4, 32, 32)), y=__import__("numpy").full(4, 0.5)),
     "'y' must be (N,) integer labels"),
    (lambda p: __import__("numpy").savez(p, a=__import__("numpy").zeros((4, 32, 32), "uint8"),
                                         b=__import__("numpy").zeros((4, 32, 32)), y=__import__("numpy").array([0, 1, 2, 12])),
     "labels must be classes 0..9 of 'digits' (or -1 for none); found 12"),
])
def test_bad_pairs_files_are_one_line_errors(write, message, tmp_path):
    from dfkd.data.datasets import dataset_info
    from dfkd.data.pairs import load_pairs
    from dfkd_base.errors import DfkdError

    path = tmp_path / "pairs.npz"
    write(path)
    with pytest.raises(DfkdError) as err:
        load_pairs([str(path)], dataset_info("digits"))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_a_damaged_image_in_a_pairs_folder_is_named(tmp_path):
    from dfkd.data.datasets import dataset_info
    from dfkd.data.pairs import load_pairs
    from dfkd_base.errors import DfkdError

    for side in ("a", "b"):
        (tmp_path / side).mkdir()
    (tmp_path / "a" / "x.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "b" / "x.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(DfkdError, match=r"pairs: .*x.png is not a readable image or array"):
        load_pairs([str(tmp_path / "a"), str(tmp_path / "b")], dataset_info("digits"))


# ---------------------------------------------------------------- processes killed or racing
KILL_IN_SECOND_SAVE = """
import os, sys, torch
from dfkd.cli import main
saves, original = [], torch.save
def save(obj, f, *a, **k):
    saves.append(1)
    if len(saves) == 2:  # the second epoch's last.pt: write part of it, then die as kill -9 would
        f.write(b"PK half a checkpoint")
        f.flush()
        os._exit(9)
    return original(obj, f, *a, **k)
torch.save = save
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_process_killed_while_saving_leaves_the_last_good_state_and_resumes(tmp_path):
    from dfkd.core.checkpoint import safe_load

    args = ["teacher", "--config", "teacher/lenet5-digits", "--out", str(tmp_path), "train.epochs=3",
            "train.iters_per_epoch=2", "runtime.num_threads=1", "output.tensorboard=false", "data.eval=false"]
    killed = subprocess.run([sys.executable, "-c", KILL_IN_SECOND_SAVE, *args], capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == 9, killed.stderr
    run_dir = next((tmp_path / "teacher-lenet5-digits").iterdir())
    assert list((run_dir / "ckpt").glob(".*.tmp"))  # the half-written file a kill leaves
    assert safe_load(run_dir / "ckpt" / "last.pt")["step"] == 2  # epoch 1's state, whole
    resumed = dfkd("teacher", "--config", "teacher/lenet5-digits", "--resume", str(run_dir / "ckpt" / "last.pt"),
                   *args[5:])
    assert resumed.returncode == 0, resumed.stderr
    assert safe_load(run_dir / "ckpt" / "last.pt")["step"] == 6 and not list((run_dir / "ckpt").glob(".*.tmp"))


@pytest.mark.slow
def test_a_second_resume_of_a_running_run_is_refused_in_one_line(tmp_path, fit_until_killed):
    from dfkd.core.config import load_config
    from dfkd.loop.engine import Engine

    config = load_config("teacher/lenet5-digits", [f"output.root={tmp_path}", "train.epochs=2",
                                                   "train.iters_per_epoch=2", "runtime.num_threads=1",
                                                   "output.tensorboard=false"])
    engine = Engine(config)
    fit_until_killed(engine, 1)
    last = engine.run_dir / "ckpt" / "last.pt"
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); f.seek(0); f.truncate(); f.write('process 4242'); "
                               "f.flush(); print('held', flush=True); time.sleep(60)", str(engine.run_dir / ".lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"  # another process trains in the folder
        before = snapshot(engine.run_dir)
        second = dfkd("teacher", "--config", "teacher/lenet5-digits", "--resume", str(last), "train.epochs=2",
                      "train.iters_per_epoch=2", "runtime.num_threads=1", "output.tensorboard=false")
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert second.stderr.strip().endswith("is in use by process 4242; wait for it to finish or stop it first")
        after = snapshot(engine.run_dir)
        assert {k: v for k, v in after.items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}
    finally:
        holder.kill()
        holder.wait()
