"""Data sets: real files, files written here in the official formats, splits, batching, augmentation, errors."""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
import torchvision

from engine.errors import ConfigError, DataError
from tasks.augment import random_crop_flip
from tasks.image_datasets import read_cifar10, read_mnist
from tasks.splits import random_split, stratified_split
from tasks.supervised import (
    DATASETS,
    TABULAR_SPLIT_SEED,
    TABULAR_TEST_FRACTION,
    SupervisedTask,
    batch_indices,
    load_task,
)

# name -> (folder under the data root, official train size, test size, classes or None, input shape)
REAL = {
    "mnist": ("MNIST/raw", 60_000, 10_000, 10, (1, 28, 28)),
    "cifar10": ("cifar-10-batches-py", 50_000, 10_000, 10, (3, 32, 32)),
    "diabetes": ("tabular/diabetes", 442, None, None, (10,)),
    "california_housing": ("tabular/california_housing", 20_640, None, None, (8,)),
    "communities_crime": ("tabular/communities_crime", 1_994, None, None, (122,)),
}
# Published per-channel pixel mean and std (in [0, 1]) of the full training sets.
PUBLISHED_STATS = {
    "mnist": ([0.1307], [0.3081]),
    "cifar10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
}
_TASKS: dict[str, SupervisedTask] = {}


@pytest.fixture
def real_task(shared_data):
    """Loads (once per session) a real data set from ../shared/data, skipping when its files are absent."""

    def load(name: str) -> SupervisedTask:
        if not (shared_data / REAL[name][0]).is_dir():
            pytest.skip(f"{name} is not in {shared_data}")
        if name not in _TASKS:
            _TASKS[name] = load_task(name, shared_data, download=False)
        return _TASKS[name]

    return load


# ----- real files ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", REAL)
def test_real_data_set_shapes_and_split_sizes(real_task, name) -> None:
    task = real_task(name)
    _, n_train, n_test, classes, shape = REAL[name]
    if classes is None:  # the tabular sets: a fixed 80/20 split of the file, then validation from the 80
        n_test = round(0.2 * n_train)
        n_train -= n_test
    assert task.input_shape == shape
    assert task.size("val") == round(0.1 * n_train)
    assert task.size("train") == n_train - task.size("val")
    assert task.size("test") == n_test
    for inputs, targets in task.splits.values():
        assert inputs.shape[1:] == shape
        assert inputs.dtype == (torch.uint8 if classes else torch.float32)
        assert targets.dtype == (torch.int64 if classes else torch.float32) and targets.ndim == 1
    if classes:
        assert task.kind == "classification" and task.num_outputs == classes
        for _, targets in task.splits.values():
            assert set(targets.unique().tolist()) == set(range(classes))
    else:
        assert task.kind == "regression" and task.num_outputs == 1


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_real_validation_split_is_stratified_and_normalisation_uses_train_stats(real_task, name) -> None:
    task = real_task(name)
    train_labels, val_labels = task.splits["train"][1], task.splits["val"][1]
    train_share = torch.bincount(train_labels).double() / len(train_labels)
    val_share = torch.bincount(val_labels).double() / len(val_labels)
    assert (train_share - val_share).abs().max() < 0.002

    mean, std = PUBLISHED_STATS[name]
    assert torch.allclose(task.input_mean.flatten() / 255, torch.tensor(mean), atol=0.002)
    assert torch.allclose(task.input_std.flatten() / 255, torch.tensor(std), atol=0.002)
    sample = torch.randperm(task.size("train"), generator=torch.Generator().manual_seed(0))[:4000]
    inputs, _ = task.batch("train", sample)
    assert inputs.dtype == torch.float32
    assert inputs.mean(dim=(0, 2, 3)).abs().max() < 0.05
    assert (inputs.std(dim=(0, 2, 3)) - 1).abs().max() < 0.05


@pytest.mark.parametrize(("name", "reader"), [("mnist", read_mnist), ("cifar10", read_cifar10)])
def test_real_validation_comes_from_train_without_overlap(real_task, shared_data, name, reader) -> None:
    task = real_task(name)
    images, labels = reader(shared_data, download=False).train
    kept, held = stratified_split(labels, 0.1, seed=0)
    assert len(np.intersect1d(kept.numpy(), held.numpy())) == 0
    assert torch.equal(torch.cat([kept, held]).sort().values, torch.arange(len(labels)))
    assert torch.equal(task.splits["val"][0], images[held]) and torch.equal(task.splits["val"][1], labels[held])
    assert torch.equal(task.splits["train"][0], images[kept])


@pytest.mark.parametrize("name", ["diabetes", "california_housing", "communities_crime"])
def test_real_regression_sets_are_standardised_with_train_statistics(real_task, name) -> None:
    task = real_task(name)
    inputs, targets = task.batch("train", torch.arange(task.size("train")))
    assert not inputs.isnan().any()
    assert inputs.mean(dim=0).abs().max() < 1e-4
    assert ((inputs.std(dim=0, correction=0) - 1).abs() < 1e-3).all()
    assert abs(targets.mean().item()) < 1e-4 and abs(targets.std(correction=0).item() - 1) < 1e-3
    assert task.target_std > 0


def test_tabular_test_split_does_not_depend_on_the_run_seed(shared_data) -> None:
    if not (shared_data / "tabular" / "diabetes").is_dir():
        pytest.skip("diabetes is not in the shared data folder")
    first, second = load_task("diabetes", shared_data, seed=0), load_task("diabetes", shared_data, seed=1)
    assert torch.equal(first.splits["test"][0], second.splits["test"][0])
    assert not torch.equal(first.splits["val"][0], second.splits["val"][0])


# ----- files written here in the official formats ----------------------------------------------------


def _images(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def write_mnist(root: Path, train: int = 50, test: int = 20) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", train), ("t10k", test)):
        images = _images(n, (28, 28), seed=n)
        labels = np.arange(n, dtype=np.uint8) % 10
        header = (2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (n, 28, 28))
        (raw / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + images.tobytes()))
        header = (2049).to_bytes(4, "big") + n.to_bytes(4, "big")
        (raw / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(header + labels.tobytes()))


def _pickle_batch(path: Path, data: np.ndarray, labels: dict[str, list[int]], bytes_keys: bool) -> None:
    entry = {"batch_label": "testing batch", "data": data, "filenames": [f"{i}.png" for i in range(len(data))]}
    entry.update(labels)
    if bytes_keys:  # what the official Python 2 pickles read back as under encoding="bytes"
        entry = {k.encode(): v.encode() if isinstance(v, str) else v for k, v in entry.items()}
    path.write_bytes(pickle.dumps(entry, protocol=2))


def write_cifar10(root: Path, per_batch: int = 20) -> None:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        labels = {"labels": [j % 10 for j in range(per_batch)]}
        _pickle_batch(folder / name, _images(per_batch, (3072,), seed=i), labels, bytes_keys=True)


def write_cifar100(root: Path, bytes_keys: bool = True) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Official CIFAR-100 files: 5 train and 1 test image per fine class; coarse labels differ."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    written = {}
    for name, per_class in (("train", 5), ("test", 1)):
        fine = np.random.default_rng(1).permutation(np.repeat(np.arange(100), per_class))
        data = _images(len(fine), (3072,), seed=per_class)
        labels = {"fine_labels": fine.tolist(), "coarse_labels": (fine // 5).tolist()}
        _pickle_batch(folder / name, data, labels, bytes_keys)
        written[name] = (data, fine)
    return written


def write_svhn(folder: Path, train: int = 40, test: int = 20) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Official SVHN format 2 files: X (32, 32, 3, N) uint8 and y (N, 1) with 10 for the digit 0."""
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, n in (("train", train), ("test", test)):
        x = np.random.default_rng(n).integers(0, 256, (32, 32, 3, n), dtype=np.uint8)
        y = (np.arange(n, dtype=np.uint8) % 10 + 1).reshape(n, 1)
        scipy.io.savemat(folder / f"{name}_32x32.mat", {"X": x, "y": y})
        written[name] = (x, y)
    return written


def test_mnist_reader_on_written_files(tmp_path) -> None:
    write_mnist(tmp_path)
    task = load_task("mnist", tmp_path, download=False)
    assert task.size("train") + task.size("val") == 50 and task.size("test") == 20
    assert task.splits["test"][0].shape == (20, 1, 28, 28)
    assert torch.equal(task.splits["test"][0][3, 0], torch.from_numpy(_images(20, (28, 28), seed=20)[3]))
    assert (task.crop_padding, task.flip) == (0, False)


@pytest.mark.parametrize("bytes_keys", [True, False])
def test_cifar100_reader_on_official_format(tmp_path, bytes_keys) -> None:
    written = write_cifar100(tmp_path, bytes_keys)
    task = load_task("cifar100", tmp_path, download=False)
    assert task.num_outputs == 100 and task.input_shape == (3, 32, 32)
    assert task.size("train") == 450 and task.size("val") == 50 and task.size("test") == 100
    assert torch.bincount(task.splits["val"][1], minlength=100).max() == 1  # stratified
    data, fine = written["test"]
    images, labels = task.splits["test"]
    assert torch.equal(labels, torch.from_numpy(fine))  # fine, not coarse, labels
    assert torch.equal(images[7], torch.from_numpy(data[7].reshape(3, 32, 32)))
    assert (task.crop_padding, task.flip) == (4, True)


def test_svhn_reader_on_official_format(tmp_path) -> None:
    written = write_svhn(tmp_path / "svhn")
    task = load_task("svhn", tmp_path, download=False)
    x, y = written["test"]
    images, labels = task.splits["test"]
    assert task.num_outputs == 10 and images.shape == (20, 3, 32, 32)
    assert torch.equal(labels, torch.from_numpy(y[:, 0].astype(np.int64) % 10))
    assert labels.min() == 0 and labels.max() == 9
    assert torch.equal(images[5], torch.from_numpy(x[..., 5].transpose(2, 0, 1).copy()))
    assert (task.crop_padding, task.flip) == (4, False)  # digits are not mirrored
    no_augment = load_task("svhn", tmp_path, augment=False, download=False)
    assert (no_augment.crop_padding, no_augment.flip) == (0, False)


def test_communities_reader_drops_non_predictive_columns_and_imputes_train_mean(tmp_path) -> None:
    folder = tmp_path / "tabular" / "communities_crime"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    values = rng.random((40, 123)).round(2)
    values[rng.random(40) < 0.3, 0] = np.nan
    cells = [["?" if np.isnan(v) else f"{v:g}" for v in row] for row in values]
    rows = [",".join(["8", "?", "?", "Some town", "1", *row]) for row in cells]
    (folder / "communities.data").write_text("\n".join(rows) + "\n")
    task = load_task("communities_crime", tmp_path, seed=2)

    rest, _ = random_split(40, TABULAR_TEST_FRACTION, TABULAR_SPLIT_SEED)
    train = rest[random_split(len(rest), 0.1, seed=2)[0]].numpy()
    fill = np.nanmean(values[train, 0])
    features, target = task.splits["train"]
    assert task.input_shape == (122,)
    assert np.allclose(features[:, 0].numpy(), np.where(np.isnan(values[train, 0]), fill, values[train, 0]))
    assert np.allclose(features[:, 1:].numpy(), values[train, 1:122])
    expected = (values[train, 122] - values[train, 122].mean()) / values[train, 122].std()
    assert np.allclose(target.numpy(), expected, atol=1e-5)
    assert not any(x.isnan().any() for x, _ in task.splits.values())


# ----- missing and corrupt files ------------------------------------------------------------------------

EXPECTED_FILES = {
    "mnist": ["train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "MNIST"],
    "cifar10": ["data_batch_1", "test_batch", "cifar-10-batches-py"],
    "cifar100": ["train", "test", "cifar-100-python"],
    "svhn": ["train_32x32.mat", "test_32x32.mat", "svhn"],
    "diabetes": ["diabetes_data_raw.csv.gz", "diabetes_target.csv.gz"],
    "california_housing": ["cal_housing.data"],
    "communities_crime": ["communities.data"],
}


@pytest.mark.parametrize("name", DATASETS)
def test_missing_files_are_named_with_the_fix(tmp_path, name) -> None:
    with pytest.raises(DataError) as error:
        load_task(name, tmp_path / "empty", download=False)
    message = str(error.value)
    for fragment in [*EXPECTED_FILES[name], str(tmp_path / "empty"), "--data-root", "META_DATA_ROOT"]:
        assert fragment in message


def test_a_failed_download_falls_back_to_the_missing_files_message_and_leaves_the_root_as_it_was(
        tmp_path, monkeypatch) -> None:
    def offline(root, download):  # as torchvision does: the folders first, then the failing request
        (Path(root) / "MNIST" / "raw").mkdir(parents=True)
        (Path(root) / "MNIST" / "raw" / "train-images-idx3-ubyte.gz.part").write_bytes(b"partial")
        raise RuntimeError("no route to host")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    (tmp_path / "mine").mkdir()
    with pytest.raises(DataError, match="Downloading them failed: RuntimeError: no route to host"):
        load_task("mnist", tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]
    with pytest.raises(DataError):
        load_task("mnist", tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_a_successful_download_lands_where_the_reader_looks(tmp_path, monkeypatch) -> None:
    def fake_svhn(root, split, download):
        write_svhn(Path(root), train=10, test=10)

    monkeypatch.setattr(torchvision.datasets, "SVHN", fake_svhn)
    assert load_task("svhn", tmp_path).size("test") == 10


def _corrupt_mnist(raw: Path) -> None:
    path = raw / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:200])


def _wrong_magic(raw: Path) -> None:
    path = raw / "train-labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress((2051).to_bytes(4, "big") + gzip.decompress(path.read_bytes())[4:]))


def _wrong_size(raw: Path) -> None:
    path = raw / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-5]))


@pytest.mark.parametrize(
    ("damage", "file"),
    [
        (_corrupt_mnist, "train-images-idx3-ubyte.gz"),
        (_wrong_magic, "train-labels-idx1-ubyte.gz"),
        (_wrong_size, "t10k-images-idx3-ubyte.gz"),
    ],
)
def test_corrupt_mnist_file_is_named(tmp_path, damage, file) -> None:
    write_mnist(tmp_path)
    damage(tmp_path / "MNIST" / "raw")
    with pytest.raises(DataError, match=f"{file} is corrupt.*re-download or replace it"):
        load_task("mnist", tmp_path, download=False)


@pytest.mark.parametrize(
    "content",
    [
        b"garbage, not a pickle",
        pickle.dumps({"data": print, "labels": []}),  # a pickle that would call code is refused
        pickle.dumps({"data": np.zeros((3, 10), np.uint8), "labels": [0, 1, 2]}),
        pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1, 2]}),
        pickle.dumps({"data": np.zeros((2, 3072), np.uint8), "labels": ["cat", "dog"]}),
    ],
)
def test_corrupt_cifar_file_is_named(tmp_path, content) -> None:
    write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(content)
    with pytest.raises(DataError, match="data_batch_3 is corrupt"):
        load_task("cifar10", tmp_path, download=False)


def test_corrupt_svhn_file_is_named(tmp_path) -> None:
    write_svhn(tmp_path / "svhn")
    (tmp_path / "svhn" / "test_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file, but then nothing")
    with pytest.raises(DataError, match="test_32x32.mat is corrupt"):
        load_task("svhn", tmp_path, download=False)


@pytest.mark.parametrize("row", ["1,2,3", "1,2,3,4,5,6,7,8,oops"])
def test_corrupt_tabular_file_is_named(tmp_path, row) -> None:
    folder = tmp_path / "tabular" / "california_housing"
    folder.mkdir(parents=True)
    (folder / "cal_housing.data").write_text("1,2,3,4,5,6,7,8,9\n" * 20 + row + "\n")
    with pytest.raises(DataError, match="cal_housing.data is corrupt"):
        load_task("california_housing", tmp_path)


def test_unknown_data_set_and_bad_fraction_are_config_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="valid names: mnist, cifar10, cifar100, svhn, diabetes"):
        load_task("imagenet", tmp_path)
    with pytest.raises(ConfigError, match="val_fraction"):
        load_task("mnist", tmp_path, val_fraction=0.0)


# ----- splits, batches, augmentation ------------------------------------------------------------------


def test_stratified_split_is_seeded_and_proportional() -> None:
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    kept, held = stratified_split(labels, 0.1, seed=3)
    assert torch.bincount(labels[held]).tolist() == [5, 3, 2]
    assert torch.equal(held, stratified_split(labels, 0.1, seed=3)[1])
    assert not torch.equal(held, stratified_split(labels, 0.1, seed=4)[1])
    assert len(set(kept.tolist()) | set(held.tolist())) == 100 and not set(kept.tolist()) & set(held.tolist())
    assert len(random_split(101, 0.1, seed=0)[1]) == 10


def test_batch_indices_are_deterministic_and_cover_each_epoch() -> None:
    n, batch_size = 103, 10  # 10 batches an epoch, 3 examples left out
    epoch0 = [batch_indices(n, batch_size, seed=5, step=s) for s in range(10)]
    assert all(len(b) == batch_size for b in epoch0)
    seen = torch.cat(epoch0)
    assert len(seen.unique()) == 100 and seen.max() < n
    assert torch.equal(batch_indices(n, batch_size, seed=5, step=4), epoch0[4])
    assert not torch.equal(batch_indices(n, batch_size, seed=5, step=10), epoch0[0])  # a new permutation
    assert not torch.equal(batch_indices(n, batch_size, seed=6, step=0), epoch0[0])
    with pytest.raises(ConfigError, match="batch size"):
        batch_indices(5, 10, seed=0, step=0)


@pytest.fixture
def image_task() -> SupervisedTask:
    images = torch.from_numpy(_images(24, (3, 8, 8), seed=0))
    labels = torch.arange(24) % 4
    return SupervisedTask(
        name="toy",
        kind="classification",
        num_outputs=4,
        input_shape=(3, 8, 8),
        splits={"train": (images, labels), "val": (images[:8], labels[:8]), "test": (images[8:], labels[8:])},
        input_mean=torch.full((3, 1, 1), 100.0),
        input_std=torch.full((3, 1, 1), 50.0),
        crop_padding=2,
        flip=True,
    )


def test_augmentation_is_reproducible_and_only_for_train(image_task) -> None:
    indices = torch.arange(16)

    def train_batch(seed: int) -> torch.Tensor:
        return image_task.batch("train", indices, torch.Generator().manual_seed(seed))[0]

    plain = image_task.batch("train", indices)[0]
    assert torch.equal(plain, (image_task.splits["train"][0][:16].float() - 100) / 50)
    assert torch.equal(train_batch(1), train_batch(1))
    assert not torch.equal(train_batch(1), train_batch(2))
    assert not torch.equal(train_batch(1), plain)
    for split in ("val", "test"):
        index = torch.arange(image_task.size(split))
        augmented = image_task.batch(split, index, torch.Generator().manual_seed(1))
        assert all(torch.equal(a, b) for a, b in zip(augmented, image_task.batch(split, index)))


def test_augmentation_is_a_padded_crop_maybe_mirrored() -> None:
    images = torch.from_numpy(_images(32, (2, 6, 6), seed=1))
    out = random_crop_flip(images, 2, True, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    flips = 0
    for image, result in zip(padded, out):
        crops = [image[:, r : r + 6, c : c + 6] for r in range(5) for c in range(5)]
        if any(torch.equal(result, crop) for crop in crops):
            continue
        assert any(torch.equal(result, crop.flip(2)) for crop in crops)
        flips += 1
    assert 4 < flips < 28


def test_to_moves_every_stored_tensor(image_task) -> None:
    moved = image_task.to("meta")
    assert all(x.is_meta and y.is_meta for x, y in moved.splits.values())
    assert moved.input_mean.is_meta and moved.input_std.is_meta
    assert image_task.splits["train"][0].device.type == "cpu"


def test_unknown_split_is_a_config_error(image_task) -> None:
    with pytest.raises(ConfigError, match="train, val, test"):
        image_task.size("validation")
