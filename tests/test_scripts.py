"""scripts/sweep.py, benchmark.py and throughput.py: the table arithmetic, and each end to end on tiny budgets."""
import contextlib
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
import yaml

from dfkd.core.config import load_config
from dfkd.loop.engine import Engine

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def load_script(name: str):
    """Scripts are not a package: import one from its path."""
    spec = importlib.util.spec_from_file_location(f"scripts_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses of a script look their module up there
    spec.loader.exec_module(module)
    return module


sweep = load_script("sweep")
benchmark = load_script("benchmark")
throughput = load_script("throughput")


@contextlib.contextmanager
def one_torch_thread():
    """One torch thread: faster than two on a busy small CPU; restored so other tests keep theirs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _one_thread():
    with one_torch_thread():  # the scripts and the engine may set the thread count themselves
        yield


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    """A barely trained digits teacher: the scripts need a model file, not a good one."""
    root = tmp_path_factory.mktemp("teacher")
    with one_torch_thread():
        summary = Engine(load_config("teacher/lenet5-digits", [
            f"output.root={root}", "train.epochs=1", "train.iters_per_epoch=3", "output.tensorboard=false"])).fit()
    return str(Path(summary["run_dir"]) / "ckpt" / "final.pt")


def row(config, seed, final, best, **extra):
    return {"config": config, "experiment": config.split("/")[-1], "seed": seed, "final_acc": final,
            "best_acc": best, "teacher_acc": 98.0, "time_synthesis_s": 10.0 + seed, "time_total_s": 20.0 + seed,
            **extra}


def test_render_table_aggregates_seeds():
    rows = [row("datafree/dfad-digits", s, f, b) for s, f, b in [(0, 90.0, 91.0), (1, 92.0, 95.0), (2, 94.0, 96.0)]]
    rows.append(row("datafree/dfq-digits", 0, 85.5, 86.25))
    lines = sweep.render_table(rows).splitlines()
    assert len(lines) == 4 and lines[0].startswith("| method / experiment | teacher acc | final acc | best (on eval")
    dfad = [c.strip() for c in lines[2].strip("|").split("|")]
    # final 90/92/94: mean 92, sample std 2; best 91/95/96: mean 94, std sqrt(7) = 2.6458
    assert dfad == ["datafree/dfad-digits", "98.00", "92.00 ± 2.00", "94.00 ± 2.65", "3", "11.0", "21.0", "–",
                    "0, 1, 2"]
    dfq = [c.strip() for c in lines[3].strip("|").split("|")]
    assert dfq[2:5] == ["85.50", "86.25", "1"]  # one seed: the mean alone, no ±


def test_render_table_time_to_target_counts_the_seeds_that_reached_it():
    rows = [row("a", s, 99.0, 99.0) for s in range(3)]
    for r, t in zip(rows, [10.0, None, 20.0]):
        r["time_to_99pct_teacher_s"] = t
    cells = [c.strip() for c in sweep.render_table(rows).splitlines()[2].strip("|").split("|")]
    assert cells[7] == "15.0 (2/3)"


def test_render_table_counts_a_rerun_once_with_its_latest_result():
    rows = [row("a", 0, 50.0, 50.0), row("a", 1, 70.0, 70.0), row("a", 0, 60.0, 60.0)]
    cells = [c.strip() for c in sweep.render_table(rows).splitlines()[2].strip("|").split("|")]
    assert cells[2] == "65.00 ± 7.07" and cells[4] == "2"


def test_sweep_end_to_end_and_report(tmp_path, teacher, capsys):
    out = tmp_path / "sweep"
    args = ["--configs", "datafree/dfad-digits", "--seeds", "0", "1", "--teacher", teacher, "--out", str(out),
            "--set", "train.epochs=1", "train.iters_per_epoch=2", "synthesis.batch_size=32",
            "output.tensorboard=false", "runtime.num_threads=1"]
    assert sweep.main(args) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["config"], r["seed"], r["steps"]) for r in rows] == [("datafree/dfad-digits", 0, 2),
                                                                   ("datafree/dfad-digits", 1, 2)]
    table = (out / "results.md").read_text()
    assert table in capsys.readouterr().out
    line = next(line for line in table.splitlines() if line.startswith("| datafree/dfad-digits"))
    assert "± " in line and line.rstrip().endswith("| 0, 1 |")

    # a restart with --skip-done runs nothing new; --from-jsonl only renders
    assert sweep.main([*args, "--skip-done"]) == 0
    assert len((out / "results.jsonl").read_text().splitlines()) == 2
    assert sweep.main(["--from-jsonl", str(out / "results.jsonl"), "--table", str(tmp_path / "t.md")]) == 0
    assert (tmp_path / "t.md").read_text() == table


def test_sweep_drops_a_cut_last_line_and_skip_done_keys_on_the_overrides(tmp_path, teacher, capsys):
    out = tmp_path / "sweep"
    base = ["--configs", "datafree/dfad-digits", "--seeds", "0", "--teacher", teacher, "--out", str(out), "--set",
            "train.epochs=1", "train.iters_per_epoch=1", "synthesis.batch_size=16", "output.tensorboard=false",
            "runtime.num_threads=1"]
    assert sweep.main(base) == 0
    results = out / "results.jsonl"
    with results.open("a") as f:
        f.write('{"config": "datafree/dfad-digits", "se')  # a sweep killed while writing a row
    capsys.readouterr()
    assert sweep.main([*base, "--skip-done"]) == 0  # the same run: done
    captured = capsys.readouterr()
    assert "dropped its last line" in captured.err and "sweep: datafree/dfad-digits seed 0" not in captured.err
    assert sweep.main([*base, "synthesis.batch_size=8", "--skip-done"]) == 0  # other overrides: another run
    assert "sweep: datafree/dfad-digits seed 0" in capsys.readouterr().err
    assert len(sweep.read_jsonl(results)) == 2  # the cut line is gone from the file, both runs' rows read


def test_sweep_without_teacher_fails_in_one_line(tmp_path, capsys):
    assert sweep.main(["--configs", "datafree/dfad-digits", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--teacher" in err


@pytest.mark.slow
def test_benchmark_runs_both_variants(tmp_path, teacher, capsys):
    out = tmp_path / "bench.json"
    assert benchmark.main(["--teacher", teacher, "--iters", "4", "--eval-every", "2", "--warmup", "1",
                           "--threads", "1", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    for name in ("engine", "inline"):
        v = report[name]
        assert {"time_s", "final_acc", "student_teacher_ratio", "time_to_99pct_s", "iter_to_99pct"} <= v.keys()
        assert [p["iter"] for p in v["runs"][0]["curve"]] == [2, 4] and v["time_s"] > 0
    assert {"teacher_acc", "overhead_pct", "max_weight_diff"} <= report.keys()
    # the same seed and the same computation: the two students agree (bitwise on CPU)
    assert report["max_weight_diff"] < 1e-4 and report["engine"]["final_acc"] == report["inline"]["final_acc"]
    assert "| engine |" in capsys.readouterr().out


@pytest.mark.slow
def test_benchmark_compares_a_method_with_the_inline_loop(tmp_path, teacher, capsys):
    out = tmp_path / "bench.json"
    assert benchmark.main(["--teacher", teacher, "--iters", "2", "--eval-every", "2", "--warmup", "0",
                           "--threads", "1", "--out", str(out), "--method", "datafree/dfq-digits", "--method-set",
                           "train.epochs=1", "train.iters_per_epoch=2", "synthesis.batch_size=16"]) == 0
    method = json.loads(out.read_text())["method"]
    assert method["config"] == "datafree/dfq-digits" and method["final_acc"] is not None
    assert method["target_s"] == pytest.approx(json.loads(out.read_text())["inline"]["time_s"] / 2)
    assert method["target_met"] == (method["time_to_99pct_s"] is not None
                                    and method["time_to_99pct_s"] <= method["target_s"])
    assert "datafree/dfq-digits: final" in capsys.readouterr().out


def _throughput(tmp_path, batch: int, *extra: str) -> dict:
    out = tmp_path / f"throughput-{batch}.json"
    assert throughput.main(["--dataset", "digits", "--teacher-net", "lenet5", "--student-net", "lenet5_half",
                            "--generator", "dcgan", "--ngf", "8", "--batch", str(batch), "--iters", "2",
                            "--warmup", "1", "--threads", "1", "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())


@pytest.mark.slow
def test_throughput_counts_the_work_of_one_iteration(tmp_path, capsys):
    small, large = _throughput(tmp_path, 8, "--peak-tflops", "2"), _throughput(tmp_path, 16)
    # dfq-digits: one generator step and ten student steps, each on a fresh batch
    assert small["student_images_per_s"] * small["seconds_per_iter"] == pytest.approx(10 * 8)
    assert small["synthetic_images_per_s"] * small["seconds_per_iter"] == pytest.approx(11 * 8)
    # convolutions and matrix products scale with the batch; set-up work (the generator's shape
    # check, the teacher's probe) would break the proportion if it were counted
    # the generator folds its kernels once a forward, whatever the batch: not quite twice the work
    assert small["tflops_per_iter"] > 0 and large["tflops_per_iter"] == pytest.approx(2 * small["tflops_per_iter"],
                                                                                      rel=0.01)
    assert small["flop_floor_fraction"] == pytest.approx(small["achieved_tflops"] / 2)
    assert large["flop_floor_fraction"] is None and large["peak_source"] == "no peak known for a CPU"
    assert "FLOP-floor fraction not computed" in capsys.readouterr().out


def test_throughput_peaks_by_gpu_name(monkeypatch):
    cuda = torch.device("cuda")
    for name, peak in [("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H200", 989.4),
                       ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA GeForce GTX 1080", None)]:
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert throughput.peak_tflops(cuda, None)[0] == peak
    assert throughput.peak_tflops(cuda, 100.0) == (100.0, "--peak-tflops")


def test_throughput_rejects_a_bad_model_name_in_one_line(tmp_path, capsys):
    assert throughput.main(["--dataset", "digits", "--teacher-net", "lenet6", "--out", str(tmp_path / "t.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "lenet6" in err and not (tmp_path / "t.json").exists()


# ------------------------------------------------------------------ reproduce.py
@pytest.mark.slow
def test_reproduce_writes_the_table_with_budgets_teacher_hash_and_published_numbers(tmp_path, teacher, capsys):
    reproduce = load_script("reproduce")
    out = tmp_path / "table"
    tiny = ["train.epochs=1", "train.iters_per_epoch=2", "synthesis.batch_size=16"]
    assert reproduce.main(["--datasets", "digits", "--methods", "dfq", "dafl", "--seeds", "0", "1",
                           "--teacher-digits", teacher, "--out", str(out), "--set", *tiny]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["config"], r["seed"]) for r in rows] == [("datafree/dfq-digits", 0), ("datafree/dfq-digits", 1),
                                                        ("datafree/dafl-digits", 0), ("datafree/dafl-digits", 1)]
    table = (out / "results.md").read_text()
    dafl = next(line for line in table.splitlines() if "datafree/dafl-digits" in line)
    sha = json.loads((out / "results.jsonl").read_text().splitlines()[0])["teacher_sha256"][:12]
    assert "2 it × 16 / 24000 it × 512" in dafl and "DAFL 98.20 (MNIST)" in dafl and sha in dafl
    assert "ZSKD 79.62" in table
    # a killed table resumes: nothing left to run, the same rows
    capsys.readouterr()
    assert reproduce.main(["--datasets", "digits", "--methods", "dfq", "dafl", "--seeds", "0", "1",
                           "--teacher-digits", teacher, "--out", str(out), "--skip-done", "--set", *tiny]) == 0
    assert "reproduce:" not in capsys.readouterr().err
    assert len((out / "results.jsonl").read_text().splitlines()) == 4


# ------------------------------------------------------------------ fingerprint.py
@pytest.mark.slow
def test_fingerprint_reports_identical_runs_and_names_what_differs(tmp_path, capsys):
    fingerprint = load_script("fingerprint")
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    assert fingerprint.main(["--out", str(first), "--cases", "teacher", "--root", str(tmp_path / "r1")]) == 0
    assert fingerprint.main(["--out", str(second), "--cases", "teacher", "--root", str(tmp_path / "r2"),
                             "--compare", str(first)]) == 0
    assert capsys.readouterr().out.strip().endswith("identical")  # the same seed, the same weights
    report = json.loads(first.read_text())
    report["cases"]["teacher"]["model"] = "0" * 64  # as if the code had changed one weight
    first.write_text(json.dumps(report))
    assert fingerprint.main(["--out", str(second), "--cases", "teacher", "--root", str(tmp_path / "r3"),
                             "--compare", str(first)]) == 1
    assert "differ: teacher.model" in capsys.readouterr().out


# ------------------------------------------------------------------ taxonomy.py
@pytest.mark.slow
def test_taxonomy_table_has_the_thin_student_fsp_at_full_width_and_the_published_anchor(tmp_path, teacher, capsys):
    taxonomy = load_script("taxonomy")
    out = tmp_path / "kd"
    args = ["--datasets", "digits", "--methods", "student", "fsp", "--seeds", "0", "1", "--teacher-digits", teacher,
            "--out", str(out), "--set", "train.epochs=1"]
    assert taxonomy.main(args) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["method"], r["seed"], r["student"]) for r in rows] == [
        ("student", 0, "LeNet-5 × 0.125"), ("student", 1, "LeNet-5 × 0.125"), ("fsp", 0, "LeNet-5"), ("fsp", 1, "LeNet-5")]
    student = next(line for line in (out / "results.md").read_text().splitlines() if "kd/student-digits" in line)
    assert "| 0, 1 |" in student and student.endswith("| 69.06 |")
    capsys.readouterr()
    assert taxonomy.main([*args, "--skip-done"]) == 0  # nothing left to run
    assert "taxonomy:" not in capsys.readouterr().err
    assert taxonomy.main([*args[:4], "--seeds", "0", *args[8:], "--skip-done", "--stretch", "2"]) == 0  # another schedule
    assert "taxonomy: kd/student-digits seed 0" in capsys.readouterr().err


def test_taxonomy_stretch_lengthens_every_stage_and_ramp_by_the_factor(capsys):
    taxonomy = load_script("taxonomy")
    assert taxonomy.stretched("kd/kd-fmnist", [], 3) == ["train.epochs=24"]
    assert taxonomy.stretched("kd/fitnets-fmnist", [], 3) == ["train.epochs=24", "phases.0.epochs=[0,6]",
                                                              "phases.1.epochs=[6,24]"]
    assert taxonomy.stretched("kd/dkd-fmnist", [], 3) == ["train.epochs=24", "phases.0.losses.dkd.warmup=6"]
    assert taxonomy.stretched("datafree/dfq-fmnist", ["train.epochs=40"], 0.5)[0] == "train.epochs=20"
    with pytest.raises(SystemExit):
        taxonomy.main(["--methods", "kd", "takd", "--stretch", "2", "--table-only"])
    assert "--stretch takes single-run methods" in capsys.readouterr().err


def test_quant_table_puts_bits_down_methods_across_and_names_the_best_data_free_method(tmp_path):
    quant_table = load_script("quant_table")

    def row(experiment, precision, acc, best, seed, overrides=()):
        return {"experiment": experiment, "precision": precision, "final_acc": acc, "best_acc": best, "seed": seed,
                "teacher_acc": 91.85, "overrides": list(overrides)}

    rows = [row("qat-kd-fmnist", "W4A4 lsq", 91.0, 91.2, 0), row("qat-kd-fmnist", "W4A4 lsq", 91.2, 91.3, 1),
            row("gdfq-fmnist", "W4A4 minmax", 89.5, 89.9, 0), row("qimera-fmnist", "W4A4 minmax", 89.0, 89.1, 0),
            row("qdfq-fmnist", "W4A4 lsq", 88.0, 88.1, 0),
            row("ptq-fmnist", "W2A2 minmax, first/last 8-bit", 63.0, 63.0, 0),
            row("qat-fmnist", "W4A4 lsq", 80.0, 80.5, 0, ["players.student.net.name=lenet5_half"])]
    table = quant_table.render(rows)
    lines = table.splitlines()
    w4 = next(line for line in lines if line.startswith("| LeNet-5 | W4A4"))
    assert "91.10 ± 0.14 (best 91.30, n=2)" in w4          # QAT + KD: mean ± sample std, best beside
    assert w4.endswith("| Qimera: 89.00 (best 89.10, n=1) |")  # the best data-free method other than GDFQ
    assert lines.index(w4) < lines.index(next(line for line in lines if "W2A2, first/last 8-bit" in line))
    assert any(line.startswith("| LeNet-5-half | W4A4") and "80.00" in line for line in lines)
    (tmp_path / "r.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert quant_table.main([str(tmp_path / "r.jsonl"), "--out", str(tmp_path / "t.md")]) == 0
    assert (tmp_path / "t.md").read_text() == table
    assert quant_table.main([str(tmp_path / "missing.jsonl")]) == 2


@pytest.mark.slow
def test_taxonomy_runs_chains_and_data_free_rows_from_the_tables_teacher(tmp_path, teacher):
    taxonomy = load_script("taxonomy")
    out = tmp_path / "kd"
    assert taxonomy.main(["--datasets", "digits", "--methods", "born-again", "takd", "dfq", "dfq+pkt", "--seeds", "0",
                          "--teacher-digits", teacher, "--out", str(out), "--set", "train.epochs=1"]) == 0
    rows = {r["method"]: r for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())}
    born_again, takd, dfq = rows["born-again"], rows["takd"], rows["dfq"]
    # the given teacher is no stage of the row; generation 1 (or the assistant) is beside the last stage
    assert list(born_again["stages"]) == ["gen1"] and list(takd["stages"]) == ["assistant"]
    assert born_again["teacher"] == teacher and born_again["student"] == "LeNet-5"
    assert born_again["seed"] == takd["seed"] == 0  # the chain's seed, not its last stage's (seed + 2)
    assert 0 <= born_again["ensemble_acc"] <= 100 and "ensemble_acc" not in takd
    assert born_again["run_dir"].startswith(str(out / "chains" / "born-again-digits"))
    state = json.loads((Path(born_again["run_dir"]).parent / "chain.json").read_text())
    assert state["stages"]["teacher"]["model"] == teacher and "runtime.num_threads=1" in state["config"]["set"]
    assert dfq["config"] == "datafree/dfq-digits" and dfq["student"] == "LeNet-5 × 0.125" and dfq["steps"] == 25
    # the budget the digits rows were measured at: 5 student steps an iteration (dfq-digits ships 10)
    assert yaml.safe_load((Path(dfq["run_dir"]) / "config.yaml").read_text())["phases"][1]["steps"] == 5
    pkt = rows["dfq+pkt"]  # PKT's relation term on the synthetic batches, beside KD
    logged = (Path(pkt["run_dir"]) / "metrics.jsonl").read_text()
    assert pkt["config"] == "datafree/dfq+pkt-digits" and '"loss/student/pkt"' in logged and "loss/student/ce" not in logged
    table = (out / "results.md").read_text()
    assert "| chain/born-again-digits | LeNet-5 (gen1 " in table and "; ensemble " in table
    assert "| chain/takd-digits | LeNet-5 × 0.125 (assistant " in table and "| datafree/dfq-digits |" in table


# ------------------------------------------------------------------ teachers_table.py
@pytest.mark.slow
def test_teachers_table_trains_each_architecture_as_a_user_would_and_marks_the_target(tmp_path, teacher, capsys):
    table = load_script("teachers_table")
    out = tmp_path / "teachers"
    tiny = ["train.epochs=1", "train.iters_per_epoch=2"]
    args = ["--archs", "lenet5", "resnet8", "--methods", "dfq", "--seeds", "0", "--teacher", f"lenet5={teacher}",
            "--teacher-set", *tiny, "--set", *tiny, "--out", str(out)]
    assert table.main(args) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [(r["config"], r["arch"], r["seed"]) for r in rows] == [("datafree/dfq-digits", "lenet5", 0),
                                                                  ("datafree/dfq-digits", "resnet8", 0)]
    trained = rows[1]["teacher"]
    assert rows[0]["teacher"] == teacher and trained.startswith(str(out / "teachers" / "teacher-resnet8-digits"))
    assert torch.load(trained, weights_only=True)["arch"]["name"] == "resnet8"
    assert rows[1]["teacher_sha256"] == torch.load(trained, weights_only=True)["sha256"]
    capsys.readouterr()
    assert table.main([*args, "--skip-done"]) == 0  # nothing left to run, the trained teacher found again
    assert "teachers:" not in capsys.readouterr().err
    with pytest.raises(SystemExit):
        table.main(["--teacher", "resnet8"])
    assert "--teacher takes ARCH=PATH, got 'resnet8'" in capsys.readouterr().err

    def result(arch, final, teacher_acc):
        return {"config": "datafree/dfq-digits", "arch": arch, "seed": 0, "final_acc": final, "best_acc": final,
                "teacher_acc": teacher_acc}

    text = table.render([result("lenet5", 97.0, 99.0), result("resnet8", 90.0, 99.0)], ["lenet5", "resnet8"], 0.97)
    assert "| config | lenet5 (99.00) | resnet8 (99.00) |" in text
    assert "| datafree/dfq-digits | 97.00 (97.00), 98.0% ✓, seeds 0 | 90.00 (90.00), 90.9%, seeds 0 |" in text


# ---------------------------------------------------------------- scripts/reference.py
reference = load_script("reference")


def test_reference_gives_dfkd_the_reference_work_and_stops_when_a_setting_would_differ(monkeypatch):
    case = reference.CASES["dfq"]
    work = reference.DFQWork(batch=16, epochs=1, iters=1, kd_steps=2, T=4.0)
    overrides = reference.check_equal_work(case, work, "teacher.pt")
    assert "phases.1.losses={kd_kl: {weight: 1.0, T: 4.0}}" in overrides and "synthesis.batch_size=16" in overrides
    # dfq-digits-paper as shipped now does the benchmark's work; before: tanh+BN output, wd 5e-4, floor 0
    assert reference.shipped_differences(case, "teacher.pt") == []
    assert reference.settings(["adv=0", "output=bn"], reference.DFQWork) == {"adv": 0.0, "output": "bn"}
    with pytest.raises(SystemExit, match="--set nope=1: expected FIELD=VALUE with FIELD one of batch, nz"):
        reference.settings(["nope=1"], reference.DFQWork)
    monkeypatch.setattr(reference.DFQCase, "overrides",
                        lambda self, w: [o for o in overrides if not o.startswith("phases.1")])
    with pytest.raises(SystemExit, match=r"would not do the reference's work: kd_steps: 10 vs 2; T: 1\.0 vs 4\.0"):
        reference.check_equal_work(case, work, "teacher.pt")


def assert_refused(monkeypatch, case, work, overrides: list[str], extra: str, match: str) -> None:
    """dfkd's side given ``extra`` beyond the case's overrides no longer does the reference's work: refused."""
    monkeypatch.setattr(type(case), "overrides", lambda self, w: [*overrides, extra])
    with pytest.raises(SystemExit, match=match):
        reference.check_equal_work(case, work, "teacher.pt")


def test_reference_fast_case_reads_back_every_setting_of_fast_dfkds_synthesis(monkeypatch):
    case = reference.CASES["fast"]
    work = reference.FastWork(batch=32, g_steps=3, kd_steps=7, epochs=4, warmup=1, lr_z=0.02, bn_mmt=0.5)
    overrides = reference.check_equal_work(case, work, "teacher.pt")
    assert "synthesis.outer.lr=0.006" in overrides  # Fast-DFKD's outer step: the inner lr x the inner steps
    assert "phases.1.augment={crop_padding: 4, flip: true, pad: black}" in overrides
    assert reference.settings(["student_flip=false", "warmup=3"], reference.FastWork) == \
        {"student_flip": False, "warmup": 3}
    with pytest.raises(SystemExit, match="--set flip=no: expected FIELD=VALUE .* and VALUE true or false"):
        reference.settings(["flip=no"], reference.FastWork)
    # the shipped digits recipe asks for balanced classes and does not flip digits (on purpose)
    assert reference.shipped_differences(case, "teacher.pt") == [
        "labels: 'balanced' vs 'random'", "flip: False vs True", "student_flip: False vs True"]
    assert_refused(monkeypatch, case, work, overrides, "phases.0.losses.adv_kl.agreement_mask=false",
                   "not Fast-DFKD's synthesis as the reference runs it")


def test_reference_cmi_case_reads_back_the_contrastive_terms_settings(monkeypatch):
    case = reference.CASES["cmi"]
    work = reference.CMIWork(batch=16, g_steps=3, kd_steps=2, epochs=2, bank=64, negatives=8, head_dim=32, cr_T=0.5)
    overrides = reference.check_equal_work(case, work, "teacher.pt")
    assert "synthesis.latent_lr=null" in overrides  # CMI's latents share the generator's Adam and its lr
    # the digits recipe asks for balanced classes and flips no digit; its floor was 0 before the benchmark's 2e-4
    assert reference.shipped_differences(case, "teacher.pt") == [
        "labels: 'balanced' vs 'random'", "flip: False vs True", "local_flip: False vs True",
        "student_flip: False vs True"]
    assert_refused(monkeypatch, case, work, overrides, "synthesis.keep=last",
                   "not CMI's synthesis as the reference runs it")


def test_reference_dfad_case_is_the_scripts_loop_and_refuses_what_it_cannot_change(monkeypatch):
    case = reference.CASES["dfad"]
    work = reference.DFADWork(batch=16, epochs=1, iters=2, lr=0.05)
    overrides = reference.check_equal_work(case, work, "teacher.pt")
    assert "players.generator.optim.betas=[0.9, 0.999]" in overrides and "players.student.optim.lr=0.05" in overrides
    assert reference.shipped_differences(case, "teacher.pt") == []
    with pytest.raises(SystemExit, match="an iteration: kd_steps cannot be changed"):
        case.drive_reference(Path("."), reference.DFADWork(kd_steps=3), "teacher.pt", "lenet5_half", 0)
    assert_refused(monkeypatch, case, work, overrides, "phases.0.losses={l1_logits: 1.0, kd_kl: 1.0}",
                   "not DFAD's loop as the reference runs it")


def test_reference_zskt_case_pairs_the_attention_layers_and_the_students_train_mode(monkeypatch):
    case = reference.CASES["zskt"]
    work = reference.ZSKTWork(batch=16, epochs=3, kd_steps=2, beta=100.0)
    overrides = reference.check_equal_work(case, work, "teacher.pt")
    assert "phases.0.train_mode=[student]" in overrides
    assert "phases.1.losses={kd_kl: {weight: 1.0, reduction: mean, T: 1.0}, attention: {weight: 100.0, " \
           "pairs: [[relu1, relu1], [relu2, relu2]]}}" in overrides
    # the shipped recipe's 400 iterations an epoch: its cosine steps each student step, not once an iteration
    assert reference.shipped_differences(case, "teacher.pt") == ["interval: 'step' vs 'epoch'"]
    with pytest.raises(SystemExit, match="grad_clip cannot be changed"):
        case.drive_reference(Path("."), reference.ZSKTWork(grad_clip=1.0), "teacher.pt", "lenet5_half", 0)
    assert_refused(monkeypatch, case, work, overrides, "phases.0.train_mode=[]",
                   "not ZSKT's loop as the reference runs it")


def test_reference_dafl_case_converts_the_log10_entropy_weight_and_refuses_what_the_script_fixes(monkeypatch):
    case = reference.CASES["dafl"]
    work = reference.DAFLWork(batch=16, epochs=1, iters=2, ie=10.0, a=0.05)
    overrides = reference.check_equal_work(case, work, "teacher.pt")
    # the code's Σ p log10 p at weight 10 is dfkd's Σ p ln p at 10 / ln 10
    assert f"phases.0.losses={{onehot_ce: 1.0, class_balance: {10 / math.log(10)!r}, activation_norm: " \
           "{weight: 0.05, layer: relu3}}" in overrides
    assert "players.generator.net.kwargs.bn_eps=0.8" in overrides and "players.generator.optim.lr=0.2" in overrides
    # the shipped paper recipe's weight is 5 / ln 10 to the float (2.17 would read back as ie 4.9966)
    assert reference.shipped_differences(case, "teacher.pt") == []
    with pytest.raises(SystemExit, match="relu3 features: ngf cannot be changed"):
        case.drive_reference(Path("."), reference.DAFLWork(ngf=32), "teacher.pt", "lenet5_half", 0)
    assert_refused(monkeypatch, case, work, overrides, "phases.1.batch=fresh",
                   "not DAFL's loop as the reference runs it")
    assert_refused(monkeypatch, case, work, overrides, "players.generator.optim.betas=[0.5, 0.999]",
                   "not DAFL's loop as the reference runs it")


@pytest.mark.slow
def test_reference_dafl_iterations_are_dafl_trains_statements_at_equal_weights_and_latents(
        digits_teacher, tmp_path, monkeypatch):
    """Two iterations of dfkd's dafl-digits-paper and of DAFL-train.py's own statements, from the same
    generator and student weights and the same latents, with plain SGD on both sides so that the
    weights compare the gradients: the same to float rounding."""
    import copy

    from dfkd.nets.arch import load_model

    case, cache = reference.CASES["dafl"], Path(reference.DEFAULT_CACHE)
    code = reference.checkout_folder("dafl", cache)
    if not code.exists():
        pytest.skip(f"DAFL's code is not in the cache ({code}): no fetch from GitHub in the tests")
    work = reference.DAFLWork(batch=16, epochs=1, iters=2, lr=0.05, lr_g=0.05)
    sgd = [f"players.{name}.optim.{key}" for name in ("student", "generator") for key in ("name=sgd", "momentum=0.0")]
    engine = Engine(load_config(case.config, [f"teacher.checkpoint={digits_teacher[0]}", *case.overrides(work), *sgd,
                                              f"output.root={tmp_path}", "output.tensorboard=false",
                                              "runtime.progress=false", "output.quality_samples=0"]))
    generator, student = engine.players.module("generator"), engine.players.module("student")
    g0, s0 = copy.deepcopy(generator.state_dict()), copy.deepcopy(student.state_dict())
    draws, randn = [torch.randn(16, 100) for _ in range(2)], torch.randn
    latents = list(draws)

    def replay_latents(*size, **kwargs):  # both sides draw (16, 100) latents once an iteration
        shape = tuple(size[0]) if size and isinstance(size[0], (tuple, list)) else tuple(size)
        return latents.pop(0).clone() if shape == (16, 100) else randn(*size, **kwargs)

    monkeypatch.setattr(torch, "randn", replay_latents)
    engine.fit()
    assert not latents
    monkeypatch.setattr(torch.Tensor, "cuda", torch.Tensor.cuda)  # the program makes it the identity
    scope, loop = case.program(code, work, (1, 32, 32))
    ours = {"project": "l1.0", "blocks.0": "conv_blocks0.0", "blocks.2": "conv_blocks1.0", "blocks.3": "conv_blocks1.1",
            "blocks.6": "conv_blocks2.0", "blocks.7": "conv_blocks2.1", "to_image.0": "conv_blocks2.3",
            "to_image.2": "conv_blocks2.5"}

    def theirs(key):
        prefix = next(k for k in ours if key.startswith(k + "."))
        return ours[prefix] + key[len(prefix):]

    their_generator = scope["Generator"]()
    their_generator.load_state_dict({theirs(k): v for k, v in g0.items()})
    their_student = copy.deepcopy(student)
    their_student.load_state_dict(s0)
    teacher, _ = load_model(str(digits_teacher[0]))
    scope.update(generator=their_generator, teacher=case.out_feature(teacher, "relu3"), net=their_student,
                 criterion=torch.nn.CrossEntropyLoss(), iters=2,
                 optimizer_G=torch.optim.SGD(their_generator.parameters(), lr=0.05),
                 optimizer_S=torch.optim.SGD(their_student.parameters(), lr=0.05))
    latents.extend(draws)
    exec(loop, scope)
    assert not latents
    for key, value in generator.state_dict().items():
        torch.testing.assert_close(value, their_generator.state_dict()[theirs(key)], atol=2e-5, rtol=1e-4, msg=key)
    for key, value in student.state_dict().items():
        torch.testing.assert_close(value, their_student.state_dict()[key], atol=2e-5, rtol=1e-4, msg=key)
    assert (student.state_dict()["fc2.weight"] - s0["fc2.weight"]).abs().max() > 1e-4  # the student did move


@pytest.mark.slow
def test_reference_deepinv_batch_is_nvlabs_get_images_at_equal_noise_and_jitter(digits_teacher, tmp_path, monkeypatch):
    """One batch of deepinv-digits-paper's synthesis and one of NVlabs' get_images(), from the same
    noise, asking for the same classes, jittered by the same offsets, the pixels stepped by plain SGD
    (Adam's first steps turn float-rounding differences of near-zero gradients into whole steps):
    the same pixels."""
    import random
    import sys

    from dfkd.nets.arch import load_model

    case, cache = reference.CASES["deepinv"], Path(reference.DEFAULT_CACHE)
    code = reference.checkout_folder("deepinversion", cache)
    if not code.exists():
        pytest.skip(f"NVlabs' DeepInversion is not in the cache ({code}): no fetch from GitHub in the tests")
    steps, batch = 4, 256  # get_images' balanced classes are a list of 256
    work = reference.DeepInvWork(epochs=1, g_steps=steps, kd_steps=1, adv=0.2, lr_g=2.0)
    noise, randn, randint = torch.randn(batch, 1, 32, 32), torch.randn, torch.randint
    offsets = [random.Random(0).randint(-2, 2) for _ in range(2 * steps)]
    shifts = list(offsets)

    def same_noise(*size, **kwargs):  # the first (256, C, 32, 32) draw of each side is `noise`
        shape = tuple(size[0]) if size and isinstance(size[0], (tuple, list)) else tuple(size)
        if shape in ((batch, 1, 32, 32), (batch, 3, 32, 32)):
            return noise.clone().requires_grad_(kwargs.get("requires_grad", False))
        return randn(*size, **kwargs)

    def same_shifts(*args, **kwargs):  # dfkd's jitter: (dx, dy) from the shared offsets
        if args == (-2, 3, (2,)):
            return torch.tensor([shifts.pop(0), shifts.pop(0)])
        return randint(*args, **kwargs)

    monkeypatch.setattr(torch, "randn", same_noise)
    monkeypatch.setattr(torch, "randint", same_shifts)
    monkeypatch.setattr(torch, "randperm", lambda n, **kwargs: torch.arange(n))  # classes 0..9, 0..9, ..., 0..5
    engine = Engine(load_config(case.config, [f"teacher.checkpoint={digits_teacher[0]}", *case.overrides(work),
                                              "synthesis.inner.name=sgd", "synthesis.inner.momentum=0.0",
                                              f"output.root={tmp_path}", "output.tensorboard=false",
                                              "runtime.progress=false", "output.quality_samples=0"]))
    student = engine.players.module("student")
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    ours = None

    def keep(images, labels):
        nonlocal ours
        ours = images.clone()
        return add(images=images, labels=labels)

    add = engine.synth.pool.add
    monkeypatch.setattr(engine.synth.pool, "add", lambda images, labels: keep(images, labels))
    engine.fit()
    assert ours is not None and not shifts
    student.load_state_dict(student_before)  # the competition term reads the student as it was
    for name, value in (("Module.cuda", lambda self, *a, **k: self),
                        ("Tensor.to", lambda self, *a, **k: self if a == ("cuda",) else to(self, *a, **k))):
        owner = torch.nn.Module if name.startswith("Module") else torch.Tensor
        to = torch.Tensor.to
        monkeypatch.setattr(owner, name.split(".")[1], value)
    monkeypatch.syspath_prepend(str(code / "cifar10"))
    monkeypatch.delitem(sys.modules, "deepinversion_cifar10", raising=False)
    import deepinversion_cifar10 as nvlabs

    monkeypatch.setattr(nvlabs, "debug_output", False)
    shifts.extend(offsets)
    monkeypatch.setattr(nvlabs.random, "randint", lambda low, high: shifts.pop(0))
    monkeypatch.chdir(tmp_path)
    Path("best_images").mkdir()
    teacher, _ = load_model(str(digits_teacher[0]))
    inputs = noise.clone().requires_grad_(True)
    theirs = nvlabs.get_images(net=teacher.eval(), bs=batch, epochs=steps, idx=-1, net_student=student, prefix="",
                               competitive_scale=work.adv, optimizer=torch.optim.SGD([inputs], lr=work.lr_g),
                               inputs=inputs, bn_reg_scale=work.bn, var_scale=work.tv, random_labels=False,
                               l2_coeff=0.0)
    assert not shifts
    assert (theirs - noise).abs().max() > 0.1  # the pixels moved
    torch.testing.assert_close(ours, theirs.detach(), atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_reference_nayer_batches_are_nayers_synthesizer_at_equal_weights(digits_teacher, tmp_path, monkeypatch):
    """Two batches of nayer-digits' synthesis and two of NAYER's own synthesizer, from the same
    generator, class embeddings and noisy layers, with its adversarial term on (a student that does
    not move) and its BatchNorm momentum carried from the first batch to the second, the generator
    stepped by plain SGD on both sides and the augmentation off: the same kept images."""
    import sys

    from dfkd.data.card import card_of, info_from_card
    from dfkd.nets.arch import load_model

    case, cache = reference.CASES["nayer"], Path(reference.DEFAULT_CACHE)
    code = reference.checkout_folder("nayer", cache)
    if not code.exists():
        pytest.skip(f"NAYER's code is not in the cache ({code}): no fetch from GitHub in the tests")
    batch, steps = 20, 3
    work = reference.NayerWork(batch=batch, nz=16, noise_dim=32, ngf=8, g_steps=steps, kd_steps=1, epochs=2, lr=0.0,
                               lr_g=0.01, warmup=0, g_life=100, g_loops=1, gwp_loops=1, crop=0, flip=False,
                               student_crop=0, student_flip=False)
    engine = Engine(load_config(case.config, [f"teacher.checkpoint={digits_teacher[0]}", *case.overrides(work),
                                              "synthesis.inner.name=sgd", "synthesis.inner.momentum=0.0",
                                              # a student without BatchNorm, whose lr 0 keeps it as it is
                                              "players.student.net.kwargs.batchnorm=false",
                                              f"output.root={tmp_path / 'dfkd'}", "output.tensorboard=false",
                                              "runtime.progress=false", "output.quality_samples=0"]))
    ours_generator = engine.synth.generator
    _, meta = load_model(str(digits_teacher[0]))
    info = info_from_card(card_of(meta), "digits")
    with torch.no_grad():
        for name in ("blocks.2.bias", "blocks.6.bias"):  # NAYER's convolutions before a BatchNorm have none
            ours_generator.get_parameter(name).zero_()
    start = {k: v.clone() for k, v in ours_generator.state_dict().items()}
    noisy = [[(torch.randn(32, 16), torch.zeros(32)) for _ in ours_generator.noisy] for _ in range(2)]

    def load_noise(layers, draw):
        with torch.no_grad():
            for layer, (weight, bias) in zip(layers, draw):
                layer.weight.copy_(weight), layer.bias.copy_(bias)

    draws = iter(noisy)
    monkeypatch.setattr(ours_generator, "reset_noise", lambda: load_noise(ours_generator.noisy, next(draws)))
    ours = []
    add = engine.synth.pool.add
    monkeypatch.setattr(engine.synth.pool, "add", lambda images, labels: (ours.append(images.clone()),
                                                                          add(images=images, labels=labels)))
    engine.fit()
    assert len(ours) == 2

    monkeypatch.setattr(torch.nn.Module, "cuda", lambda self, *args, **kwargs: self)
    for name in [m for m in sys.modules if m == "datafree" or m.startswith("datafree.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.syspath_prepend(str(code))
    reference._stub_modules()
    import datafree.utils._utils as utils
    from datafree.models.generator import NLGenerator
    from datafree.synthesis import NAYER
    from datafree.utils import Normalizer

    mapping = {"embedding_norm": "n1", "noisy": "le1", "project": "l1.0", "blocks": "conv_blocks",
               "to_image.0": "conv_blocks.9"}

    def theirs(key):
        prefix = next(k for k in mapping if key.startswith(k + "."))
        return mapping[prefix] + key[len(prefix):]

    generator = NLGenerator(ngf=8, img_size=32, nc=1, nl=10, label_emb=start["class_embeddings"], le_emb_size=32,
                            le_size=16, sbz=batch)
    generator.load_state_dict({theirs(k): v for k, v in start.items()
                               if k != "class_embeddings" and k not in ("blocks.2.bias", "blocks.6.bias")})
    draws = iter(noisy)
    monkeypatch.setattr(NLGenerator, "re_init_le", lambda self: load_noise(self.le1, next(draws)))
    monkeypatch.setattr(NLGenerator, "reinit", lambda self: self)  # its first batch's re-initialization: a fresh one
    monkeypatch.setattr(utils, "save_image_batch", reference.greyscale_writer(utils.save_image_batch))
    monkeypatch.setattr(torch.optim, "Adam", lambda groups, lr, betas: torch.optim.SGD(groups, lr=lr))
    teacher, student = engine.teachers.first, engine.players.module("student")
    normalizer = Normalizer(info.mean, info.std)
    synthesizer = NAYER(teacher, student, generator, num_classes=10, img_size=(1, 32, 32), save_dir=str(tmp_path),
                        normalizer=normalizer, synthesis_batch_size=batch, sample_batch_size=batch, g_steps=steps,
                        warmup=0, lr_g=work.lr_g, adv=work.adv, bn=work.bn, oh=work.oh, bn_mmt=work.bn_mmt,
                        g_life=100, g_loops=1, gwp_loops=1)
    synthesizer.aug = normalizer  # its crop and flip off, as dfkd's are here
    theirs_kept = [synthesizer.synthesize()[0]["synthetic"][0] for _ in range(2)]
    for name in [m for m in sys.modules if m == "datafree" or m.startswith("datafree.")]:
        sys.modules.pop(name)
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (info.mean, info.std))
    for mine, their in zip(ours, theirs_kept):
        torch.testing.assert_close(mine * std + mean, their, atol=5e-4, rtol=1e-3)
    assert (ours[1] - ours[0]).abs().max() > 0.1


@pytest.mark.slow
def test_reference_deepinv_student_loop_is_dfkds_replay_at_equal_pool_and_draws(digits_teacher, tmp_path, monkeypatch):
    """The reference side's student loop (NVlabs' script has none) and dfkd's student phase, from
    the same student, on the same pool, drawing the same replay indices, the cosine stepped per
    student step: the same student."""
    case = reference.CASES["deepinv"]
    work = reference.DeepInvWork(batch=32, labels="random", epochs=2, g_steps=2, kd_steps=3)
    engine = Engine(load_config(case.config, [f"teacher.checkpoint={digits_teacher[0]}", *case.overrides(work),
                                              f"output.root={tmp_path}", "output.tensorboard=false",
                                              "runtime.progress=false", "output.quality_samples=0"]))
    student = engine.players.module("student")
    start = {k: v.clone() for k, v in student.state_dict().items()}
    pool, draws = engine.synth.pool, []
    added, add, random_index = [], pool.add, pool.random_index
    monkeypatch.setattr(pool, "add", lambda images, labels: (added.append(images.clone()), add(images=images,
                                                                                              labels=labels)))
    monkeypatch.setattr(pool, "random_index", lambda n: draws.append(random_index(n)) or draws[-1])
    engine.fit()
    assert len(added) == 2 and len(draws) == 2 * 3
    ours = {k: v.clone() for k, v in student.state_dict().items()}

    student.load_state_dict(start)
    optimizer = torch.optim.SGD(student.parameters(), work.lr, momentum=0.9, weight_decay=work.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, 2 * 3, eta_min=work.lr_min)
    replayed = iter(draws)
    randint = torch.randint
    monkeypatch.setattr(torch, "randint", lambda high, size, **kwargs: next(replayed) if tuple(size) == (32,)
                        else randint(high, size, **kwargs))
    for epoch in range(2):
        case.train_student(student, engine.teachers.first, torch.cat(added[:epoch + 1]), optimizer, scheduler, work)
    for key, value in student.state_dict().items():
        torch.testing.assert_close(value, ours[key], atol=1e-5, rtol=1e-4, msg=key)
    assert (ours["fc2.weight"] - start["fc2.weight"]).abs().max() > 1e-3


def test_reference_deepinv_case_is_nvlabs_inversion_and_refuses_what_get_images_fixes(monkeypatch):
    case = reference.CASES["deepinv"]
    work = reference.DeepInvWork(batch=16, epochs=2, g_steps=30, kd_steps=4, labels="random", adv=0.2)
    overrides = reference.check_equal_work(case, work, "teacher.pt")
    assert "phases.0.losses={bn_stats: 10.0, onehot_ce: {weight: 1.0, target: labels}, tv: 2.5e-05, " \
           "competition: {weight: 0.2, T: 3.0}}" in overrides and "synthesis.keep=last" in overrides
    assert reference.shipped_differences(case, "teacher.pt") == []
    with pytest.raises(SystemExit, match="jitter cannot be changed"):
        case.drive_reference(Path("."), reference.DeepInvWork(jitter=4), "teacher.pt", "lenet5_half", 0)
    with pytest.raises(SystemExit, match="a list of 256: batch must be 256"):
        case.drive_reference(Path("."), reference.DeepInvWork(batch=128), "teacher.pt", "lenet5_half", 0)
    for extra in ("synthesis.clamp=true", "synthesis.keep=best", "phases.0.losses.tv={weight: 2.5e-05, norm: l1}",
                  "synthesis.augment.flip=true"):
        assert_refused(monkeypatch, case, work, overrides, extra, "not DeepInversion as the reference runs it")


def test_reference_nayer_case_maps_the_generators_life_and_refuses_what_dfkd_cannot_express(monkeypatch):
    case = reference.CASES["nayer"]
    work = reference.NayerWork(batch=20, epochs=6, g_steps=3, kd_steps=2, warmup=2, g_life=2, g_loops=1, gwp_loops=1)
    overrides = reference.check_equal_work(case, work, "teacher.pt")
    assert "synthesis.reset_every=2" in overrides and "synthesis.inner.betas=[0.5, 0.999]" in overrides
    assert "phases.0.losses={adv_kl: {weight: 1.33, agreement_mask: true, from_epoch: 2}, bn_stats: {weight: 10.0, " \
           "momentum: 0.9}, onehot_ce: {weight: 0.5, target: labels}}" in overrides
    # the script's two batches an iteration (ten in the warm-up): dfkd's phase makes one
    with pytest.raises(SystemExit, match="would not do the reference's work: g_loops: 1 vs 2; gwp_loops: 1 vs 10"):
        reference.check_equal_work(case, reference.NayerWork(), "teacher.pt")
    assert "g_loops: 1 vs 2" in reference.shipped_differences(case, "teacher.pt")
    with pytest.raises(SystemExit, match="warm-up must be a multiple of g_life"):
        case.drive_reference(Path("."), reference.NayerWork(g_loops=1, gwp_loops=1, warmup=5), "teacher.pt",
                             "lenet5_half", 0)
    with pytest.raises(SystemExit, match="student_pad cannot be changed"):
        case.drive_reference(Path("."), reference.NayerWork(g_loops=1, gwp_loops=1, student_pad="mean"), "teacher.pt",
                             "lenet5_half", 0)
    assert_refused(monkeypatch, case, work, overrides, "synthesis.keep=last",
                   "not NAYER's synthesis as the reference runs it")


@pytest.mark.slow
@pytest.mark.parametrize("case, extra, expect", [
    ("cmi", ["--set", "g_steps=2", "kd_steps=2", "bank=64", "negatives=8"], ["sorts the classes", "8-bit PNG"]),
    ("dfad", [], ["visdom", "train() is called as it is"]),
    ("zskt", ["--set", "kd_steps=2"], ["ZeroShotKTSolver.run() is called as it is"]),
    ("dafl", [], ["its iteration's statements", "log10"]),
    ("deepinv", ["--set", "labels=random", "g_steps=3", "kd_steps=2"], ["never removes them", "keep: last"]),
    ("nayer", ["--set", "g_steps=2", "kd_steps=2", "g_loops=1", "gwp_loops=1", "warmup=1", "g_life=1"],
     ["CLIP text embeddings", "g_loops: 1 vs 2"]),
    ("dfq", [], ["differs from the reference's settings in: nothing", "student=teacher"]),
    ("fast", ["--set", "warmup=1", "g_steps=2", "kd_steps=2"], ["num_workers=0", "8-bit PNG"]),
])
def test_reference_runs_beside_dfkd_at_a_tiny_budget(case, extra, expect, digits_teacher, tmp_path, capsys):
    import os

    source, cache = os.environ.get("DFKD_REFERENCE_SOURCE"), Path(reference.DEFAULT_CACHE)
    name = reference.CASES[case].reference
    if source:  # a clone or URL to check the pinned commit out from, into a fresh cache
        where, cache = ["--source", source], tmp_path / "cache"
    elif reference.checkout_folder(name, cache).exists():
        where = []
    else:
        pytest.skip(f"the reference code is not in the cache ({reference.checkout_folder(name, cache)}) and "
                    "DFKD_REFERENCE_SOURCE names no clone of it: no fetch from GitHub in the tests")
    assert reference.main(["--case", case, "--teacher", str(digits_teacher[0]), "--seeds", "0", "--epochs", "2",
                           "--iters", "1", "--batch", "16", "--cache", str(cache), "--out", str(tmp_path / "out"),
                           *where, *extra]) == 0
    out = capsys.readouterr().out
    assert "shims:" in out and all(text in out for text in expect)
    row = json.loads((tmp_path / "out" / f"{case}.jsonl").read_text())
    assert row["work"]["batch"] == 16 and row["commit"] == reference.REFERENCES[name][1]
    for side in ("dfkd", "reference"):
        assert 0 <= row[side]["final_acc"] <= 100 and row[side]["s_per_iter"] > 0
