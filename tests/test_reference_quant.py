"""scripts/reference_quant.py: GDFQ's code beside dfkd's quantized-student config."""
import dataclasses
import json
import sys

import pytest
from test_scripts import load_script

reference = load_script("reference")
reference_quant = sys.modules["reference_quant"]  # imported by reference.py, which registers its cases


def test_gdfq_case_reads_back_every_setting_and_refuses_a_differing_one(monkeypatch):
    case = reference.CASES["gdfq"]
    assert reference.shipped_differences(case, "teacher.pt") == []
    work = dataclasses.replace(case.work, epochs=8, warmup=2, batch=32, lr=1e-3, milestones="0.5", T=4.0)
    overrides = reference.check_equal_work(case, work, "teacher.pt")
    # the student's milestone is epoch 4 of its epochs 2..8: a third of its run
    assert any("milestones: [0.3333333333333333]" in o for o in overrides if o.startswith("players.student.sched"))
    overrides_of = type(case).overrides
    for extra, wrong in (["players.generator.net.kwargs.ngf=32"], "generator: 'conditional, ngf 32"), \
                        (["players.student.quant.freeze_bn=false"], "student: 'min/max quantizer, initialized from "
                                                                    "the teacher, BatchNorm training'"), \
                        (["players.student.sched.gamma=0.5"], "milestones: 'student 0.5' vs '0.5'"):
        monkeypatch.setattr(type(case), "overrides",
                            lambda self, work, extra=extra: [*overrides_of(self, work), *extra])
        with pytest.raises(SystemExit, match="would not do the reference's work: .*" + wrong.replace("(", r"\(")):
            reference.check_equal_work(case, work, "teacher.pt")


def test_gdfq_case_refuses_what_its_trainer_fixes():
    case = reference.CASES["gdfq"]
    with pytest.raises(SystemExit, match=r"fixes the BN-statistics weight \(0.1\) and the iterations per epoch "
                                         r"\(200\): bn, iters cannot be changed"):
        case.drive_reference(reference.checkout_folder("gdfq", reference.DEFAULT_CACHE),
                             dataclasses.replace(case.work, iters=100), "teacher.pt", "lenet5_half", 0)


def test_gdfq_runs_beside_dfkd_at_a_tiny_budget(digits_teacher, tmp_path, capsys):
    from pathlib import Path

    if not reference.checkout_folder("gdfq", Path(reference.DEFAULT_CACHE)).exists():
        pytest.skip("GDFQ's code is not in the cache: no fetch from GitHub in the tests")
    assert reference.main(["--case", "gdfq", "--teacher", str(digits_teacher[0]), "--seeds", "0", "--epochs", "1",
                           "--batch", "8", "--set", "data=digits", "warmup=0", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "pyhocon" in out and "differs from the reference's settings in: nothing" in out
    row = json.loads((tmp_path / "out" / "gdfq.jsonl").read_text())
    assert row["work"]["batch"] == 8 and row["commit"] == reference.REFERENCES["gdfq"][1]
    for side in ("dfkd", "reference"):
        assert 0 <= row[side]["final_acc"] <= 100 and row[side]["s_per_iter"] > 0


def test_gdfq_case_refuses_milestones_before_the_students_first_epoch():
    case = reference.CASES["gdfq"]
    with pytest.raises(SystemExit, match=r"milestones 0.25,0.5,0.75 of 4 epochs fall at or before the warm-up's end "
                                         r"\(epoch 1\)"):
        reference.check_equal_work(case, dataclasses.replace(case.work, epochs=4, warmup=1), "teacher.pt")
