"""`atlas-eval`: evaluation suites for Atlas or any OpenAI-compatible server.

Suites (perplexity, generation, hallucination, latency) are data + TOML config in this
package and talk to servers only over HTTP; scores come from metric plugins looked up by
name in the Atlas plugin registry. See docs/evaluation.md.
"""

from __future__ import annotations

from .errors import (
    AuthenticationError,
    CapabilityError,
    EvalError,
    ResultsError,
    ServerRequestError,
    ServerUnreachableError,
    SuiteConfigError,
)

__all__ = [
    "AuthenticationError",
    "CapabilityError",
    "EvalError",
    "ResultsError",
    "ServerRequestError",
    "ServerUnreachableError",
    "SuiteConfigError",
]
