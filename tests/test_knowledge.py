"""The rest of the taxonomy on real data: relation, hint, decoupled and contrastive KD configs,
their plumbing (sample indices on real batches), and their bad-input errors."""
import pytest
import torch

from dfkd.core.config import load_config, named_configs
from dfkd.data.batch import Batch
from dfkd.data.datasets import load_dataset
from dfkd.data.loader import TensorLoader
from dfkd.loop.engine import Engine
from dfkd.data.datasets import dataset_info
from dfkd.loop.phases import RealStream, build_batch_transform
from dfkd.nets.models import create_model
from dfkd_base.errors import ConfigError, ShapeError

KD_DIGITS = sorted(n for n in named_configs() if n.startswith("kd/") and n.endswith("-digits"))
THIN = ["players.student.net.name=lenet5", "players.student.net.kwargs={width: 0.125}"]


def test_every_method_has_a_digits_and_a_fashion_mnist_config():
    methods = {n[3:-len("-digits")] for n in KD_DIGITS}
    assert methods == {"student", "kd", "hint", "fitnets", "at", "rkd", "sp", "pkt", "crd", "fsp", "dkd", "byot", "cskd"}
    assert all(f"kd/{m}-fmnist" in named_configs() for m in methods)


@pytest.mark.parametrize("name", [n for n in KD_DIGITS if n not in ("kd/byot-digits", "kd/cskd-digits")])  # no teacher
@pytest.mark.slow
def test_kd_configs_train_a_thin_student_on_digits(name, tmp_path, digits_teacher):
    width = [] if name == "kd/fsp-digits" else THIN
    config = load_config(name, [f"teacher.checkpoint={digits_teacher[0]}", f"output.root={tmp_path}",
                                "runtime.num_threads=1", "train.epochs=2", *width])
    summary = Engine(config).fit()
    assert summary["steps"] == 2 * 21 and summary["final_acc"] is not None


def test_real_batches_carry_the_index_of_each_sample_in_the_training_split():
    split = load_dataset("digits", "train")
    stream = RealStream(TensorLoader(split, 16, shuffle=True, seed=3))
    for _ in range(3):
        batch = stream.next()
        assert torch.allclose(batch.images, split.normalize(split.images[batch.index].float() / 255))
        assert torch.equal(batch.labels, split.labels[batch.index])
    mixed = build_batch_transform(load_config("datafree/dfq-digits", ["phases.1.mixup=1.0"]).phases[1],
                                  dataset_info("digits"))
    assert mixed(Batch(batch.images, batch.labels, "real", index=batch.index)).index is None  # no one sample


def test_lenet5_width_scales_every_layer():
    thin = create_model("lenet5", in_channels=1, num_classes=10, image_size=32, width=0.125)
    assert [thin.conv1.out_channels, thin.conv2.out_channels, thin.conv3.out_channels, thin.fc1.out_features] == \
        [1, 2, 15, 10]
    half = create_model("lenet5_half", in_channels=1, num_classes=10, image_size=32)
    assert half.conv2.out_channels == 8 and half.fc1.out_features == 42
    with pytest.raises(ConfigError, match="width must be positive"):
        create_model("lenet5", in_channels=1, num_classes=10, image_size=32, width=0)


def test_fsp_with_a_thinner_student_is_a_one_line_error_naming_the_layers(tmp_path, digits_teacher):
    config = load_config("kd/fsp-digits", [f"teacher.checkpoint={digits_teacher[0]}", f"output.root={tmp_path}",
                                            "runtime.num_threads=1", "train.epochs=1", *THIN])
    with pytest.raises(ShapeError, match=r"fsp: between 'relu1' and 'relu2' the student's FSP matrix is \(1, 2\), "
                                         r"the teacher's \(6, 16\)"):
        Engine(config).fit()


def test_crd_in_a_run_without_real_batches_is_a_one_line_error(tmp_path, digits_teacher):
    config = load_config("datafree/dfq-digits", [f"teacher.checkpoint={digits_teacher[0]}", f"output.root={tmp_path}",
                                                  "phases.1.losses={crd: 0.8}"])
    with pytest.raises(ConfigError, match="crd needs real training batches"):
        Engine(config)


def test_crd_heads_train_in_the_students_optimizer_at_its_scheduled_rate(tmp_path, digits_teacher):
    """CRD's code steps its embedding heads with the student's optimizer: its momentum, Nesterov
    and weight decay, and the rate of its schedule, which a constant-rate optimizer of their own
    (as dfkd had) does not follow."""
    from dfkd.data.datasets import ImageTensorDataset
    from dfkd.methods.losses.contrastive import ContrastiveRepresentation

    train = load_dataset("digits", "train")
    split = ImageTensorDataset(train.images[:64], train.labels[:64], train.info, "train")
    engine = Engine(load_config("kd/crd-digits", [f"teacher.checkpoint={digits_teacher[0]}", f"output.root={tmp_path}",
                                                  "train.epochs=2", "data.batch_size=32", "runtime.progress=false",
                                                  "phases.0.losses.crd={weight: 0.8, negatives: 8}", *THIN]),
                    write=False, train_split=split)
    crd = next(t for t in engine.phases[0].terms if isinstance(t.term, ContrastiveRepresentation))
    optimizer = engine.players["student"].optimizer
    assert crd.optimizer is None and len(optimizer.param_groups) == 2
    assert {id(p) for p in optimizer.param_groups[1]["params"]} == {id(p) for p in crd.term.parameters()}
    assert optimizer.param_groups[1]["nesterov"] and optimizer.param_groups[1]["weight_decay"] == 5e-4
    head = crd.term.embed_student.weight.detach().clone()
    engine.fit()
    assert not torch.equal(head, crd.term.embed_student.weight)
    rates = [group["lr"] for group in optimizer.param_groups]
    assert rates[0] == rates[1] < 0.05 * 0.01  # the cosine's end, for the heads as for the student


def test_a_run_whose_crd_heads_train_with_the_student_resumes_with_them(tmp_path, digits_teacher):
    from dfkd.data.datasets import ImageTensorDataset

    train = load_dataset("digits", "train")
    split = ImageTensorDataset(train.images[:64], train.labels[:64], train.info, "train")
    common = [f"teacher.checkpoint={digits_teacher[0]}", f"output.root={tmp_path}", "data.batch_size=32",
              "runtime.progress=false", "output.tensorboard=false", "phases.0.losses.crd={weight: 0.8, negatives: 8}"]
    done = Engine(load_config("kd/crd-digits", [*common, "train.epochs=2"]), train_split=split).fit()
    resumed = Engine(load_config("kd/crd-digits", [*common, "train.epochs=3"]),
                     resume=f"{done['run_dir']}/ckpt/last.pt", train_split=split)
    groups = resumed.players["student"].optimizer.param_groups
    assert len(groups) == 2 and groups[1]["lr"] == pytest.approx(0.05 * 0.25)  # step 4 of 6 of the cosine
    assert resumed.fit()["steps"] == 6


# ---------------------------------------------------------------- self-distillation (BYOT)
def test_exits_attach_by_hooks_and_leave_the_networks_output_alone():
    torch.manual_seed(0)
    plain = create_model("lenet5", in_channels=1, num_classes=10, image_size=32).eval()
    torch.manual_seed(0)
    net = create_model("lenet5", in_channels=1, num_classes=10, image_size=32,
                       exits={"layers": ["pool1", "pool2"], "width": 8}).eval()
    x = torch.randn(3, 1, 32, 32)
    assert torch.equal(net(x), plain(x))  # the same network, the same logits
    assert [z.shape for z in net.exit_logits] == [(3, 10), (3, 10)] and net.deep_feature.shape == (3, 84)
    assert [a.in_features for a in net.adapters] == [8, 8] and net.adapters[0].out_features == 84
    with pytest.raises(ConfigError, match="no module 'pool3' in LeNet5; nearest: pool2, pool1"):
        create_model("lenet5", in_channels=1, num_classes=10, image_size=32, exits=["pool3"])
    with pytest.raises(ShapeError, match="'fc1' gives \\(84,\\), not a feature map"):
        create_model("lenet5", in_channels=1, num_classes=10, image_size=32, exits=["fc1"])


def test_self_distill_term_hand_example():
    from types import SimpleNamespace

    import torch.nn.functional as F

    from dfkd.methods.losses.self_distill import self_distill

    z1, z2, deep = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]]), torch.tensor([[3.0, 0.0]])
    f1, f2, deep_feature = torch.tensor([[1.0]]), torch.tensor([[2.0]]), torch.tensor([[0.0, 5.0]])
    adapters = [torch.nn.Linear(1, 2), torch.nn.Linear(1, 2)]
    with torch.no_grad():
        for a in adapters:
            a.weight.copy_(torch.tensor([[1.0], [1.0]]))
            a.bias.zero_()
    net = SimpleNamespace(exit_logits=[z1, z2], exit_features=[f1, f2], deep_feature=deep_feature, adapters=adapters)
    ctx = SimpleNamespace(network=lambda name: net, student_logits=deep, labels=torch.tensor([0]))
    T, alpha, beta = 2.0, 0.25, 0.5

    def soft_ce(z):
        return -(F.softmax(deep / T, 1) * F.log_softmax(z / T, 1)).sum().item()

    expected = sum((1 - alpha) * F.cross_entropy(z, ctx.labels).item() + alpha * soft_ce(z) for z in (z1, z2))
    expected += beta * ((2 - 0) ** 2 + (2 - 5) ** 2) ** 0.5  # the second exit's adapted feature (2, 2) vs (0, 5)
    assert self_distill(ctx, T=T, alpha=alpha, feature_weight=beta).item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.slow
def test_byot_trains_exits_that_are_evaluated_and_exit_early(tmp_path):
    from dfkd.loop.evaluation import early_exit, evaluate, exit_costs
    from dfkd.nets.arch import load_model

    config = load_config("kd/byot-digits", [f"output.root={tmp_path}", "runtime.num_threads=1", "train.epochs=3"])
    engine = Engine(config)
    summary = engine.fit()
    assert len(summary["final_exits"]) == 2 and summary["final_exit_ensemble"] is not None
    model = load_model(engine.run_dir / "ckpt" / "final.pt")[0]  # rebuilt with its exits from the model file
    test = TensorLoader(load_dataset("digits", "test"), 500)
    scores = evaluate(model, test)
    assert scores["exits"] == pytest.approx(summary["final_exits"])
    costs, network = exit_costs(model, (1, 32, 32))
    assert costs[0] < costs[1] < network < costs[2]  # the end also paid for both heads
    never, always = early_exit(model, test, [1.01, 0.0], (1, 32, 32))
    assert never["exits"] == [0.0, 0.0, 1.0] and never["acc"] == pytest.approx(scores["acc"])
    assert never["flops"] == pytest.approx(costs[2] / network)
    assert always["exits"] == [1.0, 0.0, 0.0] and always["acc"] == pytest.approx(scores["exits"][0])
    assert always["flops"] == pytest.approx(costs[0] / network)


def test_self_distill_without_exits_is_a_one_line_error(tmp_path):
    config = load_config("kd/byot-digits", [f"output.root={tmp_path}", "players.model.net.kwargs={}",
                                             "train.epochs=1", "runtime.num_threads=1"])
    with pytest.raises(ConfigError, match="self_distill needs a student with exits"):
        Engine(config).fit()


# ---------------------------------------------------------------- class-wise self-distillation (CS-KD)
def test_class_pairs_give_each_sample_another_of_its_class():
    split = load_dataset("digits", "train")
    loader = TensorLoader(split, 32, shuffle=True, augment=False, seed=1, class_pairs=True)
    for _, (_, labels) in zip(range(3), loader):
        assert torch.equal(split.labels[loader.last_partner_index], labels)
        assert torch.allclose(loader.last_partners, split.normalize(split.images[loader.last_partner_index].float() / 255))
    assert not torch.equal(loader.last_partner_index, loader.last_index)  # not (all) the samples themselves


def test_cs_kd_term_is_the_kl_to_the_partners_prediction_without_its_gradient():
    from types import SimpleNamespace

    from dfkd.methods.losses.response import kd_kl_divergence
    from dfkd.methods.losses.self_distill import cs_kd

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 4)
    x, partners = torch.randn(5, 3), torch.randn(5, 3)
    ctx = SimpleNamespace(batch=SimpleNamespace(partners=partners, source="real"), student_logits=net(x),
                          logits_on=lambda name, images: net(images))
    loss = cs_kd(ctx, T=4.0)
    expected = kd_kl_divergence(net(x), net(partners).detach(), 4.0)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    grad = torch.autograd.grad(loss, net.weight)[0]
    assert torch.allclose(grad, torch.autograd.grad(expected, net.weight)[0])  # no gradient through the target
    with pytest.raises(ConfigError, match="cs_kd needs another sample of each one's class: set data.class_pairs"):
        cs_kd(SimpleNamespace(batch=SimpleNamespace(partners=None, source="real")))
