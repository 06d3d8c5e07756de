"""Readers for the regression sets: Diabetes, California Housing, Communities and Crime.

Each reader returns the whole file as float64 features (N, D), NaN where a value is missing, and a
float64 target (N,). Splitting, imputation and standardisation happen in `tasks.supervised`.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from tasks.data_files import corrupt, require_files


def _read_table(
    path: Path, columns: int, delimiter: str | None = None, missing: str | None = None, skip: int = 0
) -> np.ndarray:
    """Columns `skip:` of a text table of `columns` values a row (the skipped ones may be text).

    A '.gz' name is gunzipped; `missing` marks a NaN; anything else not a number is corruption.
    """
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="ascii") as f:
            lines = [line for line in f.read().splitlines() if line.strip()]
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as exc:
        raise corrupt(path, f"unreadable text: {exc}") from None
    rows = [line.split(delimiter) for line in lines]
    for number, row in enumerate(rows, start=1):
        if len(row) != columns:
            raise corrupt(path, f"line {number} has {len(row)} values, expected {columns}")
    try:
        return np.array([[np.nan if v.strip() == missing else float(v) for v in row[skip:]] for row in rows])
    except ValueError as exc:
        raise corrupt(path, str(exc)) from None


def _tensors(features: np.ndarray, target: np.ndarray) -> tuple[Tensor, Tensor]:
    return torch.from_numpy(features), torch.from_numpy(target)


def read_diabetes(root: Path) -> tuple[Tensor, Tensor]:
    """scikit-learn's diabetes files (unscaled): 442 patients, 10 features, disease progression after a year."""
    features_path, target_path = require_files(
        root / "tabular" / "diabetes",
        ["diabetes_data_raw.csv.gz", "diabetes_target.csv.gz"],
        "diabetes",
        source="scikit-learn's sklearn/datasets/data/",
    )
    features = _read_table(features_path, 10)
    target = _read_table(target_path, 1)[:, 0]
    if len(features) != len(target):
        raise corrupt(target_path, f"{len(target)} targets for {len(features)} rows of features")
    return _tensors(features, target)


def read_california_housing(root: Path) -> tuple[Tensor, Tensor]:
    """StatLib's cal_housing.data: 20,640 block groups, 8 features, median house value (last column)."""
    (path,) = require_files(
        root / "tabular" / "california_housing",
        ["cal_housing.data"],
        "california_housing",
        source="StatLib's cal_housing.tgz, CaliforniaHousing/cal_housing.data",
    )
    table = _read_table(path, 9, delimiter=",")
    return _tensors(table[:, :-1], table[:, -1])


def read_communities_crime(root: Path) -> tuple[Tensor, Tensor]:
    """UCI Communities and Crime: 1,994 communities, 122 predictive features ('?' missing), and
    ViolentCrimesPerPop (last column). The first 5 columns (state, county, community, name, fold)
    are not predictive and are dropped."""
    (path,) = require_files(
        root / "tabular" / "communities_crime",
        ["communities.data"],
        "communities_crime",
        source="UCI Machine Learning Repository, Communities and Crime",
    )
    table = _read_table(path, 128, delimiter=",", missing="?", skip=5)
    if np.isnan(table[:, -1]).any():
        raise corrupt(path, "missing values in the target column")
    return _tensors(table[:, :-1], table[:, -1])
