"""Episodes: learn2learn tasksets over in-memory Omniglot and mini-ImageNet pickles."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tasks.omniglot as omniglot_module
from engine.errors import ConfigError, DataError
from tasks.episodes import EpisodeSampler, check_episodes_fit, python_random, split_episode
from tasks.fewshot_datasets import load_splits
from tasks.image_classes import ImageClasses
from tasks.mini_imagenet import load_mini_imagenet, pickle_path
from tasks.omniglot import (
    SPLIT_SIZES,
    SUBSETS,
    VALIDATION_ALPHABETS,
    character_folders,
    load_omniglot,
    split_characters,
)


@pytest.fixture(scope="session")
def omniglot(shared_data: Path) -> dict[str, ImageClasses]:
    return load_splits("omniglot", shared_data)


def write_mini_imagenet(root: Path, classes: dict[str, int], per_class: int = 20, seed: int = 0) -> None:
    """Small pickles in the official `mini-imagenet-cache-{split}.pkl` format."""
    rng = np.random.default_rng(seed)
    for split, count in classes.items():
        images = rng.integers(0, 256, size=(count * per_class, 84, 84, 3), dtype=np.uint8)
        order = rng.permutation(count * per_class)
        class_dict = {f"n{split[:2]}{c:05d}": order[c * per_class:(c + 1) * per_class].tolist()
                      for c in range(count)}
        path = pickle_path(root, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            pickle.dump({"image_data": images, "class_dict": class_dict}, f)


def check_episode(sampler: EpisodeSampler, ways: int, shots: int, query: int) -> None:
    x, y = sampler.taskset.sample()
    assert x.shape[0] == ways * (shots + query) and y.shape == (ways * (shots + query),)
    assert sorted(set(y.tolist())) == list(range(ways))
    assert torch.bincount(y).tolist() == [shots + query] * ways
    episode = split_episode(x, y, ways, shots)
    assert episode.support_y.tolist() == [c for c in range(ways) for _ in range(shots)]
    assert episode.query_y.tolist() == [c for c in range(ways) for _ in range(query)]


def test_omniglot_split_is_vinyals(shared_data: Path) -> None:
    """1028 / 172 / 423 characters: the test split is the last 423 in path order (the evaluation set's last 12
    alphabets and Gurmukhi's characters 42-45), validation five whole background alphabets."""
    folders = character_folders(shared_data)
    split = split_characters(folders)
    assert {k: len(v) for k, v in split.items()} == SPLIT_SIZES
    assert len(set().union(*map(set, split.values()))) == 1623
    test = [folders[i] for i in split["test"]]
    assert {f.parent.parent.name for f in test} == {"images_evaluation"}
    gurmukhi = sorted(f.name for f in test if f.parent.name == "Gurmukhi")
    assert gurmukhi == ["character42", "character43", "character44", "character45"]
    assert {folders[i].parent.name for i in split["validation"]} == set(VALIDATION_ALPHABETS)
    assert not {folders[i].parent.name for i in split["train"]} & set(VALIDATION_ALPHABETS)
    # torchmeta's train.json: every background alphabet but the five, and the evaluation set's first 236 characters
    train_evaluation = [folders[i] for i in split["train"] if folders[i].parent.parent.name == "images_evaluation"]
    assert len(train_evaluation) == 236 and {f.parent.name for f in train_evaluation} == {
        "Angelic", "Atemayar_Qelisayer", "Atlantean", "Aurek-Besh", "Avesta", "Ge_ez", "Glagolitic", "Gurmukhi"}
    assert max(f.name for f in train_evaluation if f.parent.name == "Gurmukhi") == "character41"


def test_omniglot_episodes(omniglot: dict[str, ImageClasses]) -> None:
    assert len(omniglot["train"]) == 1028 * 20 and len(omniglot["test"]) == 423 * 20
    x, label = omniglot["train"][0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32 and 0.0 <= float(x.min()) <= float(x.max()) <= 1.0
    sampler = EpisodeSampler(omniglot["train"], ways=5, shots=1, query=3)
    check_episode(sampler, 5, 1, 3)
    episode = sampler.sample()
    assert episode.support_x.shape == (5, 1, 28, 28) and episode.query_x.shape == (15, 1, 28, 28)


def test_only_meta_train_classes_are_rotated_each_class_as_one(omniglot: dict[str, ImageClasses]) -> None:
    """A meta-train episode turns every image of a class by the same multiple of 90 degrees (drawn per episode);
    meta-validation and meta-test images are never turned."""
    assert omniglot["train"].rotate_classes and not omniglot["validation"].rotate_classes
    assert not omniglot["test"].rotate_classes
    sampler = EpisodeSampler(omniglot["train"], ways=5, shots=2, query=3)
    turns_seen = set()
    for seed in range(20):
        with python_random(seed):
            rotated = sampler.sample()
        omniglot["train"].rotate_classes = False
        try:
            with python_random(seed):
                plain = sampler.sample()
        finally:
            omniglot["train"].rotate_classes = True
        assert torch.equal(rotated.support_y, plain.support_y)
        for c in range(5):
            images = [(rotated.support_x[2 * c:2 * c + 2], plain.support_x[2 * c:2 * c + 2]),
                      (rotated.query_x[3 * c:3 * c + 3], plain.query_x[3 * c:3 * c + 3])]
            turns = {next(k for k in range(4) if torch.equal(r, torch.rot90(p, k, dims=(-2, -1))))
                     for r, p in images}
            assert len(turns) == 1
            turns_seen |= turns
    assert turns_seen == {0, 1, 2, 3}
    test_sampler = EpisodeSampler(omniglot["test"], ways=5, shots=1, query=1)
    episode = next(iter(test_sampler.fixed(1, seed=3)))
    drawings = {tuple(omniglot["test"].images[i].flatten().tolist()) for i in range(len(omniglot["test"]))}
    assert all(tuple((x * 255).round().to(torch.uint8).flatten().tolist()) in drawings for x in episode.support_x)


def test_no_test_class_in_meta_training(omniglot: dict[str, ImageClasses]) -> None:
    train, test = set(omniglot["train"].labels), set(omniglot["test"].labels)
    validation = set(omniglot["validation"].labels)
    assert not train & test and not train & validation and not validation & test
    sampler = EpisodeSampler(omniglot["train"], ways=5, shots=1, query=1)
    seen = set()
    for _ in range(200):
        description = sampler.taskset.sample_task_description()
        seen |= {omniglot["train"].labels[d.index] for d in description}
    assert seen <= train and not seen & test


def test_episode_sampling_replays_under_a_seed(omniglot: dict[str, ImageClasses]) -> None:
    sampler = EpisodeSampler(omniglot["validation"], ways=5, shots=1, query=2)
    first = [e.support_x for e in sampler.fixed(3, seed=7)]
    with python_random(123):
        sampler.sample()
    second = [e.support_x for e in sampler.fixed(3, seed=7)]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


def test_mini_imagenet_pickles(tmp_path: Path) -> None:
    write_mini_imagenet(tmp_path, {"train": 8, "validation": 6, "test": 6}, per_class=10)
    images, labels = load_mini_imagenet(tmp_path, "train")
    assert images.shape == (80, 3, 84, 84) and images.dtype == torch.uint8
    assert torch.bincount(labels).tolist() == [10] * 8
    splits = load_splits("mini_imagenet", tmp_path)
    check_episode(EpisodeSampler(splits["test"], ways=5, shots=2, query=3), 5, 2, 3)


def test_mini_imagenet_missing_and_corrupt(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="mini-imagenet-cache-train.pkl"):
        load_mini_imagenet(tmp_path, "train")
    path = pickle_path(tmp_path, "train")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a pickle")
    with pytest.raises(DataError, match="not a mini-ImageNet"):
        load_mini_imagenet(tmp_path, "train")


def test_missing_omniglot_is_a_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="Omniglot not found"):
        load_splits("omniglot", tmp_path)


def write_omniglot(root: Path, characters_per_subset: int, drawings: int, seed: int = 0) -> list[Path]:
    """Random-noise PNGs in the official layout `omniglot-py/<subset>/<alphabet>/<character>/<name>.png`."""
    rng = np.random.default_rng(seed)
    paths = []
    for subset in SUBSETS:
        for c in range(characters_per_subset):
            folder = root / "omniglot-py" / subset / "Alphabet_of_Tests" / f"character{c + 1:02d}"
            folder.mkdir(parents=True)
            for d in range(drawings):
                path = folder / f"{c + 1:04d}_{d + 1:02d}.png"
                Image.fromarray(rng.integers(0, 256, size=(28, 28), dtype=np.uint8)).save(path)
                paths.append(path)
    return paths


def test_omniglot_cache_sees_a_replaced_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(omniglot_module, "CHARACTERS", 4)
    monkeypatch.setattr(omniglot_module, "DRAWINGS", 2)
    root, cache = tmp_path / "data", tmp_path / "cache"
    paths = write_omniglot(root, characters_per_subset=2, drawings=2)
    first = load_omniglot(root, cache, workers=1)
    assert first.shape == (4, 2, 28, 28) and len(list(cache.iterdir())) == 1
    assert torch.equal(load_omniglot(root, cache, workers=1), first) and len(list(cache.iterdir())) == 1
    replaced = paths[0]
    before = replaced.stat()
    Image.new("L", (40, 40), color=0).save(replaced)  # black, so no ink: 255 everywhere once decoded
    os.utime(replaced, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    second = load_omniglot(root, cache, workers=1)
    assert (second[0, 0] == 255).all() and not torch.equal(second[0, 0], first[0, 0])
    assert torch.equal(second.flatten(0, 1)[1:], first.flatten(0, 1)[1:])
    assert len(list(cache.iterdir())) == 2


def test_episodes_the_splits_cannot_supply_name_the_limits() -> None:
    def classes(count: int, per_class: int) -> ImageClasses:
        return ImageClasses(torch.zeros(count * per_class, 1, 2, 2, dtype=torch.uint8),
                            torch.arange(count).repeat_interleave(per_class))

    splits = {"train": classes(8, 6), "validation": classes(5, 4), "test": classes(6, 5)}
    check_episodes_fit(splits, "tiny", ways=5, shots=1, query=3)
    with pytest.raises(ConfigError) as error:
        check_episodes_fit(splits, "tiny", ways=6, shots=1, query=3)
    assert str(error.value) == (
        "data.ways = 6 but the tiny meta-validation split has 5 classes (classes per split: meta-train 8, "
        "meta-validation 5, meta-test 6); set data.ways to at most 5"
    )
    with pytest.raises(ConfigError) as error:
        check_episodes_fit(splits, "tiny", ways=5, shots=2, query=3)
    assert str(error.value) == (
        "data.shots + data.query = 2 + 3 = 5 examples per class, but a class of the tiny meta-validation split "
        "has only 4 (fewest per class: meta-train 6, meta-validation 4, meta-test 5); lower data.shots and/or "
        "data.query so that they sum to at most 4"
    )
