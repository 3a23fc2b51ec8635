"""The exceptions sdatom raises on purpose.

The CLI catches only these: it prints the message as one line and exits with
``exit_code`` (2 for bad input or options, 1 for a failure of the run itself).
Messages name the file or option at fault and say what to do instead.
"""


class SdatomError(Exception):
    """Base class of every error sdatom raises deliberately."""

    exit_code = 1


class UsageError(SdatomError):
    """Bad input from the user: an option, a file, a folder, a model spec."""

    exit_code = 2


class ConfigError(UsageError):
    """An invalid configuration value or key (names the field path)."""


class NoTargetsMatchedError(ConfigError):
    """Target patterns matched no module of the model."""


class DataError(UsageError):
    """A subject folder or image that cannot be used."""


class ModelLoadError(UsageError):
    """A model spec that cannot be turned into a pipeline."""


class AdapterError(UsageError):
    """An adapter file that is missing, corrupt, foreign or for another base model."""


class CheckpointError(UsageError):
    """A checkpoint or resume path that holds no usable checkpoint."""


class TrainingError(SdatomError):
    """The run itself failed (for example the loss became NaN)."""


class Interrupted(SdatomError):
    """The user stopped the run (Ctrl-C, exit code 130) or the system did (SIGTERM, 143)
    after a checkpoint was saved. ``report`` is False on the processes of a multi-process run
    other than the main one: one message per run."""

    exit_code = 130

    def __init__(self, message: str, *, terminated: bool = False, report: bool = True) -> None:
        super().__init__(message)
        self.report = report
        if terminated:
            self.exit_code = 143


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (at most ``limit`` characters), or its type's
    name when it has none: what a one-line error message quotes."""
    text = str(e).strip().splitlines()
    return text[0][:limit] if text else type(e).__name__


def one_line(e: BaseException, limit: int = 300) -> str:
    """An exception's whole message joined onto one line (at most ``limit`` characters): for
    hub and transformers errors, whose first line alone rarely says what went wrong."""
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
