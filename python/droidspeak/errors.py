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


class LimitExceededError(InvalidRequestError):
    """A request asks for more than a configured limit allows (HTTP 400); `field`
    names the request field and `limit` the config field that bounds it."""

    def __init__(self, message: str, field: str, limit: str):
        super().__init__(message, field)
        self.limit = limit


class QueueFullError(DroidspeakError):
    """The server holds as much queued work as it may (HTTP 429 with Retry-After)."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class BodyTooLargeError(DroidspeakError):
    """The request body is over the server's size cap (HTTP 413)."""
