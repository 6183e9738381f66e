"""The analysis service's own errors; the API maps each to its HTTP status (provider errors stay
`LLMError`s)."""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base of the service's own errors (provider errors stay `LLMError`s)."""


class InvalidInput(ServiceError):
    """The request does not validate. `errors`: ``[{"loc": [...], "msg": ..., "type": ...}]``
    with locations starting at the input's name (``topology``, ``analysis``, ``question``)."""

    def __init__(self, errors: list[dict[str, Any]]):
        self.errors = errors
        super().__init__("; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in errors))


class RetrievalUnavailable(ServiceError):
    """The embedding backend or the vector store failed or timed out."""

    retryable = True


class InvalidImage(ServiceError):
    """An uploaded plan that is not a decodable image (HTTP 400)."""


class UploadTooLarge(ServiceError):
    """An upload over ``serving.max_upload_mb`` (HTTP 413)."""


class ServiceBusy(ServiceError):
    """No model slot for this call: the queue is full, the wait for a slot passed
    ``serving.timeout_s``, or the service is stopping (HTTP 503 with Retry-After)."""

    retryable = True

    def __init__(self, message: str, *, retry_after: float):
        super().__init__(message)
        self.retry_after = retry_after


class PromptTooLarge(ServiceError):
    """The prompt built from this input does not fit the model with its output budget (HTTP 413)."""

    def __init__(self, message: str, *, prompt_tokens: int | None = None, context: int | None = None):
        super().__init__(message)
        self.prompt_tokens = prompt_tokens
        self.context = context


class CVFailed(ServiceError):
    """The CV source failed on an uploaded plan. `status`: 503 when trying again may help (a
    timeout, an unreachable endpoint), 502 when it answered badly (a failed job, a graph that does
    not read)."""

    def __init__(self, message: str, *, status: int = 502, retryable: bool = False):
        super().__init__(message)
        self.status = status
        self.retryable = retryable
