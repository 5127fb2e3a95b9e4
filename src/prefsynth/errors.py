"""Errors users see: each names the file, field or endpoint at fault and never a secret."""


class PrefsynthError(Exception):
    """Base class: the CLI prints these without a traceback and exits with code 2."""


class ConfigError(PrefsynthError):
    """The pipeline config is missing a field or has a bad value."""


class InputError(PrefsynthError):
    """A prompt file or dataset cannot be read (names the file and line)."""


class EndpointError(PrefsynthError):
    """A model endpoint cannot be reached or answered with an error."""


class ModelFileError(PrefsynthError):
    """A local GGUF model file is missing or cannot be served."""


class WarehouseError(PrefsynthError):
    """A warehouse file cannot be created or opened (names the file, what happened and the way out)."""


class ExportError(PrefsynthError):
    """An export target cannot be written (names the folder or file)."""


class RunFailed(PrefsynthError):
    """A run ended without its result: it produced no responses or scores, or items failed and the config sets
    `failures_fatal`. The flow raises it (so its Prefect state is Failed); `summary` is the run's summary."""

    def __init__(self, message: str, summary: object = None) -> None:
        super().__init__(message)
        self.summary = summary

    def __reduce__(self) -> tuple[type, tuple[str, object]]:  # Prefect pickles a failed flow's exception
        return type(self), (str(self), self.summary)


class DeployError(PrefsynthError):
    """A deployment cannot be registered or served: no Prefect server, a bad schedule or work pool."""


def not_utf8(path: object, data: bytes) -> str:
    """'PATH:LINE: not UTF-8 text (byte N: ...)' for a file whose bytes `data` do not decode."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        return (f"{path}:{line}: not UTF-8 text (byte {err.start}: {data[err.start:err.start + 1]!r}); "
                "save the file as UTF-8")  # fmt: skip
    return f"{path}: not UTF-8 text; save the file as UTF-8"


def reason(err: ValueError) -> str:
    """The first message of a pydantic ValidationError (a validator's own words), else the error's text."""
    errors = getattr(err, "errors", None)
    return str(errors()[0]["msg"]).removeprefix("Value error, ") if errors else str(err)
