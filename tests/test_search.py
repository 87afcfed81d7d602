"""dfkd search: the families it searches, the space, costs, the DisWOT proxy, held-out
validation, the study (budget, pruning, resume, shared storage) and bad input."""
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import torch

from dfkd.core.config import load_config
from dfkd.nets.models import count_parameters, create_model
from dfkd.tools.search.config import BudgetConfig, load_search
from dfkd.tools.search.proxy import diswot_score
from dfkd.tools.search.report import pareto_rows, spearman
from dfkd.tools.search.space import Space, over_budget, static_cost
from dfkd.tools.search.study import Search
from dfkd_base.errors import ConfigError

pytest.importorskip("optuna")


# ---------------------------------------------------------------- families
def test_lenet5_channels_and_kernels_define_the_family():
    torch.manual_seed(0)
    default = create_model("lenet5", 1, 10, 28)
    torch.manual_seed(0)
    explicit = create_model("lenet5", 1, 10, 28, channels=[6, 16, 120, 84], kernels=[5, 5])
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), explicit.state_dict().values()))
    small = create_model("lenet5", 1, 10, 28, channels=[2, 4, 16, 8], kernels=[3, 3])
    # 3x3 kernels leave a 6x6 map after two poolings (32 -> 30 -> 15 -> 13 -> 6), which conv3 spans
    assert small.conv1.kernel_size == (3, 3) and small.conv3.kernel_size == (6, 6)
    assert small(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(ConfigError, match="channels must be a list of 4 positive integers"):
        create_model("lenet5", 1, 10, 28, channels=[2, 4, 16])
    with pytest.raises(ConfigError, match="give width or channels, not both"):
        create_model("lenet5", 1, 10, 28, channels=[2, 4, 16, 8], width=0.5)


def test_resnet_and_mobilenetv2_families():
    net = create_model("resnet", 1, 10, 28, blocks=[1, 2], widths=[8, 16])
    assert len(net.layer1) == 1 and len(net.layer2) == 2 and net.fc.in_features == 16
    torch.manual_seed(0)
    resnet20 = create_model("resnet20", 3, 10)
    torch.manual_seed(0)
    same = create_model("resnet", 3, 10, blocks=[3, 3, 3], widths=[16, 32, 64])
    assert all(torch.equal(a, b) for a, b in zip(resnet20.state_dict().values(), same.state_dict().values()))
    with pytest.raises(ConfigError, match="widths must be a list of 2 positive integers"):
        create_model("resnet", 1, 10, 28, blocks=[1, 2], widths=[8])
    mobile = create_model("mobilenetv2", 1, 10, 28, width_mult=0.25, expansion=2, blocks=[1] * 7, kernel_size=5,
                          head=64)
    assert mobile.layer2[0].expand[0].out_channels == 2 * mobile.layer1[0].project[0].out_channels
    assert mobile.layer3[0].depthwise[0].kernel_size == (5, 5) and mobile.fc.in_features == 64
    assert mobile(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert count_parameters(create_model("mobilenetv2", 3, 10)) == 2236682  # the default is the paper's
    with pytest.raises(ConfigError, match="kernel_size must be 3, 5 or 7"):
        create_model("mobilenetv2", 3, 10, kernel_size=4)


# ---------------------------------------------------------------- space and costs
def test_space_parses_choices_ranges_and_per_element_lists():
    space = Space("lenet5", {"channels": [[2, 4], [8], {"low": 16, "high": 32, "step": 8}, [8, 16]],
                             "kernels": [[3, 5], [5]]}, {"batchnorm": True})
    names = [d.name for d in space.dimensions]
    assert names == ["channels.0", "channels.1", "channels.2", "channels.3", "kernels.0", "kernels.1"]
    options = space.decode({"channels.0": 4, "channels.1": 8, "channels.2": 24, "channels.3": 8,
                            "kernels.0": 3, "kernels.1": 5})
    assert options == {"batchnorm": True, "channels": [4, 8, 24, 8], "kernels": [3, 5]}
    grid = space.grid(100)
    assert len(grid) == 2 * 1 * 3 * 2 * 2 * 1
    assert {p["channels.2"] for p in grid} == {16, 24, 32}
    assert Space("mobilenetv2", {"width_mult": {"low": 0.25, "high": 1.0}}, {}).grid(100) is None  # continuous


def test_space_rejects_what_the_family_lacks_and_bad_specs():
    with pytest.raises(ConfigError, match="lenet5 has no option 'depth' \\(it has batchnorm, width, channels, kernels\\)"):
        Space("lenet5", {"depth": [1, 2]}, {})
    with pytest.raises(ConfigError, match="family 'lenet7' is not a registered model"):
        Space("lenet7", {"width": [1]}, {})
    with pytest.raises(ConfigError, match="space.width: expected a list of choices or"):
        Space("lenet5", {"width": "wide"}, {})
    with pytest.raises(ConfigError, match="need low <= high"):
        Space("lenet5", {"width": {"low": 2, "high": 1}}, {})


def test_static_cost_counts_parameters_and_flops_by_hand():
    options = {"channels": [1, 2, 8, 8], "kernels": [5, 5]}
    cost = static_cost("lenet5", options, (1, 28, 28), 10)
    assert cost["params"] == count_parameters(create_model("lenet5", 1, 10, 28, **options))
    # multiply-adds: conv1 28x28x1x(1x5x5), conv2 10x10x2x(1x5x5), conv3 1x1x8x(2x5x5), fc1 8x8, fc2 8x10;
    # FLOPs are two per multiply-add (BatchNorm, ReLU and pooling are not counted)
    macs = 28 * 28 * 25 + 10 * 10 * 2 * 25 + 8 * 2 * 25 + 64 + 80
    assert cost["flops"] == 2 * macs


def test_over_budget_names_each_limit_exceeded():
    budget = BudgetConfig(params=1000, flops=None, latency_ms=1.0)
    assert over_budget({"params": 999, "flops": 10 ** 9, "latency_ms": 0.5}, budget) == []
    assert over_budget({"params": 1500, "flops": 1, "latency_ms": 2.0}, budget) == ["params 1500 > 1000",
                                                                                  "latency_ms 2 > 1"]


# ---------------------------------------------------------------- proxy and ranking
def test_diswot_is_zero_for_the_teacher_itself_and_lower_for_an_untrained_student():
    torch.manual_seed(0)
    teacher = create_model("lenet5", 1, 10, 32, batchnorm=False)  # no BatchNorm: train and eval modes agree
    x = torch.randn(16, 1, 32, 32)
    assert diswot_score(teacher, teacher, x, 10) == pytest.approx(0.0, abs=1e-5)
    student = create_model("lenet5", 1, 10, 32, channels=[2, 4, 16, 8], batchnorm=False)
    assert diswot_score(teacher, student, x, 10) < -0.1
    from dfkd.tools.search.proxy import \
        relations as _relations  # the teacher's side computed once for many students gives the same score
    assert diswot_score(teacher, student, x, 10, _relations(teacher, x, 10)) == diswot_score(teacher, student, x, 10)


def test_diswot_relation_term_is_the_row_normalized_embedding_gram():
    from dfkd.tools.search.proxy import relations as _relations

    torch.manual_seed(0)
    model = create_model("lenet5", 1, 10, 32, channels=[2, 4, 6, 5], batchnorm=False)
    x = torch.randn(4, 1, 32, 32)
    semantic, relation = _relations(model, x, 10)
    embedding = x
    for name, module in model.named_children():  # the input of fc2, by hand
        if name == "fc2":
            break
        embedding = module(embedding)
    gram = embedding @ embedding.T
    assert torch.allclose(relation, gram / gram.norm(dim=1, keepdim=True), atol=1e-5)
    assert semantic.shape == (10, 10)


def test_spearman_matches_rank_correlation_and_refuses_degenerate_input():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)  # 1 - 6 x 2 / (4 x 15)
    assert spearman([1, 2], [1, 2]) is None and spearman([1, 1, 1], [1, 2, 3]) is None


def test_pareto_rows_mark_the_non_dominated_students():
    def entry(params, accs):
        return {"model": "lenet5", "options": {}, "cost": {"params": params, "flops": 1, "latency_ms": 0.1},
                "runs": {str(i): {"final_acc": a, "best_acc": a, "time_total_s": 1.0} for i, a in enumerate(accs)}}
    state = {"retrain": {"a": entry(100, [80, 82]), "b": entry(200, [79, 79]), "c": entry(300, [90, 92])}}
    rows = {r["label"]: r for r in pareto_rows(state)}
    assert rows["a"]["pareto"] and not rows["b"]["pareto"] and rows["c"]["pareto"]
    assert rows["a"]["final"] == 81 and rows["a"]["std"] == pytest.approx(2 ** 0.5)


# ---------------------------------------------------------------- held-out validation
def test_validation_holds_out_the_same_stratified_part_and_evaluates_on_it(tmp_path, digits_teacher):
    from dfkd.data.datasets import load_dataset
    from dfkd.data.splits import hold_out
    from dfkd.loop.build import build_run

    train = load_dataset("digits", "train")
    rest, held = hold_out(train, 0.2)
    again, held_again = hold_out(train, 0.2)
    assert torch.equal(held.images, held_again.images) and len(rest) + len(held) == len(train)
    counts = torch.bincount(held.labels, minlength=10).float() / torch.bincount(train.labels, minlength=10)
    assert counts.min() >= 0.2 and counts.max() < 0.25  # ceil(0.2 n_c) of each class
    run = build_run(load_config("kd/kd-digits", ["data.validation=0.2", f"teacher.checkpoint={digits_teacher[0]}"]))
    assert len(run.test_loader.dataset) == len(held) and "held out" in run.test_loader.dataset.split
    assert len(run.real.loader.dataset) == len(rest)
    with pytest.raises(ConfigError, match="data.validation must be in \\[0, 1\\)"):
        load_config("kd/kd-digits", ["data.validation=1.0"])


# ---------------------------------------------------------------- the study
def _search(tmp_path, teacher, *overrides, storage=None, name="search/lenet5-digits"):
    config = load_search(name, [f"root={tmp_path}", f"teacher={teacher}", "set=[output.tensorboard=false, "
                                "runtime.num_threads=1, runtime.progress=false]", *overrides])
    return Search(config, storage=storage)


@pytest.mark.slow
def test_digits_search_finds_a_student_better_than_the_smallest_member(tmp_path, digits_teacher):
    teacher, _ = digits_teacher
    search = _search(tmp_path, teacher)
    state = search.run()
    trained = [t for t in state["trials"] if not t["over_budget"] and t["duplicate_of"] is None]
    assert len([t for t in trained if t["state"] in ("COMPLETE", "PRUNED")]) == 4
    assert all(t["cost"]["params"] <= 8000 for t in trained)
    assert trained[0]["queued_by"] == "proxy"  # the proxy's best candidate ran first
    assert len(state["proxy_ranking"]) == 8 and state["proxy_ranking"][0]["proxy"] >= state["proxy_ranking"][-1]["proxy"]
    rows = {r["label"]: r for r in pareto_rows(state)}
    # measured: 97.78% for the searched student, 84.89% for the smallest member (seed 0, 10 epochs)
    assert rows["searched-1"]["final"] > rows["reference-lenet5"]["final"] + 3
    assert rows["searched-1"]["params"] <= 8000 and rows["searched-1"]["latency_ms"] > 0
    table = (search.folder / "search.md").read_text()
    assert "| searched-1: lenet5(" in table and "| reference-lenet5: lenet5(channels=[1, 2, 8, 8]" in table
    assert (search.folder / "pareto.png").stat().st_size > 1000
    from tensorboard.backend.event_processing import event_accumulator as ea

    events = ea.EventAccumulator(str(search.folder), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    assert events.Images("search/pareto")[0].width == 720  # the plot, in TensorBoard too
    assert [e.step for e in events.Scalars("search/trial_acc")] == [t["number"] for t in trained
                                                                   if t["value"] is not None]
    # each trial is a run folder with its validation curve; retrained runs evaluate on the test split
    trial_config = (search.folder / "trials" / "0" / "config.yaml").read_text()
    assert "validation: 0.2" in trial_config
    assert "validation: 0.0" in (search.folder / "retrain" / "searched-1-s0" / "config.yaml").read_text()


@pytest.mark.slow
def test_a_space_with_nothing_within_the_budget_is_a_one_line_error(tmp_path, digits_teacher, capsys):
    from dfkd.cli import main

    teacher, _ = digits_teacher
    code = main(["search", "--config", "search/lenet5-digits", "--teacher", str(teacher), "--out", str(tmp_path),
                 "budget.params=100"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("dfkd: error: search: no architecture of the space fits the budget "
                                            "(params 643 > 100 for the smallest of 324 looked at)")


def test_an_unknown_option_and_an_unopenable_storage_are_one_line_errors(tmp_path, digits_teacher, capsys):
    from dfkd.cli import main

    teacher, _ = digits_teacher
    code = main(["search", "--config", "search/lenet5-digits", "--teacher", str(teacher), "--out", str(tmp_path),
                 "space.depth=[1, 2]"])
    assert code == 2 and "lenet5 has no option 'depth'" in capsys.readouterr().err
    code = main(["search", "--config", "search/lenet5-digits", "--teacher", str(teacher), "--out", str(tmp_path),
                 "--storage", f"sqlite:///{tmp_path}/no/such/folder/study.db"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith(f"dfkd: error: --storage sqlite:///{tmp_path}/no/such/folder/study.db: "
                                            f"cannot open it")
    code = main(["search", "--config", "search/lenet5-digits", "--teacher", str(teacher), "--out", str(tmp_path),
                 "--storage", "nosuchdb://x"])
    assert code == 2 and "cannot open it" in capsys.readouterr().err
    assert not (tmp_path / "search-lenet5-digits").exists()  # no search folder was left behind


@pytest.mark.slow
def test_workers_sharing_a_storage_share_the_trial_count(tmp_path, digits_teacher):
    teacher, _ = digits_teacher
    storage = f"sqlite:///{tmp_path}/shared.db"
    overrides = ["trial.set=[train.epochs=1]", "proxy.candidates=0", "retrain.top_k=0", "references=[]"]
    first = _search(tmp_path / "a", teacher, "trials=2", *overrides, storage=storage)
    first.run(trials_only=True)
    second = _search(tmp_path / "b", teacher, "trials=3", *overrides, storage=storage)
    state = second.run()
    # a worker of a shared study draws its own TPE samples, so one may propose (and skip) a candidate
    # over the budget: neither that nor a repeat is trained
    trained = [t for t in state["trials"] if t["duplicate_of"] is None and t["over_budget"] is None]
    assert len(trained) == 3  # one study: the second worker trained one more architecture
    first_numbers = {p.name for p in (first.folder / "trials").iterdir()}
    second_numbers = {p.name for p in (second.folder / "trials").iterdir()}
    assert len(first_numbers) == 2 and len(second_numbers) == 1
    assert first_numbers | second_numbers == {str(t["number"]) for t in trained}


@pytest.mark.slow
def test_a_killed_search_resumes_without_losing_a_finished_trial(tmp_path, digits_teacher):
    teacher, _ = digits_teacher
    command = [sys.executable, "-m", "dfkd", "search", "--config", "search/lenet5-digits", "--teacher", str(teacher),
               "--out", str(tmp_path), "trials=3", "proxy.candidates=0", "pruner.name=none",
               "trial.set=[train.epochs=30]", "retrain.top_k=1", "retrain.set=[train.epochs=1]", "references=[]",
               "set=[output.tensorboard=false, runtime.num_threads=1]"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline, states = time.time() + 240, {}
    try:
        while time.time() < deadline:  # kill -9 once trial 0 is done and trial 1 has a checkpoint
            time.sleep(0.1)
            found = list(tmp_path.glob("search-lenet5-digits/*/study.db"))
            if found:
                try:
                    with sqlite3.connect(found[0]) as db:
                        states = dict(db.execute("select number, state from trials").fetchall())
                except sqlite3.OperationalError:
                    continue
                if states.get(0) == "COMPLETE" and states.get(1) == "RUNNING" and \
                        (found[0].parent / "trials" / "1" / "ckpt" / "last.pt").exists():
                    break
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        process.kill()
    assert states.get(1) == "RUNNING", f"the search did not reach its second trial in time: {states}"
    folder = found[0].parent
    before = json.loads((folder / "search.json").read_text())
    search = Search.resume(folder)
    state = search.run()
    by_number = {t["number"]: t for t in state["trials"]}
    assert by_number[0]["state"] == "COMPLETE"  # the finished trial is kept as it was
    assert by_number[1]["state"] == "FAIL"      # the one cut short ...
    retried = [t for t in state["trials"] if t["number"] > 1 and t["options"] == by_number[1]["options"]]
    assert retried and retried[0]["state"] == "COMPLETE"  # ... ran again with the same architecture
    assert sum(t["state"] == "COMPLETE" and t["duplicate_of"] is None for t in state["trials"]) == 3
    assert before["config"] == state["config"] and (folder / "search.md").is_file()
    # the retried trial continued in the killed one's folder, from its checkpoint
    assert not (folder / "trials" / str(retried[0]["number"])).exists()


@pytest.mark.slow
def test_candidates_over_the_budget_are_rejected_untrained_and_do_not_count(tmp_path, digits_teacher):
    teacher, _ = digits_teacher
    search = _search(tmp_path, teacher, "budget.params=1500", "trials=2", "proxy.name=none",
                     "trial.set=[train.epochs=1]", "retrain.top_k=0", "references=[]")
    state = search.run()
    rejected = [t for t in state["trials"] if t["over_budget"]]
    trained = [t for t in state["trials"] if not t["over_budget"] and t["duplicate_of"] is None]
    assert rejected and all(t["state"] == "PRUNED" and t["epochs"] == 0 for t in rejected)
    assert all(t["cost"]["params"] > 1500 and t["over_budget"] == f"params {t['cost']['params']} > 1500"
               for t in rejected)
    assert len(trained) == 2 and all(t["cost"]["params"] <= 1500 for t in trained)
    assert not any((search.folder / "trials" / str(t["number"])).exists() for t in rejected)


@pytest.mark.slow
def test_with_no_trials_the_proxy_alone_chooses(tmp_path, digits_teacher):
    teacher, _ = digits_teacher
    search = _search(tmp_path, teacher, "trials=0", "proxy.candidates=5", "retrain.seeds=[0]",
                     "retrain.set=[train.epochs=1]", "references=[]")
    state = search.run()
    assert state["trials"] == [] and not (search.folder / "trials").exists()
    assert len(state["proxy_ranking"]) == 5
    assert state["retrain"]["searched-1"]["options"] == state["proxy_ranking"][0]["options"]


def test_a_data_free_search_ranks_by_the_proxy_on_noise_and_reads_no_training_image(tmp_path, digits_teacher,
                                                                                    monkeypatch):
    import dfkd.tools.search.study

    teacher, _ = digits_teacher
    search = _search(tmp_path, teacher, "config=datafree/dfq-digits")
    assert search.data_free

    def no_reading(*args, **kwargs):
        raise AssertionError("a data-free search read a dataset")

    monkeypatch.setattr(dfkd.tools.search.study, "load_dataset", no_reading)
    batch = search.proxy_batch()
    assert batch.shape == (64, 1, 32, 32) and abs(float(batch.mean())) < 0.05 and abs(float(batch.std()) - 1) < 0.05
    assert search.proxy({"channels": [2, 4, 16, 8], "kernels": [5, 5]}, batch) < 0
    monkeypatch.undo()
    kd = _search(tmp_path, teacher)  # a real-data method compares on training images (never held-out ones)
    assert not kd.data_free and kd.proxy_batch().shape == (64, 1, 32, 32)


@pytest.mark.slow
def test_a_repeated_architecture_is_answered_from_its_earlier_trial_and_a_small_space_ends(tmp_path, digits_teacher):
    teacher, _ = digits_teacher
    search = _search(tmp_path, teacher, "space={channels: [[2], [4], [16], [8, 16]], kernels: [[5], [5]]}",
                     "trials=3", "proxy.name=none", "trial.set=[train.epochs=1]", "retrain.top_k=0", "references=[]")
    state = search.run()
    trained = [t for t in state["trials"] if t["duplicate_of"] is None]
    repeats = [t for t in state["trials"] if t["duplicate_of"] is not None]
    assert sorted(t["options"]["channels"][3] for t in trained) == [8, 16]  # the space's two architectures, once each
    assert repeats and len(repeats) == 20 * 3 + 50 + 1  # then repeats, answered without training, until the cap
    by_number = {t["number"]: t for t in trained}
    assert all(t["value"] == by_number[t["duplicate_of"]]["value"] for t in repeats)
    assert sorted(p.name for p in (search.folder / "trials").iterdir()) == sorted(str(t["number"]) for t in trained)
