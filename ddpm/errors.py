"""The errors ddpm raises for bad input or a bad environment: each says what is wrong and how to fix
it, and the entry points (the ddpm CLI, the pipeline) report them as one line, exit 2. No MindSpore
here, so that anything can name them."""


class ConfigError(ValueError):
    """A params file or override that does not describe a valid configuration."""


class DataError(RuntimeError):
    """The dataset is missing, truncated or altered."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read back intact."""


class CheckpointWriteError(CheckpointError):
    """A checkpoint that cannot be written (full disk, unwritable directory); the previous one is intact."""


class DeviceError(RuntimeError):
    """The configured device cannot be used on this machine."""


class WorkerError(RuntimeError):
    """A data-parallel training run (msrun) failed."""


class SampleRequestError(ValueError):
    """A sampling request outside the stated ranges; the message names every bad value and its range."""


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN or Inf loss."""


# What an entry point reports as one clear line rather than a traceback (flows adds its own).
USER_ERRORS = (
    ConfigError,
    DataError,
    CheckpointError,
    DeviceError,
    WorkerError,
    SampleRequestError,
    FloatingPointError,
    FileExistsError,
    FileNotFoundError,
    PermissionError,  # an unwritable or unreadable path (as root: a read-only mount)
    NotADirectoryError,  # a file where a directory should be
    IsADirectoryError,
)


def describe(e: BaseException) -> str:
    """The one line an entry point reports for a user error: an OS error on a path names the path and
    what to do about it; our own errors already say both."""
    if isinstance(e, OSError) and e.filename is not None:
        fix = (
            "check the path"
            if isinstance(e, FileNotFoundError)
            else "make it writable here, or clear what is in its way"
        )
        return f"{e.filename}: {e.strerror}; {fix}, then rerun"
    return str(e)
