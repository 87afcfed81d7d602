"""Exception types that the command line reports as one line, without a traceback."""


class DfkdError(Exception):
    """Base class for errors caused by user input (config, checkpoint, dataset, name)."""


class ConfigError(DfkdError, ValueError):
    """A config file or override is malformed: unknown key, wrong type, bad value."""


class UnknownNameError(DfkdError, KeyError):
    """A registry lookup failed (model, dataset, loss term, method ...)."""

    def __str__(self) -> str:  # KeyError would otherwise wrap the message in quotes
        return str(self.args[0]) if self.args else ""


class DatasetNotFoundError(DfkdError, FileNotFoundError):
    """A dataset's files are missing; the message says where we looked and how to get them."""


class CheckpointError(DfkdError):
    """A checkpoint is missing, corrupt, unsafe, or belongs to another experiment."""


class ShapeError(DfkdError, ValueError):
    """Two parts of an experiment disagree on tensor shapes (generator vs teacher input, ...)."""


class DivergenceError(DfkdError):
    """A loss became NaN or infinite, or a state failed its health check."""


class RunInUseError(DfkdError):
    """Another process is training in the run folder."""


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type's name when it has none): how a foreign
    library's error is quoted inside a one-line dfkd error."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__
