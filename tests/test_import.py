"""The user's own teacher: ``dfkd import`` from every form people save a network in, the input card
that then drives a run, the user's own labeled images, black-box teachers, consent to run code, and
every bad input as a one-line error with nothing written."""
from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
import torch
from torch import nn

from dfkd.cli import main
from dfkd.core.config import load_config
from dfkd.data.datasets import load_dataset
from dfkd.loop.engine import Engine
from dfkd.nets.arch import BlackBox, load_model
from dfkd.nets.models import create_model

CARD = ["--input", "1,32,32", "--mean", "0.5", "--std", "0.5", "--classes", "10"]
USER_MODULE = '''
import torch
from torch import nn


class TinyNet(nn.Module):
    """A user's network: conv, BatchNorm, ReLU, pooling, linear."""

    def __init__(self, num_classes=10, width=8):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.out = nn.Linear(16 * width, num_classes)

    def forward(self, x):
        return self.out(self.body(x))
'''


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module of the user's own, importable as ``usernets``; and its class."""
    (tmp_path / "usernets.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import usernets

    importlib.reload(usernets)
    return usernets.TinyNet


def same_outputs(model_file: str, network: nn.Module, allow_code: bool = False) -> bool:
    model, _ = load_model(model_file, allow_code=allow_code)
    x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return torch.allclose(model(x), network.eval()(x), atol=1e-6)


# ---------------------------------------------------------------- every form a network is saved in
@pytest.mark.parametrize("nesting", [None, "state_dict", "model", "model_state_dict", "net", "ddp"])
def test_a_state_dict_imports_however_a_training_script_nested_it(nesting, tmp_path, capsys):
    torch.manual_seed(0)
    network = create_model("lenet5", 1, 10, 32).eval()
    state = network.state_dict()
    if nesting == "ddp":
        state = {f"module.{k}": v for k, v in state.items()}
    elif nesting:
        state = {"epoch": 7, "optimizer_lr": 0.1, nesting: state}
    torch.save(state, tmp_path / "w.pth")
    code, out, err = run_cli(capsys, "import", str(tmp_path / "w.pth"), "--arch", "lenet5", *CARD,
                             "--out", str(tmp_path / "t.pt"))
    assert code == 0, err
    result = json.loads(out)
    assert result["card"] == {"shape": [1, 32, 32], "mean": [0.5], "std": [0.5], "classes": 10, "class_names": None,
                              "native_size": None}
    assert same_outputs(str(tmp_path / "t.pt"), network)
    _, meta = load_model(tmp_path / "t.pt")
    assert meta["provenance"]["source"] == str((tmp_path / "w.pth").resolve())
    assert len(meta["provenance"]["source_sha256"]) == 64 and meta["dataset"] is None


def test_safetensors_torchvision_and_timm_teachers_import(tmp_path, capsys):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    tv = create_model("tv:resnet18", 1, 10, 32).eval()
    save_file(tv.state_dict(), str(tmp_path / "r18.safetensors"))
    code, _, err = run_cli(capsys, "import", str(tmp_path / "r18.safetensors"), "--arch", "tv:resnet18", *CARD,
                           "--out", str(tmp_path / "tv.pt"))
    assert code == 0, err
    assert same_outputs(str(tmp_path / "tv.pt"), tv)
    import timm
    net = timm.create_model("resnet10t", pretrained=False, num_classes=10, in_chans=1).eval()
    torch.save(net.state_dict(), tmp_path / "r10t.pth")
    code, _, err = run_cli(capsys, "import", str(tmp_path / "r10t.pth"), "--arch", "timm:resnet10t", *CARD,
                           "--out", str(tmp_path / "timm.pt"))
    assert code == 0, err
    assert same_outputs(str(tmp_path / "timm.pt"), net)


def test_a_users_class_needs_consent_at_import_and_at_every_load(user_module, tmp_path, capsys):
    torch.manual_seed(0)
    network = user_module().eval()
    torch.save(network.state_dict(), tmp_path / "w.pt")
    args = ["import", str(tmp_path / "w.pt"), "--arch", "usernets:TinyNet", *CARD, "--out", str(tmp_path / "t.pt")]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "names code to import, which runs it" in err and "--allow-code" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "t.pt").exists()
    code, _, err = run_cli(capsys, *args, "--allow-code")
    assert code == 0, err
    assert same_outputs(str(tmp_path / "t.pt"), network, allow_code=True)
    # the model file alone never imports the module: eval, inspect and distill ask again
    for command in (["eval", str(tmp_path / "t.pt"), "--data", "digits"], ["inspect", str(tmp_path / "t.pt")],
                    ["distill", "--config", "datafree/dfad-digits", "--teacher", str(tmp_path / "t.pt"),
                     "--out", str(tmp_path / "runs")]):
        code, _, err = run_cli(capsys, *command)
        assert code == 2 and "names code to import (usernets:TinyNet)" in err, err
    assert not (tmp_path / "runs").exists()
    code, out, err = run_cli(capsys, "eval", str(tmp_path / "t.pt"), "--data", "digits", "--allow-code")
    assert code == 0 and json.loads(out)["n"] == 450, err
    # a file path works too: path/to/file.py:Name
    code, _, err = run_cli(capsys, "import", str(tmp_path / "w.pt"), "--arch", f"{tmp_path / 'usernets.py'}:TinyNet",
                           *CARD, "--allow-code", "--out", str(tmp_path / "t2.pt"))
    assert code == 0, err


@pytest.mark.parametrize("kind", ["torchscript", "torch.export"])
def test_a_compiled_program_imports_as_a_black_box(kind, tmp_path, capsys):
    torch.manual_seed(0)
    network = create_model("lenet5", 1, 10, 32).eval()
    path = tmp_path / "program.pt"
    if kind == "torchscript":
        torch.jit.script(network).save(str(path))
    else:
        batch = torch.export.Dim("batch")
        torch.export.save(torch.export.export(network, (torch.zeros(2, 1, 32, 32),), dynamic_shapes=({0: batch},)),
                          str(path))
    code, out, err = run_cli(capsys, "import", str(path), *CARD, "--out", str(tmp_path / "t.pt"))
    assert code == 0, err
    assert json.loads(out)["black_box"] is True
    code, out, _ = run_cli(capsys, "inspect", str(tmp_path / "t.pt"), "--json")
    assert code == 0 and json.loads(out)["recipe"]["config"] == "datafree/dfq-outputs-digits"
    model, meta = load_model(tmp_path / "t.pt")
    assert isinstance(model, BlackBox) and meta["arch"]["name"] == kind
    assert same_outputs(str(tmp_path / "t.pt"), network)
    code, _, err = run_cli(capsys, "import", str(path), "--arch", "lenet5", *CARD, "--out", str(tmp_path / "u.pt"))
    assert code == 2 and "holds its own architecture: import it without --arch" in err


def test_a_black_box_serves_output_only_methods_and_the_others_refuse_naming_what_applies(tmp_path, capsys):
    torch.manual_seed(0)
    torch.jit.script(create_model("lenet5", 1, 10, 32).eval()).save(str(tmp_path / "p.pt"))
    assert main(["import", str(tmp_path / "p.pt"), *CARD, "--out", str(tmp_path / "t.pt")]) == 0
    capsys.readouterr()
    code, _, err = run_cli(capsys, "distill", "--config", "datafree/dfq-digits", "--teacher", str(tmp_path / "t.pt"),
                           "--out", str(tmp_path / "runs"))
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "dfq-digits: loss term 'bn_stats' needs the teacher's BatchNorm statistics; the teacher is a black box" \
        in err and "methods that apply to it: datafree/dfad-digits" in err
    assert not (tmp_path / "runs").exists()
    config = load_config("datafree/dfad-digits", [f"teacher.checkpoint={tmp_path / 't.pt'}", "train.epochs=1",
                                                  "train.iters_per_epoch=2", f"output.root={tmp_path}",
                                                  "output.quality_samples=64", "runtime.num_threads=1"])
    engine = Engine(config)
    assert engine.fit()["steps"] == 2  # with TensorBoard on: its pictures and measures, as far as a black box allows
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(engine.run_dir), size_guidance={"tensors": 0, "images": 0})
    events.Reload()
    assert "synthetic/what_the_teacher_sees" in events.Tags()["images"]  # its gradients are all it needs
    about = events.Tensors("quality/about/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "the teacher has no embedding" in about
    from dfkd.tools.audit.run import features

    teacher = load_model(tmp_path / "t.pt")[0]
    assert features(teacher, torch.zeros(3, 1, 32, 32)).shape == (3, 10)  # its logits, for lack of an embedding


# ---------------------------------------------------------------- bad input: one line, nothing written
def import_error(capsys, tmp_path, *args: str) -> str:
    code, _, err = run_cli(capsys, "import", *args, "--out", str(tmp_path / "never.pt"))
    assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert not (tmp_path / "never.pt").exists()
    return err


def test_weights_that_do_not_fit_are_named_with_the_closest_names(tmp_path, capsys):
    state = create_model("lenet5", 1, 10, 32).state_dict()
    renamed = {("conv1.kernel" if k == "conv1.weight" else k): v for k, v in state.items()}
    torch.save(renamed, tmp_path / "renamed.pt")
    err = import_error(capsys, tmp_path, str(tmp_path / "renamed.pt"), "--arch", "lenet5", *CARD)
    assert "missing conv1.weight (closest in the file: conv1.kernel)" in err
    assert "unexpected conv1.kernel (closest in the architecture: conv1.weight)" in err
    extra = {**state, "fc3.weight": torch.zeros(2)}
    torch.save(extra, tmp_path / "extra.pt")
    assert "unexpected fc3.weight" in import_error(capsys, tmp_path, str(tmp_path / "extra.pt"), "--arch", "lenet5",
                                                   *CARD)
    wide = create_model("lenet5", 1, 10, 32, width=2.0).state_dict()
    torch.save(wide, tmp_path / "wide.pt")
    err = import_error(capsys, tmp_path, str(tmp_path / "wide.pt"), "--arch", "lenet5", *CARD)
    assert "conv1.weight is (12, 1, 5, 5) in the file and (6, 1, 5, 5) in the architecture" in err


def test_a_card_that_does_not_fit_the_network_is_refused(tmp_path, capsys):
    torch.save(create_model("lenet5", 1, 10, 32).state_dict(), tmp_path / "w.pt")
    err = import_error(capsys, tmp_path, str(tmp_path / "w.pt"), "--arch", "lenet5", "--input", "1,32,32", "--mean",
                       "0.5", "--std", "0.5", "--classes", "7")
    assert "fc2.weight is (10, 84) in the file and (7, 84)" in err  # the classes change the architecture itself
    torch.jit.script(create_model("lenet5", 1, 10, 32).eval()).save(str(tmp_path / "p.pt"))
    err = import_error(capsys, tmp_path, str(tmp_path / "p.pt"), "--input", "1,32,32", "--mean", "0.5", "--std",
                       "0.5", "--classes", "7")
    assert "gives (2, 10) for the card's input (2, 1, 32, 32); expected (2, 7) logits" in err
    err = import_error(capsys, tmp_path, str(tmp_path / "p.pt"), "--input", "3,32,32", "--mean", "0.5", "--std",
                       "0.5", "--classes", "10")
    assert "does not take the card's input (2, 3, 32, 32)" in err
    err = import_error(capsys, tmp_path, str(tmp_path / "w.pt"), "--arch", "lenet5", "--input", "1,32,32", "--mean",
                       "0.1,0.2", "--std", "0.5", "--classes", "10")
    assert "mean must give one number per input channel (1), got [0.1, 0.2]" in err
    err = import_error(capsys, tmp_path, str(tmp_path / "w.pt"), "--arch", "lenet5", *CARD, "--class-names", "a,b")
    assert "class names must be 10 distinct names" in err


def test_a_pickle_that_carries_code_is_refused_and_never_unpickled(tmp_path, capsys):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"model": Payload()}, tmp_path / "evil.pt")
    err = import_error(capsys, tmp_path, str(tmp_path / "evil.pt"), "--arch", "lenet5", *CARD)
    assert "holds Python objects beyond tensors" in err and "never unpickled" in err
    assert not marker.exists()
    with open(tmp_path / "whole.pt", "wb") as f:  # torch.save(model) of a whole network: the same refusal
        pickle.dump(create_model("lenet5", 1, 10, 32), f)
    assert "not a torch.save archive" in import_error(capsys, tmp_path, str(tmp_path / "whole.pt"), "--arch",
                                                      "lenet5", *CARD)


def test_an_import_path_that_does_not_resolve_and_an_existing_out_are_refused(tmp_path, capsys):
    torch.save(create_model("lenet5", 1, 10, 32).state_dict(), tmp_path / "w.pt")
    err = import_error(capsys, tmp_path, str(tmp_path / "w.pt"), "--arch", "no_such_module:Net", "--allow-code", *CARD)
    assert "'no_such_module:Net' does not resolve: ModuleNotFoundError" in err
    err = import_error(capsys, tmp_path, str(tmp_path / "w.pt"), "--arch", "torch.nn:NoSuchLayer", "--allow-code",
                       *CARD)
    assert "'torch.nn:NoSuchLayer' does not resolve: AttributeError" in err
    (tmp_path / "taken.pt").write_text("someone's file")
    code, _, err = run_cli(capsys, "import", str(tmp_path / "w.pt"), "--arch", "lenet5", *CARD, "--out",
                           str(tmp_path / "taken.pt"))
    assert code == 2 and "exists; give --force" in err and (tmp_path / "taken.pt").read_text() == "someone's file"


# ---------------------------------------------------------------- the card drives the run
def user_norm(pixels: torch.Tensor) -> torch.Tensor:
    """The users' normalization here: (x - 0.5) / 0.5, not digits' statistics."""
    return (pixels.float() / 255 - 0.5) / 0.5


def train_plainly(net: nn.Module, epochs: int) -> nn.Module:
    """A user's own training loop on digits (Adam, batches of 64, no dfkd code); the net in eval mode."""
    import torch.nn.functional as F

    train = load_dataset("digits", "train")
    optimizer = torch.optim.Adam(net.parameters(), 3e-3)
    for _ in range(epochs):
        for i in range(0, len(train) - 63, 64):
            loss = F.cross_entropy(net(user_norm(train.images[i:i + 64])), train.labels[i:i + 64])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return net.eval()


@pytest.fixture
def user_teacher(tmp_path_factory):
    """LeNet-5 trained for two epochs in a loop of its own on digits normalized (x - 0.5) / 0.5, as a
    user would (not digits' own statistics), imported; and its predictions by the user's reckoning."""
    tmp = tmp_path_factory.mktemp("user-teacher")
    torch.manual_seed(0)
    net = train_plainly(create_model("lenet5", 1, 10, 32), epochs=2)
    with torch.no_grad():
        predictions = net(user_norm(load_dataset("digits", "test").images)).argmax(1)
    torch.save(net.state_dict(), tmp / "w.pt")
    assert main(["import", str(tmp / "w.pt"), "--arch", "lenet5", *CARD, "--class-names",
                 ",".join("zero one two three four five six seven eight nine".split()), "--out",
                 str(tmp / "t.pt")]) == 0
    return str(tmp / "t.pt"), predictions


def test_evaluation_reads_real_images_as_the_card_says(user_teacher, capsys):
    path, predictions = user_teacher
    capsys.readouterr()
    code, out, err = run_cli(capsys, "eval", path, "--data", "digits")
    assert code == 0, err
    expected = 100 * float((predictions == load_dataset("digits", "test").labels).float().mean())
    assert json.loads(out)["acc"] == pytest.approx(expected, abs=0.01)  # (x - 0.5) / 0.5, not digits' statistics
    code, _, err = run_cli(capsys, "eval", path)
    assert code == 2 and "names no dataset it was trained on (an imported teacher): give --data" in err
    code, _, err = run_cli(capsys, "eval", path, "--data", "fashion-mnist", "--root", "/nonexistent")
    assert code == 2 and "dataset 'fashion-mnist' gives 1x28x28 images of 10 classes; the input card of" in err


def test_a_run_from_an_imported_teacher_follows_its_card(user_teacher, tmp_path):
    path, _ = user_teacher
    engine = Engine(load_config("datafree/dfq-digits", [f"teacher.checkpoint={path}", f"output.root={tmp_path}",
                                                        "train.epochs=1", "train.iters_per_epoch=1",
                                                        "phases.1.steps=1"]))
    assert engine.info.mean == (0.5,) and engine.info.std == (0.5,) and engine.info.class_names[3] == "three"
    assert engine.test_loader.dataset.info.mean == (0.5,)  # evaluation normalizes with the card's statistics
    summary = engine.fit()
    model_file = load_model(f"{summary['run_dir']}/ckpt/final.pt")[1]
    assert model_file["card"]["mean"] == [0.5] and model_file["card"]["class_names"][9] == "nine"


# ---------------------------------------------------------------- the user's own labeled images
def write_folder(root, images: torch.Tensor, labels: torch.Tensor, names: list[str], rgb: bool = False) -> None:
    from PIL import Image

    for k, (image, label) in enumerate(zip(images, labels)):
        folder = root / names[int(label)]
        folder.mkdir(parents=True, exist_ok=True)
        pixels = image[0].numpy()
        picture = Image.fromarray(pixels)
        (picture.convert("RGB") if rgb else picture).save(folder / f"{k}.png")


def test_an_image_folder_and_arrays_evaluate_as_the_dataset_does(user_teacher, tmp_path, capsys):
    path, _ = user_teacher
    capsys.readouterr()
    test = load_dataset("digits", "test")
    names = "zero one two three four five six seven eight nine".split()
    write_folder(tmp_path / "folder", test.images[:120], test.labels[:120], names, rgb=True)  # RGB files: read as gray
    np.savez(tmp_path / "arrays.npz", x=test.images[:120].permute(0, 2, 3, 1).numpy(), y=test.labels[:120].numpy())
    model, _ = load_model(path)
    with torch.no_grad():
        expected = 100 * float((model(user_norm(test.images[:120])).argmax(1)
                                == test.labels[:120]).float().mean())
    for data, root in (("folder", tmp_path / "folder"), ("arrays", tmp_path / "arrays.npz")):
        code, out, err = run_cli(capsys, "eval", path, "--data", data, "--root", str(root))
        assert code == 0, err
        assert json.loads(out)["acc"] == pytest.approx(expected, abs=0.01) and json.loads(out)["n"] == 120


def test_bad_labeled_images_are_one_line_errors(user_teacher, tmp_path, capsys):
    path, _ = user_teacher
    capsys.readouterr()
    test = load_dataset("digits", "test")

    def error(data: str, root) -> str:
        code, _, err = run_cli(capsys, "eval", path, "--data", data, "--root", str(root))
        assert code == 2 and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
        return err

    write_folder(tmp_path / "unknown", test.images[:4], test.labels[:4], [f"class{k}" for k in range(10)])
    assert "has class 'class" in error("folder", tmp_path / "unknown") and "which the card does not know" in \
        error("folder", tmp_path / "unknown")
    (tmp_path / "empty").mkdir()
    assert "holds no class sub-folders" in error("folder", tmp_path / "empty")
    (tmp_path / "hollow" / "three").mkdir(parents=True)
    assert "hollow/three holds no image" in error("folder", tmp_path / "hollow")
    (tmp_path / "broken" / "three").mkdir(parents=True)
    (tmp_path / "broken" / "three" / "x.png").write_bytes(b"not a png")
    assert "x.png is not a readable image" in error("folder", tmp_path / "broken")
    np.savez(tmp_path / "none.npz", x=np.zeros((0, 32, 32), np.uint8), y=np.zeros(0, np.int64))
    assert "holds no sample" in error("arrays", tmp_path / "none.npz")
    np.savez(tmp_path / "float.npz", x=np.zeros((2, 32, 32), np.float32), y=np.zeros(2, np.int64))
    assert "x must be uint8 pixels" in error("arrays", tmp_path / "float.npz")
    assert "data.name=folder needs data.root" in error("folder", "")


# ---------------------------------------------------------------- no labeled image at all
@pytest.mark.slow
def test_a_run_with_no_labeled_image_reports_agreement_on_held_out_synthetic_samples(user_teacher, tmp_path):
    from dfkd.core.runs import read_metrics

    path, _ = user_teacher
    for config, extra, samples in (("datafree/dfq-digits", ["phases.1.steps=2", "data.agreement_samples=40"], 40),
                                   ("datafree/cmi-digits", ["phases.0.steps=2", "phases.1.steps=2"], 512)):
        engine = Engine(load_config(config, [f"teacher.checkpoint={path}", f"output.root={tmp_path}",
                                             "data.eval=false", "train.epochs=2", "train.iters_per_epoch=2",
                                             *extra]))
        summary = engine.fit()
        assert engine.run.synth.heldout.capacity == samples
        assert summary["final_acc"] is None and 0 <= summary["final_agreement"] <= 100
        rows = [r for r in read_metrics(summary["run_dir"]) if "eval/teacher_agreement" in r]
        assert len(rows) == 2 and rows[-1]["eval/teacher_agreement"] == summary["final_agreement"]


def test_inspect_reports_size_batchnorm_embedding_methods_and_a_recipe(user_teacher, capsys):
    path, _ = user_teacher
    capsys.readouterr()
    code, out, _ = run_cli(capsys, "inspect", path, "--json")
    report = json.loads(out)
    assert code == 0 and report["params"] == 61848 and report["flops"] > 0
    assert report["batchnorm"] == {"layers": 3, "channels": 142, "first": "bn1", "last": "bn3"}
    assert report["embedding"] == {"path": "fc2", "features": 84}
    applies = {m["config"]: m["applies"] for m in report["methods"]}
    assert applies["datafree/dfq-digits"] and applies["datafree/zskt-digits"]
    assert report["recipe"]["config"] == "datafree/dfq-digits" and report["recipe"]["student"] == "lenet5_half"
    code, out, _ = run_cli(capsys, "inspect", path)
    assert "start from datafree/dfq-digits" in out and "docs/results.md" in out


def test_the_student_is_chosen_for_the_cards_size():
    from dfkd.tools.inspect import student_for

    assert [student_for(s) for s in ((1, 32, 32), (3, 28, 28), (3, 48, 48), (3, 224, 224))] == \
        ["lenet5_half", "lenet5_half", "resnet8", "tv:resnet18"]


def test_what_names_a_users_class():
    from dfkd.nets.models import is_code

    assert is_code("mynets.py:SmallCNN") and is_code("pkg.mod:Net")
    assert not is_code("tv:resnet18") and not is_code("timm:resnet10t") and not is_code("lenet5")


# ---------------------------------------------------------------- the whole journey, and real resolution
@pytest.mark.slow
def test_the_journey_from_a_plain_pytorch_state_dict(user_module, tmp_path, capsys):
    """A network class of the user's, trained here on digits in plain PyTorch with its own
    normalization, saved as a state_dict: imported, distilled data-free, quantized to W8A8 and
    exported to ONNX, and audited by whoever holds the training data (as .npz arrays)."""
    torch.manual_seed(0)
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    net = train_plainly(user_module(width=16), epochs=12)
    with torch.no_grad():
        teacher_acc = 100 * float((net(user_norm(test.images)).argmax(1) == test.labels).float().mean())
    torch.save({"model_state_dict": net.state_dict(), "epoch": 12}, tmp_path / "checkpoint.pt")
    teacher = str(tmp_path / "teacher.pt")
    code, _, err = run_cli(capsys, "import", str(tmp_path / "checkpoint.pt"), "--arch", "usernets:TinyNet", "--kwargs",
                           '{"width": 16}', *CARD, "--native-size", "8,8", "--allow-code", "--out", teacher)
    assert code == 0, err
    code, out, err = run_cli(capsys, "distill", "--config", "datafree/dfq-digits", "--teacher", teacher, "--allow-code",
                             "--out", str(tmp_path / "runs"), "train.epochs=4", "train.iters_per_epoch=10",
                             "phases.1.steps=5", "runtime.num_threads=1")
    assert code == 0, err
    student = json.loads(out.strip().splitlines()[-1])
    assert student["teacher_acc"] == pytest.approx(teacher_acc, abs=0.01)  # the card's normalization
    assert student["final_acc"] >= 75.0, student  # measured: 90.0 from the teacher's 95.3, at this budget
    code, out, err = run_cli(capsys, "distill", "--config", "quant/dfq-digits", "--teacher", teacher, "--allow-code",
                             "--out", str(tmp_path / "runs"), "players.student.quant.weights=8",
                             "players.student.quant.acts=8", "train.epochs=2", "train.iters_per_epoch=5",
                             "runtime.num_threads=1")
    assert code == 0, err
    quantized = json.loads(out.strip().splitlines()[-1])
    assert quantized["precision"].startswith("W8A8") and quantized["final_acc"] >= 70.0, quantized  # measured: 82.7
    code, out, err = run_cli(capsys, "export", f"{quantized['run_dir']}/ckpt/final.pt", "--data", "digits",
                             "--allow-code", "--batch-size", "150")
    assert code == 0, err
    exported = json.loads(out)
    assert exported["agreement"] >= 99.0 and exported["acc_onnx"] == pytest.approx(quantized["final_acc"], abs=1.0)
    (tmp_path / "data").mkdir()
    np.savez(tmp_path / "data" / "train.npz", x=train.images[:, 0].numpy(), y=train.labels.numpy())
    np.savez(tmp_path / "data" / "test.npz", x=test.images[:, 0].numpy(), y=test.labels.numpy())
    code, out, err = run_cli(capsys, "audit", student["run_dir"], "--data", "arrays", "--root", str(tmp_path / "data"),
                             "--shadows", "0", "--samples", "64", "--allow-code")
    assert code == 0, err
    report = json.loads(open(f"{student['run_dir']}/audit.json").read())
    assert report["dataset"] == "arrays" and report["references"] == 225  # half the test split: the rest is the null
    assert report["synthetic"]["unseen_test_images"]["samples"] == 64
    assert 0.3 < report["membership"]["teacher"]["auc"] < 0.9 and "Membership inference" in out


@pytest.mark.slow
def test_an_imagenet_shaped_teacher_imports_and_is_inverted_at_224_pixels(tmp_path, capsys):
    """torchvision's ResNet-18 as an ImageNet teacher (3x224x224, 1000 classes; random weights: no
    download here) imports, and DFQ and DeepInversion run a few iterations on it at full size."""
    import resource

    torch.manual_seed(0)
    torch.save(create_model("tv:resnet18", 3, 1000, 224).state_dict(), tmp_path / "r18.pth")
    teacher = str(tmp_path / "r18.pt")
    code, out, err = run_cli(capsys, "import", str(tmp_path / "r18.pth"), "--arch", "tv:resnet18", "--input",
                             "3,224,224", "--mean", "0.485,0.456,0.406", "--std", "0.229,0.224,0.225", "--classes",
                             "1000", "--out", teacher)
    assert code == 0, err
    common = ["--teacher", teacher, "--out", str(tmp_path / "runs"), "data.eval=false", "train.epochs=1",
              "runtime.num_threads=2", "output.quality_samples=0", "players.student.net.name=tv:resnet18",
              "data.agreement_samples=16"]
    for config, budget in (("datafree/dfq-digits", ["train.iters_per_epoch=1", "phases.1.steps=1",
                                                    "synthesis.batch_size=4"]),
                           ("datafree/deepinv-digits", ["train.iters_per_epoch=1", "phases.0.steps=2",
                                                        "phases.1.steps=1", "synthesis.batch_size=4",
                                                        "synthesis.pool_size=16"])):
        code, out, err = run_cli(capsys, "distill", "--config", config, *common, *budget)
        assert code == 0, err
        summary = json.loads(out.strip().splitlines()[-1])
        pool = torch.load(f"{summary['run_dir']}/ckpt/last.pt", weights_only=True)["synthesis"]
        assert summary["steps"] >= 1 and "final_agreement" in summary
        if "pool" in pool:
            assert tuple(pool["pool"]["images"].shape[1:]) == (3, 224, 224)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{config} at 3x224x224: {summary['time_total_s']:.1f} s, peak resident memory {peak:.0f} MiB")
