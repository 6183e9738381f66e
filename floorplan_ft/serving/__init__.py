"""Chat clients (OpenAI, Gemini, OpenAI-compatible servers, the local student) and OpenAI
embeddings behind one interface. Provider SDKs are imported by the modules that need them."""

from floorplan_ft.serving.base import (
    AuthError,
    BadRequest,
    ChatResult,
    ConfigError,
    ConnectionFailed,
    InvalidOutput,
    LLMClient,
    LLMError,
    OutputTruncated,
    ProviderTimeout,
    RateLimitError,
    RateLimitInfo,
    Refusal,
    ServerError,
    TimeoutError_,
    Usage,
)
from floorplan_ft.serving.factory import make_chat_client, make_embedding_manager

__all__ = [
    "AuthError",
    "BadRequest",
    "ChatResult",
    "ConfigError",
    "ConnectionFailed",
    "InvalidOutput",
    "LLMClient",
    "LLMError",
    "OutputTruncated",
    "ProviderTimeout",
    "RateLimitError",
    "RateLimitInfo",
    "Refusal",
    "ServerError",
    "TimeoutError_",
    "Usage",
    "make_chat_client",
    "make_embedding_manager",
]
