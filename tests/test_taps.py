import pytest
import torch
import torch.nn as nn

from dfkd.nets.models import create_model
from dfkd.nets.taps import BNStatsTap, FeatureTap, resolve_module
from dfkd_base.errors import ConfigError


@pytest.fixture
def resnet8():
    torch.manual_seed(0)
    return create_model("resnet8").eval()


def test_resolve_module(resnet8):
    assert resolve_module(resnet8, "layer3.0.bn2") is resnet8.layer3[0].bn2
    with pytest.raises(ConfigError, match="no module 'layer5' in ResNet; nearest: layer[123]"):
        resolve_module(resnet8, "layer5")


def test_feature_tap_records_outputs(resnet8):
    x = torch.randn(2, 3, 32, 32)
    with FeatureTap(resnet8, ["layer2", "layer3"]) as tap:
        resnet8(x)
        assert tap.features["layer2"].shape == (2, 32, 16, 16)
        assert tap.features["layer3"].shape == (2, 64, 8, 8)
        # The recorded output is exactly what layer3 computes from layer2's output.
        assert torch.allclose(resnet8.layer3(tap.features["layer2"]), tap.features["layer3"])
        resnet8(x[:1])
        assert tap.features["layer3"].shape[0] == 1  # overwritten by the latest forward
        tap.clear()
        assert tap.features == {}
    resnet8(x)
    assert tap.features == {}  # leaving the with block removed the hooks


def test_feature_tap_remove_and_bad_path(resnet8):
    tap = FeatureTap(resnet8, ["fc"])
    resnet8(torch.randn(2, 3, 32, 32))
    assert tap.features["fc"].shape == (2, 10)
    tap.remove()
    tap.clear()
    resnet8(torch.randn(2, 3, 32, 32))
    assert "fc" not in tap.features
    with pytest.raises(ConfigError, match="nearest: .*layer1"):
        FeatureTap(resnet8, ["layer1", "layr1"])
    assert not resnet8.layer1._forward_hooks  # the valid path was not hooked either


def test_bn_stats_match_manual_computation():
    torch.manual_seed(0)
    model = create_model("lenet5", in_channels=1, image_size=28).eval()
    bn_count = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    x = torch.randn(4, 1, 28, 28, requires_grad=True)
    with BNStatsTap(model) as tap:
        model(x)
        assert tap.layers == ["bn1", "bn2", "bn3"]
        assert len(tap.stats) == bn_count == 3
        name, mean, var, running_mean, running_var = tap.stats[0]
        reference = model.conv1(x)  # bn1's input, computed without hooks
        assert name == "bn1"
        assert torch.allclose(mean, reference.mean(dim=(0, 2, 3)), atol=1e-6)
        assert torch.allclose(var, reference.var(dim=(0, 2, 3), unbiased=False), atol=1e-5)
        assert running_mean is model.bn1.running_mean and running_var is model.bn1.running_var
        # A BN-statistics loss reaches the input through the recorded mean.
        tap.stats[1].mean.pow(2).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0


def test_bn_stats_disabled_and_removed():
    model = create_model("lenet5", in_channels=1).eval()
    tap = BNStatsTap(model)
    tap.enabled = False
    model(torch.randn(2, 1, 32, 32))
    assert tap.stats == []
    tap.enabled = True
    model(torch.randn(2, 1, 32, 32))
    assert len(tap.stats) == 3
    tap.clear()
    tap.remove()
    model(torch.randn(2, 1, 32, 32))
    assert tap.stats == []


def test_bn_stats_needs_batchnorm():
    with pytest.raises(ConfigError, match="model Sequential has no BatchNorm layers"):
        BNStatsTap(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()))
