"""Adversarial distillation: discriminators, GAN objectives against hand computations, the
adversarial and mutual-learning terms, teacher ensembles, and the shipped configs run end to end
on digits (kd, advkd-logit, advkd-feature, meal, afd), with their bad-input errors."""
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from dfkd.core.checkpoint import save_model
from dfkd.core.config import load_config, named_configs
from dfkd.core.runs import read_metrics
from dfkd.loop.engine import Engine
from dfkd.loop.teachers import combine_logits
from dfkd.methods.losses.adversarial import Adversarial
from dfkd.methods.losses.base import build_terms
from dfkd.methods.losses.response import kd_kl_divergence
from dfkd.nets.discriminators import OBJECTIVES, create_adapter, create_discriminator, grad_reverse, gradient_penalty
from dfkd.nets.models import create_model
from dfkd_base.errors import ConfigError, ShapeError, UnknownNameError

ADVERSARIAL = sorted(n for n in named_configs() if n.startswith("adversarial/"))


# ------------------------------------------------------------------ objectives
REAL, FAKE = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([-0.5, 1.5, 0.0])


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


@pytest.mark.parametrize("name, d_expected, g_expected", [
    # BCE with logits: -log σ(r) = softplus(-r), -log(1 - σ(f)) = softplus(f)
    ("vanilla", mean(softplus(-r) for r in REAL.tolist()) + mean(softplus(f) for f in FAKE.tolist()),
     -mean(softplus(f) for f in FAKE.tolist())),
    ("nonsaturating", mean(softplus(-r) for r in REAL.tolist()) + mean(softplus(f) for f in FAKE.tolist()),
     mean(softplus(-f) for f in FAKE.tolist())),
    ("lsgan", 0.5 * mean((r - 1) ** 2 for r in REAL.tolist()) + 0.5 * mean(f ** 2 for f in FAKE.tolist()),
     0.5 * mean((f - 1) ** 2 for f in FAKE.tolist())),
    ("hinge", mean(max(0, 1 - r) for r in REAL.tolist()) + mean(max(0, 1 + f) for f in FAKE.tolist()),
     -mean(FAKE.tolist())),
    ("wgan-gp", mean(FAKE.tolist()) - mean(REAL.tolist()), -mean(FAKE.tolist())),
])
def test_gan_objectives_match_hand_computation(name, d_expected, g_expected):
    objective = OBJECTIVES[name]
    assert float(objective.d_loss(REAL, FAKE)) == pytest.approx(d_expected, rel=1e-5)
    assert float(objective.g_loss(FAKE)) == pytest.approx(g_expected, rel=1e-5)
    assert objective.gradient_penalty == (name == "wgan-gp")


def test_gradient_penalty_of_a_linear_critic():
    # D(x) = w·x + b has gradient w everywhere: the penalty is (‖w‖ − 1)², here (5 − 1)² = 16
    critic = torch.nn.Linear(2, 1)
    with torch.no_grad():
        critic.weight.copy_(torch.tensor([[3.0, 4.0]]))
    disc = lambda x, labels=None: critic(x).squeeze(1)  # noqa: E731
    penalty = gradient_penalty(disc, torch.randn(6, 2), torch.randn(6, 2))
    assert float(penalty.detach()) == pytest.approx(16.0, rel=1e-5)
    penalty.backward()  # differentiable in the critic's weights: d/dw (‖w‖ − 1)² = 2(‖w‖ − 1) w/‖w‖
    assert torch.allclose(critic.weight.grad, torch.tensor([[2 * 4 * 0.6, 2 * 4 * 0.8]]), rtol=1e-4)


def test_grad_reverse_negates_the_gradient_only():
    x = torch.tensor([1.0, -2.0], requires_grad=True)
    y = grad_reverse(x)
    assert torch.equal(y, x)
    (y * torch.tensor([3.0, 5.0])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([-3.0, -5.0]))


# ------------------------------------------------------------------ networks
def test_discriminator_shapes_and_spectral_norm():
    torch.manual_seed(0)
    mlp = create_discriminator("mlp", (10,), 10, hidden=[32], spectral_norm=True)
    assert mlp(torch.randn(4, 10)).shape == (4,)
    assert any("parametrizations" in n for n, _ in mlp.named_parameters())
    proj = create_discriminator("projection", (10,), 10)
    assert proj(torch.randn(4, 10), torch.tensor([0, 1, 2, 3])).shape == (4,)
    conv = create_discriminator("conv", (16, 5, 5), 10)
    assert conv(torch.randn(4, 16, 5, 5)).shape == (4,)


def test_projection_discriminator_uses_the_class():
    torch.manual_seed(0)
    proj = create_discriminator("projection", (10,), 10)
    x = torch.randn(4, 10)
    assert not torch.allclose(proj(x, torch.zeros(4).long()), proj(x, torch.ones(4).long()))
    with pytest.raises(ConfigError, match="needs labels"):
        proj(x)


def test_discriminator_errors():
    with pytest.raises(ShapeError, match="discriminator 'mlp' takes vectors .* got shape \\(16, 5, 5\\)"):
        create_discriminator("mlp", (16, 5, 5), 10)
    with pytest.raises(ShapeError, match="'conv' takes feature maps"):
        create_discriminator("conv", (10,), 10)
    with pytest.raises(UnknownNameError, match="did you mean 'conv'"):
        create_discriminator("convv", (16, 5, 5), 10)
    with pytest.raises(ConfigError, match="discriminator 'mlp'.*width"):
        create_discriminator("mlp", (10,), 10, width=3)


def test_adapter_maps_student_features_onto_the_teachers_shape():
    adapter = create_adapter((8, 10, 10), (16, 5, 5))
    assert adapter(torch.randn(3, 8, 10, 10)).shape == (3, 16, 5, 5)
    assert create_adapter((84,), (42,))(torch.randn(3, 84)).shape == (3, 42)
    with pytest.raises(ShapeError, match=r"no adapter maps a student feature of shape \(8, 10, 10\) onto .*\(42,\)"):
        create_adapter((8, 10, 10), (42,))


# ------------------------------------------------------------------ terms
def test_dml_is_the_mean_kl_to_each_detached_peer():
    torch.manual_seed(0)
    s, a, b = torch.randn(5, 10, requires_grad=True), torch.randn(5, 10, requires_grad=True), torch.randn(5, 10)
    ctx = SimpleNamespace(student_logits=s, logits_of={"a": a, "b": b}.__getitem__)
    (term,) = build_terms({"dml": {"peers": ["a", "b"], "T": 2.0}}, "losses")
    value = term(ctx)
    expected = 0.5 * (kd_kl_divergence(s, a, 2.0) + kd_kl_divergence(s, b, 2.0))
    assert float(value.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    value.backward()
    assert a.grad is None and s.grad is not None  # the peer is a target, not trained here


def test_adversarial_term_parameter_errors():
    with pytest.raises(ConfigError, match="adversarial.objective must be one of vanilla, nonsaturating, lsgan, "
                                          "hinge, wgan-gp, got 'wgan'"):
        build_terms({"adversarial": {"discriminator": "d", "objective": "wgan"}}, "losses")
    with pytest.raises(ConfigError, match="real and the fake side are both 'teacher'"):
        Adversarial("d", real="teacher", fake="teacher")
    with pytest.raises(ConfigError, match="needs parameter discriminator"):
        build_terms({"adversarial": {"objective": "hinge"}}, "losses")


def test_a_discriminator_that_always_wins_is_reported_once_per_episode():
    warnings = []
    ctx = SimpleNamespace(step=7, warn=lambda tag, message: warnings.append((tag, message)))
    term = Adversarial("disc", patience=3)
    for won in (True, True, True, True, True):
        term._watch(ctx, won)
    assert len(warnings) == 1 and warnings[0][0] == "adv/disc/wins"
    assert "discriminator 'disc' has classified every sample right for 3 steps" in warnings[0][1]
    term._watch(ctx, False)  # a lost step starts a new episode
    for _ in range(3):
        term._watch(ctx, True)
    assert len(warnings) == 2


# ------------------------------------------------------------------ ensembles
def combine(logits, ensemble):
    return combine_logits(logits, ensemble)


def test_teacher_ensembles_average_soft_targets():
    a, b = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    pa, pb = F.softmax(a, 1), F.softmax(b, 1)
    assert torch.allclose(F.softmax(combine([a, b], "mean"), 1), (pa + pb) / 2)
    # confidence: weights ∝ each teacher's top-class probability (0.881 and 0.5)
    wa, wb = pa.max(), pb.max()
    expected = (wa * pa + wb * pb) / (wa + wb)
    assert torch.allclose(F.softmax(combine([a, b], "confidence"), 1), expected)
    assert torch.equal(combine([a], "mean"), a)  # one teacher: its own logits


# ------------------------------------------------------------------ end to end on digits
@pytest.fixture(scope="module")
def teachers(tmp_path_factory, digits_teacher):
    """The trained digits teacher, plus an untrained LeNet-5-half (another architecture) and a
    model file that predicts 7 classes."""
    folder = tmp_path_factory.mktemp("teachers")
    torch.manual_seed(1)
    half = save_model(folder / "half.pt", create_model("lenet5_half", in_channels=1, num_classes=10, image_size=32),
                      {"name": "lenet5_half", "in_channels": 1, "num_classes": 10, "image_size": 32, "kwargs": {}},
                      dataset="digits", accuracy=None)
    seven = save_model(folder / "seven.pt", create_model("lenet5", in_channels=1, num_classes=7, image_size=32),
                       {"name": "lenet5", "in_channels": 1, "num_classes": 7, "image_size": 32, "kwargs": {}},
                       dataset="digits", accuracy=None)
    return {"trained": str(digits_teacher[0]), "half": str(half), "seven": str(seven)}


def digits(name: str, tmp_path, *extra: str, teacher: str | list | None = None) -> Engine:
    overrides = ["data.name=digits", "train.epochs=2", "train.iters_per_epoch=10", "runtime.num_threads=1",
                 f"output.root={tmp_path}", *extra]
    if teacher is not None:
        overrides.append(f"teacher.checkpoint={teacher}")
    return Engine(load_config(name, overrides))


@pytest.mark.parametrize("name", ADVERSARIAL)
@pytest.mark.slow
def test_shipped_adversarial_config_learns_digits(name, tmp_path, teachers):
    teacher = None if "afd" in name else [teachers["trained"]] * (3 if "meal" in name else 1)
    engine = digits(name, tmp_path, "train.epochs=3", "train.iters_per_epoch=30", teacher=teacher)
    summary = engine.fit()
    assert summary["final_acc"] > 60, summary  # 10% is chance; a broken loss term stays near it
    metrics = read_metrics(engine.run_dir)
    discriminators = [n for n, p in engine.players.items() if p.kind == "discriminator"]
    for d in discriminators:  # the discriminator's accuracies are logged beside the losses
        assert any(f"adv/{d}/acc_real" in row and f"adv/{d}/acc_fake" in row for row in metrics), d
    if "meal" in name:
        assert any("teacher/picked_0" in row for row in metrics)


def test_gradient_reversal_trains_the_discriminator_in_the_student_phase(tmp_path, teachers):
    engine = digits("adversarial/meal-fmnist", tmp_path, "train.epochs=1", "train.iters_per_epoch=2",
                    teacher=teachers["trained"])
    before = {k: v.clone() for k, v in engine.players["disc"].module.state_dict().items()}
    engine.fit()
    after = engine.players["disc"].module.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert engine.players["disc"].steps == 2


@pytest.mark.slow
def test_wgan_gp_logs_its_penalty(tmp_path, teachers):
    engine = digits("adversarial/advkd-logit-fmnist", tmp_path, "train.epochs=1",
                    "phases.0.losses.adversarial.objective=wgan-gp", "phases.1.losses.adversarial.objective=wgan-gp",
                    "phases.1.steps=3", teacher=teachers["trained"])
    engine.fit()
    assert engine.players["disc"].steps == 30  # n_critic = 3 per student step
    assert any("adv/disc/gradient_penalty" in row for row in read_metrics(engine.run_dir))


@pytest.mark.slow
def test_ensemble_of_different_architectures_distils(tmp_path, teachers):
    for ensemble in ("mean", "confidence", "random"):
        engine = digits("adversarial/kd-fmnist", tmp_path, "train.epochs=1", f"teacher.ensemble={ensemble}",
                        teacher=f"[{teachers['trained']}, {teachers['half']}]")
        summary = engine.fit()
        assert len(engine.teachers) == 2 and summary["teacher_acc"] is not None


@pytest.mark.slow
def test_resume_restores_discriminator_adapter_and_their_optimizers(tmp_path, teachers, fit_until_killed):
    def make(root):
        return digits("adversarial/advkd-feature-fmnist", root, teacher=teachers["trained"])

    full = make(tmp_path / "full")
    full.fit()
    killed = make(tmp_path / "killed")
    fit_until_killed(killed, 1)
    resumed = Engine(killed.config, resume=killed.run_dir / "ckpt" / "last.pt")
    resumed.fit()
    for name in ("student", "disc", "adapter"):
        a, b = full.players[name].module.state_dict(), resumed.players[name].module.state_dict()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


# ------------------------------------------------------------------ bad input
def one_line(exc_info) -> str:
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def test_discriminator_on_a_layer_that_does_not_exist(tmp_path, teachers):
    with pytest.raises(ConfigError) as exc:
        digits("adversarial/advkd-feature-fmnist", tmp_path, "phases.0.losses.adversarial.layer=relu22",
               "phases.1.losses.adversarial.layer=relu22", teacher=teachers["trained"])
    assert "relu22" in one_line(exc) and "relu2" in one_line(exc)


def test_feature_shapes_that_need_an_adapter(tmp_path, teachers):
    with pytest.raises(ShapeError) as exc:  # at start-up, not at the first step
        digits("adversarial/advkd-feature-fmnist", tmp_path, "players.adapter=null",
               "phases.0.also=[]", "phases.0.losses.adversarial.adapter=null",
               "phases.1.losses.adversarial.adapter=null", teacher=teachers["trained"])
    assert "discriminator 'disc' compares student's relu2 (8, 10, 10) with teacher's relu2 (16, 10, 10)" \
        in one_line(exc) and "give the term an 'adapter' player" in one_line(exc)


def test_d_steps_below_one(tmp_path):
    with pytest.raises(ConfigError, match=r"phases.1.steps must be >= 1, got 0"):
        load_config("adversarial/advkd-logit-fmnist", ["phases.1.steps=0"])


def test_ensemble_whose_teachers_disagree_on_class_count(tmp_path, teachers):
    with pytest.raises(ConfigError) as exc:
        digits("adversarial/kd-fmnist", tmp_path, teacher=f"[{teachers['trained']}, {teachers['seven']}]")
    assert "seven.pt takes 1 channels and predicts 7 classes" in one_line(exc)


def test_term_naming_a_player_that_is_not_a_discriminator(tmp_path, teachers):
    with pytest.raises(ConfigError, match="'student' is not a discriminator player"):
        digits("adversarial/advkd-logit-fmnist", tmp_path, "phases.0.losses.adversarial.discriminator=student",
               teacher=teachers["trained"])


def test_discriminator_that_no_term_uses(tmp_path, teachers):
    with pytest.raises(ConfigError, match="players.extra: no loss term uses discriminator 'extra'"):
        digits("adversarial/advkd-logit-fmnist", tmp_path, "players.extra={kind: discriminator, net: {name: mlp}}",
               teacher=teachers["trained"])


@pytest.mark.slow
def test_peers_and_discriminators_share_one_real_batch_per_iteration(tmp_path):
    engine = digits("adversarial/afd-fmnist", tmp_path, "train.epochs=1")
    engine.fit()
    # four phases per iteration, one of them draws: 10 iterations read 10 batches, not 40
    assert (engine.real.epoch, engine.real.index) == (0, 10)
    assert engine.student.name == "peer1" and engine.teachers == []
    assert {n: p.steps for n, p in engine.players.items()} == {"peer1": 10, "peer2": 10, "disc1": 10, "disc2": 10}


def test_an_ensemble_drives_synthesis_with_the_bn_statistics_of_every_teacher(tmp_path, teachers):
    engine = Engine(load_config("datafree/dfq-digits", [
        f"teacher.checkpoint=[{teachers['trained']}, {teachers['half']}]", "synthesis.batch_size=8",
        "train.epochs=1", "train.iters_per_epoch=1", "runtime.num_threads=1", f"output.root={tmp_path}"]))
    generator_phase = engine.phases[0]
    engine.players.active = {generator_phase.player}
    ctx = engine.context(generator_phase, engine.next_batch(generator_phase))
    # LeNet-5 and LeNet-5-half have 3 BN layers each; their channel counts tell them apart
    assert [s.mean.numel() for s in ctx.teacher_bn] == [6, 16, 120, 3, 8, 60]
    engine.teachers.ensemble = "random"
    engine.teachers.pick = 1
    ctx = engine.context(generator_phase, engine.next_batch(generator_phase))
    assert [s.mean.numel() for s in ctx.teacher_bn] == [3, 8, 60]  # only the picked teacher ran
