"""Typed errors. Each user-facing one says what was wrong and what is allowed;
the HTTP layer maps them to 4xx responses."""


class DroidspeakError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidRequestError(DroidspeakError, ValueError):
    """A request field is malformed or out of range (HTTP 400)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class ModelNotFoundError(DroidspeakError, LookupError):
    """A model path or model name does not exist (HTTP 404)."""


class UnsupportedModelError(DroidspeakError, ValueError):
    """The model exists but its architecture or format is not supported."""


class PromptTooLongError(InvalidRequestError):
    """The prompt does not fit the context window or the KV pool."""
