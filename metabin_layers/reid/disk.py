"""Disk errors while saving: a full disk, a read-only one, an exhausted quota, told in one line.

``disk_error`` turns the ``OSError`` (``ENOSPC``, ``EROFS``, ``EDQUOT``) into a ``DiskError``
naming the file, the system's reason and the space left; ``find_disk_error`` digs it out of what
a writer raised around it (torch's zip writer reports a failed write as ``RuntimeError: ...
unexpected pos``). Every file of a run is written to a temporary file and renamed over the old
one, so the previous checkpoint and results are intact when a save fails.

Examples:
    >>> from metabin_layers.reid.disk import format_size
    >>> format_size(123), format_size(5 * 1024**2)
    ('123 B', '5.0 MiB')
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterator, Optional, Union

from .errors import DiskError

__all__ = ["DISK_ERRNOS", "atomic_path", "disk_error", "find_disk_error", "format_size"]

#: The errors of a disk that cannot take the file: full, read-only, over quota.
DISK_ERRNOS = frozenset(code for code in (errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", None)) if code is not None)


def format_size(n: int) -> str:
    """``n`` bytes as ``"<n> B"`` or with one decimal in KiB, MiB, GiB or TiB.

    Examples:
        >>> from metabin_layers.reid.disk import format_size
        >>> format_size(1536), format_size(3 * 1024**3)
        ('1.5 KiB', '3.0 GiB')
    """
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if value < 1024 or unit == "TiB":
            break
    return f"{value:.1f} {unit}"


def _free_space(path: Path) -> str:
    """The space left on the disk holding ``path`` (its nearest existing folder)."""
    folder = path if path.is_dir() else path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return f"{format_size(shutil.disk_usage(folder).free)} free on that disk"
    except OSError:
        return "free space unknown"


def disk_error(path: Union[str, os.PathLike], err: OSError) -> DiskError:
    """The one-line ``DiskError`` for ``err`` met while writing ``path``.

    Args:
        path: the file being written (its final name, not a temporary one).
        err: the ``OSError`` the write raised.

    Returns:
        ``DiskError("cannot write <path>: <reason> (<free> free on that disk); ...")``.

    Examples:
        >>> import errno
        >>> from metabin_layers.reid.disk import disk_error
        >>> str(disk_error("/out/results.json", OSError(errno.EROFS, "Read-only file system"))).split(" (")[0]
        'cannot write /out/results.json: Read-only file system'
    """
    path = Path(path)
    reason = err.strerror or os.strerror(err.errno) if err.errno else str(err)
    return DiskError(
        f"cannot write {path}: {reason} ({_free_space(path)}); what was saved before is intact: "
        "free some space (or choose another --output) and run again"
    )


def find_disk_error(err: BaseException) -> Optional[OSError]:
    """The ``OSError`` of a full, read-only or over-quota disk in ``err`` or what caused it, if any."""
    seen: set[int] = set()
    cause: Optional[BaseException] = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, OSError) and cause.errno in DISK_ERRNOS:
            return cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__
    return None


@contextlib.contextmanager
def atomic_path(path: Union[str, os.PathLike]) -> Iterator[Path]:
    """A temporary name beside ``path`` to write to; renamed over ``path`` when the block ends.

    The temporary name keeps ``path``'s extension (writers that pick the format from it, such as
    PIL and matplotlib, still do). A failed write leaves the old file intact and no temporary
    file; a full, read-only or over-quota disk raises ``DiskError`` naming ``path``.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from metabin_layers.reid.disk import atomic_path
        >>> path = Path(tempfile.mkdtemp()) / "plot.png"
        >>> with atomic_path(path) as tmp:
        ...     _ = tmp.write_bytes(b"png")
        >>> path.read_bytes(), sorted(p.name for p in path.parent.iterdir())
        (b'png', ['plot.png'])
    """
    path = Path(path)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except Exception as err:
        disk = find_disk_error(err)
        if disk is not None:
            raise disk_error(path, disk) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)
