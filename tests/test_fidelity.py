"""Each data-free method computes what its reference code computes: one test per divergence fixed.

Facts from the reference implementations: ZSKT (polo5), DAFL (huawei-noah), Fast-DFKD and CMI
(zju-vipa), DeepInversion (NVlabs, and the DataFree benchmark's copy).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from dfkd.core.checkpoint import save_model
from dfkd.core.config import load_config
from dfkd.core.runs import read_metrics
from dfkd.core.schema import NetConfig, OptimConfig, RuntimeConfig
from dfkd.data.datasets import dataset_info
from dfkd.loop.engine import Engine
from dfkd.loop.runtime import Runtime
from dfkd.methods.losses.datafree import adv_kl
from dfkd.methods.losses.response import kd_kl
from dfkd.methods.synthesis import create_synthesizer
from dfkd.methods.synthesis.inversion import InversionOptions
from dfkd.methods.synthesis.meta import MetaOptions
from dfkd.methods.synthesis.nayer import NayerOptions
from dfkd.methods.synthesis.reinit import reset_dcgan
from dfkd.methods.synthesis.spaceship import SpaceshipOptions
from dfkd.nets.models import create_model
from dfkd.nets.taps import FeatureTap
from dfkd_base.errors import ConfigError
from generators import create_generator


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """An untrained LeNet-5 on digits' shape: these tests are about what is computed, not learned."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "lenet5.pt"
    save_model(path, create_model("lenet5", in_channels=1, num_classes=10, image_size=32),
               {"name": "lenet5", "in_channels": 1, "num_classes": 10, "image_size": 32, "kwargs": {}},
               dataset="digits")
    return path


def engine_for(config, teacher, tmp_path, *overrides):
    return Engine(load_config(config, [f"teacher.checkpoint={teacher}", f"output.root={tmp_path}",
                                       "runtime.num_threads=1", "data.eval=false", *overrides]))


# ---------------------------------------------------------------- ZSKT
@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides")
def test_kl_with_mean_reduction_is_f_kl_divs_default():
    torch.manual_seed(0)
    s, t = torch.randn(6, 10), torch.randn(6, 10)
    reference = F.kl_div(F.log_softmax(s, 1), F.softmax(t, 1))  # ZSKT's call: reduction 'mean'
    ctx = type("Ctx", (), {"student_logits": s, "teacher_logits": t})()
    assert kd_kl(ctx, reduction="mean").item() == pytest.approx(reference.item(), rel=1e-5)
    assert adv_kl(ctx, reduction="mean").item() == pytest.approx(-reference.item(), rel=1e-5)
    # the batch mean is the classes (10) times larger: attention transfer's β = 250 was set beside 'mean'
    assert kd_kl(ctx).item() == pytest.approx(10 * reference.item(), rel=1e-5)
    with pytest.raises(ConfigError, match="kd_kl.reduction must be one of batchmean, mean"):
        kd_kl(ctx, reduction="sum")


def test_zskt_student_trains_on_the_updated_generators_images_of_the_same_latents(teacher, tmp_path):
    engine = engine_for("datafree/zskt-digits", teacher, tmp_path, "synthesis.batch_size=16")
    generator_phase, student_phase = engine.phases
    engine.run_phase(generator_phase)  # draws z, steps the generator
    before = engine.synth.last.images.clone()  # the batch the generator step was taken on
    batch = engine.next_batch(student_phase)
    z, labels = engine.synth.drawn
    with torch.no_grad():
        expected = engine.players["generator"].module(z, labels)
    assert torch.allclose(batch.images, expected) and not torch.allclose(batch.images, before)
    assert engine.next_batch(student_phase) is batch  # unchanged generator: the same images, not recomputed
    terms = {t.name: t.params for t in student_phase.terms}
    assert terms["kd_kl"]["reduction"] == "mean" and student_phase.batch == "regenerated"


def test_zskt_generator_ends_in_an_affine_batchnorm_without_tanh():
    g = create_generator("dcgan", nz=8, img_shape=(1, 32, 32), ngf=4, output="affine_bn")
    assert not any(isinstance(m, nn.Tanh) for m in g.modules())
    last = g.to_image[-1]
    assert isinstance(last, nn.BatchNorm2d) and last.affine
    with torch.no_grad():
        last.bias.fill_(3.0)  # a learned shift moves the output, which an affine-free BN could not
        assert g(torch.randn(16, 8)).mean().item() == pytest.approx(3.0, abs=1e-4)


# ---------------------------------------------------------------- DAFL
def test_dafl_activation_reads_the_teachers_relu3_output(teacher, tmp_path):
    engine = engine_for("datafree/dafl-digits", teacher, tmp_path, "synthesis.batch_size=8")
    phase = engine.phases[0]
    engine.players.active = {"generator"}
    ctx = engine.context(phase, engine.next_batch(phase))
    (term,) = [t for t in phase.terms if t.name == "activation_norm"]
    relu3 = ctx.teacher_features["relu3"]
    assert relu3.shape[1] == 120  # not the 84-d input of the last Linear layer
    assert term(ctx).item() == pytest.approx(-relu3.abs().mean().item(), rel=1e-6)
    with FeatureTap(engine.teachers[0], ["relu4"]) as tap, torch.no_grad():  # what the term read before
        engine.teachers[0](ctx.teacher_images)
    assert tap.features["relu4"].shape[1] == 84
    assert term(ctx).item() != pytest.approx(-tap.features["relu4"].abs().mean().item(), rel=1e-3)


def test_dafl_generator_block_batchnorms_use_eps_08():
    g = create_generator("dcgan", nz=8, img_shape=(1, 32, 32), ngf=4, bn_eps=0.8)
    eps = [m.eps for m in g.blocks if isinstance(m, nn.BatchNorm2d)]
    assert eps == [1e-5, 0.8, 0.8]  # DAFL: the first BN at its default, the two in the blocks at 0.8
    with pytest.raises(ValueError, match="bn_eps must be positive"):
        create_generator("dcgan", nz=8, img_shape=(1, 32, 32), bn_eps=0.0)


# ---------------------------------------------------------------- Fast-DFKD
def toy_meta(meta: str):
    cfg = MetaOptions(kind="meta", meta=meta, net=NetConfig(name="dcgan", kwargs={"nz": 4, "ngf": 2}),
                          batch_size=4, inner=OptimConfig(name="adam", lr=0.01, betas=[0.5, 0.999]))
    return create_synthesizer(cfg, dataset_info("digits"), Runtime(RuntimeConfig(device="cpu")))


class _Recorder:
    """Stands in for the outer optimizer: keeps the meta-gradient it is asked to apply."""

    def __init__(self, params):
        self.params, self.grads = list(params), None

    def step(self):
        self.grads = [p.grad.clone() for p in self.params]

    def zero_grad(self, set_to_none=True):
        pass


def test_fomaml_meta_gradient_is_the_sum_of_every_inner_steps_gradient():
    torch.manual_seed(0)
    synth = toy_meta("fomaml")
    synth.outer = _Recorder(synth.generator.parameters())
    inner = []
    original = synth.gradients_ready

    def record():
        inner.append([q.grad.clone() for q in synth.fast.parameters()])
        original()

    synth.gradients_ready = record
    synth.synthesize(lambda batch: batch.images.square().mean(), steps=3)
    expected = [sum(step[i] for step in inner) for i in range(len(inner[0]))]
    assert len(inner) == 3 and not torch.allclose(expected[0], inner[-1][0])  # sum, not the last one
    for got, want in zip(synth.outer.grads, expected):
        assert torch.allclose(got, want)


def test_reptile_meta_gradient_is_the_move_of_the_adapted_copy():
    torch.manual_seed(0)
    synth = toy_meta("reptile")
    synth.outer = _Recorder(synth.generator.parameters())
    start = [p.detach().clone() for p in synth.generator.parameters()]
    adapted = []
    original = synth.finish
    synth.finish = lambda: adapted.extend(q.detach().clone() for q in synth.fast.parameters()) or original()
    synth.synthesize(lambda batch: batch.images.square().mean(), steps=2)
    for got, s, a in zip(synth.outer.grads, start, adapted):
        assert torch.allclose(got, s - a)


def test_fast_adversarial_term_waits_for_the_warm_up(teacher, tmp_path):
    engine = engine_for("datafree/fast-digits", teacher, tmp_path, "train.epochs=2", "train.iters_per_epoch=1",
                        "train.log_every=1", "phases.0.steps=1", "phases.1.steps=1", "synthesis.batch_size=8")
    engine.fit()
    logged = {row["step"]: row for row in read_metrics(engine.run_dir) if "loss/synthesizer/total" in row}
    assert "loss/synthesizer/adv_kl" not in logged[1] and "loss/synthesizer/bn_stats" in logged[1]
    assert "loss/synthesizer/adv_kl" in logged[2]  # epoch 1: the warm-up is over

def test_fast_students_cosine_starts_after_the_warm_up_and_ends_at_its_floor(teacher, tmp_path):
    # the reference steps CosineAnnealingLR only after the warm-up, with T_max = epochs - warm-up:
    # the student's last step is taken at the floor. The schedule once spanned the warm-up too.
    engine = engine_for("datafree/fast-digits", teacher, tmp_path, "train.epochs=3", "train.iters_per_epoch=2",
                        "synthesis.warmup_epochs=1", "phases.0.steps=1", "phases.1.steps=2",
                        "synthesis.batch_size=8", "players.student.sched.min_lr=0.001")
    student = engine.players["student"]
    assert student.total_steps == (3 - 1) * 2 * 2
    engine.fit()
    assert student.steps == student.total_steps and student.lr == pytest.approx(0.001)


def test_a_phase_whose_terms_all_start_later_is_an_error(teacher, tmp_path):
    with pytest.raises(ConfigError, match="phases.1: every loss term starts after epoch 0"):
        engine_for("datafree/dfq-digits", teacher, tmp_path, "phases.1.losses.kd_kl.from_epoch=2")
    with pytest.raises(ConfigError, match="from_epoch must be an epoch number >= 0"):
        engine_for("datafree/dfq-digits", teacher, tmp_path, "phases.1.losses.kd_kl.from_epoch=-1")


# ---------------------------------------------------------------- CMI
def test_cmi_reinitializes_its_generator_as_dcgan_does():
    torch.manual_seed(0)
    g = create_generator("dcgan", nz=64, img_shape=(1, 32, 32), ngf=32)
    reset_dcgan(g)
    conv = torch.cat([m.weight.flatten() for m in g.modules() if isinstance(m, (nn.Conv2d, nn.Linear))])
    scales = torch.cat([m.weight for m in g.modules() if isinstance(m, nn.BatchNorm2d) and m.affine])
    assert conv.std().item() == pytest.approx(0.02, rel=0.05) and abs(conv.mean().item()) < 1e-3
    assert scales.mean().item() == pytest.approx(1.0, abs=0.01) and scales.std().item() == pytest.approx(0.02, rel=0.3)
    assert all(float(m.bias.detach().abs().max()) == 0 for m in g.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def test_cmi_contrastive_term_reads_the_teachers_bn_input_means(teacher, tmp_path):
    engine = engine_for("datafree/cmi-digits", teacher, tmp_path, "synthesis.batch_size=8", "phases.0.steps=2",
                        "phases.1.steps=1", "train.epochs=1", "train.iters_per_epoch=2")
    (term,) = [t.term for t in engine.phases[0].terms if t.name == "contrastive"]
    assert term.head[0].in_features == 6 + 16 + 120  # LeNet-5's BatchNorm2d widths
    engine.fit()
    assert len(term.bank) == 2 * 8  # one row per kept sample per synthesized batch, two batches


# ---------------------------------------------------------------- DeepInversion
def test_inversion_clamp_keeps_pixels_in_the_range_of_real_images():
    info = dataset_info("digits")
    cfg = InversionOptions(kind="inversion", batch_size=4, clamp=True, pool_size=8,
                          inner=OptimConfig(name="adam", lr=1.0, betas=[0.5, 0.9]))
    synth = create_synthesizer(cfg, info, Runtime(RuntimeConfig(device="cpu")))
    torch.manual_seed(0)
    synth.synthesize(lambda batch: -batch.images.abs().mean(), steps=3)  # pushes pixels outwards
    low, high = (0 - info.mean[0]) / info.std[0], (1 - info.mean[0]) / info.std[0]
    images = synth.last.images
    assert images.min().item() >= low - 1e-6 and images.max().item() <= high + 1e-6
    assert math.isclose(images.max().item(), high, rel_tol=1e-5)  # it was pushed to the bound and held there


# ---------------------------------------------------------------- paper recipes
PAPER = ["dafl", "dfad", "zskt", "dfq", "deepinv", "cmi", "fast"]


def shrunk(name: str) -> list[str]:
    """The recipe at a few steps: its phases, terms and synthesis as written, the budget cut."""
    cut = ["train.epochs=1", "train.iters_per_epoch=1", "synthesis.batch_size=8", "synthesis.warmup_epochs=0"]
    steps = {"deepinv": ["phases.0.steps=2", "phases.1.steps=2"], "cmi": ["phases.0.steps=2", "phases.1.steps=2"],
             "fast": ["phases.0.steps=2", "phases.1.steps=2", "phases.0.losses.adv_kl.from_epoch=0"],
             "zskt": ["phases.1.steps=2"], "dfq": ["phases.1.steps=2"]}
    return cut + steps.get(name, [])


@pytest.mark.parametrize("method", PAPER)
@pytest.mark.slow
def test_paper_recipes_run_and_name_a_teacher_other_than_their_papers(method, teacher, tmp_path, capsys):
    config = f"datafree/{method}-digits-paper"
    engine = engine_for(config, teacher, tmp_path, *shrunk(method))
    summary = engine.fit()
    assert summary["steps"] == 1
    warnings = [line for line in capsys.readouterr().err.splitlines() if "was written for" in line]
    if method in ("dafl", "dfad"):  # their papers' LeNets have no BatchNorm; this teacher has
        assert warnings == [f"dfkd: warning: {method}-digits-paper was written for a lenet5 (batchnorm=False) "
                            f"teacher; {teacher} is a lenet5; running it anyway"]
    else:
        assert warnings == []


def test_paper_recipes_exist_for_both_datasets():
    from dfkd.core.config import named_configs

    names = set(named_configs())
    for method in PAPER:
        assert {f"datafree/{method}-digits-paper", f"datafree/{method}-fmnist-paper"} <= names
        assert load_config(f"datafree/{method}-fmnist-paper").data.name == "fashion-mnist"


# ---------------------------------------------------------------- ZSKT
def test_zskt_student_runs_in_train_mode_in_the_generators_step(teacher, tmp_path):
    # ZSKT's solver never puts its student in eval mode: its BatchNorm normalizes the generator's
    # batch with that batch's statistics and updates its running ones. dfkd's inactive players run
    # in eval mode unless a phase names them in train_mode.
    def student_bn_after_generator_phase(config):
        engine = engine_for(config, teacher, tmp_path, *shrunk("zskt" if "zskt" in config else "dfq"))
        bn = next(m for m in engine.players["student"].module.modules() if isinstance(m, nn.BatchNorm2d))
        before = bn.running_mean.clone()
        engine.run_phase(engine.phases[0])
        return not torch.equal(before, bn.running_mean)

    assert student_bn_after_generator_phase("datafree/zskt-digits-paper")
    assert not student_bn_after_generator_phase("datafree/dfq-digits-paper")  # the benchmark's DFQ: eval
    with pytest.raises(ConfigError, match="phases.0.train_mode: 'critic' is not another player"):
        engine_for("datafree/zskt-digits-paper", teacher, tmp_path, "phases.0.train_mode=[critic]")


# ---------------------------------------------------------------- NAYER
def test_nayer_generator_draws_its_variety_from_the_noisy_layer_not_from_latents():
    torch.manual_seed(0)
    g = create_generator("nayer", nz=16, img_shape=(1, 32, 32), num_classes=10, ngf=4, noise_dim=32,
                         batch_size=25, output="pixels", mean=(0.5,), std=(0.5,))
    assert len(g.noisy) == 3  # groups of 10 samples: 25 need three noisy layers
    y = torch.arange(25) % 10
    g.reset_noise()
    a = g(None, y)
    assert torch.equal(a, g(torch.randn(25, 16), y))  # latents play no part
    g.reset_noise()
    assert not torch.allclose(a, g(None, y))  # a new noisy layer, new images
    assert "class_embeddings" in g.state_dict()  # the fixed embeddings travel with the generator
    with pytest.raises(Exception, match="noisy layers for 30 samples, got 31"):
        g(None, torch.zeros(31, dtype=torch.long))


def test_nayer_synthesis_keeps_its_generator_across_batches_and_orders_labels_as_nayer():
    cfg = NayerOptions(kind="nayer", batch_size=12, labels="balanced", reset_every=2,
                          net=NetConfig(name="nayer", kwargs={"nz": 8, "ngf": 2, "noise_dim": 16}),
                          inner=OptimConfig(name="adam", lr=0.01, betas=[0.5, 0.999]))
    torch.manual_seed(0)
    synth = create_synthesizer(cfg, dataset_info("digits"), Runtime(RuntimeConfig(device="cpu")))
    labels = synth.sample_labels(12)
    assert labels[:10].tolist() == list(range(10))  # each class once per noisy-layer group, in order
    body = lambda: [p.detach().clone() for n, p in synth.generator.named_parameters() if not n.startswith("noisy")]
    start = body()
    synth.synthesize(lambda batch: batch.images.mean(), steps=2)
    after_first = body()
    assert not torch.allclose(start[0], after_first[0])
    synth.synthesize(lambda batch: batch.images.mean(), steps=1)  # batch 2 starts from batch 1's weights
    assert synth.batches == 2
    saved = {k: v.clone() for k, v in synth.generator.state_dict().items()}
    synth.variables(12, labels)  # the third batch: reset_every 2 re-initializes the whole generator
    assert not torch.allclose(saved["project.weight"], synth.generator.state_dict()["project.weight"])


# ---------------------------------------------------------------- MAD
def test_mad_student_batches_hold_samples_of_the_generator_and_of_its_average(teacher, tmp_path):
    engine = engine_for("datafree/mad-digits", teacher, tmp_path, "synthesis.batch_size=8", "train.epochs=1",
                        "train.iters_per_epoch=3")
    gen = engine.players["generator"]
    assert gen.ema is not None and gen.ema.training  # the average runs as generators do
    engine.fit()
    # the average trails the generator: decay 0.95 after 3 steps (ramped as (1 + n) / (10 + n))
    live, avg = gen.module.state_dict()["project.weight"], gen.ema.state_dict()["project.weight"]
    assert not torch.allclose(live, avg)
    student_phase = engine.phases[1]
    engine.players.active = {"student"}
    zs = [torch.randn(8, 100), torch.randn(8, 100)]
    draws = iter(zs)
    engine.synth.latents = lambda generator, n, labels=None: next(draws)
    batch = engine.next_batch(student_phase)
    assert batch.images.shape[0] == 16 and batch.labels.shape == (16,)
    with torch.no_grad():  # the first half is the generator's, the second its average's, from their own latents
        assert torch.allclose(batch.images[:8], gen.module(zs[0], batch.labels[:8]), atol=1e-5)
        assert torch.allclose(batch.images[8:], gen.ema(zs[1], batch.labels[8:]), atol=1e-5)
        assert not torch.allclose(batch.images[8:], gen.module(zs[1], batch.labels[8:]), atol=1e-3)


def test_a_tap_layer_that_does_not_exist_is_a_one_line_error_naming_the_nearest(teacher, tmp_path):
    with pytest.raises(ConfigError, match="no module 'relu33' in LeNet5; nearest: relu3"):
        engine_for("datafree/dafl-digits", teacher, tmp_path, "phases.0.losses.activation_norm.layer=relu33")


# ---------------------------------------------------------------- SpaceshipNet
def test_dcgan_generators_regenerate_their_images_from_every_feature_level():
    torch.manual_seed(0)
    g = create_generator("dcgan_deep", nz=8, img_shape=(1, 32, 32), ngf=2, output="pixels", mean=(0.5,), std=(0.5,))
    g.eval()
    levels = []
    hooks = [m.register_forward_hook(lambda m, i, o: levels.append(o)) for m in g.level_modules()]
    images = g(torch.randn(3, 8))
    for h in hooks:
        h.remove()
    assert [f.shape[-1] for f in levels] == [4, 8, 16, 32]
    for level, features in enumerate(levels):
        assert torch.allclose(g.from_level(features, level), images)
    with pytest.raises(ValueError, match="feature levels 0..3, got 4"):
        g.from_level(levels[0], 4)


def test_channel_exchange_takes_half_of_each_samples_channels_from_its_mirror_partner():
    from dfkd.methods.synthesis.spaceship import exchange_channels

    torch.manual_seed(0)
    n, channels = 6, 8
    features = torch.arange(n, dtype=torch.float).view(n, 1, 1, 1).expand(n, channels, 3, 3).clone()
    mixed = exchange_channels(features)
    for i in range(n):
        per_channel = mixed[i, :, 0, 0]
        assert set(per_channel.tolist()) == {float(i), float(n - 1 - i)}  # only itself and sample N-1-i
        assert int((per_channel == i).sum()) == channels // 2
        assert torch.equal(mixed[i], mixed[i, :, :1, :1].expand(channels, 3, 3))  # whole channels move
    assert not torch.equal(mixed[0, :, 0, 0] == 0, mixed[1, :, 0, 0] == 1)  # halves drawn per sample


def _spaceship(**overrides):
    cfg = SpaceshipOptions(kind="spaceship", batch_size=6, labels="balanced", keep="best", pool_size=12,
                          net=NetConfig(name="dcgan", kwargs={"nz": 8, "ngf": 2, "output": "pixels"}),
                          inner=OptimConfig(name="adam", lr=0.01, betas=[0.5, 0.999]), **overrides)
    return create_synthesizer(cfg, dataset_info("digits"), Runtime(RuntimeConfig(device="cpu")))


def test_spaceship_keeps_the_best_steps_features_and_regenerates_replays_from_them_in_eval_mode():
    torch.manual_seed(0)
    synth = _spaceship(levels=[1], exchange_p=0.0)
    seen = []  # the level-1 features of every inner step
    synth.generator.level_modules()[1].register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
    losses = iter([3.0, 1.0, 2.0])
    start = [p.detach().clone() for p in synth.generator.parameters()]
    synth.synthesize(lambda batch: batch.images.mean() * 1e-3 + next(losses), steps=3)
    assert torch.equal(synth.features.columns["level1"][:6], seen[1])  # the best step's, not the last one's
    assert len(synth.features) == 6 and len(synth.pool) == 6
    assert not torch.equal(start[0], synth.generator.project.weight)  # one generator, trained in place
    assert synth.generator.training
    seen.clear()
    batch = synth.replay()
    assert synth.generator.training  # put back after regenerating
    with torch.no_grad():
        synth.generator.eval()
        every = synth.generator.from_level(synth.features.columns["level1"][:6], 1)
        synth.generator.train()
    for image in batch.images:  # each replayed image is one stored sample through the generator as it is now
        assert min(float((image - e).abs().max()) for e in every) < 1e-6
    assert batch.labels is not None and batch.source == "pool"


def test_spaceship_exchanged_replays_carry_no_labels_and_bad_levels_are_one_line_errors():
    torch.manual_seed(0)
    synth = _spaceship(exchange_p=1.0)
    synth.synthesize(lambda batch: batch.images.mean(), steps=1)
    assert synth.replay().labels is None  # exchanged samples mix two classes
    with pytest.raises(ConfigError, match=r"synthesis.levels must be .* levels 0..2, got \[0, 3\]"):
        _spaceship(levels=[0, 3])
    with pytest.raises(ConfigError, match="exchange_p must be a probability"):  # checked as the config loads
        load_config("datafree/spaceship-digits", ["synthesis.exchange_p=1.5"])


class _MapNet(nn.Module):
    """conv → global average pool → fc: Grad-CAM's weights are fc's row of the class over H·W."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, padding=1)
        self.fc = nn.Linear(channels, 3)

    def forward(self, x):
        self.maps = self.conv(x)
        return self.fc(self.maps.mean((2, 3)))


def _cam_ctx(teacher, student, x):
    from types import SimpleNamespace

    def teacher_view(images):
        logits = teacher(images)
        return logits, {"conv": teacher.maps}

    s_logits = student(x)
    t_logits = teacher(x)
    return SimpleNamespace(teacher_images=x, teacher_view=teacher_view, student_logits=s_logits,
                           student_features={"conv": student.maps}, teacher_logits=t_logits,
                           features_of=lambda n: {"conv": (student if n == "student" else teacher).maps},
                           network=lambda n: student if n == "student" else teacher)


def test_grad_cam_term_is_the_mse_of_hand_computed_grad_cams_with_constant_weights():
    from dfkd.methods.losses.feature import grad_cam

    torch.manual_seed(0)
    teacher, student = _MapNet(4), _MapNet(2)
    for p in teacher.parameters():
        p.requires_grad_(False)
    x = torch.randn(5, 1, 6, 6)
    ctx = _cam_ctx(teacher, student, x)
    loss = grad_cam(ctx, pairs=[["conv", "conv"]])
    k = teacher(x).argmax(1)
    hw = 36
    with torch.no_grad():
        cam_t = torch.einsum("bchw,bc->bhw", teacher.conv(x), teacher.fc.weight[k]) / hw
    cam_s = torch.einsum("bchw,bc->bhw", student.conv(x), student.fc.weight[k].detach()) / hw
    expected = F.mse_loss(cam_s, cam_t)
    assert torch.allclose(loss, expected, rtol=1e-5)
    loss.backward()
    assert student.fc.weight.grad is None  # Grad-CAM's weights are constants
    conv_grad = torch.autograd.grad(expected, student.conv.weight)[0]
    assert torch.allclose(student.conv.weight.grad, conv_grad, rtol=1e-4, atol=1e-7)


def test_class_activation_term_compares_cams_made_with_each_networks_own_classifier():
    from dfkd.methods.losses.feature import class_activation
    from dfkd_base.errors import ShapeError

    torch.manual_seed(0)
    teacher, student = _MapNet(4), _MapNet(2)
    x = torch.randn(5, 1, 6, 6)
    ctx = _cam_ctx(teacher, student, x)
    loss = class_activation(ctx, pair=["conv", "conv"])
    cam_s = torch.einsum("bchw,kc->bkhw", student.maps, student.fc.weight)
    cam_t = torch.einsum("bchw,kc->bkhw", teacher.maps, teacher.fc.weight)
    assert torch.allclose(loss, F.mse_loss(cam_s, cam_t), rtol=1e-5)
    student.fc = nn.Linear(3, 3)  # a classifier that does not take the map's channels
    with pytest.raises(ShapeError, match=r"the student's 'conv' is \(2, 6, 6\) and its classifier takes 3 features"):
        class_activation(ctx, pair=["conv", "conv"])
