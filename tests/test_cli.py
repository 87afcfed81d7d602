import json
import subprocess
import sys

import pytest
import torch

from dfkd.cli import main
from dfkd.core.checkpoint import MODEL_FORMAT

TINY = ["train.epochs=1", "train.iters_per_epoch=3"]


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def out_root(tmp_path):
    root = tmp_path / "runs"
    root.mkdir()
    (root / "keep.txt").write_text("earlier results")  # must survive every failed command
    yield root
    assert (root / "keep.txt").read_text() == "earlier results"


@pytest.fixture
def trained(capsys, out_root):
    code, out, _ = run_cli(capsys, "teacher", "--config", "teacher/lenet5-digits", "--out", str(out_root), *TINY)
    assert code == 0
    return json.loads(out.strip().splitlines()[-1])


def test_teacher_then_eval_round_trip(capsys, trained):
    assert trained["steps"] == 3 and trained["final_acc"] is not None
    final = f"{trained['run_dir']}/ckpt/final.pt"
    code, out, _ = run_cli(capsys, "eval", final)
    result = json.loads(out)
    assert code == 0 and result["dataset"] == "digits" and result["n"] == 450
    assert result["acc"] == pytest.approx(trained["final_acc"], abs=0.01)


def test_overrides_in_both_spellings(capsys, out_root):
    code, out, _ = run_cli(capsys, "teacher", "--out", str(out_root), "--train.epochs", "1",
                           "train.iters_per_epoch=2", "--optim.lr=0.01", "--seed", "5")
    summary = json.loads(out.strip().splitlines()[-1])
    assert code == 0 and summary["steps"] == 2 and summary["seed"] == 5
    config = (out_root / "teacher-lenet5-digits").glob("*_s5/config.yaml")
    assert "lr: 0.01" in next(config).read_text()


@pytest.mark.parametrize("argv, message", [
    (["teacher", "--config", "teacher/lenet5-fminst"], "config 'teacher/lenet5-fminst' not found"),
    (["teacher", "train.epoch=3"], "unknown key 'train.epoch' (did you mean 'epochs'?)"),
    (["teacher", "players.model.net.name=resnet81"], "unknown model 'resnet81'; did you mean"),
    (["teacher", "data.name=mnist", "data.root=/nonexistent/mnist"], "mnist"),
    (["teacher", "data.name=cifar-10"], "unknown dataset 'cifar-10'; did you mean 'cifar10'"),
    (["teacher", "train.epochs"], "unexpected argument 'train.epochs'"),
    (["distill", "--config", "datafree/dfad-digits"], "teacher.checkpoint is not set"),
    (["distill", "--config", "teacher/lenet5-digits"], "is a teacher config; run it with `dfkd teacher`"),
    (["eval", "/nonexistent/final.pt"], "checkpoint not found: /nonexistent/final.pt"),
])
def test_bad_input_is_one_line_with_exit_2(capsys, out_root, argv, message):
    code, out, err = run_cli(capsys, *argv, "--out", str(out_root)) if argv[0] != "eval" else run_cli(capsys, *argv)
    assert code == 2
    assert err.startswith("dfkd: error: ") and err.count("\n") == 1, err
    assert message in err


def test_missing_dataset_error_says_where_it_looked(capsys, out_root):
    code, _, err = run_cli(capsys, "teacher", "--out", str(out_root), "data.name=mnist",
                           "data.root=/nonexistent/mnist")
    assert code == 2 and "/nonexistent/mnist" in err and "data.download" in err


def test_code_carrying_checkpoint_is_refused(capsys, tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"format": MODEL_FORMAT, "arch": {}, "x": Payload()}, tmp_path / "evil.pt")
    code, out, err = run_cli(capsys, "eval", str(tmp_path / "evil.pt"))
    assert code == 2 and "refused to load" in err and "code ran" not in out


def test_resume_from_a_foreign_config_keeps_the_run(capsys, trained, out_root):
    last = f"{trained['run_dir']}/ckpt/last.pt"
    before = open(last, "rb").read()
    code, _, err = run_cli(capsys, "teacher", "--out", str(out_root), "--resume", last, *TINY, "seed=1")
    assert code == 2 and "from another config; differs in seed" in err
    assert open(last, "rb").read() == before


@pytest.mark.slow
def test_list_and_console_entry_point(capsys):
    code, out, _ = run_cli(capsys, "list")
    assert code == 0
    assert "datasets: " in out and "fashion-mnist" in out and "lenet5_half" in out and "bn_stats" in out
    assert "teacher/lenet5-fmnist" in out and "datafree/dfad-digits" in out
    proc = subprocess.run([sys.executable, "-m", "dfkd.cli", "list", "models"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("models: ")
