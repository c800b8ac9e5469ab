"""Exceptions for user errors: one line each, naming what was wrong and what is expected."""

from __future__ import annotations


class PyengineError(Exception):
    """Base class of every error caused by user input (the CLI exits 2 on these)."""


class OptionsError(PyengineError, ValueError):
    """A technique option is unknown or has a bad value."""


class PluginError(PyengineError):
    """A plugin is broken, missing, or registers a name another plugin owns."""


class StoreError(PyengineError):
    """An HDF5 file is not a pyengine store, is damaged, or does not match the request."""


class NotFoundError(PyengineError, KeyError):
    """A named technique, model, dataset or layer does not exist."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
