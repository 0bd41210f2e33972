"""Errors of the recipe that are the user's to fix (a file, a folder, a config key, a dataset).

The ``metabin-reid`` command prints them as one line (``metabin-reid: error: ...``) and exits
with status 2 instead of showing a traceback; used as a library they are ordinary ``ValueError``.
"""

from __future__ import annotations

__all__ = ["RecipeError", "ConfigError", "CheckpointError", "OutputFolderError", "DataError", "DiskError"]


class RecipeError(ValueError):
    """A problem with the inputs of a recipe run, reported by the CLI as one line.

    The base class of the recipe's errors; a ``ValueError``, so library callers that catch
    ``ValueError`` keep working. Raised with one argument, the message, which names the file,
    folder, config key or dataset at fault.

    Examples:
        >>> from metabin_layers.reid.errors import DataError, RecipeError
        >>> try:
        ...     raise DataError("target viper (folder /data/viper): the query set is empty")
        ... except RecipeError as err:
        ...     print(f"metabin-reid: error: {err}")
        metabin-reid: error: target viper (folder /data/viper): the query set is empty
        >>> issubclass(RecipeError, ValueError)
        True
    """


class ConfigError(RecipeError):
    """A config value of the wrong type, out of range, or in conflict with another key.

    Raised by ``metabin_layers.reid.validation.validate_config`` (which ``TrainConfig`` runs when
    built) before any folder is created or any data is read; the message is one line,
    ``<key>=<value>: expected <what>``.

    Examples:
        >>> from metabin_layers.reid.config import TrainConfig
        >>> from metabin_layers.reid.errors import ConfigError
        >>> try:
        ...     TrainConfig(lr=-1.0)
        ... except ConfigError as err:
        ...     print(err)
        lr=-1.0: expected a finite number > 0
    """


class CheckpointError(RecipeError):
    """A checkpoint that is missing, empty, corrupt, of another format, or not safe to load.

    Raised by ``metabin_layers.reid.checkpoint.load_checkpoint``; the message names the file
    and says why it was refused.

    Examples:
        >>> import tempfile
        >>> from pathlib import Path
        >>> from metabin_layers.reid.checkpoint import load_checkpoint
        >>> from metabin_layers.reid.errors import CheckpointError
        >>> path = Path(tempfile.mkdtemp()) / "empty.pt"
        >>> _ = path.write_bytes(b"")
        >>> try:
        ...     load_checkpoint(path)
        ... except CheckpointError as err:
        ...     print(str(err).split(": ", 1)[1])
        the file is empty (an interrupted save?)
    """


class OutputFolderError(RecipeError):
    """An output folder that holds an earlier run (use ``--overwrite`` or ``--resume``).

    Also raised when the output path is an existing file rather than a folder.

    Examples:
        >>> from metabin_layers.reid.errors import OutputFolderError, RecipeError
        >>> err = OutputFolderError("output runs/bn: holds an earlier run (results.json)")
        >>> isinstance(err, RecipeError), str(err)
        (True, 'output runs/bn: holds an earlier run (results.json)')
    """


class DataError(RecipeError):
    """A dataset that cannot feed the run (an empty query or gallery, too few identities, ...).

    Raised by the checks of ``metabin_layers.reid.checks`` before the first iteration; the
    message names the dataset and the folder it was read from.

    Examples:
        >>> from metabin_layers.reid.checks import check_targets
        >>> from metabin_layers.reid.data import RecipeData, TargetSplit
        >>> from metabin_layers.reid.errors import DataError
        >>> data = RecipeData([(None, 0, 0, 0)], None, 1, 1, {"grid": [TargetSplit([0], [])]}, "")
        >>> try:
        ...     check_targets(data)
        ... except DataError as err:
        ...     print(err)
        target grid (synthetic data): the gallery set is empty
    """


class DiskError(RecipeError):
    """A file that could not be written: the disk is full, read-only, or over its quota.

    The message names the file, the system's reason and the space left on that disk; whatever
    was saved before (the previous checkpoint, earlier results) is intact, since every file of a
    run is written to a temporary file first and renamed over the old one.

    Examples:
        >>> import errno
        >>> from metabin_layers.reid.disk import disk_error
        >>> err = disk_error("runs/x/checkpoint.pt", OSError(errno.ENOSPC, "No space left on device"))
        >>> str(err).split(" (")[0]
        'cannot write runs/x/checkpoint.pt: No space left on device'
    """
