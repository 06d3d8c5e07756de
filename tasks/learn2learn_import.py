"""The project's one import of learn2learn: every path to it (tasksets, the CUB split lists, MAML / Meta-SGD
learners) goes through `import_learn2learn`."""

from __future__ import annotations

import contextlib
import io


def import_learn2learn():
    """`import learn2learn`, without the deprecation notice gym (which learn2learn imports) prints on its first
    import: only gym's import is silenced, so learn2learn's own warnings still show."""
    with contextlib.redirect_stderr(io.StringIO()):
        import gym  # noqa: F401
    import learn2learn

    return learn2learn
