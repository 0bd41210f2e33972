"""Errors of the recipe that are the user's to fix (a file, a folder, a config key, a dataset).

The ``metabin-reid`` command prints them as one line (``metabin-reid: error: ...``) and exits
with status 2 instead of showing a traceback; used as a library they are ordinary ``ValueError``.
"""

from __future__ import annotations

__all__ = ["RecipeError", "CheckpointError", "OutputFolderError", "DataError"]


class RecipeError(ValueError):
    """A problem with the inputs of a recipe run, reported by the CLI as one line."""


class CheckpointError(RecipeError):
    """A checkpoint that is missing, empty, corrupt, of another format, or not safe to load."""


class OutputFolderError(RecipeError):
    """An output folder that holds an earlier run (use ``--overwrite`` or ``--resume``)."""


class DataError(RecipeError):
    """A dataset that cannot feed the run (an empty query or gallery, too few identities, ...)."""
