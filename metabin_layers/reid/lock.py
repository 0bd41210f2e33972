"""One run per output folder: an exclusive lock file holding the owner's pid and host.

``run_lock(folder)`` creates ``<folder>/.metabin-reid.lock`` with ``O_CREAT | O_EXCL`` (one
process wins, also on two machines sharing the folder over NFS v3+), writes the owner's pid, host
and command into it, and removes it when the block ends, also on an error or Ctrl-C. A second
run on the folder is refused with an ``OutputFolderError`` naming the folder and the process that
holds it; a lock left by a process that no longer runs on this host (killed with ``kill -9``, a
machine that lost power) is reported as stale, with the command that clears it, and never removed
behind the user's back: only they know that no run is going on. Under ``torchrun`` only rank 0
takes the lock (the other ranks write nothing there).

Examples:
    >>> import tempfile
    >>> from pathlib import Path
    >>> from metabin_layers.reid.lock import LOCK_NAME, run_lock
    >>> folder = Path(tempfile.mkdtemp()) / "run"
    >>> with run_lock(folder):
    ...     (folder / LOCK_NAME).exists()
    True
    >>> (folder / LOCK_NAME).exists()
    False
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import socket
import sys
from pathlib import Path
from typing import Any, Iterator, Optional, Union

from .errors import OutputFolderError

__all__ = ["LOCK_NAME", "run_lock", "check_unlocked"]

#: The lock file's name inside the output folder.
LOCK_NAME = ".metabin-reid.lock"


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this host (``kill(pid, 0)``: no signal is sent)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    except OSError:
        return False
    return True


def _read(path: Path) -> dict[str, Any]:
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return owner if isinstance(owner, dict) else {}


def _refusal(folder: Path, path: Path) -> OutputFolderError:
    """Why ``folder`` cannot be used: a live run holds it, or a stale lock is left there."""
    owner = _read(path)
    pid, host = owner.get("pid"), owner.get("host")
    here = socket.gethostname()
    who = f"pid {pid}" + (f" on {host}" if host else "")
    clear = f"rm {shlex.quote(str(path))}"
    if isinstance(pid, int) and host == here and not _alive(pid):
        return OutputFolderError(
            f"output {folder}: a stale lock of {who}, which no longer runs (a run killed without cleaning "
            f"up?); if no run uses this folder, clear it with: {clear}"
        )
    if host not in (None, here):
        return OutputFolderError(
            f"output {folder}: in use by {who} (another host: this one cannot tell whether it still runs); "
            f"wait for it, choose another --output, or if no run uses this folder clear the lock with: {clear}"
        )
    return OutputFolderError(
        f"output {folder}: in use by a run of {who}; wait for it to finish, choose another --output, or stop that process first"
    )


def check_unlocked(folder: Union[str, Path]) -> None:
    """Refuse early (before the data are read) when ``folder`` holds a lock.

    Args:
        folder: the run folder.

    Raises:
        OutputFolderError: a run holds ``folder``, or a stale lock is there (see the module).

    Examples:
        >>> import tempfile
        >>> from metabin_layers.reid.lock import check_unlocked
        >>> check_unlocked(tempfile.mkdtemp())  # no lock: nothing to say
    """
    folder = Path(folder)
    path = folder / LOCK_NAME
    if path.exists() or path.is_symlink():
        raise _refusal(folder, path)


@contextlib.contextmanager
def run_lock(folder: Union[str, Path], rank: int = 0, command: Optional[str] = None) -> Iterator[None]:
    """Hold ``folder``'s lock for the block: created (with the folder) on entry, removed on exit.

    Args:
        folder: the run folder; created with its parents if missing.
        rank: the process's rank; only rank 0 takes the lock (the block runs without one else).
        command: what the lock file records as the owner's command; default ``sys.argv``.

    Raises:
        OutputFolderError: the folder is in use by a live process (the message names it), or a
            stale lock is there (the message gives the command that clears it).

    Examples:
        >>> import json, os, tempfile
        >>> from pathlib import Path
        >>> from metabin_layers.reid.lock import LOCK_NAME, run_lock
        >>> folder = Path(tempfile.mkdtemp())
        >>> with run_lock(folder):
        ...     json.loads((folder / LOCK_NAME).read_text())["pid"] == os.getpid()
        True
    """
    if rank != 0:
        yield
        return
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        raise _refusal(folder, path) from None
    owner = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command if command is not None else " ".join(shlex.quote(a) for a in sys.argv),
    }
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(owner) + "\n")
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    try:
        yield
    finally:
        # Only our own lock: never one another process made after ours was cleared by hand.
        if _read(path).get("pid") == owner["pid"] and _read(path).get("host") == owner["host"]:
            path.unlink(missing_ok=True)
