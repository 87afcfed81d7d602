import re

import pytest
import torch

from dfkd.core.config import load_config
from dfkd.core.schema import NetConfig
from dfkd.data.datasets import dataset_info
from dfkd.loop.engine import Engine
from dfkd.methods.synthesis.base import build_generator
from dfkd_base.errors import ConfigError, ShapeError, UnknownNameError
from generators import GENERATORS, ConditionalGenerator, DCGANGenerator, DeepDCGANGenerator, create_generator
from generators.layers import UpsampleConv2d

SHAPES = [(1, 28, 28), (1, 32, 32), (3, 32, 32)]


@pytest.mark.parametrize("img_shape", SHAPES)
@pytest.mark.parametrize("name", ["dcgan", "conditional"])
def test_output_shape(name, img_shape):
    generator = create_generator(name, nz=16, img_shape=img_shape, num_classes=10, ngf=8)
    z, y = torch.randn(4, 16), torch.randint(0, 10, (4,))
    assert generator(z, y).shape == (4, *img_shape)
    assert (generator.nz, generator.img_shape, generator.num_classes) == (16, img_shape, 10)


@pytest.mark.parametrize("img_shape", [(1, 32, 32), (3, 32, 32), (3, 64, 48)])
def test_deep_generator_output_shape(img_shape):
    generator = create_generator("dcgan_deep", nz=16, img_shape=img_shape, ngf=8)
    assert isinstance(generator, DeepDCGANGenerator)
    assert generator(torch.randn(2, 16)).shape == (2, *img_shape)
    ups = [m for m in generator.modules() if isinstance(m, UpsampleConv2d)]
    assert len(ups) == 3


def test_fused_upsample_conv_is_nearest_upsampling_then_the_3x3_convolution():
    import torch.nn.functional as F

    torch.manual_seed(0)
    layer = UpsampleConv2d(6, 4)
    x = torch.randn(3, 6, 5, 7, requires_grad=True)
    expected = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), layer.weight, layer.bias, padding=1)
    got = layer(x)
    assert got.shape == (3, 4, 10, 14) and torch.allclose(got, expected, atol=1e-5)
    upstream = torch.randn_like(expected)
    grads = torch.autograd.grad((expected * upstream).sum(), (x, layer.weight, layer.bias))
    for ours, theirs in zip(torch.autograd.grad((got * upstream).sum(), (x, layer.weight, layer.bias)), grads):
        assert torch.allclose(ours, theirs, atol=1e-4)
    channels_last = layer(x.detach().contiguous(memory_format=torch.channels_last))
    assert channels_last.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(channels_last, expected, atol=1e-5)


def test_generators_load_the_state_of_the_upsample_then_conv_layout():
    # the layout before the fused layer: Upsample (no state) then Conv2d at the same index
    torch.manual_seed(0)
    generator = create_generator("dcgan", nz=16, img_shape=(1, 32, 32), ngf=8)
    old = torch.nn.Sequential(torch.nn.Upsample(scale_factor=2), torch.nn.Conv2d(16, 16, 3, padding=1))
    state = {f"blocks.{1 + int(k.split('.')[0])}.{k.split('.')[1]}": v for k, v in old.state_dict().items()}
    generator.load_state_dict({**generator.state_dict(), **state})
    features = torch.randn(2, 16, 8, 8)
    assert torch.allclose(generator.blocks[1:3](features), old(features), atol=1e-5)


def test_registry_and_flags():
    assert set(GENERATORS.names()) == {"dcgan", "dcgan_deep", "conditional", "nayer", "qimera"}
    assert isinstance(create_generator("dcgan", 8, (1, 28, 28)), DCGANGenerator)
    assert not create_generator("dcgan", 8, (1, 28, 28)).conditional
    assert create_generator("conditional", 8, (1, 28, 28)).conditional
    assert create_generator("nayer", 8, (1, 28, 28)).conditional
    assert create_generator("qimera", 8, (1, 28, 28)).conditional


def test_output_is_normalised_per_channel_in_train_mode():
    torch.manual_seed(0)
    generator = create_generator("dcgan", nz=32, img_shape=(3, 32, 32), ngf=16).train()
    images = generator(torch.randn(16, 32))
    mean = images.mean(dim=(0, 2, 3))
    var = images.var(dim=(0, 2, 3), correction=0)
    assert torch.allclose(mean, torch.zeros(3), atol=1e-4)
    assert torch.allclose(var, torch.ones(3), atol=1e-2)
    assert generator.to_image[-1].weight is None  # affine-free: nothing can undo the normalisation


def test_conditional_needs_labels_and_uses_them():
    torch.manual_seed(0)
    generator = create_generator("conditional", nz=16, img_shape=(1, 28, 28), ngf=8).eval()
    z = torch.randn(1, 16).repeat(2, 1)
    with pytest.raises(ValueError, match="needs class labels"):
        generator(z)
    images = generator(z, torch.tensor([3, 7]))
    assert not torch.allclose(images[0], images[1])
    same = generator(z, torch.tensor([3, 3]))
    assert torch.allclose(same[0], same[1])
    assert isinstance(generator, ConditionalGenerator)


@pytest.mark.parametrize("name, img_shape, factor", [
    ("dcgan", (1, 30, 30), 4), ("conditional", (3, 32, 30), 4), ("dcgan_deep", (1, 28, 28), 8)])
def test_indivisible_sizes_are_shape_errors(name, img_shape, factor):
    message = f"Generator needs image height and width divisible by {factor}, got img_shape {img_shape}"
    with pytest.raises(ShapeError, match=re.escape(message)):
        create_generator(name, nz=8, img_shape=img_shape)


def test_wrong_latent_size_is_a_shape_error():
    generator = create_generator("dcgan", nz=8, img_shape=(1, 28, 28))
    with pytest.raises(ShapeError, match="z of shape \\(N, 8\\)"):
        generator(torch.randn(2, 9))


def test_unknown_generator():
    with pytest.raises(UnknownNameError, match="did you mean 'dcgan'"):
        create_generator("dcgn", nz=8, img_shape=(1, 28, 28))


@pytest.mark.parametrize("name", ["dcgan", "dcgan_deep", "conditional"])
def test_pixel_output_stays_within_the_datasets_pixel_range(name):
    torch.manual_seed(0)
    mean, std = (0.25, 0.5, 0.75), (0.5, 0.25, 0.2)
    generator = create_generator(name, nz=16, img_shape=(3, 32, 32), ngf=8, output="pixels", mean=mean, std=std)
    z, y = 10 * torch.randn(64, 16), torch.randint(0, 10, (64,))
    with torch.no_grad():
        pixels = generator(z, y) * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
        assert pixels.min() >= 0 and pixels.max() <= 1
        last = generator.to_image[0]
        last.weight.zero_()
        for bias, pixel in ((-50.0, 0.0), (50.0, 1.0)):  # the sigmoid's ends: black, then white
            last.bias.fill_(bias)
            expected = ((pixel - torch.tensor(mean)) / torch.tensor(std)).view(1, 3, 1, 1).expand(64, 3, 32, 32)
            torch.testing.assert_close(generator(z, y), expected)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) and not m.affine for m in generator.modules())
    assert generator.state_dict().keys() == create_generator(
        name, nz=16, img_shape=(3, 32, 32), ngf=8, output="pixels", mean=(0.0,), std=(1.0,)).state_dict().keys()


@pytest.mark.parametrize("kwargs, message", [
    ({"output": "tanh"}, "DCGANGenerator: output must be 'bn', 'affine_bn' or 'pixels', got 'tanh'"),
    ({"output": "pixels"}, "DCGANGenerator: output='pixels' needs the dataset's mean and std"),
])
def test_bad_output_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        create_generator("dcgan", nz=8, img_shape=(1, 28, 28), **kwargs)


def test_engine_gives_a_pixel_generator_the_datasets_normalisation(digits_teacher):
    teacher, _ = digits_teacher

    def engine(*overrides):
        return Engine(load_config("datafree/dfq-digits", [f"teacher.checkpoint={teacher}", "data.eval=false",
                                                          *overrides]), write=False)

    generator = engine("players.generator.net.kwargs.output=pixels").players["generator"].module
    info = dataset_info("digits")
    assert generator.mean.flatten().tolist() == pytest.approx(info.mean)
    assert generator.std.flatten().tolist() == pytest.approx(info.std)
    with pytest.raises(ConfigError, match=re.escape("generator 'dcgan': DCGANGenerator: output must be 'bn', "
                                                    "'affine_bn' or 'pixels', got 'rgb'")):
        engine("players.generator.net.kwargs.output=rgb")


@pytest.mark.parametrize("name", ["dcgan", "conditional", "nayer"])
@pytest.mark.parametrize("output", ["bn", "affine_bn", "pixels"])
def test_native_size_renders_only_what_the_data_pipeline_can_make(name, output):
    """native_size=(8, 8) on 32x32 images: every image lies in the range of the pipeline's bilinear
    8 -> 32 upsampling U (X = P X P^T with P the projection onto U's columns), so has rank <= 8; the
    same weights without the option make images that do not."""
    kwargs = {"ngf": 4, "output": output, **({"mean": (0.3,), "std": (0.3,)} if output == "pixels" else {})}
    torch.manual_seed(0)
    native = create_generator(name, nz=16, img_shape=(1, 32, 32), native_size=(8, 8), **kwargs)
    plain = create_generator(name, nz=16, img_shape=(1, 32, 32), **kwargs)
    plain.load_state_dict(native.state_dict())
    z, y = torch.randn(6, 16), torch.arange(6) % 10
    with torch.no_grad():
        images, reference = native(z, y)[:, 0], plain(z, y)[:, 0]
    upsample = torch.nn.functional.interpolate(torch.eye(8).view(8, 1, 8, 1), size=(32, 1), mode="bilinear",
                                               align_corners=False).view(8, 32).T  # 32 x 8
    project = upsample @ torch.linalg.pinv(upsample)
    torch.testing.assert_close(project @ images @ project.T, images, atol=1e-4, rtol=1e-4)
    assert (project @ reference @ project.T - reference).abs().max() > 0.1
    assert max(torch.linalg.matrix_rank(image).item() for image in images) <= 8
    assert min(torch.linalg.matrix_rank(image).item() for image in reference) > 8
    if output == "bn":  # the last BatchNorm still standardizes the batch
        assert images.mean().item() == pytest.approx(0.0, abs=1e-4)
        assert images.std().item() == pytest.approx(1.0, abs=1e-2)


def test_native_size_data_follows_the_dataset_and_bad_sizes_are_named(digits_teacher):
    with pytest.raises(ShapeError, match=re.escape("DCGANGenerator: native_size must be (height, width) within the "
                                                   "image's (32, 32), got (64, 64)")):
        create_generator("dcgan", nz=8, img_shape=(1, 32, 32), native_size=(64, 64))
    with pytest.raises(ShapeError, match=re.escape("DCGANGenerator: native_size must be (height, width), got 'data'")):
        create_generator("dcgan", nz=8, img_shape=(1, 32, 32), native_size="data")
    teacher, _ = digits_teacher

    def generator(*overrides):
        config = load_config("datafree/dfq-digits", [f"teacher.checkpoint={teacher}", "data.eval=false", *overrides])
        return Engine(config, write=False).players["generator"].module

    assert generator().native_size == (8, 8)  # dfq-digits ships with native_size: data
    assert generator("players.generator.net.kwargs.native_size=null").native_size is None
    assert generator("players.generator.net.kwargs.native_size=[4,4]").native_size == (4, 4)
    # a dataset taken at the model's resolution: nothing to resize (the fmnist configs inherit the option)
    fmnist = build_generator(NetConfig(name="dcgan", kwargs={"native_size": "data"}), dataset_info("fashion-mnist"),
                             torch.device("cpu"))
    assert fmnist.native_size is None


def test_cmi_digits_renders_at_the_data_resolution(digits_teacher):
    """cmi-digits' re-initialized generators render on digits' 8x8 grid, as dfq-digits' does (measured
    from a resnet8 teacher: 89.56% with it, 74.89 without); cmi-fmnist inherits the option, which its
    dataset resolves to nothing."""
    teacher, _ = digits_teacher
    config = load_config("datafree/cmi-digits", [f"teacher.checkpoint={teacher}", "data.eval=false"])
    assert Engine(config, write=False).synth.generator.native_size == (8, 8)
    fmnist = build_generator(load_config("datafree/cmi-fmnist").synthesis.net, dataset_info("fashion-mnist"),
                             torch.device("cpu"))
    assert fmnist.native_size is None
