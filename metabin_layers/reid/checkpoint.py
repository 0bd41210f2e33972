"""Recipe checkpoints that are safe to load: tensors and plain types only, versioned, checksummed.

A checkpoint file is ``torch.save`` of::

    {"format": "metabin-reid-checkpoint", "format_version": 1, "checksum": "<sha256 hex>", "state": {...}}

``state`` holds only tensors and plain Python values (dict, list, tuple, str, int, float, bool,
None): the random number generator states of numpy, Python and CUDA are stored as tensors (see
``capture_rng_state``). ``load_checkpoint`` reads with ``torch.load(weights_only=True)``,
so a file that would need to unpickle any other object (which could run code) is refused before
anything of it is used, and then compares the checksum of every tensor and value with the one
stored: a modified or damaged file is refused. Every refusal is a
``CheckpointError`` that names the file and says why.

``save_checkpoint`` writes to a temporary file in the same folder, syncs it and renames it
over the destination, so an interrupted save leaves the previous checkpoint (or none) intact.

Examples:
    >>> from pathlib import Path
    >>> from metabin_layers.reid.checkpoint import load_checkpoint, save_checkpoint
    >>> import tempfile, torch
    >>> path = Path(tempfile.mkdtemp()) / "checkpoint.pt"
    >>> save_checkpoint({"iteration": 3, "weights": torch.ones(2)}, path)
    >>> load_checkpoint(path)["iteration"]
    3
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import struct
import zipfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from .disk import disk_error, find_disk_error
from .errors import CheckpointError

__all__ = ["FORMAT", "FORMAT_VERSION", "save_checkpoint", "load_checkpoint", "capture_rng_state", "restore_rng_state"]

FORMAT = "metabin-reid-checkpoint"
"""The ``"format"`` header of every checkpoint file; a file without it is refused."""
FORMAT_VERSION = 1
"""The checkpoint format version this library writes and reads; other versions are refused."""

_PLAIN = (str, int, float, bool, type(None))


def _digest(value: Any, h: Any, where: str) -> None:
    """Feed ``value`` into the hash ``h``, refusing anything but tensors and plain values."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(value, dict):
        h.update(f"D{len(value)}".encode())
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"checkpoint keys must be str or int, got {type(key).__name__} at {where}")
            h.update(f"K{key!r}".encode())
            _digest(item, h, f"{where}.{key}")
    elif isinstance(value, (list, tuple)):
        h.update(f"{'L' if isinstance(value, list) else 'U'}{len(value)}".encode())
        for i, item in enumerate(value):
            _digest(item, h, f"{where}[{i}]")
    elif isinstance(value, float):
        h.update(b"F" + struct.pack("<d", value))
    elif isinstance(value, _PLAIN):
        h.update(f"P{type(value).__name__}{value!r}".encode())
    else:
        raise TypeError(f"checkpoint state must hold only tensors and plain values, got {type(value).__name__} at {where}")


def checksum(state: Any) -> str:
    """SHA-256 over every tensor (dtype, shape, bytes) and plain value of ``state``, in order.

    Args:
        state: tensors and plain values (dict with str or int keys, list, tuple, str, int,
            float, bool, None), nested at will.

    Returns:
        The hex digest (64 characters); equal states (same keys in the same order, same values,
        same tensor dtypes and shapes) give equal digests.

    Raises:
        TypeError: ``state`` holds another kind of object; the message gives where.

    Examples:
        >>> from metabin_layers.reid.checkpoint import checksum
        >>> import torch
        >>> checksum({"w": torch.zeros(2)}) == checksum({"w": torch.zeros(2)})
        True
        >>> checksum({"w": torch.zeros(2)}) == checksum({"w": torch.zeros(2, dtype=torch.float64)})
        False
    """
    h = hashlib.sha256()
    _digest(state, h, "state")
    return h.hexdigest()


def save_checkpoint(state: dict[str, Any], path: Union[str, Path]) -> None:
    """Write ``state`` (tensors and plain values only) atomically to ``path``, with its checksum.

    Args:
        state: the values to save: a dict of tensors and plain Python values (dict with str or
            int keys, list, tuple, str, int, float, bool, None), nested at will.
        path: the checkpoint file; replaced in one rename, so an interrupted save leaves the
            previous file intact (and no temporary file).

    Raises:
        TypeError: ``state`` holds another kind of object (a numpy array, a custom class, ...).
        DiskError: the disk is full, read-only or over quota: one line naming ``path`` and the
            space left; the previous file is intact.
        KeyboardInterrupt: Ctrl-C came while writing, also when torch's writer then failed
            because of it.

    Examples:
        >>> from metabin_layers.reid.checkpoint import load_checkpoint, save_checkpoint
        >>> import tempfile
        >>> from pathlib import Path
        >>> import torch
        >>> path = Path(tempfile.mkdtemp()) / "last.pt"
        >>> save_checkpoint({"iteration": 7, "rho": torch.full((2,), 0.5)}, path)
        >>> sorted(load_checkpoint(path))
        ['iteration', 'rho']
    """
    path = Path(path)
    payload = {"format": FORMAT, "format_version": FORMAT_VERSION, "checksum": checksum(state), "state": state}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as err:
        # Ctrl-C inside torch.save makes its zip writer fail on the way out ("unexpected pos"):
        # report the interrupt, not that consequence of it. A full disk does the same.
        if _caused_by_interrupt(err):
            raise KeyboardInterrupt from err
        disk = find_disk_error(err)
        if disk is not None:
            raise disk_error(path, disk) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)


def _caused_by_interrupt(err: BaseException) -> bool:
    seen: set[int] = set()
    cause: Optional[BaseException] = err
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, KeyboardInterrupt):
            return True
        seen.add(id(cause))
        cause = cause.__context__
    return False


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
#: What torch's safe unpickler says of an object it refuses to build (a global it does not allow).
_UNSAFE = re.compile(r"Unsupported global: GLOBAL ([A-Za-z_][\w.]*) was not an allowed global")
_PICKLE_PROTOCOL = b"\x80"  # the first byte of a pickle of protocol 2 or later (torch's legacy format)


def _why_unreadable(path: Path, err: BaseException) -> str:
    """Why ``torch.load`` refused ``path``: unsafe (it would build other objects) or damaged.

    torch reports both as an unpickling error; only a well-formed archive or pickle that names a
    global can be unsafe. Its advice on how to load the file anyway and its ANSI codes are left out.
    """
    text = _ANSI.sub("", str(err))
    unsafe = _UNSAFE.search(text)
    if unsafe is not None:
        return (
            "refused, it holds objects other than tensors and plain values, which could run code when "
            f"loaded (Unsupported global: GLOBAL {unsafe.group(1)})"
        )
    with open(path, "rb") as f:
        head = f.read(4)
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
        except (zipfile.BadZipFile, OSError, EOFError) as zip_err:
            return f"damaged: the zip archive cannot be read ({_first_line(zip_err)}): the file is corrupt or truncated"
        if bad is not None:
            return f"damaged: bad checksum of {bad} in the zip archive: the file is corrupt or truncated"
        return f"damaged: not a readable checkpoint ({_first_line(err)})"
    if not head.startswith(_PICKLE_PROTOCOL):
        return "damaged: neither a zip archive nor a pickle (not a checkpoint, or a corrupt or truncated one)"
    return f"damaged: the pickle cannot be read ({_first_line(err)}): the file is corrupt or truncated"


def _first_line(err: BaseException) -> str:
    text = _ANSI.sub("", str(err)).strip()
    if "WeightsUnpickler error:" in text:  # torch's own reason, without its advice around it
        text = text.split("WeightsUnpickler error:", 1)[1]
    return text.strip().splitlines()[0].strip() if text.strip() else type(err).__name__


def load_checkpoint(path: Union[str, Path]) -> dict[str, Any]:
    """The ``state`` saved by ``save_checkpoint``, after checking format, version and checksum.

    Loads on the CPU with ``weights_only=True``.

    Args:
        path: a file written by ``save_checkpoint``.

    Returns:
        The saved ``state`` dict, its tensors on the CPU.

    Raises:
        CheckpointError: the file is missing, empty, not a checkpoint of this format (or version),
            holds objects other than tensors and plain values, or fails the checksum; the message
            names the file.

    Examples:
        >>> from metabin_layers.reid.checkpoint import load_checkpoint, save_checkpoint
        >>> import tempfile
        >>> from pathlib import Path
        >>> import torch
        >>> path = Path(tempfile.mkdtemp()) / "last.pt"
        >>> save_checkpoint({"iteration": 7, "weights": torch.ones(2)}, path)
        >>> load_checkpoint(path)["weights"].tolist()
        [1.0, 1.0]
        >>> load_checkpoint(path.with_name("missing.pt"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        metabin_layers.reid.errors.CheckpointError: checkpoint ...missing.pt: no such file
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path}: no such file")
    if path.is_dir():
        raise CheckpointError(f"checkpoint {path}: is a folder, expected a checkpoint file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path}: the file is empty (an interrupted save?)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # whatever a damaged or unsafe file makes the reader raise
        raise CheckpointError(f"checkpoint {path}: {_why_unreadable(path, err)}") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(
            f"checkpoint {path}: not a metabin-reid checkpoint (no {FORMAT!r} header; files written "
            "before checkpoints carried a format version cannot be loaded safely)"
        )
    version = payload.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"checkpoint {path}: format version {version!r}, this version of metabin-layers reads {FORMAT_VERSION}"
        )
    state = payload.get("state")
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {path}: no state in the file")
    try:
        actual = checksum(state)
    except TypeError as err:
        raise CheckpointError(f"checkpoint {path}: {err}") from err
    if actual != payload.get("checksum"):
        raise CheckpointError(
            f"checkpoint {path}: checksum mismatch (stored {str(payload.get('checksum'))[:12]}..., "
            f"computed {actual[:12]}...): the file was damaged or modified after it was written"
        )
    return state


# -- random number generators as tensors ---------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """The torch, CUDA, numpy and Python global RNG states, as tensors and plain values.

    CUDA states are included only when CUDA is initialised in this process.

    Returns:
        A dict with keys ``"torch"``, ``"numpy"``, ``"python"`` (and ``"cuda"``) that
        ``save_checkpoint`` accepts and ``restore_rng_state`` reads back.

    Examples:
        >>> from metabin_layers.reid.checkpoint import capture_rng_state, restore_rng_state
        >>> import random
        >>> state = capture_rng_state()
        >>> a = random.random(); restore_rng_state(state); a == random.random()
        True
    """
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    version, py_state, py_gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "name": str(name),
            "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "python": {"version": int(version), "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Set the global RNGs from ``capture_rng_state``'s result (CUDA when present and usable).

    The CUDA states are restored only when the saved number of devices matches this process's.

    Args:
        state: a dict returned by ``capture_rng_state`` (possibly through ``save_checkpoint`` and
            ``load_checkpoint``).

    Examples:
        >>> from metabin_layers.reid.checkpoint import capture_rng_state, restore_rng_state
        >>> import torch
        >>> state = capture_rng_state()
        >>> first = torch.rand(2)
        >>> restore_rng_state(state)
        >>> torch.equal(torch.rand(2), first)
        True
    """
    torch.set_rng_state(state["torch"])
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state((npy["name"], keys, int(npy["pos"]), int(npy["has_gauss"]), float(npy["gauss"])))
    py = state["python"]
    random.setstate((int(py["version"]), tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
        torch.cuda.set_rng_state_all(cuda)
