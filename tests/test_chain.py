"""Chains of distillations (TAKD, DGKD, born-again): stage order and teachers, resume after a kill,
the ensemble evaluation, and the chain config's one-line errors."""
import json
import shutil
from types import SimpleNamespace

import pytest
import torch

from dfkd.core.checkpoint import read_model_file
from dfkd.data.datasets import load_dataset
from dfkd.data.loader import TensorLoader
from dfkd.methods.losses.response import kd_kl, kd_kl_divergence
from dfkd.nets.arch import load_model
from dfkd.tools.chain import Chain, evaluate_ensemble, load_chain
from dfkd_base.errors import ConfigError

TINY = 'set=["train.epochs=1", "runtime.num_threads=1", "output.tensorboard=false"]'


@pytest.mark.slow
def test_takd_chain_teaches_each_stage_with_the_model_before_it(tmp_path, digits_teacher):
    chain = Chain(load_chain("chain/takd-digits", [f"root={tmp_path}", f"teacher={digits_teacher[0]}", TINY]))
    state = chain.run()
    teacher, assistant, student = (state["stages"][n] for n in ("teacher", "assistant", "student"))
    assert teacher["model"] == str(digits_teacher[0]) and teacher["config"] == "given"  # in place of stage 0
    assert assistant["teachers"] == [str(digits_teacher[0])]
    assert student["teachers"] == [assistant["model"]] == ["1-assistant/ckpt/final.pt"]  # inside the folder
    assert read_model_file(chain.model_of("assistant"))["arch"]["name"] == "lenet5_half"
    assert read_model_file(chain.model_of("student"))["arch"]["kwargs"] == {"width": 0.125}
    table = (chain.folder / "chain.md").read_text()
    assert "| student |" in table and "| assistant |" in table.split("| student |")[1]  # taught by the assistant


@pytest.mark.slow
def test_a_killed_chain_resumes_at_its_stage_and_step_and_ends_as_an_unkilled_one(tmp_path, digits_teacher,
                                                                                monkeypatch):
    overrides = [f"teacher={digits_teacher[0]}", 'set=["train.epochs=2", "runtime.num_threads=1", '
                 '"runtime.deterministic=true", "output.tensorboard=false"]']
    first = Chain(load_chain("chain/takd-digits", [f"root={tmp_path / 'a'}", *overrides]))
    whole = first.run()
    from dfkd.loop.engine import Engine

    original, calls = Engine.end_of_epoch, []

    def die_in_the_student_stage(self, epoch):
        original(self, epoch)
        calls.append(epoch)
        if len(calls) == 3:  # the assistant's two epochs, then the student's first
            raise KeyboardInterrupt

    monkeypatch.setattr(Engine, "end_of_epoch", die_in_the_student_stage)
    chain = Chain(load_chain("chain/takd-digits", [f"root={tmp_path / 'b'}", *overrides]))
    with pytest.raises(KeyboardInterrupt):
        chain.run()
    monkeypatch.setattr(Engine, "end_of_epoch", original)
    assert list(json.loads((chain.folder / "chain.json").read_text())["stages"]) == ["teacher", "assistant"]
    # moved elsewhere before it resumes: it reads its own assistant, the original folder is gone
    moved = shutil.move(chain.folder, tmp_path / "moved")
    again = Chain.resume(moved)
    resumed = again.run()
    assert resumed["stages"]["student"]["summary"]["steps"] == whole["stages"]["student"]["summary"]["steps"]
    a = load_model(first.model_of("student"))[0].state_dict()
    b = load_model(again.model_of("student"))[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_born_again_ensemble_is_the_mean_of_the_generations_softmax(tmp_path, digits_teacher):
    chain = Chain(load_chain("chain/born-again-digits", [f"root={tmp_path}", f"teacher={digits_teacher[0]}", TINY]))
    state = chain.run()
    models = [chain.model_of(g) for g in ("gen1", "gen2")]
    assert read_model_file(models[0])["arch"]["name"] == "lenet5"  # the teacher's architecture
    test = load_dataset("digits", "test")
    nets = [load_model(m)[0].eval() for m in models]
    correct = 0
    with torch.no_grad():
        for images, labels in TensorLoader(test, 500):
            probs = sum(n(images).softmax(1) for n in nets) / 2
            correct += int((probs.argmax(1) == labels).sum())
    assert state["ensemble"]["acc"] == pytest.approx(100 * correct / len(test))
    assert evaluate_ensemble(models[:1])["acc"] == pytest.approx(state["stages"]["gen1"]["summary"]["final_acc"])


def test_dgkd_drops_one_teacher_per_iteration_and_sums_a_kl_per_teacher():
    from dfkd.core.schema import RuntimeConfig
    from dfkd.loop.runtime import Runtime
    from dfkd.loop.teachers import Teachers

    teachers = Teachers([torch.nn.Identity()] * 3, "drop_one", Runtime(RuntimeConfig(device="cpu")))
    torch.manual_seed(0)
    for _ in range(5):
        dropped = teachers.draw()
        assert teachers.running() == [i for i in range(3) if i != dropped]
    s, a, b = torch.randn(4, 5), torch.randn(4, 5), torch.randn(4, 5)
    ctx = SimpleNamespace(student_logits=s, each_teacher_logits=[a, b])
    assert kd_kl(ctx, T=4.0, per_teacher=True).item() == pytest.approx(
        (kd_kl_divergence(s, a, 4.0) + kd_kl_divergence(s, b, 4.0)).item())


def test_chain_config_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="stage 'assistant' trains on 'cifar100' \\(100 classes\\), but the model "
                                          "before it predicts 10"):
        load_chain("chain/takd-digits", ['stages.1.set=["data.name=cifar100"]'])
    with pytest.raises(ConfigError, match="ensemble names gen3, which are not stages"):
        load_chain("chain/born-again-digits", ["ensemble=[gen1, gen3]"])
    with pytest.raises(ConfigError, match="the first stage 'assistant' distils a teacher; set the chain's teacher"):
        load_chain("chain/takd-digits", ['stages=[{name: assistant, config: kd/kd-digits}]'])
    with pytest.raises(ConfigError, match="unknown key 'stages.0.teacher' \\(did you mean 'teachers'"):
        load_chain("chain/takd-digits", ['stages.0.teacher=all'])
    with pytest.raises(ConfigError, match="is not the folder of a chain \\(no chain.json\\)"):
        Chain.resume(tmp_path)


@pytest.mark.slow
def test_chain_command_line(tmp_path, digits_teacher, capsys):
    from dfkd.cli import main

    assert main(["chain"]) == 2
    assert "dfkd chain needs --config" in capsys.readouterr().err
    assert main(["chain", "--resume", str(tmp_path), "--config", "chain/takd-digits"]) == 2
    assert "give no --config or overrides" in capsys.readouterr().err
    assert main(["chain", "--config", "chain/born-again-digits", "--out", str(tmp_path), f"teacher={digits_teacher[0]}",
                 TINY, "ensemble=[gen1]"]) == 0
    out = capsys.readouterr().out
    assert "| gen2 |" in out and "| ensemble of gen1 |" in out
