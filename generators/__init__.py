"""Image generators for data-free distillation.

A generator maps latents ``z`` of shape ``(N, nz)`` (and, if conditional, labels ``y``) to images
``(N, C, H, W)`` in the teacher's *normalised* input space. Its last layer is one of:

- ``output="bn"`` (DAFL's and DFAD's design, the default): tanh, then an affine-free BatchNorm, so in
  training mode the output has zero mean and unit variance per channel, as normalised real data would;
- ``output="affine_bn"`` (ZSKT's): no tanh, and a BatchNorm with a learned scale and shift;
- ``output="pixels"`` (CMI's and Fast-DFKD's): a sigmoid gives pixels in [0, 1], which are then
  normalised with the dataset's ``mean`` and ``std``, so every image is one a camera could take:
  nothing darker than black, nothing brighter than white.

``native_size=(h, w)`` renders images as a dataset whose pictures were taken at ``h x w`` and
resized to the model's input shows them: area-averaged down to ``h x w``, then resized back
bilinearly, as the data pipeline resized the real images. The synthetic images then hold no
detail finer than the real ones can, detail a teacher of one architecture may respond to and a
student of another cannot imitate (docs/results.md, "Teachers of other architectures").
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from dfkd_base.errors import ShapeError
from dfkd_base.registry import Registry
from generators.layers import UpsampleConv2d

__all__ = ["GENERATORS", "create_generator", "DCGANGenerator", "DeepDCGANGenerator", "ConditionalGenerator",
           "SuperposedGenerator"]

GENERATORS = Registry("generator")


@GENERATORS.register("dcgan")
class DCGANGenerator(nn.Module):
    """The DAFL / DFAD generator: a linear layer to ``2*ngf`` maps at 1/4 of the image size, then two
    (upsample x2, conv3x3, BN, LeakyReLU) blocks with ``2*ngf`` and ``ngf`` channels, then conv3x3 to
    ``C`` channels, tanh, and BatchNorm2d(C, affine=False).

    ``output="pixels"`` replaces tanh and BatchNorm with a sigmoid and the dataset's normalisation
    (``mean`` and ``std``, one per channel or one for all, in [0, 1] pixel units); ``output="affine_bn"``
    drops the tanh and learns the last BatchNorm's scale and shift (ZSKT). ``bn_eps`` is the eps of
    the BatchNorms inside the upsampling blocks: DAFL's code passes 0.8 there (``BatchNorm2d(C, 0.8)``).
    ``native_size`` (height, width), when given, limits the images to that resolution (module docstring).

    ``forward(z, y=None)`` ignores ``y``, so a training loop can call every generator the same way.
    """

    conditional = False
    width_multipliers: tuple[int, ...] = (2, 1)  # of ngf; one upsampling block per entry

    def __init__(self, nz: int, img_shape: tuple[int, int, int], num_classes: int = 10, ngf: int = 64,
                 output: str = "bn", mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                 bn_eps: float = 1e-5, native_size: tuple[int, int] | None = None):
        super().__init__()
        if len(img_shape) != 3:
            raise ShapeError(f"{type(self).__name__}: img_shape must be (C, H, W), got {tuple(img_shape)}")
        if output not in ("bn", "affine_bn", "pixels"):
            raise ValueError(f"{type(self).__name__}: output must be 'bn', 'affine_bn' or 'pixels', got {output!r}")
        if not bn_eps > 0:
            raise ValueError(f"{type(self).__name__}: bn_eps must be positive, got {bn_eps}")
        if output == "pixels" and (mean is None or std is None):
            raise ValueError(f"{type(self).__name__}: output='pixels' needs the dataset's mean and std")
        channels, height, width = img_shape
        if isinstance(native_size, str):  # 'data' is resolved from a dataset, by dfkd's build_generator
            raise ShapeError(f"{type(self).__name__}: native_size must be (height, width), got {native_size!r}")
        if native_size is not None:
            native_size = tuple(native_size)
            if len(native_size) != 2 or not all(0 < n <= m for n, m in zip(native_size, (height, width))):
                raise ShapeError(f"{type(self).__name__}: native_size must be (height, width) within the image's "
                                 f"{(height, width)}, got {native_size}")
        self.native_size = native_size
        factor = 2 ** len(self.width_multipliers)
        if height % factor or width % factor:
            raise ShapeError(f"{type(self).__name__} needs image height and width divisible by {factor}, "
                             f"got img_shape {tuple(img_shape)}")
        self.nz, self.img_shape, self.num_classes = nz, tuple(img_shape), num_classes
        widths = [m * ngf for m in self.width_multipliers]
        self.init_shape = (widths[0], height // factor, width // factor)
        self.project = nn.Linear(nz, widths[0] * (height // factor) * (width // factor))
        blocks: list[nn.Module] = [nn.BatchNorm2d(widths[0])]
        in_planes = widths[0]
        for planes in widths:
            # upsampling x2 and the 3x3 convolution in one layer, at 16/36 of their cost (the identity
            # keeps the layers' indices, and so checkpoints' keys, those of Upsample + Conv2d)
            blocks += [nn.Identity(), UpsampleConv2d(in_planes, planes),
                       nn.BatchNorm2d(planes, eps=bn_eps), nn.LeakyReLU(0.2)]
            in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.output = output
        if output == "bn":
            self.to_image = nn.Sequential(nn.Conv2d(in_planes, channels, 3, padding=1), nn.Tanh(),
                                          nn.BatchNorm2d(channels, affine=False))
        elif output == "affine_bn":
            self.to_image = nn.Sequential(nn.Conv2d(in_planes, channels, 3, padding=1), nn.BatchNorm2d(channels))
        else:
            self.to_image = nn.Sequential(nn.Conv2d(in_planes, channels, 3, padding=1), nn.Sigmoid())
            # buffers, not parameters: the normalisation is the dataset's and is not learned
            self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float).view(-1, 1, 1), persistent=False)
            self.register_buffer("std", torch.as_tensor(std, dtype=torch.float).view(-1, 1, 1), persistent=False)

    def _check_latent(self, z: torch.Tensor) -> None:
        if z.dim() != 2 or z.shape[1] != self.nz:
            raise ShapeError(f"{type(self).__name__} expects z of shape (N, {self.nz}), got {tuple(z.shape)}")

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self._to_image(self.blocks(self.project(z).view(z.shape[0], *self.init_shape)))

    def _to_image(self, features: torch.Tensor) -> torch.Tensor:
        if self.native_size is None:
            images = self.to_image(features)
        elif self.output == "pixels":  # resized as pixels, then normalised as the dataset's are
            images = self._from_native(self.to_image(features))
        else:  # resized before the last BatchNorm, which then standardizes the resized images
            images = self.to_image[-1](self._from_native(self.to_image[:-1](features)))
        return (images - self.mean) / self.std if self.output == "pixels" else images

    def _from_native(self, images: torch.Tensor) -> torch.Tensor:
        """The data pipeline's resize: area-averaged to ``native_size``, then bilinearly back."""
        return F.interpolate(F.adaptive_avg_pool2d(images, self.native_size), size=images.shape[-2:],
                             mode="bilinear", align_corners=False)

    # Feature levels (SpaceshipNet's generator features): level 0 is the first BatchNorm's output at
    # 1/2^k of the image size, level i >= 1 the output of upsampling block i.
    def level_modules(self) -> list[nn.Module]:
        """The modules whose outputs are levels 0, 1, ...: forward hooks on them read a batch's levels."""
        return [self.blocks[i - 1] for i in self._level_cuts()]

    def from_level(self, features: torch.Tensor, level: int) -> torch.Tensor:
        """Images from ``features`` of ``level``, through the rest of the generator as it is now."""
        cuts = self._level_cuts()
        if not 0 <= level < len(cuts):
            raise ValueError(f"{type(self).__name__} has feature levels 0..{len(cuts) - 1}, got {level}")
        return self._to_image(self.blocks[cuts[level]:](features))

    def _level_cuts(self) -> list[int]:
        """Where each level ends in ``blocks``: after the first BatchNorm, then after each 4-layer block."""
        return [1 + 4 * i for i in range(len(self.width_multipliers) + 1)]

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        self._check_latent(z)
        return self._decode(z)


@GENERATORS.register("dcgan_deep")
class DeepDCGANGenerator(DCGANGenerator):
    """One stage deeper than ``dcgan`` for 32x32 and larger images: starts at 1/8 of the image size
    with three upsampling blocks of ``4*ngf``, ``2*ngf`` and ``ngf`` channels.
    """

    width_multipliers = (4, 2, 1)


@GENERATORS.register("conditional")
class ConditionalGenerator(DCGANGenerator):
    """Conditional generator: a learned embedding of the label ``y`` is combined with ``z`` before
    the ``dcgan`` body, so each class gets its own region of latent space: multiplied elementwise
    (``combine="mul"``, GDFQ's) or added (``combine="sum"``, the variant MAD reports as the most
    stable).
    """

    conditional = True

    def __init__(self, nz: int, img_shape: tuple[int, int, int], num_classes: int = 10, ngf: int = 64,
                 combine: str = "mul", **output):
        super().__init__(nz, img_shape, num_classes, ngf, **output)
        if combine not in ("mul", "sum"):
            raise ValueError(f"ConditionalGenerator: combine must be 'mul' or 'sum', got {combine!r}")
        self.combine = combine
        self.embedding = nn.Embedding(num_classes, nz)

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None:
            raise ValueError("ConditionalGenerator needs class labels: call generator(z, y) with y of shape (N,)")
        self._check_latent(z)
        e = self.embedding(y)
        return self._decode(z * e if self.combine == "mul" else z + e)


@GENERATORS.register("qimera")
class SuperposedGenerator(DCGANGenerator):
    """Qimera's generator (Choi et al., NeurIPS 2021): each class has a learned embedding; a sample
    of class ``y`` starts from embedding(y) + ``noise_scale``·z, standardized over its latent
    dimensions, so the decoder sees inputs on one scale. A superposed request (``synthesis.mix_prob``)
    gives ``y`` as slots ``(N, K, classes)``, each a weighted one-hot row, and ``z`` as ``(N, K, nz)``,
    a latent a slot: each slot starts from its class's embedding + ``noise_scale``·its latent,
    standardized over the batch and the latent dimensions (Qimera's code runs one BatchNorm over the
    stacked slots), and the sample starts from the slots' weighted sum, a point between its classes
    that supports the teacher's decision boundaries. ``mapping``: a linear layer after the mix
    (Qimera's disentanglement mapping, off in its CIFAR scripts).
    """

    conditional = True

    def __init__(self, nz: int, img_shape: tuple[int, int, int], num_classes: int = 10, ngf: int = 64,
                 noise_scale: float = 1.0, mapping: bool = False, **output):
        super().__init__(nz, img_shape, num_classes, ngf, **output)
        self.embedding = nn.Embedding(num_classes, nz)
        self.noise_scale = noise_scale
        self.mapping = nn.Linear(nz, nz) if mapping else nn.Identity()

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None or y.dim() not in (1, 3):
            raise ValueError("SuperposedGenerator needs class labels: y of shape (N,), or superposed slots "
                             f"(N, K, classes), got {None if y is None else tuple(y.shape)}")
        if y.dim() == 1:
            self._check_latent(z)
            start = self.embedding(y) + self.noise_scale * z
            start = (start - start.mean(1, keepdim=True)) / (start.var(1, unbiased=False, keepdim=True) + 1e-5).sqrt()
        else:
            if z.shape != (*y.shape[:2], self.nz):
                raise ShapeError(f"SuperposedGenerator expects z of shape (N, K, {self.nz}) for slots y of shape "
                                 f"{tuple(y.shape)}, got {tuple(z.shape)}")
            slots = self.embedding(y.argmax(2)) + self.noise_scale * z            # (N, K, nz)
            # one mean and variance a slot, over the batch and the latent: Qimera's BatchNorm1d of the
            # transposed (nz, K, N) stack, where a single-class batch's (nz, N) gives one a sample
            slots = (slots - slots.mean((0, 2), keepdim=True)) / (
                slots.var((0, 2), unbiased=False, keepdim=True) + 1e-5).sqrt()
            start = (y.sum(2).to(slots.dtype).unsqueeze(2) * slots).sum(1)
        return self._decode(self.mapping(start))


@GENERATORS.register("nayer")
class NoisyLayerGenerator(DCGANGenerator):
    """NAYER's generator (Tran et al., CVPR 2024): no input noise. A sample of class ``y`` starts
    from that class's fixed embedding (``nz`` wide), batch-normalized, then goes through a *noisy
    layer*, a Linear(``nz`` → ``noise_dim``) that the synthesizer re-initializes N(0, 1) for every
    batch (``reset_noise``), then the ``dcgan`` body (on a ``noise_dim`` input; NAYER's ends in a
    sigmoid, ``output="pixels"``). Each group of ``group`` consecutive samples (default: the number
    of classes) has a noisy layer of its own, enough for ``batch_size`` samples.

    NAYER embeds the class names with CLIP's text encoder (512-d); no text model is available
    offline here, so the embeddings are fixed random N(0, 1) vectors, drawn once and saved with the
    generator."""

    conditional = True

    def __init__(self, nz: int, img_shape: tuple[int, int, int], num_classes: int = 10, ngf: int = 64,
                 noise_dim: int = 1000, group: int | None = None, batch_size: int = 256, **output):
        super().__init__(noise_dim, img_shape, num_classes, ngf, **output)
        self.nz = nz  # the class embeddings' width (what the synthesizer calls latents is not used)
        self.group = group or num_classes
        self.register_buffer("class_embeddings", torch.randn(num_classes, nz))
        self.embedding_norm = nn.BatchNorm1d(nz)
        self.noisy = nn.ModuleList(nn.Linear(nz, noise_dim) for _ in range(-(-batch_size // self.group)))

    @torch.no_grad()
    def reset_noise(self) -> None:
        for layer in self.noisy:
            nn.init.normal_(layer.weight, 0.0, 1.0)
            nn.init.zeros_(layer.bias)

    def forward(self, z: torch.Tensor | None = None, y: torch.Tensor | None = None) -> torch.Tensor:
        if y is None:
            raise ValueError("NoisyLayerGenerator needs class labels: call generator(z, y) with y of shape (N,)")
        if len(y) > len(self.noisy) * self.group:
            raise ShapeError(f"NoisyLayerGenerator has noisy layers for {len(self.noisy) * self.group} samples, "
                             f"got {len(y)}: set its batch_size")
        embedding = self.embedding_norm(self.class_embeddings[y])
        noise = torch.cat([layer(chunk) for layer, chunk in zip(self.noisy, embedding.split(self.group))])
        return self._decode(noise)


def create_generator(name: str, nz: int, img_shape: tuple[int, int, int], num_classes: int = 10,
                     **kwargs) -> nn.Module:
    """Build a registered generator; ``kwargs`` are its options (``ngf``; ``output``, with ``mean``
    and ``std`` for ``output="pixels"``; ``native_size``)."""
    return GENERATORS.get(name)(nz=nz, img_shape=tuple(img_shape), num_classes=num_classes, **kwargs)
