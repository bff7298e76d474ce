"""Errors the user fixes (a setting, the data, a folder in use) rather than bugs: the CLI prints
their message, which says what to do, without a traceback. Each also is the built-in error it
stands for, so that ``except ValueError`` and the like still catch it."""

from __future__ import annotations


class UsageError(Exception):
    """A problem with the settings, the data or the run folder; the message says what to do."""

    def __str__(self) -> str:  # KeyError quotes its message; these print it as written
        return str(self.args[0]) if self.args else ""


class SettingsError(UsageError, ValueError):
    """Settings, samples or data other than a run folder's records were made with."""


class MissingColumn(UsageError, KeyError):
    """A column the benchmark's config names is not in its rows."""


class MissingFiles(UsageError, FileNotFoundError):
    """No rows where ``dataset.path`` points."""


class FolderBusy(UsageError, RuntimeError):
    """Another process writes the run folder."""


class RunStopped(UsageError, RuntimeError):
    """The run stopped on failures that point at the model or the device; the records are kept."""


class LoadError(UsageError, OSError):
    """The backbone's checkpoint could not be loaded."""
