"""Exceptions raised by library code; the CLI turns each into one red line and a non-zero exit."""


class RepaError(Exception):
    """Base class: a user-facing error with a message that says what to do."""


class ConfigError(RepaError):
    """An option or combination of options is invalid."""


class BadInputError(RepaError):
    """An input file (image, npz, tar member) cannot be used."""


class MissingWeightsError(RepaError):
    """Pretrained weights are neither on disk nor reachable; the message names the option to pass."""


class NotACacheError(RepaError):
    """A folder given as a cache is not one (no manifest, or a foreign manifest)."""


class CacheMismatchError(RepaError):
    """A cache does not fit what is asked of it (source, resolution, shapes, encoders, progress)."""


class CacheBusyError(RepaError):
    """Another job holds the lock on writing an array of the cache; the message names it."""


class OutputBusyError(RepaError):
    """Another job holds the lock of an output folder (e.g. sample-eval's --out); the message names it."""


class CorruptDataError(RepaError):
    """Bytes on disk differ from what was written (a checksum mismatch) or a file of a done shard is missing.

    `detail`: the damage alone, without the cache's path or the advice to run `cache verify` (which verify,
    reporting it, does not need)."""

    def __init__(self, message: str, detail: str | None = None):
        super().__init__(message)
        self.detail = detail or message


class CheckpointError(RepaError):
    """A checkpoint cannot be written or read (no space left, unreadable file)."""


class RunBusyError(RepaError):
    """Another `train` holds the lock of the run folder; the message names it."""


class ResourceLimitError(RepaError):
    """The process ran out of a machine resource (file descriptors: EMFILE/ENFILE): a limit, not damage."""
