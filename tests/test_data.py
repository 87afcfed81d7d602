"""Tests for dfkd.data: dataset readers on fabricated files, and the batch loader."""
from __future__ import annotations

import collections
import gzip
import itertools
import os
import pickle
import struct

import numpy as np
import pytest
import torch

import dfkd.data.readers
from dfkd.data.datasets import DatasetInfo, ImageTensorDataset, dataset_info, denormalize, load_dataset
from dfkd.data.loader import TensorLoader, augment_batch
from dfkd.data.readers import _digits_arrays
from dfkd_base.errors import ConfigError, DatasetNotFoundError, DfkdError, UnknownNameError

DEBIAN_FASHION_TEST_IMAGES = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz"


def write_idx(path, array: np.ndarray, magic: int | None = None) -> None:
    """Write uint8 ``array`` as an IDX file (gzipped if ``path`` ends in .gz)."""
    magic = (0x0800 | array.ndim) if magic is None else magic
    header = struct.pack(f">{1 + array.ndim}I", magic, *array.shape)
    with (gzip.open if str(path).endswith(".gz") else open)(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_idx_split(directory, split: str, images: np.ndarray, labels: np.ndarray, ext: str = ".gz") -> None:
    prefix = "train" if split == "train" else "t10k"
    os.makedirs(directory, exist_ok=True)
    write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte{ext}"), images)
    write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte{ext}"), labels)


def random_idx_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n, dtype=np.uint8)


@pytest.fixture
def no_system_fashion(tmp_path, monkeypatch):
    """Point the Debian location at an empty directory so results do not depend on this machine."""
    empty = tmp_path / "no-system-files"
    monkeypatch.setattr(dfkd.data.readers, "FASHION_MNIST_SYSTEM_DIR", str(empty))
    return empty


def assert_one_line_not_found(excinfo, *fragments: str) -> None:
    message = str(excinfo.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


# --- digits ---------------------------------------------------------------------------


def recompute_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """The digits preprocessing spelled out independently of dfkd.data."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = torch.from_numpy(np.round(digits.data * 255 / 16)).float().view(-1, 1, 8, 8)
    up = torch.nn.functional.interpolate(pixels, size=(32, 32), mode="bilinear", align_corners=False)
    return up.round().clamp(0, 255).to(torch.uint8), torch.from_numpy(digits.target).long()


def rows(dataset) -> collections.Counter:
    return collections.Counter(
        (image.numpy().tobytes(), int(label)) for image, label in zip(dataset.images, dataset.labels)
    )


def test_digits_shapes_sizes_and_partition():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert (len(train), len(test)) == (1347, 450)
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (1, 32, 32)
    assert train.labels.dtype == torch.int64
    assert set(test.labels.tolist()) == set(range(10))
    # As multisets of (image, label) rows, train + test is exactly the whole dataset: the
    # splits are disjoint and cover it even though digits contains duplicate images.
    all_images, all_labels = recompute_digits()
    whole = collections.Counter((im.numpy().tobytes(), int(lb)) for im, lb in zip(all_images, all_labels))
    assert rows(train) + rows(test) == whole


def test_digits_split_is_stratified():
    test = load_dataset("digits", "test")
    _, all_labels = recompute_digits()
    expected = all_labels.bincount().double() * 0.25
    assert torch.all((test.labels.bincount().double() - expected).abs() <= 1)


def test_digits_split_ignores_global_seeds():
    first = load_dataset("digits", "test")
    # Drop the in-memory cache so the second load really redoes the split.
    _digits_arrays.cache_clear()
    torch.manual_seed(123)
    np.random.seed(123)
    second = load_dataset("digits", "test")
    assert torch.equal(first.images, second.images) and torch.equal(first.labels, second.labels)


def test_digits_mean_std_constants_match_train_split():
    train = load_dataset("digits", "train")
    pixels = train.images.double() / 255
    info = dataset_info("digits")
    assert pixels.mean().item() == pytest.approx(info.mean[0], abs=1e-3)
    assert pixels.std().item() == pytest.approx(info.std[0], abs=1e-3)


def test_loaded_datasets_are_independent_copies():
    first = load_dataset("digits", "train")
    first.images.zero_()
    assert load_dataset("digits", "train").images.max() > 0


# --- fashion-mnist and mnist: IDX files ----------------------------------------------------


@pytest.mark.parametrize("ext", [".gz", ""])
def test_fashion_mnist_round_trips_idx_files_in_root(tmp_path, no_system_fashion, ext):
    train_images, train_labels = random_idx_split(20, seed=0)
    test_images, test_labels = random_idx_split(10, seed=1)
    write_idx_split(tmp_path, "train", train_images, train_labels, ext)
    write_idx_split(tmp_path, "test", test_images, test_labels, ext)

    train = load_dataset("fashion-mnist", "train", root=str(tmp_path))
    test = load_dataset("fmnist", "test", root=str(tmp_path))
    assert train.images.shape == (20, 1, 28, 28) and train.images.dtype == torch.uint8
    assert np.array_equal(train.images[:, 0].numpy(), train_images)
    assert np.array_equal(train.labels.numpy(), train_labels)
    assert np.array_equal(test.images[:, 0].numpy(), test_images)
    assert test.labels.dtype == torch.int64 and np.array_equal(test.labels.numpy(), test_labels)
    assert train.info.class_names[0] == "T-shirt/top" and train.info.class_names[9] == "Ankle boot"


def test_fashion_mnist_reads_torchvision_layout(tmp_path, no_system_fashion):
    images, labels = random_idx_split(5, seed=2)
    write_idx_split(tmp_path / "FashionMNIST" / "raw", "test", images, labels, ext="")
    test = load_dataset("fashion-mnist", "test", root=str(tmp_path))
    assert np.array_equal(test.images[:, 0].numpy(), images)


def test_fashion_mnist_default_root_is_data_in_cwd(tmp_path, no_system_fashion, monkeypatch):
    images, labels = random_idx_split(4, seed=3)
    write_idx_split(tmp_path / "data", "test", images, labels)
    monkeypatch.chdir(tmp_path)
    assert np.array_equal(load_dataset("fashion-mnist", "test").labels.numpy(), labels)


def test_fashion_mnist_falls_back_to_system_dir_only_without_a_root(tmp_path, monkeypatch):
    system = tmp_path / "system"
    images, labels = random_idx_split(3, seed=4)
    write_idx_split(system, "test", images, labels)
    monkeypatch.setattr(dfkd.data.readers, "FASHION_MNIST_SYSTEM_DIR", str(system))
    monkeypatch.chdir(tmp_path)  # the default root, ./data, holds nothing
    test = load_dataset("fashion-mnist", "test")
    assert np.array_equal(test.labels.numpy(), labels)
    # a root the user names is the one read: not silently replaced by the system-wide copy
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "empty")):
        load_dataset("fashion-mnist", "test", root=str(tmp_path / "empty"))


def test_fashion_mnist_missing_files_name_places_and_remedies(tmp_path, no_system_fashion, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetNotFoundError) as excinfo:
        load_dataset("fashion-mnist", "train")
    assert_one_line_not_found(
        excinfo, "fashion-mnist", str(tmp_path / "data"), str(no_system_fashion), "apt-get install dataset-fashion-mnist"
    )


def test_fashion_mnist_needs_both_files_of_a_split(tmp_path, no_system_fashion):
    images, _ = random_idx_split(3, seed=5)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    with pytest.raises(DatasetNotFoundError):
        load_dataset("fashion-mnist", "train", root=str(tmp_path))


def test_bad_magic_names_the_file(tmp_path, no_system_fashion):
    images, labels = random_idx_split(3, seed=6)
    write_idx_split(tmp_path, "test", images, labels)
    bad = tmp_path / "t10k-images-idx3-ubyte.gz"
    write_idx(bad, images, magic=0x0801)
    with pytest.raises(DfkdError, match="magic") as excinfo:
        load_dataset("fashion-mnist", "test", root=str(tmp_path))
    assert str(bad) in str(excinfo.value)


def test_truncated_and_non_gzip_files_are_reported(tmp_path, no_system_fashion):
    images, labels = random_idx_split(3, seed=7)
    write_idx_split(tmp_path, "test", images, labels, ext="")
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(DfkdError, match="header says"):
        load_dataset("fashion-mnist", "test", root=str(tmp_path))

    path.unlink()
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(DfkdError, match="t10k-images-idx3-ubyte.gz"):
        load_dataset("fashion-mnist", "test", root=str(tmp_path))


def test_image_and_label_counts_must_agree(tmp_path, no_system_fashion):
    images, labels = random_idx_split(3, seed=8)
    write_idx_split(tmp_path, "test", images, labels[:2])
    with pytest.raises(DfkdError, match="3 images but"):
        load_dataset("fashion-mnist", "test", root=str(tmp_path))


def test_download_reads_what_torchvision_fetched(tmp_path, no_system_fashion, monkeypatch):
    import torchvision.datasets

    images, labels = random_idx_split(6, seed=9)

    class FakeFashionMNIST:
        """Stands in for the network: puts the files where torchvision's download would."""

        def __init__(self, root, train, download):
            assert download and not train
            write_idx_split(os.path.join(root, "FashionMNIST", "raw"), "test", images, labels, ext="")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    test = load_dataset("fashion-mnist", "test", root=str(tmp_path), download=True)
    assert np.array_equal(test.images[:, 0].numpy(), images)


def test_failed_download_is_one_line(tmp_path, no_system_fashion, monkeypatch):
    import torchvision.datasets

    def offline(root, train, download):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz:\nTried https://...")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", offline)
    with pytest.raises(DatasetNotFoundError) as excinfo:
        load_dataset("fashion-mnist", "train", root=str(tmp_path), download=True)
    assert_one_line_not_found(excinfo, "fashion-mnist", str(tmp_path), "Error downloading")


@pytest.mark.skipif(not os.path.exists(DEBIAN_FASHION_TEST_IMAGES), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_test_split():
    test = load_dataset("fashion-mnist", "test")
    assert test.images.shape == (10000, 1, 28, 28)
    assert test.labels.bincount().tolist() == [1000] * 10


def test_mnist_reads_torchvision_raw_layout(tmp_path):
    images, labels = random_idx_split(7, seed=10)
    # torchvision's MNIST keeps the uncompressed files in root/MNIST/raw.
    write_idx_split(tmp_path / "MNIST" / "raw", "train", images, labels, ext="")
    train = load_dataset("mnist", "train", root=str(tmp_path))
    assert train.info.mean == (0.1307,)
    assert np.array_equal(train.images[:, 0].numpy(), images)
    assert np.array_equal(train.labels.numpy(), labels)


def test_mnist_missing_is_one_line(tmp_path):
    with pytest.raises(DatasetNotFoundError) as excinfo:
        load_dataset("mnist", "test", root=str(tmp_path))
    assert_one_line_not_found(excinfo, "mnist", str(tmp_path), "data.download=true")


# --- cifar and svhn: torchvision's formats ---------------------------------------------------


@pytest.fixture
def skip_md5(monkeypatch):
    """Fabricated files cannot match torchvision's md5 sums of the real ones, so keep only
    its existence check (cifar's ``_load_meta`` calls the module function directly)."""
    import torchvision.datasets.cifar
    import torchvision.datasets.svhn

    def exists(path, md5=None):
        return os.path.isfile(path)

    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", exists)
    monkeypatch.setattr(torchvision.datasets.svhn, "check_integrity", exists)


def write_pickle(path, obj) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def test_cifar10_train_and_test(tmp_path, skip_md5):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (2, 3072), dtype=np.uint8) for _ in range(6)]
    for i, batch in enumerate(batches[:5]):
        write_pickle(folder / f"data_batch_{i + 1}", {"data": batch, "labels": [i, 9 - i]})
    write_pickle(folder / "test_batch", {"data": batches[5], "labels": [3, 3]})
    names = list(dataset_info("cifar10").class_names)
    write_pickle(folder / "batches.meta", {"label_names": names})

    train = load_dataset("cifar10", "train", root=str(tmp_path))
    assert train.images.shape == (10, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.labels.tolist() == [0, 9, 1, 8, 2, 7, 3, 6, 4, 5]
    # CIFAR rows are channel-major 3x32x32, which is also our layout.
    assert np.array_equal(train.images[1].numpy(), batches[0][1].reshape(3, 32, 32))
    test = load_dataset("cifar10", "test", root=str(tmp_path))
    assert len(test) == 2 and test.labels.tolist() == [3, 3]
    assert test.info.class_names == tuple(names) and test.info.augment == "crop_flip"


def test_cifar100_uses_fine_labels_and_meta_names(tmp_path, skip_md5):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    fine = [0, 50, 99]
    for split in ("train", "test"):
        write_pickle(
            folder / split,
            {"data": rng.integers(0, 256, (3, 3072), dtype=np.uint8), "fine_labels": fine, "coarse_labels": [0, 1, 2]},
        )
    names = [f"class{i}" for i in range(100)]
    write_pickle(folder / "meta", {"fine_label_names": names})
    train = load_dataset("cifar100", "train", root=str(tmp_path))
    assert train.labels.tolist() == fine and train.info.num_classes == 100
    assert train.info.class_names == tuple(names)


def test_svhn_maps_label_10_to_zero(tmp_path, skip_md5):
    import scipy.io

    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8)  # SVHN stores H, W, C, N
    y = np.array([[10], [1], [9], [10]], dtype=np.uint8)
    scipy.io.savemat(tmp_path / "test_32x32.mat", {"X": x, "y": y})
    test = load_dataset("svhn", "test", root=str(tmp_path))
    assert test.images.shape == (4, 3, 32, 32) and test.images.dtype == torch.uint8
    assert test.labels.tolist() == [0, 1, 9, 0]
    assert np.array_equal(test.images.numpy(), x.transpose(3, 2, 0, 1))
    assert test.info.augment == "crop"


@pytest.mark.parametrize(
    "name, looked_in",
    [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"), ("svhn", "train_32x32.mat")],
)
def test_torchvision_datasets_missing_are_one_line(tmp_path, name, looked_in):
    with pytest.raises(DatasetNotFoundError) as excinfo:
        load_dataset(name, "train", root=str(tmp_path))
    assert_one_line_not_found(excinfo, name, str(tmp_path / looked_in), "data.download=true")
    assert excinfo.value.__cause__ is None and excinfo.value.__context__ is None


# --- registry ---------------------------------------------------------------------------


def test_unknown_dataset_suggests_spelling():
    with pytest.raises(UnknownNameError, match="did you mean.*'fashion-mnist'"):
        load_dataset("fashon-mnist", "train")
    assert dataset_info("fashion_mnist") is dataset_info("fmnist")


def test_bad_split_is_config_error():
    with pytest.raises(ConfigError, match="'val'"):
        load_dataset("digits", "val")


# --- TensorLoader -----------------------------------------------------------------------


def toy_dataset(n: int = 10, augment: str = "none", size: int = 4) -> ImageTensorDataset:
    """Image i is filled with the value i and has label i, so batches reveal their indices."""
    info = DatasetInfo("toy", (1, size, size), 10, tuple("abcdefghij"), (0.0,), (1.0,), augment)
    images = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, size, size).contiguous()
    return ImageTensorDataset(images, torch.arange(n), info, "train")


def epoch_labels(loader) -> list[list[int]]:
    return [labels.tolist() for _, labels in loader]


def test_loader_covers_every_sample_once():
    loader = TensorLoader(toy_dataset(10), batch_size=3, shuffle=True)
    batches = epoch_labels(loader)
    assert len(loader) == 4 and [len(b) for b in batches] == [3, 3, 3, 1]
    assert sorted(itertools.chain(*batches)) == list(range(10))
    for images, labels in loader:  # images and labels stay paired through the shuffle
        assert torch.allclose(images[:, 0, 0, 0] * 255, labels.float())


def test_loader_drop_last():
    loader = TensorLoader(toy_dataset(10), batch_size=3, drop_last=True)
    assert len(loader) == 3 and epoch_labels(loader) == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]


def test_shuffle_reproduces_and_varies_by_epoch_and_seed():
    def two_epochs(seed):
        loader = TensorLoader(toy_dataset(10), batch_size=10, shuffle=True, seed=seed)
        return epoch_labels(loader), epoch_labels(loader)

    first, second = two_epochs(seed=0)
    assert (first, second) == two_epochs(seed=0)
    assert first != second
    assert two_epochs(seed=1)[0] not in (first, second)


def test_normalization_by_hand():
    info = DatasetInfo("toy", (1, 1, 3), 10, tuple("abcdefghij"), (0.5,), (0.25,), "none")
    pixels = torch.tensor([[[[0, 51, 255]]]], dtype=torch.uint8)
    dataset = ImageTensorDataset(pixels, torch.tensor([7]), info, "test")
    expected = torch.tensor([[[-2.0, -1.2, 2.0]]])
    image, label = dataset[0]
    assert torch.allclose(image, expected) and label == 7
    (batch, labels), = list(TensorLoader(dataset, batch_size=4))
    assert torch.allclose(batch[0], expected) and labels.tolist() == [7]
    assert torch.allclose(denormalize(batch, info), torch.tensor([0, 0.2, 1.0]).view(1, 1, 1, 3))


def test_no_augmentation_unless_asked():
    dataset = toy_dataset(4, augment="crop_flip")
    (images, _), = list(TensorLoader(dataset, batch_size=4))
    assert torch.equal(images, dataset.images.float() / 255)


def test_crop_flip_changes_the_batch_but_not_its_shape():
    dataset = toy_dataset(10, augment="crop_flip", size=8)
    (plain, _), = list(TensorLoader(dataset, batch_size=10))
    (augmented, _), = list(TensorLoader(dataset, batch_size=10, augment=True))
    assert augmented.shape == plain.shape
    assert not torch.equal(augmented, plain)


@pytest.mark.parametrize("policy", ["crop", "crop_flip"])
def test_augment_batch_is_a_padded_crop_per_image(policy):
    x = torch.rand(64, 2, 6, 6)
    out = augment_batch(x, policy, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
    flips_seen = 0
    for i in range(len(x)):
        crops = [padded[i, :, t : t + 6, l : l + 6] for t in range(9) for l in range(9)]
        if any(torch.equal(out[i], c) for c in crops):
            continue
        assert policy == "crop_flip" and any(torch.equal(out[i], c.flip(-1)) for c in crops)
        flips_seen += 1
    assert (flips_seen > 0) == (policy == "crop_flip")


def test_infinite_runs_past_an_epoch():
    loader = TensorLoader(toy_dataset(10), batch_size=4, shuffle=True)
    batches = list(itertools.islice(loader.infinite(), 3 * len(loader) + 1))
    assert len(batches) == 3 * len(loader) + 1
    assert loader.epoch == 4


def test_loader_rejects_bad_arguments():
    with pytest.raises(ConfigError, match="batch_size"):
        TensorLoader(toy_dataset(), batch_size=0)
    with pytest.raises(ConfigError, match="seed"):
        TensorLoader(toy_dataset(), batch_size=1, seed=-1)


def test_infinite_without_batches_is_an_error():
    loader = TensorLoader(toy_dataset(3), batch_size=4, drop_last=True)
    with pytest.raises(ConfigError):
        next(loader.infinite())


def test_sharded_loaders_split_each_epoch_between_ranks():
    import dataclasses

    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    info = dataclasses.replace(dataset_info("digits"), shape=(1, 2, 2))
    dataset = ImageTensorDataset(images, torch.arange(10), info, "train")
    ranks = [TensorLoader(dataset, 2, shuffle=True, seed=3, shard=(r, 3)) for r in range(3)]
    seen = [torch.cat([labels for _, labels in loader]).tolist() for loader in ranks]
    assert [len(s) for s in seen] == [3, 3, 3] and [len(loader) for loader in ranks] == [2, 2, 2]
    assert len(set(sum(seen, []))) == 9  # disjoint; the one sample that does not divide is dropped
