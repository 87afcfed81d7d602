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
                        (["players.student.quant.freeze_bn=false"], "student: 'min/max quantizer, float input, "
                                                                    "initialized from the teacher, BatchNorm training'"), \
                        (["players.student.sched.gamma=0.5"], "milestones: 'student 0.5' vs '0.5'"), \
                        (["players.student.quant.quantize_input=true"], "student: 'min/max quantizer, quantized "
                                                                        "input"):
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


def test_qimera_case_reads_back_its_mixing_and_refuses_a_differing_one(monkeypatch):
    case = reference.CASES["qimera"]
    assert reference.shipped_differences(case, "teacher.pt") == []
    work = dataclasses.replace(case.work, epochs=8, warmup=1, batch=32, mix_prob=0.5, mix_classes=3)
    overrides = reference.check_equal_work(case, work, "teacher.pt")
    assert "synthesis.mix_prob=0.5" in overrides and "synthesis.mix_classes=3" in overrides
    overrides_of = type(case).overrides
    for extra, wrong in (["synthesis.mix_prob=0.2"], "mix_prob: 0.2 vs 0.5"), \
                        (["players.generator.net.kwargs.mapping=true"], "generator: 'superposed, random embeddings, "
                                                                        "a mapping"), \
                        (["players.generator.net.kwargs.noise_scale=2.0"], "noise_scale: 2.0 vs 1.0"):
        monkeypatch.setattr(type(case), "overrides",
                            lambda self, work, extra=extra: [*overrides_of(self, work), *extra])
        with pytest.raises(SystemExit, match="would not do the reference's work: .*" + wrong):
            reference.check_equal_work(case, work, "teacher.pt")


def _qimera_generator_beside_dfkds():
    """Qimera's Generator (as run_cifar10_4bit.sh builds it) and dfkd's ``qimera`` generator of
    ``quant/qimera-fmnist-paper`` with the same weights, on 28x28 grey images."""
    from pathlib import Path

    import torch

    from generators import create_generator

    code = reference.checkout_folder("qimera", Path(reference.DEFAULT_CACHE))
    if not code.exists():
        pytest.skip("Qimera's code is not in the cache: no fetch from GitHub in the tests")
    reference_quant._stub_for_gdfq()
    (qimera_main,) = reference_quant._import_fresh(code, "main")
    settings = type("Settings", (), dict(nClasses=10, latent_dim=64, no_DM=True, noise_scale=1.0, intermediate_dim=100,
                                         img_size=28, channels=1))()
    torch.manual_seed(0)
    theirs = qimera_main.Generator(options=settings)
    ours = create_generator("qimera", 64, (1, 28, 28), 10, ngf=64, bn_eps=0.8)
    mine = [t for name, t in ours.state_dict().items() if not name.startswith("embedding")]
    their = [t for name, t in theirs.state_dict().items() if not name.startswith("label_emb")]
    assert [t.shape for t in mine] == [t.shape for t in their]
    with torch.no_grad():
        for a, b in zip(mine, their):
            a.copy_(b)
        ours.embedding.weight.copy_(theirs.label_emb.weight)
    return theirs.train(), ours.train()


def test_qimera_generator_makes_qimeras_images_from_single_classes():
    import torch

    theirs, ours = _qimera_generator_beside_dfkds()
    z, y = torch.randn(16, 64, generator=torch.Generator().manual_seed(1)), torch.arange(16) % 10
    assert torch.allclose(ours(z, y), theirs(z, y), atol=1e-5)


def test_qimera_generator_makes_qimeras_images_from_superposed_classes():
    """A superposed batch: a latent a slot, each slot standardized over the batch and the latent (one
    BatchNorm over the stacked slots in Qimera's code). dfkd drew one latent a sample and standardized
    each sample's start alone, which made other images from the same weights."""
    import torch

    theirs, ours = _qimera_generator_beside_dfkds()
    g = torch.Generator().manual_seed(2)
    z, labels = torch.randn(16, 2, 64, generator=g), torch.randint(0, 10, (16, 2), generator=g)
    weights = torch.softmax(torch.randn(16, 2, generator=g), 1)
    slots = torch.nn.functional.one_hot(labels, 10).float() * weights.unsqueeze(2)
    assert torch.allclose(ours(z, slots), theirs(z, labels, weights), atol=1e-5)
    assert not torch.allclose(ours(z, slots), theirs(z.flip(1), labels, weights), atol=1e-3)


def test_qimera_runs_beside_dfkd_at_a_tiny_budget(digits_teacher, tmp_path, capsys):
    from pathlib import Path

    if not reference.checkout_folder("qimera", Path(reference.DEFAULT_CACHE)).exists():
        pytest.skip("Qimera's code is not in the cache: no fetch from GitHub in the tests")
    assert reference.main(["--case", "qimera", "--teacher", str(digits_teacher[0]), "--seeds", "0", "--epochs", "1",
                           "--batch", "8", "--set", "data=digits", "warmup=0", "mix_prob=1.0",
                           "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "Qimera keeps biases in float" in out and "dfkd draws one a sample" not in out
    assert "differs from the reference's settings in: nothing" in out
    row = json.loads((tmp_path / "out" / "qimera.jsonl").read_text())
    assert row["work"]["mix_prob"] == 1.0 and row["commit"] == reference.REFERENCES["qimera"][1]
    for side in ("dfkd", "reference"):
        assert 0 <= row[side]["final_acc"] <= 100 and row[side]["s_per_iter"] > 0
