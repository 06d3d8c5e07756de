"""Finding a data set's files under the data root, and the errors for missing or corrupt ones."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from engine.errors import DataError

ROOT_HINT = "set --data-root or META_DATA_ROOT to a folder that holds them (torchvision's folder layout)"


def corrupt(path: Path, detail: str) -> DataError:
    """The error for a file that exists but cannot be decoded."""
    return DataError(f"{path} is corrupt or not in the expected format ({detail}); re-download or replace it")


def require_files(
    folder: Path,
    names: Sequence[str],
    dataset: str,
    fetch: Callable[[], object] | None = None,
    source: str = "",
) -> list[Path]:
    """The paths `folder/name`, all of which must be files.

    When some are missing and `fetch` is given (a torchvision downloader), it is tried once; if it fails
    or the files are still missing, a DataError names the files, the folder and the fix.
    """
    paths = [folder / name for name in names]
    missing = [p for p in paths if not p.is_file()]
    download_note = ""
    if missing and fetch is not None:
        try:
            fetch()
        except Exception as exc:  # any download failure falls back to the message below
            download_note = f" Downloading them failed: {type(exc).__name__}: {exc}."
        missing = [p for p in paths if not p.is_file()]
    if missing:
        where = f" ({source})" if source else ""
        raise DataError(
            f"{dataset}: missing {', '.join(p.name for p in missing)} in {folder}.{download_note} "
            f"Put the official files{where} there, or {ROOT_HINT}."
        )
    return paths
