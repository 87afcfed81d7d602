"""scripts/reference_kd.py: the knowledge-distillation cases beside mdistiller's distillers."""
import copy
import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch
from test_scripts import load_script

from dfkd.core.config import load_config
from dfkd.data.datasets import ImageTensorDataset, load_dataset
from dfkd.loop.engine import Engine

reference = load_script("reference")
reference_kd = sys.modules["reference_kd"]  # imported by reference.py, which registers its cases
CACHE = Path(reference.DEFAULT_CACHE)


def mdistiller_code() -> Path:
    code = reference.checkout_folder("mdistiller", CACHE)
    if not code.exists():
        pytest.skip(f"mdistiller's code is not in the cache ({code}): no fetch from GitHub in the tests")
    return code


def test_kd_cases_read_every_setting_back_and_refuse_a_differing_one(monkeypatch):
    for name in ("kd", "dkd", "at", "fitnet", "rkd", "sp", "pkt", "crd"):
        case = reference.CASES[name]
        assert reference.check_equal_work(case, case.work, "teacher.pt") == case.overrides(case.work), name
    case = reference.CASES["at"]
    work = dataclasses.replace(case.work, layers="relu2", p=4.0, epochs=3, data="digits")
    assert "phases.0.losses.attention.pairs=[[relu2,relu2]]" in reference.check_equal_work(case, work, "teacher.pt")
    # the thin student of the knowledge table, and mdistiller's regressor: not what kd/hint ships
    assert reference.shipped_differences(reference.CASES["fitnet"], "teacher.pt") == [
        "width: 0.5 vs 0.125"]
    # a regressor stepped by its own schedule is not mdistiller's, which steps it with the student
    fitnet = reference.CASES["fitnet"]
    overrides = type(fitnet).overrides
    monkeypatch.setattr(type(fitnet), "overrides", lambda self, work: [
        *overrides(self, work), "players.adapter.sched.name=constant"])
    with pytest.raises(SystemExit, match=r"would not do the reference's work: hint: nan vs 100\.0"):
        reference.check_equal_work(fitnet, fitnet.work, "teacher.pt")
    with pytest.raises(SystemExit, match="--iters: case kd runs whole epochs"):
        reference.main(["--case", "kd", "--teacher", "t.pt", "--iters", "3"])


def test_a_kd_case_refuses_a_teacher_of_another_dataset(digits_teacher):
    case = reference.CASES["kd"]
    with pytest.raises(SystemExit, match="the teacher was trained on 'digits', the work names 'fashion-mnist'"):
        reference_kd.mdistiller_setup(case, mdistiller_code(), case.work, str(digits_teacher[0]), 0)


def _split(n: int) -> ImageTensorDataset:
    train = load_dataset("digits", "train")
    return ImageTensorDataset(train.images[:n], train.labels[:n], train.info, "train")


def _dfkd_steps(case, work, teacher, tmp_path, split, extra=()):
    """dfkd's side of ``work`` on ``split``: the student's (and adapter's) weights before and after."""
    engine = Engine(load_config(case.config, [f"teacher.checkpoint={teacher}", *case.overrides(work), *extra, "seed=0",
                                              f"output.root={tmp_path}", "output.tensorboard=false",
                                              "runtime.progress=false", "output.quality_samples=0"]),
                    write=False, train_split=split)
    modules = {name: engine.players.module(name) for name in ("student", "adapter") if name in engine.players}
    before = {name: copy.deepcopy(m.state_dict()) for name, m in modules.items()}
    engine.fit()
    return before, {name: m.state_dict() for name, m in modules.items()}


@pytest.mark.parametrize("method", ["kd", "dkd", "at", "fitnet", "rkd", "sp", "pkt"])
def test_kd_case_steps_are_mdistillers_at_equal_weights_and_batches(method, digits_teacher, tmp_path):
    """Two epochs of two batches (DKD's ramp at half, then full strength) of dfkd's config and of
    mdistiller's distiller stepped as its trainer steps it, from the same student (and regressor)
    on the same batches: the same weights to float rounding."""
    code, case, teacher = mdistiller_code(), reference.CASES[method], str(digits_teacher[0])
    work, split = dataclasses.replace(case.work, data="digits", batch=32, epochs=2), _split(64)
    before, after = _dfkd_steps(case, work, teacher, tmp_path, split)

    def mdistiller_steps(work):
        distiller, student, optimizer, scheduler, loader, _, _ = reference_kd.mdistiller_setup(
            case, code, work, teacher, 0, train=split, init=before["student"])
        if method == "fitnet":  # the regressor from dfkd's adapter: its convolution's bias is 0 (BN follows it)
            regressor = distiller.conv_reg
            regressor.conv.weight.data.copy_(before["adapter"]["proj.0.weight"])
            regressor.conv.bias.data.zero_()
            regressor.bn.load_state_dict({k[len("proj.1."):]: v for k, v in before["adapter"].items()
                                          if k.startswith("proj.1.")})
        assert reference_kd.mdistiller_train(case, work, distiller, optimizer, scheduler, loader) == 4
        return student.state_dict()

    theirs = mdistiller_steps(work)
    for key, value in after["student"].items():
        assert torch.allclose(value.float(), theirs[key].float(), atol=2e-5), (method, key)
    moved = max((after["student"][k].float() - before["student"][k].float()).abs().max() for k in theirs)
    assert moved > 1e-3, "the student did not train: the comparison would be empty"


def test_hint_regressor_ends_in_mdistillers_relu(digits_teacher, tmp_path):
    """dfkd's hint adapter without the ReLU (as kd/hint shipped before) trains another student than
    mdistiller's ConvReg; with it, the same (the equality test above)."""
    code, case, teacher = mdistiller_code(), reference.CASES["fitnet"], str(digits_teacher[0])
    work, split = dataclasses.replace(case.work, data="digits", batch=32, epochs=2), _split(64)
    before, after = _dfkd_steps(case, work, teacher, tmp_path, split, ["players.adapter.net.kwargs.relu=false"])
    distiller, student, optimizer, scheduler, loader, _, _ = reference_kd.mdistiller_setup(
        case, code, work, teacher, 0, train=split, init=before["student"])
    distiller.conv_reg.conv.weight.data.copy_(before["adapter"]["proj.0.weight"])
    distiller.conv_reg.conv.bias.data.zero_()
    reference_kd.mdistiller_train(case, work, distiller, optimizer, scheduler, loader)
    gap = max((after["student"][k].float() - v.float()).abs().max() for k, v in student.state_dict().items())
    assert gap > 1e-3


@pytest.mark.parametrize("case", ["kd", "crd"])
def test_kd_case_runs_beside_dfkd_at_a_tiny_budget(case, digits_teacher, tmp_path, capsys):
    mdistiller_code()
    assert reference.main(["--case", case, "--teacher", str(digits_teacher[0]), "--seeds", "0", "--epochs", "1",
                           "--batch", "256", "--set", "data=digits", "negatives=64" if case == "crd" else "T=2.0",
                           "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "cfg: a namespace" in out and "1 epochs, batch 256" in out
    row = json.loads((tmp_path / "out" / f"{case}.jsonl").read_text())
    assert row["work"]["data"] == "digits" and row["commit"] == reference.REFERENCES["mdistiller"][1]
    for side in ("dfkd", "reference"):
        assert 0 <= row[side]["final_acc"] <= 100 and row[side]["s_per_iter"] > 0


def test_crd_case_steps_are_mdistillers_at_equal_heads_memories_and_negatives(digits_teacher, tmp_path, monkeypatch):
    """CRD with the same student, embedding heads, memories and negative draws on both sides: two
    epochs of two batches end at the same student and heads as mdistiller's ContrastMemory and
    ContrastLoss, stepped in one optimizer with the student (dfkd's heads once had an SGD of their
    own, without the student's Nesterov momentum or schedule: their weights then part)."""
    from dfkd.methods.losses.contrastive import ContrastiveRepresentation

    code, case, teacher = mdistiller_code(), reference.CASES["crd"], str(digits_teacher[0])
    work, split = dataclasses.replace(case.work, data="digits", batch=32, epochs=2, negatives=16), _split(64)
    drawn, sample = [], ContrastiveRepresentation.sample_negatives
    monkeypatch.setattr(ContrastiveRepresentation, "sample_negatives",
                        lambda self, labels: drawn.append(sample(self, labels)) or drawn[-1])
    engine = Engine(load_config(case.config, [f"teacher.checkpoint={teacher}", *case.overrides(work), "seed=0",
                                              f"output.root={tmp_path}", "output.tensorboard=false",
                                              "runtime.progress=false", "output.quality_samples=0"]),
                    write=False, train_split=split)
    student = engine.players.module("student")
    crd = next(t.term for t in engine.phases[0].terms if isinstance(t.term, ContrastiveRepresentation))
    before = copy.deepcopy(student.state_dict())
    heads = {"embed_s.linear": copy.deepcopy(crd.embed_student.state_dict()),
             "embed_t.linear": copy.deepcopy(crd.embed_teacher.state_dict())}
    memories = crd.memory_student.clone(), crd.memory_teacher.clone()
    engine.fit()
    assert len(drawn) == 4

    distiller, theirs, optimizer, scheduler, loader, _, _ = reference_kd.mdistiller_setup(
        case, code, work, teacher, 0, train=split, init=before)
    for name, state in heads.items():
        distiller.get_submodule(name).load_state_dict(state)
    distiller.contrast.memory_v1.copy_(memories[0]), distiller.contrast.memory_v2.copy_(memories[1])
    replay = list(drawn)
    monkeypatch.setattr(type(case), "inputs", lambda self, work, distiller, loader, labels: {
        "index": loader.last_index, "contrastive_index": torch.cat([loader.last_index[:, None], replay.pop(0)], 1)})
    reference_kd.mdistiller_train(case, work, distiller, optimizer, scheduler, loader)
    assert not replay
    for key, value in student.state_dict().items():
        assert torch.allclose(value.float(), theirs.state_dict()[key].float(), atol=2e-5), key
    assert torch.allclose(crd.embed_student.weight, distiller.embed_s.linear.weight, atol=2e-5)
    assert torch.allclose(crd.memory_teacher, distiller.contrast.memory_v2, atol=2e-5)
