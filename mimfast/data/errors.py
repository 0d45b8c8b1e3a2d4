"""Errors of :mod:`mimfast.data`: each names, in ``key``, the :class:`~mimfast.data.DataConfig` field or the
:func:`~mimfast.data.build_loader` argument at fault, so a launcher can restate it with its own config key."""

from __future__ import annotations

__all__ = ["DataError", "DataPathError", "DataValueError", "UndecodableImageError"]


class DataError(Exception):
    """A dataset, a loader argument or a sample is unusable. ``key`` names the :class:`DataConfig` field or the
    :func:`build_loader` argument at fault (``"root"``, ``"format"``, ``"batch_size"``, ``"state"``...)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


class DataValueError(DataError, ValueError):
    """A :class:`DataError` about a value (a ``ValueError``)."""


class DataPathError(DataError, FileNotFoundError):
    """A :class:`DataError` about a missing path (a ``FileNotFoundError``)."""


class UndecodableImageError(DataError, RuntimeError):
    """DALI could not decode a sample mid-epoch; ``paths`` lists the file(s) found responsible (may be empty when
    they could not be singled out, e.g. with webdataset shards)."""

    def __init__(self, message: str, paths: list[str]):
        super().__init__("root", message)
        self.paths = paths
