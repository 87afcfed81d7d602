import pytest
import torch
import torch.nn as nn

from dfkd.nets.models import MODELS, count_parameters, create_model, list_models
from dfkd_base.errors import ConfigError, ShapeError, UnknownNameError

# (name, in_channels, image_size) for every registered name plus the parsed families.
CASES = [(name, 1, 28) if name.startswith("lenet") else (name, 3, 32) for name in MODELS.names()] + [
    ("lenet5", 1, 32),
    ("lenet5", 1, 30),
    ("lenet5_half", 1, 31),
    ("resnet8", 1, 28),
    ("wrn16_2", 3, 32),
    ("wrn-16-1", 3, 32),
    ("tv:resnet18", 1, 32),
    ("tv:mobilenet_v3_small", 3, 32),
]


@pytest.mark.parametrize("name, in_channels, image_size", CASES)
def test_model_outputs_logits_and_has_batchnorm(name, in_channels, image_size):
    torch.manual_seed(0)
    model = create_model(name, in_channels=in_channels, num_classes=7, image_size=image_size).eval()
    with torch.no_grad():
        logits = model(torch.randn(2, in_channels, image_size, image_size))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())


def test_lenet5_parameter_count_and_half_variant():
    model = create_model("lenet5", in_channels=1, num_classes=10)
    # conv1 1*6*25 + bn 2*6 + conv2 6*16*25 + bn 2*16 + conv3 16*120*25 + bn 2*120
    # + fc1 120*84+84 + fc2 84*10+10 (convs have no bias: BN follows each)
    assert count_parameters(model) == 150 + 12 + 2400 + 32 + 48000 + 240 + 10164 + 850 == 61848
    half = create_model("lenet5-half", in_channels=1, num_classes=10)
    assert count_parameters(half) == 15809
    assert count_parameters(half) < count_parameters(model)


def test_lenet5_pads_conv1_for_mnist_and_rejects_other_sizes():
    assert create_model("lenet5", in_channels=1, image_size=28).conv1.padding == (2, 2)
    assert create_model("lenet5", in_channels=1, image_size=32).conv1.padding == (0, 0)
    for size in (20, 64):
        with pytest.raises(ShapeError, match=f"LeNet-5.*image_size={size}"):
            create_model("lenet5", in_channels=1, image_size=size)


def test_cifar_resnet18_parameter_count():
    # stem 3*64*9 + bn 128                                          =     1,856
    # layer1: 2 blocks x (2 * 64*64*9 + 2 bn 128)                    =   147,968
    # layer2: 64*128*9 + 128*128*9 + 2*256 + proj 64*128 + 256
    #         + (2 * 128*128*9 + 2*256)                              =   525,568
    # layer3: same pattern at 256                                    = 2,099,712
    # layer4: same pattern at 512                                    = 8,393,728
    # fc 512*10 + 10                                                 =     5,130
    assert count_parameters(create_model("resnet18")) == 11_173_962


def test_other_parameter_counts():
    # WRN-16-2: conv1 432 + layer1 32,992 + layer2 131,520 + layer3 525,184 + bn 256 + fc 1,290
    assert count_parameters(create_model("wrn16_2")) == 691_674
    assert count_parameters(create_model("resnet20")) > count_parameters(create_model("resnet8"))
    thin = create_model("mobilenetv2", width_mult=0.5)
    assert count_parameters(thin) < count_parameters(create_model("mobilenetv2"))


def test_resnet_paths_are_meaningful():
    model = create_model("resnet20")
    names = dict(model.named_modules())
    for path in ("conv1", "layer1", "layer3", "layer3.1.bn2", "layer2.0.shortcut", "fc"):
        assert path in names
    assert "layer4" not in names
    assert model.layer3[0].conv1.stride == (2, 2)
    assert len(model.layer1) == 3  # (20 - 2) / 6 blocks per stage


def test_weights_are_kaiming_fan_out_and_identity_bn():
    torch.manual_seed(0)
    model = create_model("resnet18")
    weight = model.layer4[1].conv2.weight  # fan_out 512*9: std sqrt(2/4608) ~ 0.0208; PyTorch default ~ 0.0085
    assert weight.std().item() == pytest.approx((2 / (512 * 9)) ** 0.5, rel=0.05)
    assert torch.equal(model.bn1.weight, torch.ones(64)) and torch.equal(model.bn1.bias, torch.zeros(64))


def test_wrn_options_and_bad_depth():
    model = create_model("wrn16_2", dropout=0.3)
    assert model.layer1[0].dropout.p == 0.3
    assert len(model.layer2) == 2  # (16 - 4) / 6 blocks per stage
    with pytest.raises(ConfigError, match="6n\\+4"):
        create_model("wrn18_2")


def test_torchvision_first_conv_is_adapted():
    model = create_model("tv:resnet18", in_channels=1, num_classes=5)
    assert model.conv1.in_channels == 1 and model.conv1.out_channels == 64
    assert model.conv1.kernel_size == (7, 7) and model.conv1.stride == (2, 2)
    assert model.fc.out_features == 5


def test_unknown_names():
    with pytest.raises(UnknownNameError, match="unknown model 'resnet81'; did you mean .*'resnet18'"):
        create_model("resnet81")
    with pytest.raises(UnknownNameError, match="torchvision model 'resnet181'.*'resnet18'"):
        create_model("tv:resnet181")


def test_unsupported_option_is_a_config_error():
    with pytest.raises(ConfigError, match="resnet8.*width_mult"):
        create_model("resnet8", width_mult=2.0)


def test_list_models_includes_families():
    names = list_models()
    assert {"lenet5", "lenet5_half", "resnet8", "resnet18", "resnet34", "mobilenetv2"} <= set(names)
    assert "wrn<depth>_<width>" in names and "tv:<torchvision name>" in names


class _Scaled(nn.Module):
    """A stand-in wrapper: the wrapped network's logits times a factor."""

    def __init__(self, inner: nn.Module, factor: float):
        super().__init__()
        self.inner, self.factor = inner, factor

    def forward(self, x):
        return self.inner(x) * self.factor


def test_a_registered_wrapper_is_built_trained_saved_and_reloaded_without_engine_changes(tmp_path):
    from dfkd.core.config import load_config
    from dfkd.loop.engine import Engine
    from dfkd.nets.arch import load_model
    from dfkd.nets.models import MODEL_WRAPPERS

    MODEL_WRAPPERS.register("test_scale")(_Scaled)
    try:
        torch.manual_seed(0)
        base = create_model("lenet5_half", in_channels=1, num_classes=10, image_size=32).eval()
        torch.manual_seed(0)
        wrapped = create_model("lenet5_half", in_channels=1, num_classes=10, image_size=32, test_scale=3.0).eval()
        x = torch.randn(2, 1, 32, 32)
        assert isinstance(wrapped, _Scaled) and torch.allclose(wrapped(x), 3.0 * base(x))
        with pytest.raises(ConfigError, match="model 'lenet5_half'"):  # other options are still checked
            create_model("lenet5_half", in_channels=1, test_scale=2.0, width=3)

        engine = Engine(load_config("teacher/lenet5-digits", [
            f"output.root={tmp_path}", "train.epochs=1", "train.iters_per_epoch=2", "runtime.num_threads=1",
            "players.model.net.name=lenet5_half", "players.model.net.kwargs={test_scale: 3.0}"]))
        assert isinstance(engine.student.module, _Scaled)
        summary = engine.fit()
        model, meta = load_model(engine.run_dir / "ckpt" / "final.pt")
        assert meta["arch"]["kwargs"] == {"test_scale": 3.0} and isinstance(model, _Scaled)
        assert engine.evaluate(model)["acc"] == pytest.approx(summary["final_acc"])
    finally:
        MODEL_WRAPPERS._items.pop("test_scale")


def test_lenet5_without_batchnorm_is_dafl_and_dfads_pair():
    for name, widths in (("lenet5", (6, 16, 120)), ("lenet5_half", (3, 8, 60))):
        model = create_model(name, in_channels=1, num_classes=10, image_size=32, batchnorm=False)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
        assert [c.out_channels for c in convs] == list(widths) and all(c.bias is not None for c in convs)
        paths = dict(model.named_modules())
        assert "relu3" in paths and "bn1" not in paths
        assert model(torch.randn(2, 1, 32, 32)).shape == (2, 10)
