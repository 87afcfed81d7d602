import os

import pytest
import torch

from dfkd import checkpoint as ck
from dfkd.errors import CheckpointError
from dfkd.models import create_model


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
    path = ck.save_model(tmp_path / "m.pt", model, ARCH, dataset="digits", accuracy=97.5)
    loaded, meta = ck.load_model(path)
    assert meta["dataset"] == "digits" and meta["accuracy"] == 97.5 and meta["arch"] == ARCH
    assert meta["sha256"] == ck.state_hash(model.state_dict())
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert not loaded.training
    x = torch.randn(3, 1, 32, 32)
    model.eval()
    assert torch.equal(model(x), loaded(x))


def test_hash_changes_with_any_weight():
    model = create_model("lenet5_half", in_channels=1, num_classes=10)
    before = ck.state_hash(model.state_dict())
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1e-6
    assert ck.state_hash(model.state_dict()) != before


def test_edited_weights_are_detected(tmp_path):
    model = create_model("lenet5_half", in_channels=1, num_classes=10)
    path = ck.save_model(tmp_path / "m.pt", model, ARCH)
    blob = torch.load(path, weights_only=True)
    blob["state_dict"]["fc2.bias"] = blob["state_dict"]["fc2.bias"] + 1 if "fc2.bias" in blob["state_dict"] else \
        next(iter(blob["state_dict"].values())) * 0
    key = "fc2.bias" if "fc2.bias" in blob["state_dict"] else next(iter(blob["state_dict"]))
    blob["state_dict"][key] = blob["state_dict"][key] + 1
    torch.save(blob, path)
    with pytest.raises(CheckpointError, match="do not match the recorded SHA-256"):
        ck.load_model(path)


def test_code_carrying_checkpoint_is_refused_and_never_runs(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": ck.MODEL_FORMAT, "payload": RunsCode(str(target))}, path)
    with pytest.raises(CheckpointError) as err:
        ck.safe_load(path)
    assert "refused to load" in str(err.value) and str(path) in str(err.value)
    assert "\n" not in str(err.value)
    assert not target.exists()


def test_missing_corrupt_and_foreign_files(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.pt"):
        ck.safe_load(tmp_path / "nope.pt")
    (tmp_path / "garbage.pt").write_bytes(b"not a zip at all")
    with pytest.raises(CheckpointError, match="garbage.pt: not a readable checkpoint"):
        ck.safe_load(tmp_path / "garbage.pt")
    torch.save({"weights": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a dfkd checkpoint"):
        ck.safe_load(tmp_path / "plain.pt")
    ck.atomic_save({"format": ck.STATE_FORMAT}, tmp_path / "state.pt")
    with pytest.raises(CheckpointError, match="expected a model file"):
        ck.load_model(tmp_path / "state.pt")


def test_weights_that_do_not_fit_the_architecture(tmp_path):
    model = create_model("lenet5_half", in_channels=1, num_classes=10)
    path = ck.save_model(tmp_path / "m.pt", model, {**ARCH, "name": "lenet5"})
    with pytest.raises(CheckpointError, match="do not fit architecture 'lenet5'"):
        ck.load_model(path)


def test_atomic_save_keeps_previous_file_when_write_dies(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ck.atomic_save({"format": ck.STATE_FORMAT, "step": 1}, path)
    real_save = torch.save

    def dies_half_way(obj, f):
        f.write(b"partial bytes")
        raise KeyboardInterrupt  # a kill mid-write

    monkeypatch.setattr(torch, "save", dies_half_way)
    with pytest.raises(KeyboardInterrupt):
        ck.atomic_save({"format": ck.STATE_FORMAT, "step": 2}, path)
    monkeypatch.setattr(torch, "save", real_save)
    assert ck.safe_load(path)["step"] == 1
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind
