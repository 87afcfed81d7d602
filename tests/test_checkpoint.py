import os

import pytest
import torch

from dfkd.core.checkpoint import MODEL_FORMAT, STATE_FORMAT, safe_load, save_model, state_hash
from dfkd.core.io import atomic_save
from dfkd.nets.arch import load_model
from dfkd.nets.models import create_model
from dfkd_base.errors import CheckpointError


class RunsCode:
    """Unpickling this object would create a file: the payload a malicious checkpoint carries."""

    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


ARCH = {"name": "lenet5_half", "in_channels": 1, "num_classes": 10, "image_size": 32, "kwargs": {}}


def test_model_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    model = create_model("lenet5_half", in_channels=1, num_classes=10)
    path = save_model(tmp_path / "m.pt", model, ARCH, dataset="digits", accuracy=97.5)
    loaded, meta = load_model(path)
    assert meta["dataset"] == "digits" and meta["accuracy"] == 97.5 and meta["arch"] == ARCH
    assert meta["sha256"] == state_hash(model.state_dict())
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert not loaded.training
    x = torch.randn(3, 1, 32, 32)
    model.eval()
    assert torch.equal(model(x), loaded(x))


def test_hash_changes_with_any_weight():
    model = create_model("lenet5_half", in_channels=1, num_classes=10)
    before = state_hash(model.state_dict())
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-6
    assert state_hash(model.state_dict()) != before


def test_edited_weights_are_detected(tmp_path):
    model = create_model("lenet5_half", in_channels=1, num_classes=10)
    path = save_model(tmp_path / "m.pt", model, ARCH)
    blob = torch.load(path, weights_only=True)
    blob["state_dict"]["fc2.bias"] = blob["state_dict"]["fc2.bias"] + 1 if "fc2.bias" in blob["state_dict"] else \
        next(iter(blob["state_dict"].values())) * 0
    key = "fc2.bias" if "fc2.bias" in blob["state_dict"] else next(iter(blob["state_dict"]))
    blob["state_dict"][key] = blob["state_dict"][key] + 1
    torch.save(blob, path)
    with pytest.raises(CheckpointError, match="do not match the recorded SHA-256"):
        load_model(path)


def test_code_carrying_checkpoint_is_refused_and_never_runs(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": MODEL_FORMAT, "payload": RunsCode(str(target))}, path)
    with pytest.raises(CheckpointError) as err:
        safe_load(path)
    assert "refused to load" in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value)
    assert not target.exists()


def test_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pt"):
        safe_load(tmp_path / "nope.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a zip at all")
    with pytest.raises(CheckpointError, match="garbage.pt: not a readable checkpoint"):
        safe_load(tmp_path / "garbage.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a dfkd checkpoint"):
        safe_load(tmp_path / "plain.pt")
    atomic_save({"format": STATE_FORMAT}, tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match="expected a model file"):
        load_model(tmp_path / "state.pt")


def test_weights_that_do_not_fit_the_architecture(tmp_path):
    model = create_model("lenet5_half", in_channels=1, num_classes=10)
    path = save_model(tmp_path / "m.pt", model, {**ARCH, "name": "lenet5"})
    with pytest.raises(CheckpointError, match="do not fit architecture 'lenet5'"):
        load_model(path)


def test_atomic_save_keeps_previous_file_when_write_dies(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    atomic_save({"format": STATE_FORMAT, "step": 1}, path)
    real_save = torch.save

    def dies_half_way(obj, f):
        f.write(b"partial bytes")
        raise KeyboardInterrupt  # a kill mid-write

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        atomic_save({"format": STATE_FORMAT, "step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert safe_load(path)["step"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind
