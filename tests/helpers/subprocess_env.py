"""The environment of a test's child Python process (a DDP script, the console script, an example)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def child_env(
    *extra_paths: str | os.PathLike[str],
    prepend: Iterable[str | os.PathLike[str]] = (),
    drop: Iterable[str] = (),
    **variables: str,
) -> dict[str, str]:
    """``os.environ`` with ``prepend``, the repository, then ``extra_paths`` on ``PYTHONPATH``, one OpenMP
    thread, no inherited ``LOCAL_RANK`` (a child launched from a DDP rank would otherwise think it is one),
    none of the variables named in ``drop``, and ``variables`` on top.

    ``prepend`` is for directories that must shadow an installed package (a stand-in ``torch``, say);
    ``drop`` for inherited settings that would change what the child does (``COLUMNS``, ``NO_COLOR``).

    Example::

        subprocess.run([sys.executable, "script.py"], env=child_env(PL_DISABLE_FORK="1"))
        subprocess.run([sys.executable, "script.py"], env=child_env(prepend=[fake_site], drop=["NO_COLOR"]))
    """
    paths = (*prepend, REPO, *extra_paths)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, paths)), "OMP_NUM_THREADS": "1"}
    for name in ("LOCAL_RANK", *drop):
        env.pop(name, None)
    env.update(variables)
    return env
