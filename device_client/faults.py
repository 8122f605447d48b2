"""Named fault-injection points: make the process die at a chosen step of a rotation.

Production code calls :func:`point` at every step where a crash would leave a
different state on disk (after a temp file is written, after it is fsynced,
after the rename, after the directory fsync, ...). Normally that costs one
dictionary lookup. Two ways to arm it:

* the environment variable :data:`ENV_VAR` (read once, at import):
  ``N`` -- ``os._exit(FAULT_EXIT_CODE)`` at the N-th point reached (1-based,
  counting every point), or ``name`` / ``name:K`` -- at the K-th time (default 1)
  the point called ``name`` is reached;
* :func:`set_hook` -- a callable run at every point with the point's name (tests
  use it to count points, or to raise instead of exiting).

``os._exit`` skips ``finally`` blocks, buffered writes and atexit handlers: the
closest thing to pulling the power that a test can do cheaply. This module
knows nothing of certificates.
"""

from __future__ import annotations

import os
from collections.abc import Callable

__all__ = ["ENV_VAR", "FAULT_EXIT_CODE", "arm", "disarm", "point", "reached", "set_hook"]

ENV_VAR = "CERTMQ_FAULT_AT"
#: Exit status of a process killed by an armed point (distinguishes it from real crashes).
FAULT_EXIT_CODE = 87

_hook: Callable[[str], None] | None = None
_target_index: int | None = None
_target_name: str | None = None
_target_count = 1
_total = 0
_per_name: dict[str, int] = {}


def arm(spec: str | None) -> None:
    """Arm the points from a spec string (the :data:`ENV_VAR` syntax); ``None`` or ``""`` disarms.

    Raises ``ValueError`` for a spec that is neither a positive integer nor ``name[:K]``.
    """
    global _target_index, _target_name, _target_count, _total
    _target_index, _target_name, _target_count = None, None, 1
    _total = 0
    _per_name.clear()
    if not spec:
        return
    spec = spec.strip()
    if spec.isdigit():
        if int(spec) < 1:
            raise ValueError(f"{ENV_VAR}: the point index is 1-based, got {spec!r}")
        _target_index = int(spec)
        return
    name, sep, count = spec.partition(":")
    if not name or (sep and not count.isdigit()) or (sep and int(count) < 1):
        raise ValueError(f"{ENV_VAR} must be N or name[:K] with N, K >= 1, got {spec!r}")
    _target_name = name
    _target_count = int(count) if sep else 1


def disarm() -> None:
    """Disarm every point and forget the counts."""
    arm(None)


def set_hook(hook: Callable[[str], None] | None) -> None:
    """Run ``hook(name)`` at every point (``None`` removes it). The hook may raise."""
    global _hook
    _hook = hook


def reached() -> int:
    """How many points this process has passed since it was last armed."""
    return _total


def point(name: str) -> None:
    """A step of a multi-step update: die here if armed for it."""
    global _total
    _total += 1
    seen = _per_name.get(name, 0) + 1
    _per_name[name] = seen
    if _hook is not None:
        _hook(name)
    if (_target_index is not None and _total == _target_index) or (
        _target_name == name and seen == _target_count
    ):
        os._exit(FAULT_EXIT_CODE)


arm(os.environ.get(ENV_VAR))
