"""dfkd audit: membership-inference and memorization measures against hand computations, an
end-to-end audit of a data-free digits run, and its one-line errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from dfkd.cli import main
from dfkd.core.checkpoint import save_model
from dfkd.core.config import load_config
from dfkd.loop.engine import Engine
from dfkd.nets.arch import load_model
from dfkd.tools.audit.attacks import (canary_exposure, lira_offline, lira_online, loss_attack, memorization, roc_auc,
                                      tpr_at_fpr, true_class_logit)
from dfkd.tools.audit.run import _synthetic_samples, audit
from dfkd.tools.audit.shadows import teacher_members
from dfkd_base.errors import CheckpointError, ConfigError


def test_auc_counts_member_above_non_member_pairs_ties_half():
    # pairs: 3>1, 3>2, 2>1 and one tie 2=2 -> (3 + 0.5) / 4
    assert roc_auc(torch.tensor([3.0, 2.0]), torch.tensor([1.0, 2.0])) == pytest.approx(0.875)
    assert roc_auc(torch.tensor([0.0, 0.1]), torch.tensor([1.0, 2.0])) == 0.0


def test_tpr_at_fpr_uses_the_non_members_quantile():
    non_members = torch.arange(1000, dtype=torch.float)  # 1% of them lie above 989.01
    members = torch.tensor([995.0, 991.0, 980.0, 10.0])
    assert tpr_at_fpr(members, non_members, 0.01) == 0.5


def test_memorization_ratio_is_zero_for_copies_and_one_for_equidistant_samples():
    train, test = torch.tensor([[0.0, 0.0], [10.0, 0.0]]), torch.tensor([[0.0, 4.0], [10.0, 4.0]])
    copies = memorization(train.clone(), train, test, margin=0.1)
    assert copies["ratio_median"] == 0.0 and copies["closer_to_train"] == 1.0
    between = memorization(torch.tensor([[0.0, 2.0], [10.0, 2.0]]), train, test, margin=0.1)
    assert between["ratio_mean"] == pytest.approx(1.0) and between["closer_to_train"] == 0.0


def references(m: int) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The audit's members and non-members of digits, drawn as it draws them: ``m`` of each."""
    from dfkd.data.datasets import load_dataset

    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    g = torch.Generator().manual_seed(0)
    train_index, test_index = torch.randperm(len(train), generator=g)[:m], torch.randperm(len(test), generator=g)[:m]
    return ((train.normalize(train.images[train_index]), train.labels[train_index]),
            (test.normalize(test.images[test_index]), test.labels[test_index]))


@pytest.fixture(scope="module")
def datafree_run(tmp_path_factory, digits_teacher):
    root = tmp_path_factory.mktemp("audit")
    teacher = root / "teacher.pt"
    shutil.copy(digits_teacher[0], teacher)
    summary = Engine(load_config("datafree/dfq-digits", [
        f"teacher.checkpoint={teacher}", f"output.root={root}/runs", "train.epochs=1", "train.iters_per_epoch=3",
        "runtime.num_threads=1", "output.tensorboard=false"])).fit()
    return summary["run_dir"], teacher


@pytest.mark.slow
def test_audit_of_a_datafree_run_writes_its_report_inside_the_run(datafree_run, capsys):
    run_dir, _ = datafree_run
    run = Path(run_dir)
    beside = sorted(p.name for p in run.parent.iterdir())
    assert main(["audit", run_dir, "--samples", "64", "--references", "200"]) == 0
    out = capsys.readouterr()
    assert "reads the training split of 'digits'" in out.err and "Membership inference" in out.out
    report = json.loads((run / "audit.json").read_text())
    assert report["references"] == 200 and report["synthetic"]["samples"] == 64
    assert report["synthetic"]["source"] == "generator 'generator'"
    assert report["synthetic"]["unseen_test_images"]["samples"] == 64  # the null, outside the references
    assert report["lira"]["shadows"] == 4 and report["lira"]["shadow_images"] == 125  # halves of 450 - 200
    # the loss attack's numbers are the two models' on the references the audit drew (seeded draws)
    members, non_members = references(200)
    models = {"teacher": load_model(report["teacher"])[0], "student": load_model(run / "ckpt" / "final.pt")[0]}
    for who, model in models.items():
        assert report["membership"][who] == pytest.approx(loss_attack(model, members, non_members))
    for who in ("teacher", "student"):  # a stricter threshold never finds more members
        lira = report["lira"][who]
        assert lira["tpr_at_0.1pct_fpr"] <= lira["tpr_at_1pct_fpr"] and lira.keys() == {
            "auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr"}
    for space in ("pixel", "feature"):
        assert report["synthetic"][space]["ratio_median"] > 0.5  # an untrained generator copies nothing
    assert {"audit.json", "audit.md", "audit_pairs.png", "audit"} <= {p.name for p in run.iterdir()}
    assert sorted(p.name for p in run.parent.iterdir()) == beside  # nothing written beside the run


def test_audit_refuses_a_teacher_changed_since_the_run(datafree_run, tmp_path):
    run_dir, teacher = datafree_run
    saved = teacher.read_bytes()
    model, meta = load_model(teacher)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_model(teacher, model, meta["arch"], dataset=meta["dataset"])
    try:
        with pytest.raises(CheckpointError, match="changed since the run"):
            audit(run_dir, samples=8, references=16)
    finally:
        teacher.write_bytes(saved)


def test_lira_removes_what_shadows_also_show_the_loss_attack_does_not():
    """Members here are merely easier samples (every model, shadows included, fits them better):
    the loss threshold calls that membership (AUC 1), LiRA's per-sample standardization does not."""
    class Fixed(torch.nn.Module):
        def __init__(self, logit):
            super().__init__()
            self.logit = logit

        def forward(self, x):  # true class 0 gets ``logit`` (x's mean shifts it per sample), the rest 0
            out = torch.zeros(len(x), 3)
            out[:, 0] = self.logit + x.flatten(1).mean(1)
            return out

    members = (torch.full((4, 1), 1.0), torch.zeros(4, dtype=torch.long))
    non_members = (torch.full((4, 1), -1.0), torch.zeros(4, dtype=torch.long))
    result = lira_offline({"target": Fixed(2.0)}, [Fixed(0.0), Fixed(1.0)], members, non_members)
    assert result["target"]["auc"] == 0.5  # every sample sits the same 1.5 spreads above its shadows' mean
    assert loss_attack(Fixed(2.0), members, non_members)["auc"] == 1.0
    x = torch.tensor([[0.0]])
    expected = 2.0 - torch.log(torch.tensor(2.0))  # logit_0 - logsumexp(0, 0)
    assert torch.allclose(true_class_logit(Fixed(2.0), x, torch.tensor([0])), expected.reshape(1))


def test_audit_needs_synthetic_samples_or_a_generator_and_a_finished_run(tmp_path):
    config = load_config("datafree/cmi-digits")
    with pytest.raises(ConfigError, match="kept no synthetic samples .* and has no generator"):
        _synthetic_samples(tmp_path, config, {"synthesis": {}}, None, 8)
    with pytest.raises(ConfigError, match="not a finished run folder .config.yaml of the config is missing"):
        audit(tmp_path)


@pytest.mark.slow
def test_canaries_are_planted_recorded_and_counted(tmp_path, digits_teacher):
    from dfkd.data.datasets import load_dataset
    from dfkd.data.splits import plant_canaries

    train = load_dataset("digits", "train")
    planted, record = plant_canaries(train, 20, seed=3)
    assert len(record["index"]) == 20 and bool((planted.labels[record["index"]] != train.labels[record["index"]]).all())
    untouched = torch.ones(len(train), dtype=torch.bool)
    untouched[record["index"]] = False
    assert torch.equal(planted.labels[untouched], train.labels[untouched])
    with pytest.raises(ConfigError, match="data.canaries=5000, and digits/train has 1347 samples"):
        plant_canaries(train, 5000, seed=0)

    summary = Engine(load_config("teacher/lenet5-digits", [
        f"output.root={tmp_path}", "train.epochs=12", "data.canaries=20", "runtime.num_threads=1",
        "output.tensorboard=false"])).fit()
    _, meta = load_model(Path(summary["run_dir"]) / "ckpt" / "final.pt")
    assert torch.equal(meta["canaries"]["index"], plant_canaries(train, 20, seed=0)[1]["index"])
    teacher, _ = load_model(Path(summary["run_dir"]) / "ckpt" / "final.pt")
    test = load_dataset("digits", "test")
    wrong = (test.labels + 1) % 10
    canaries = (train.normalize(train.images[meta["canaries"]["index"]]), meta["canaries"]["label"])
    clean, _ = load_model(digits_teacher[0])  # the same recipe without canaries
    exposure = canary_exposure({"planted": teacher, "clean": clean}, canaries, (test.normalize(test.images), wrong))
    # measured: 4 of 20 found in the teacher trained on them, 0 in the clean one
    assert exposure["planted"] == 20 and exposure["found"]["planted"] > exposure["found"]["clean"]


def test_online_lira_scores_by_the_likelihood_ratio_of_in_and_out_shadows():
    """Two pool samples, four shadows, each sample in two of them: shadows that trained on a
    sample give it logit 3, the others 0 (a hand-computable IN/OUT split); the target gives its
    member 3 and its non-member 0, so LiRA separates them, and a target that gives both 1.5 does not."""
    class Table(torch.nn.Module):
        def __init__(self, values):
            super().__init__()
            self.values = torch.tensor(values)

        def forward(self, x):  # sample i (x = i) gets its true class 0 logit values[i] + log 2, the rest 0
            out = torch.zeros(len(x), 3)
            out[:, 0] = self.values[x[:, 0].long()] + torch.log(torch.tensor(2.0))
            return out

    keep = torch.tensor([[1, 0], [1, 1], [0, 0], [0, 1]], dtype=torch.bool)
    shadows = [Table([3.0 * k for k in row.tolist()]) for row in keep.float()]
    pool = (torch.tensor([[0.0], [1.0]]), torch.zeros(2, dtype=torch.long))
    member, non_member = torch.tensor([0]), torch.tensor([1])
    result = lira_online({"leaky": Table([3.0, 0.0]), "blind": Table([1.5, 1.5])}, shadows, keep, pool,
                           member, non_member)
    assert result["leaky"]["auc"] == 1.0 and result["blind"]["auc"] == 0.5
    # the statistic: log p_0 - log(1 - p_0) = logit_0 - logsumexp(0, 0) = values[i]
    assert torch.allclose(true_class_logit(Table([3.0, 0.0]), *pool), torch.tensor([3.0, 0.0]))


def test_the_members_are_what_the_teacher_trained_on():
    from dfkd.data.datasets import load_dataset
    from dfkd.data.splits import hold_out, labeled_subset

    train = load_dataset("digits", "train")
    assert teacher_members(train, None) is train
    assert teacher_members(train, {"data": {"labeled_fraction": 0.2}, "phases": [{"batch": "real"}]}) is train
    part = teacher_members(train, {"data": {"labeled_fraction": 0.2}, "phases": [{"batch": "labeled"}], "seed": 3})
    assert torch.equal(part.images, labeled_subset(train, 0.2, 3).images) and len(part) < len(train) / 4
    rest = teacher_members(train, {"data": {"validation": 0.1}, "phases": [{"batch": "real"}]})
    assert torch.equal(rest.images, hold_out(train, 0.1)[0].images)  # not what it held out to validate on


@pytest.mark.slow
def test_an_online_audit_of_the_digits_run(datafree_run, capsys):
    run_dir, _ = datafree_run
    assert main(["audit", run_dir, "--samples", "32", "--references", "100", "--shadows", "2",
                 "--lira", "online"]) == 0
    report = json.loads((Path(run_dir) / "audit.json").read_text())
    lira = report["lira"]
    # the pool: all 450 test images and as many training images; a shadow trains on about half of it
    assert lira["kind"] == "online" and lira["pool"] == 2 * 450 and 400 < lira["shadow_images"] < 500
    assert all(lira[who]["tpr_at_0.1pct_fpr"] <= lira[who]["tpr_at_1pct_fpr"] for who in ("teacher", "student"))
    assert report["membership"]["teacher"] == pytest.approx(loss_attack(load_model(report["teacher"])[0],
                                                                       *references(100)))
    assert "online LiRA, 2 shadow models on random halves of a pool of 900" in capsys.readouterr().out
    assert main(["audit", run_dir, "--shadows", "3", "--lira", "online"]) == 2
    assert "even for online LiRA" in capsys.readouterr().err


@pytest.mark.slow
def test_the_audits_defaults_fit_the_digits_test_split(datafree_run):
    from dfkd.tools.audit.run import audit

    run_dir, _ = datafree_run
    report = audit(run_dir, samples=16, shadows=2)  # the default references: half of the 450 test images
    assert report["references"] == 225 and report["lira"]["shadow_images"] == 112  # the other half, halved
    assert report["synthetic"]["unseen_test_images"]["samples"] == 16
