"""CIFAR-FS, FC-100, tieredImageNet and CUB-200-2011 read from small files written here in the official formats,
clear errors for missing files, and a cross-domain meta-test through train.py."""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import train
from engine.errors import DataError
from tasks.cifar100_fewshot import FC100_SUPERCLASSES
from tasks.fewshot_datasets import load_splits
from tasks.learn2learn_import import import_learn2learn

NAMES = [f"class_{i:03d}" for i in range(100)]  # CIFAR-100's meta file names the fine classes in label order
PER_CLASS = {"train": 2, "test": 1}


def write_cifar100(root: Path) -> dict[str, np.ndarray]:
    """Official cifar-100-python files (bytes keys, as the Python 2 pickles read back): train, test and meta."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    written = {}
    for name, per_class in PER_CLASS.items():
        fine = np.repeat(np.arange(100), per_class)
        data = np.random.default_rng(per_class).integers(0, 256, (len(fine), 3072), dtype=np.uint8)
        entry = {b"data": data, b"fine_labels": fine.tolist(), b"coarse_labels": (fine // 5).tolist(),
                 b"filenames": [b"x.png"] * len(fine), b"batch_label": b"batch"}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        written[name] = data
    meta = {b"fine_label_names": [n.encode() for n in NAMES], b"coarse_label_names": [b"c"] * 20}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return written


def write_cifarfs_splits(root: Path) -> dict[str, list[int]]:
    order = np.random.default_rng(0).permutation(100)
    classes = {"train.txt": order[:64], "val.txt": order[64:80], "test.txt": order[80:]}
    (root / "cifar-fs-splits").mkdir(parents=True)
    for file, ids in classes.items():
        (root / "cifar-fs-splits" / file).write_text("".join(f"{NAMES[i]}\n" for i in ids))
    return {"train": sorted(classes["train.txt"]), "validation": sorted(classes["val.txt"]),
            "test": sorted(classes["test.txt"])}


def test_cifarfs_reads_the_split_lists_and_all_600_images_of_a_class(tmp_path) -> None:
    written, expected = write_cifar100(tmp_path), write_cifarfs_splits(tmp_path)
    splits = load_splits("cifarfs", tmp_path)
    assert [len(splits[s].class_sizes()) for s in ("train", "validation", "test")] == [64, 16, 20]
    assert set(splits["train"].class_sizes()) == {3}  # the official train and test images together
    images, labels = splits["test"].images, torch.tensor(splits["test"].labels)
    first = expected["test"][0]  # label 0 of the test split is its lowest fine class
    assert torch.equal(images[labels == 0][0].reshape(-1), torch.from_numpy(written["train"][2 * first]))


def test_fc100_splits_by_superclass(tmp_path) -> None:
    write_cifar100(tmp_path)
    splits = load_splits("fc100", tmp_path)
    assert [len(splits[s].class_sizes()) for s in ("train", "validation", "test")] == [60, 20, 20]
    images = splits["validation"].images
    first_fine = 5 * min(FC100_SUPERCLASSES["validation"])  # the writer's coarse label is fine // 5
    assert torch.equal(images[0].reshape(-1), torch.from_numpy(write_cifar100_data(first_fine)))


def write_cifar100_data(fine: int) -> np.ndarray:
    """The first train image of fine class `fine` as write_cifar100 writes it."""
    data = np.random.default_rng(PER_CLASS["train"]).integers(0, 256, (200, 3072), dtype=np.uint8)
    return data[2 * fine]


def png(array: np.ndarray) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return np.frombuffer(buffer.getvalue(), dtype=np.uint8)


def test_tiered_imagenet_decodes_the_official_pickles(tmp_path) -> None:
    folder = tmp_path / "tiered-imagenet"
    folder.mkdir()
    rng = np.random.default_rng(0)
    pixels = {}
    for name, classes in (("train", [3, 9]), ("val", [1, 4]), ("test", [0, 7])):
        labels = np.repeat(classes, 2)
        pixels[name] = rng.integers(0, 256, (len(labels), 84, 84, 3), dtype=np.uint8)
        (folder / f"{name}_images_png.pkl").write_bytes(pickle.dumps([png(p) for p in pixels[name]]))
        (folder / f"{name}_labels.pkl").write_bytes(pickle.dumps(
            {"label_specific": labels, "label_general": labels // 2, "label_specific_str": ["n0"] * len(labels)}))
    splits = load_splits("tieredimagenet", tmp_path)
    assert splits["train"].class_sizes() == [2, 2] and splits["train"].labels == [0, 0, 1, 1]
    image, label = splits["validation"][3]
    assert label == 1 and image.shape == (3, 84, 84)
    assert torch.equal((image * 255).round().byte(), torch.from_numpy(pixels["val"][3]).permute(2, 0, 1))


def write_cub(root: Path) -> None:
    import_learn2learn()
    from learn2learn.vision.datasets.cu_birds200 import SPLITS

    rng = np.random.default_rng(0)
    for names in SPLITS.values():
        for name in names:
            folder = root / "CUB_200_2011" / "images" / name
            folder.mkdir(parents=True)
            for k in range(2):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(folder / f"{name}_{k}.jpg")


def test_cub200_reads_the_official_folders_with_learn2learns_species_split(tmp_path) -> None:
    write_cub(tmp_path)
    splits = load_splits("cub200", tmp_path)
    assert [len(splits[s].class_sizes()) for s in ("train", "validation", "test")] == [140, 30, 30]
    assert splits["test"][0][0].shape == (3, 84, 84)


@pytest.mark.parametrize(("dataset", "fragment"), [
    ("cifarfs", "CIFAR-100: missing train, test, meta in"),
    ("fc100", "CIFAR-100: missing train, test, meta in"),
    ("tieredimagenet", "tieredImageNet: missing train_images_png.pkl, train_labels.pkl in"),
    ("cub200", "CUB-200-2011: 200 species folders"),
])
def test_missing_files_name_what_to_put_where(tmp_path, dataset, fragment) -> None:
    with pytest.raises(DataError, match=fragment):
        load_splits(dataset, tmp_path)


def test_missing_cifarfs_split_lists_are_named(tmp_path) -> None:
    write_cifar100(tmp_path)
    with pytest.raises(DataError, match="CIFAR-FS split lists: missing train.txt, val.txt, test.txt"):
        load_splits("cifarfs", tmp_path)


TINY = ["device=cpu", "threads=1", "outer.iterations=2", "outer.meta_batch=2", "eval.every=2", "eval.val_tasks=2",
        "eval.test_tasks=4", "model.filters=8", "data.ways=5", "data.shots=1", "data.query=1", "inner.steps=1"]


def run(tmp_path: Path, data: Path, name: str, *extra: str) -> tuple[int, Path]:
    overrides = [arg for value in (*TINY, f"name={name}", *extra) for arg in ("--set", value)]
    code = train.main(["--config", "configs/maml_omniglot_5w1s.yaml", "--runs-root", str(tmp_path / "runs"),
                       "--data-root", str(data), *overrides])
    return code, tmp_path / "runs" / name


def test_cross_domain_meta_test_trains_on_one_set_and_tests_on_another(tmp_path) -> None:
    write_cifar100(tmp_path)
    write_cifarfs_splits(tmp_path)
    code, folder = run(tmp_path, tmp_path, "cross", "data.dataset=cifarfs", "eval.test_dataset=fc100")
    assert code == 0
    results = json.loads((folder / "results.json").read_text())
    assert results["test_dataset"] == "fc100" and results["test_tasks"] == 4


def test_a_cross_domain_set_of_another_image_shape_is_one_clear_error(tmp_path, shared_data, capsys) -> None:
    write_cifar100(tmp_path)
    (tmp_path / "omniglot-py").symlink_to(shared_data / "omniglot-py")
    code, _ = run(tmp_path, tmp_path, "shape", "data.dataset=omniglot", "eval.test_dataset=fc100")
    err = capsys.readouterr().err
    assert code == 2 and "eval.test_dataset = fc100: its images are (3, 32, 32) but omniglot's are (1, 28, 28)" in err


@pytest.mark.parametrize("config", sorted(p.name for p in Path("configs").glob("*.yaml")))
def test_every_shipped_config_validates(config) -> None:
    from engine.config import load_yaml
    from engine.experiment import resolve_config
    from train import FAMILIES

    resolve_config(load_yaml(Path("configs") / config), FAMILIES)
