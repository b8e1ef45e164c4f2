"""The environment of a test's child Python process (a DDP script, the console script, an example)."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def child_env(*extra_paths: str | os.PathLike[str], **variables: str) -> dict[str, str]:
    """``os.environ`` with the repository (then ``extra_paths``) on ``PYTHONPATH``, one OpenMP thread, no
    inherited ``LOCAL_RANK`` (a child launched from a DDP rank would otherwise think it is one) and
    ``variables`` on top.

    Example::

        subprocess.run([sys.executable, "script.py"], env=child_env(PL_DISABLE_FORK="1"))
    """
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, (REPO, *extra_paths))), "OMP_NUM_THREADS": "1"}
    env.pop("LOCAL_RANK", None)
    env.update(variables)
    return env
