"""Finding a data set's files under the data root, and the errors for missing or corrupt ones."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator, Sequence
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


def _entries(root: Path, depth: int) -> set[Path]:
    """The files and folders under `root`, `depth` levels down at most."""
    found, level = set(), [root] if root.is_dir() else []
    for _ in range(depth):
        level = [child for folder in level if folder.is_dir() for child in folder.iterdir()]
        found.update(level)
    return found


@contextlib.contextmanager
def restored_on_failure(root: Path, depth: int = 3) -> Iterator[None]:
    """Around a download into `root`: if it fails, remove what it made there (the folders and files that were not
    there before, `depth` levels down; `root` itself when it did not exist), so the data root is as it was."""
    existed, before = root.exists(), _entries(root, depth)
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(root, ignore_errors=True)
        else:
            for path in sorted(_entries(root, depth) - before, key=lambda p: len(p.parts)):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        raise
