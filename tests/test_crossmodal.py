"""Cross-modal distillation: the built-in modalities against hand computations, the labeled
subset, the digits table end to end (a student on edge maps taught by an image teacher beats
the few-labels baseline; the data-free form learns without a real sample of either modality),
paired TensorBoard grids, evaluation of a cross-modal student, and bad input."""
import json
import math

import pytest
import torch

from dfkd.cli import main as cli_main
from dfkd.core.config import load_config
from dfkd.data.datasets import dataset_info, load_dataset, normalize
from dfkd.data.modalities import MODALITIES, get_modality
from dfkd.data.splits import labeled_subset
from dfkd.loop.engine import Engine
from dfkd_base.errors import ConfigError, ShapeError, UnknownNameError

DIGITS = dataset_info("digits")


def as_input(pixels: torch.Tensor) -> torch.Tensor:
    """[0, 1] pixels → the normalized images the engine handles."""
    return normalize(pixels, DIGITS)


@pytest.mark.parametrize("name", MODALITIES.names())
def test_modalities_are_standardized_per_image_and_keep_the_shape(name):
    torch.manual_seed(0)
    y = get_modality(name)(as_input(torch.rand(4, 1, 32, 32)), DIGITS)
    assert y.shape == (4, 1, 32, 32)
    assert torch.allclose(y.mean(dim=(1, 2, 3)), torch.zeros(4), atol=1e-5)
    assert torch.allclose(y.pow(2).mean(dim=(1, 2, 3)), torch.ones(4), atol=1e-3)


def test_edges_fire_on_a_step_and_nowhere_else():
    pixels = torch.zeros(1, 1, 16, 16)
    pixels[..., 8:] = 1.0  # a vertical step between columns 7 and 8
    y = get_modality("edges")(as_input(pixels), DIGITS)[0, 0]
    on_step = torch.zeros(16, dtype=torch.bool)
    on_step[7:9] = True  # the 3x3 Sobel kernels straddle the step from these two columns
    # before standardization: 2 columns of magnitude m, 14 of zero; after it, two values only
    high, low = math.sqrt(14 / 2), -math.sqrt(2 / 14)
    assert torch.allclose(y[:, on_step], torch.tensor(high), atol=1e-3)
    assert torch.allclose(y[:, ~on_step], torch.tensor(low), atol=1e-3)


def test_lowres_erases_detail_finer_than_its_4_pixel_cells():
    # a 1-pixel checkerboard averages to 0.5 over every 4x4 cell: a flat image, standardized to zeros
    checker = ((torch.arange(16)[:, None] + torch.arange(16)[None, :]) % 2).float().view(1, 1, 16, 16)
    assert torch.allclose(get_modality("lowres")(as_input(checker), DIGITS), torch.zeros(1, 1, 16, 16), atol=1e-4)
    # a pattern of 8-pixel bars survives it
    bars = (torch.arange(16) // 8 % 2).float().view(1, 1, 1, 16).expand(1, 1, 16, 16)
    assert get_modality("lowres")(as_input(bars), DIGITS).abs().max() > 0.5


def test_fourier_of_a_constant_image_is_a_centred_impulse():
    y = get_modality("fourier")(as_input(torch.full((1, 1, 8, 8), 0.5)), DIGITS)[0, 0]
    assert y.argmax() == 4 * 8 + 4 and (y.flatten().sort().values[:-1] == y.flatten().min()).all()


def test_differentiable_modalities_pass_gradients_and_canny_is_refused_for_synthesis():
    for name in MODALITIES.names():
        modality = get_modality(name)
        x = as_input(torch.rand(2, 1, 16, 16)).requires_grad_(True)
        out = modality(x, DIGITS)
        if modality.differentiable:
            out.pow(3).sum().backward()
            assert x.grad is not None and x.grad.abs().sum() > 0, name
    with pytest.raises(ConfigError, match="modality 'canny' is not differentiable.*use one of blur, edges"):
        get_modality("canny", differentiable=True)
    with pytest.raises(UnknownNameError, match="did you mean 'edges'"):
        get_modality("edge")


def test_labeled_subset_is_stratified_and_seeded():
    train = load_dataset("digits", "train")
    subset = labeled_subset(train, 0.05, seed=0)
    for c in range(10):
        assert int((subset.labels == c).sum()) == math.ceil(0.05 * int((train.labels == c).sum()))
    assert torch.equal(labeled_subset(train, 0.05, seed=0).images, subset.images)
    assert not torch.equal(labeled_subset(train, 0.05, seed=1).images, subset.images)
    assert labeled_subset(train, 1.0, seed=0) is train


# ------------------------------------------------------------------ the digits table
def run(name: str, tmp_path, teacher=None, *extra: str) -> dict:
    overrides = [f"output.root={tmp_path}", "runtime.num_threads=1", *extra]
    if teacher is not None:
        overrides.append(f"teacher.checkpoint={teacher}")
    engine = Engine(load_config(name, overrides))
    return engine.fit() | {"engine": engine}


@pytest.fixture(scope="module")
def labels_only(tmp_path_factory):
    return run("crossmodal/crossmodal-labels-digits", tmp_path_factory.mktemp("labels"))


@pytest.mark.slow
def test_crossmodal_response_with_no_labels_beats_the_few_labels_baseline(tmp_path, digits_teacher, labels_only):
    summary = run("crossmodal/crossmodal-response-digits", tmp_path, digits_teacher[0])
    assert summary["final_acc"] > labels_only["final_acc"] + 3, (summary["final_acc"], labels_only["final_acc"])
    engine = summary["engine"]
    assert engine.student_shape == (1, 32, 32) and engine.labeled is None  # no label is drawn


@pytest.mark.slow
def test_crossmodal_feature_with_few_labels_beats_the_few_labels_baseline(tmp_path, digits_teacher, labels_only):
    summary = run("crossmodal/crossmodal-feature-digits", tmp_path, digits_teacher[0])
    assert summary["final_acc"] > labels_only["final_acc"], (summary["final_acc"], labels_only["final_acc"])
    # the two stages ran in their epoch windows: 20 epochs of feature regression, then fine-tuning
    engine = summary["engine"]
    ipe = engine.iters_per_epoch
    assert engine.players["adapter"].steps == 20 * ipe and engine.players["student"].steps == 30 * ipe


@pytest.mark.slow
def test_datafree_crossmodal_learns_real_edge_maps_without_real_data(tmp_path, monkeypatch, digits_teacher):
    import dfkd.loop.build

    read = []
    real_load = dfkd.loop.build.load_dataset
    monkeypatch.setattr(dfkd.loop.build, "load_dataset", lambda name, split, *a: read.append(split) or real_load(
        name, split, *a))
    summary = run("crossmodal/crossmodal-datafree-digits", tmp_path, digits_teacher[0], "train.epochs=3")
    assert read == ["test"]  # the training split, of either modality, is never read
    assert summary["final_acc"] > 40, summary  # chance is 10%


@pytest.mark.slow
def test_paired_grids_and_eval_of_a_crossmodal_student(tmp_path, digits_teacher, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    summary = run("crossmodal/crossmodal-response-digits", tmp_path, digits_teacher[0], "train.epochs=2")
    events = EventAccumulator(str(summary["run_dir"]), size_guidance={"images": 0})
    events.Reload()
    assert "crossmodal/real_pairs" in events.Tags()["images"]
    pairs = events.Images("crossmodal/real_pairs")[-1]  # two labeled rows of 5 cells of 64 px
    assert 5 * 64 < pairs.width <= 1.6 * 350 and pairs.height > 2 * 64  # legible in a 350 px card
    events = EventAccumulator(str(summary["run_dir"]), size_guidance={"tensors": 0})
    events.Reload()
    about = events.Tensors("crossmodal/real_pairs/about/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert "students' (edges) below" in about
    # `dfkd eval` applies the modality recorded in the model file
    assert cli_main(["eval", f"{summary['run_dir']}/ckpt/final.pt"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["modality"] == "edges" and result["acc"] == pytest.approx(summary["final_acc"], abs=0.01)


# ------------------------------------------------------------------ bad input
def test_unknown_modality(tmp_path, digits_teacher):
    with pytest.raises(UnknownNameError, match="unknown modality 'sobel'"):
        run("crossmodal/crossmodal-response-digits", tmp_path, digits_teacher[0], "data.modality=sobel")


def test_non_differentiable_modality_for_datafree(tmp_path, digits_teacher):
    with pytest.raises(ConfigError) as exc:
        run("crossmodal/crossmodal-datafree-digits", tmp_path, digits_teacher[0], "data.modality=canny")
    assert "\n" not in str(exc.value) and "modality 'canny' is not differentiable" in str(exc.value)


def test_student_checkpoint_that_does_not_take_the_modality(tmp_path, digits_teacher):
    from dfkd.core.checkpoint import save_model
    from dfkd.nets.models import create_model

    rgb = save_model(tmp_path / "rgb.pt", create_model("lenet5_half", in_channels=3, num_classes=10, image_size=32),
                     {"name": "lenet5_half", "in_channels": 3, "num_classes": 10, "image_size": 32, "kwargs": {}},
                     dataset="cifar10", accuracy=None)
    with pytest.raises(ShapeError) as exc:
        run("crossmodal/crossmodal-response-digits", tmp_path, digits_teacher[0],
            f"players.student.net.checkpoint={rgb}")
    assert "\n" not in str(exc.value)
    assert "takes 3-channel 32 px input; modality 'edges' of digits gives (1, 32, 32)" in str(exc.value)


# ------------------------------------------------------------------ a user's own pairs
def digits_pairs(n: int | None = None, split: str = "train"):
    """Digits images as modality A; as modality B their central 28x28 crop turned upside down
    (another 'sensor' whose relation to A the engine is not told)."""
    data = load_dataset("digits", split)
    a = data.images[:n]
    return a, a[:, :, 2:30, 2:30].flip(2), data.labels[:n]


def write_npz(path, a, b, y=None):
    import numpy as np

    arrays = {"a": a.numpy(), "b": b.numpy()}
    if y is not None:
        arrays["y"] = y.numpy()
    np.savez(path, **arrays)
    return str(path)


@pytest.mark.slow
def test_distil_onto_a_users_pairs(tmp_path, digits_teacher, capsys):
    train = write_npz(tmp_path / "train.npz", *digits_pairs()[:2])  # unlabeled
    test = write_npz(tmp_path / "test.npz", *digits_pairs(split="test"))
    summary = run("crossmodal/crossmodal-response-digits", tmp_path, digits_teacher[0], "data.modality=null",
                  f"data.pairs=[{train}]", f"data.pairs_test=[{test}]", "train.epochs=10")
    engine = summary["engine"]
    assert engine.student_shape == (1, 28, 28)
    assert summary["final_acc"] > 70, summary  # chance is 10%; no label of either modality was used
    assert cli_main(["eval", f"{summary['run_dir']}/ckpt/final.pt"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["acc"] == pytest.approx(summary["final_acc"], abs=0.01)


def test_pairs_from_two_folders(tmp_path):
    import numpy as np
    from PIL import Image

    from dfkd.data.pairs import load_pairs

    a, b, _ = digits_pairs(3)
    (tmp_path / "rgb").mkdir()
    (tmp_path / "depth").mkdir()
    for i in range(3):
        Image.fromarray(a[i, 0].numpy()).save(tmp_path / "rgb" / f"s{i}.png")
        np.save(tmp_path / "depth" / f"s{i}.npy", b[i, 0].numpy())
    pairs = load_pairs([str(tmp_path / "rgb"), str(tmp_path / "depth")], DIGITS)
    assert torch.equal(pairs.images, a) and torch.equal(pairs.paired, b) and (pairs.labels == -1).all()
    np.save(tmp_path / "depth" / "s9.npy", b[0, 0].numpy())
    with pytest.raises(ConfigError, match=r"pairs: .*depth/s9.npy has no counterpart named 's9.\*' in .*rgb"):
        load_pairs([str(tmp_path / "rgb"), str(tmp_path / "depth")], DIGITS)


def test_pairs_bad_input(tmp_path):
    from dfkd.data.pairs import load_pairs

    a, b, y = digits_pairs(10)
    with pytest.raises(ShapeError, match="'a' has 10 samples, 'b' has 9"):
        load_pairs([write_npz(tmp_path / "short.npz", a, b[:9])], DIGITS)
    with pytest.raises(ShapeError, match="'a' has 10 samples, 'y' has 4"):
        load_pairs([write_npz(tmp_path / "labels.npz", a, b, y[:4])], DIGITS)
    with pytest.raises(ShapeError, match=r"modality-A samples are \(1, 28, 28\); .* 'digits' takes \(1, 32, 32\)"):
        load_pairs([write_npz(tmp_path / "swapped.npz", b, a)], DIGITS)
    import numpy as np

    np.savez(tmp_path / "nob.npz", a=a.numpy())
    with pytest.raises(ConfigError, match="has no array 'b' \\(it has: a\\)"):
        load_pairs([str(tmp_path / "nob.npz")], DIGITS)
    with pytest.raises(ConfigError, match="data.pairs and data.modality both"):
        load_config("crossmodal/crossmodal-response-digits", [f"data.pairs=[{tmp_path / 'nob.npz'}]"])
    with pytest.raises(ConfigError, match="data-free cross-modal synthesis needs a built-in data.modality"):
        load_config("crossmodal/crossmodal-datafree-digits", ["data.modality=null", "data.eval=false",
                                                              f"data.pairs=[{tmp_path / 'nob.npz'}]"])


@pytest.mark.slow
def test_crossmodal_with_a_discriminator_term(tmp_path, digits_teacher):
    # the discriminator tells the image teacher's class probabilities from the edge-map student's
    summary = run("crossmodal/crossmodal-response-digits", tmp_path, digits_teacher[0], "train.epochs=8",
                  "players.disc={kind: discriminator, net: {name: mlp, kwargs: {hidden: [32]}}, "
                  "optim: {name: adam, lr: 0.0002}}",
                  "phases=[{player: student, batch: real, losses: {kd_kl: {T: 4.0}, "
                  "adversarial: {weight: 0.1, discriminator: disc, probs: true}}}, "
                  "{player: disc, batch: same, losses: {adversarial: {discriminator: disc, probs: true}}}]")
    engine = summary["engine"]
    assert engine.players["disc"].steps == engine.total_iters
    assert summary["final_acc"] > 80, summary
