"""The rest of the taxonomy on real data: relation, hint, decoupled and contrastive KD configs,
their plumbing (sample indices on real batches), and their bad-input errors."""
import pytest
import torch

from dfkd.config import load_config, named_configs
from dfkd.data import TensorLoader, load_dataset
from dfkd.engine import Engine
from dfkd.errors import ConfigError, ShapeError
from dfkd.models import create_model
from dfkd.phases import Batch, RealStream, build_batch_transform

KD_DIGITS = sorted(n for n in named_configs() if n.startswith("kd/") and n.endswith("-digits"))
THIN = ["players.student.net.name=lenet5", "players.student.net.kwargs={width: 0.125}"]


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def test_every_method_has_a_digits_and_a_fashion_mnist_config():
    methods = {n[3:-len("-digits")] for n in KD_DIGITS}
    assert methods == {"student", "kd", "hint", "fitnets", "at", "rkd", "sp", "pkt", "crd", "fsp", "dkd"}
    assert all(f"kd/{m}-fmnist" in named_configs() for m in methods)


@pytest.mark.parametrize("name", KD_DIGITS)
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
    mixed = build_batch_transform(load_config("datafree/dfq-digits", ["phases.1.mixup=1.0"]).phases[1], (1, 32, 32))
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
