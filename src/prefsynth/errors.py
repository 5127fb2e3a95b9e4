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
