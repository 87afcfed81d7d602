"""A new synthesizer, loss term, generator, discriminator or model wrapper is one new definition
plus a config: each is defined here, registered, and run from a YAML file through the command
line, with no edit to dfkd's own files."""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import generators
from dfkd.cli import main
from dfkd.core.checkpoint import save_model
from dfkd.core.registries import SYNTHESIZERS
from dfkd.core.runs import read_metrics
from dfkd.methods.losses.base import LOSSES, register
from dfkd.methods.synthesis.base import PerBatchOptions, PerBatchSynthesizer
from dfkd.nets.arch import load_model
from dfkd.nets.discriminators import DISCRIMINATORS
from dfkd.nets.models import MODEL_WRAPPERS, create_model


# ---------------------------------------------------------------- the new parts, as a user writes them
@dataclass
class LowResOptions(PerBatchOptions):
    size: int = 8                       # the side of the optimized pixel grid, upsampled to the image


class LowResInversion(PerBatchSynthesizer):
    """Pixels optimized at ``size``×``size`` and upsampled bilinearly to the teacher's input."""

    Options = LowResOptions

    def variables(self, n, labels):
        grid = torch.randn((n, self.shape[0], self.cfg.size, self.cfg.size), device=self.device, requires_grad=True)
        return [grid], lambda: F.interpolate(grid, size=self.shape[1:], mode="bilinear", align_corners=False)


def logit_norm(ctx, target: float = 5.0) -> torch.Tensor:
    """(‖z_S‖ − target)² averaged over the batch: keeps the student's logits at a given norm."""
    return (ctx.student_logits.float().norm(dim=1) - target).pow(2).mean()


class TinyGenerator(nn.Module):
    """A linear map from latents to images, normalized per channel."""

    conditional = False

    def __init__(self, nz: int, img_shape, num_classes: int = 10, scale: float = 1.0):
        super().__init__()
        self.nz, self.img_shape, self.scale = nz, tuple(img_shape), scale
        self.fc = nn.Linear(nz, int(torch.tensor(img_shape).prod()))
        self.norm = nn.BatchNorm2d(img_shape[0], affine=False)

    def forward(self, z, y=None):
        return self.norm(self.scale * self.fc(z).view(len(z), *self.img_shape))


def bilinear_discriminator(in_shape, num_classes, rank: int = 4):
    """A discriminator of logit vectors: a rank-``rank`` bilinear form of the input with itself."""
    return BilinearCritic(in_shape[0], rank)


class BilinearCritic(nn.Module):
    def __init__(self, width: int, rank: int):
        super().__init__()
        self.u, self.v = nn.Linear(width, rank), nn.Linear(width, rank)

    def forward(self, x, labels=None):
        return (self.u(x) * self.v(x)).sum(1)


class Temperature(nn.Module):
    """A network whose logits are divided by a learned temperature, starting at ``option``."""

    def __init__(self, network: nn.Module, option: float):
        super().__init__()
        self.network = network
        self.log_t = nn.Parameter(torch.tensor(float(option)).log())

    def forward(self, x):
        return self.network(x) / self.log_t.exp()


@pytest.fixture
def registered():
    """Register the parts above under test names; take them out again afterwards."""
    entries = [(SYNTHESIZERS, "test-lowres", LowResInversion), (generators.GENERATORS, "test-tiny", TinyGenerator),
               (DISCRIMINATORS, "test-bilinear", bilinear_discriminator), (MODEL_WRAPPERS, "test_temperature",
                                                                          Temperature)]
    for registry, name, obj in entries:
        registry.register(name)(obj)
    register("test_logit_norm", needs=())(logit_norm)
    yield
    for registry, name, _ in entries + [(LOSSES, "test_logit_norm", None)]:
        registry._items.pop(name)


@pytest.fixture
def teacher(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "teacher.pt"
    save_model(path, create_model("lenet5", 1, 10, 32), {"name": "lenet5", "in_channels": 1, "num_classes": 10,
                                                         "image_size": 32, "kwargs": {}}, dataset="digits")
    return str(path)


def distill(tmp_path, capsys, teacher: str, yaml: str, *overrides: str) -> dict:
    config = tmp_path / "method.yaml"
    config.write_text(yaml)
    code = main(["distill", "--config", str(config), "--teacher", teacher, "--out", str(tmp_path / "runs"),
                 "runtime.num_threads=1", "output.tensorboard=false", "runtime.progress=false", *overrides])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.strip().splitlines()[-1])


DATAFREE = """
_base_: datafree/dfq-digits
experiment: extension
data: {eval_batch_size: 450}
train: {epochs: 1, iters_per_epoch: 2, log_every: 1}
output: {quality_samples: 0}
"""


# ---------------------------------------------------------------- each part, run from YAML
@pytest.mark.slow
def test_a_synthesizer_defined_outside_dfkd_runs_from_yaml_and_validates_its_own_options(registered, teacher,
                                                                                          tmp_path, capsys):
    yaml = DATAFREE + """
players: {generator: null}
synthesis: {kind: test-lowres, size: 4, batch_size: 8, pool_size: 32, inner: {name: adam, lr: 0.1}}
phases:
  - {player: synthesizer, steps: 2, losses: {bn_stats: 1.0, onehot_ce: 1.0}}
  - {player: student, steps: 1, batch: pool, losses: {kd_kl: 1.0}}
"""
    summary = distill(tmp_path, capsys, teacher, yaml)
    assert summary["steps"] == 2
    pool = torch.load(f"{summary['run_dir']}/ckpt/last.pt", weights_only=True)["synthesis"]["pool"]["images"]
    assert pool.shape == (16, 1, 32, 32)
    # what bilinear upsampling of a 4x4 grid makes: adjacent pixels inside a cell's interior agree closely
    assert (pool[..., 5, 5] - pool[..., 5, 6]).abs().max() < (pool[..., 5, 5] - pool[..., 5, 13]).abs().max()
    # the kind's own option is validated by its options class, and named for the kinds that take it
    config = tmp_path / "method.yaml"
    config.write_text(yaml.replace("size: 4,", "size: four,"))
    assert main(["distill", "--config", str(config), "--teacher", teacher, "--out", str(tmp_path)]) == 2
    assert "'synthesis.size' must be int, got str 'four'" in capsys.readouterr().err
    config.write_text(yaml.replace("synthesis: {kind: test-lowres,", "synthesis: {kind: generator,"))
    assert main(["distill", "--config", str(config), "--teacher", teacher, "--out", str(tmp_path)]) == 2
    assert "unknown key 'synthesis.size' (an option of kind test-lowres, not of 'generator')" in \
        capsys.readouterr().err


def test_a_loss_term_a_generator_and_a_discriminator_defined_outside_dfkd_run_from_yaml(registered, teacher,
                                                                                        tmp_path, capsys):
    yaml = DATAFREE + """
players:
  generator: {net: {name: test-tiny, kwargs: {_replace_: true, nz: 16, scale: 0.5}}}  # not the base's dcgan options
  disc:
    kind: discriminator
    net: {name: test-bilinear, kwargs: {rank: 3}}
    optim: {name: adam, lr: 1.0e-3}
phases:
  - {player: generator, steps: 1, batch: fresh, losses: {adv_kl: 1.0, bn_stats: 1.0}}
  - player: student
    steps: 1
    batch: fresh
    losses: {kd_kl: 1.0, test_logit_norm: {weight: 0.01, target: 3.0}, adversarial: {weight: 0.1, discriminator: disc}}
  - {player: disc, steps: 1, batch: same, losses: {adversarial: {discriminator: disc}}}
"""
    summary = distill(tmp_path, capsys, teacher, yaml)
    rows = read_metrics(summary["run_dir"])
    assert any("loss/student/test_logit_norm" in r for r in rows)
    assert any("adv/disc/acc_real" in r for r in rows)
    state = torch.load(f"{summary['run_dir']}/ckpt/last.pt", weights_only=True)["players"]
    assert set(state["generator"]["model"]) == {"fc.weight", "fc.bias", "norm.running_mean", "norm.running_var",
                                                "norm.num_batches_tracked"}
    assert state["disc"]["model"]["u.weight"].shape == (3, 10)


@pytest.mark.slow
def test_a_model_wrapper_defined_outside_dfkd_is_recorded_in_the_model_file_and_rebuilt(registered, teacher,
                                                                                       tmp_path, capsys):
    yaml = DATAFREE + """
players:
  student: {net: {name: lenet5_half, kwargs: {test_temperature: 2.0}}}
"""
    summary = distill(tmp_path, capsys, teacher, yaml)
    model_file = f"{summary['run_dir']}/ckpt/final.pt"
    model, meta = load_model(model_file)
    assert meta["arch"]["kwargs"] == {"test_temperature": 2.0} and isinstance(model, Temperature)
    assert main(["eval", model_file, "--batch-size", "450"]) == 0
    assert json.loads(capsys.readouterr().out)["acc"] == pytest.approx(summary["final_acc"], abs=0.01)
