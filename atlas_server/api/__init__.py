"""The OpenAI-compatible HTTP API (Litestar + msgspec): routes, errors, SSE, metrics, auth."""

from .app import create_app
from .errors import APIError, RequestError
from .state import Augmentation, PromptAugmenter, ServerState

__all__ = [
    "APIError",
    "Augmentation",
    "PromptAugmenter",
    "RequestError",
    "ServerState",
    "create_app",
]
