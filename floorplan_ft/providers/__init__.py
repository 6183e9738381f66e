"""Provider clients behind one interface: chat (OpenAI, Gemini, OpenAI-compatible servers such as
vLLM, the local student) and embeddings (local, OpenAI, RunPod). Provider SDKs are imported by the
modules that need them."""

from floorplan_ft.providers.base import (
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
from floorplan_ft.providers.factory import make_chat_client, make_embedding_manager

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
