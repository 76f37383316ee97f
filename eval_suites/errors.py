"""The errors `atlas-eval` reports to its user, as one line each.

Hierarchy (everything a user can fix derives from `EvalError`; the CLI prints
`error: <message>` and exits 1 for these, while any other exception is a bug and keeps its
traceback):

    EvalError
      ServerUnreachableError   nothing answers at the base URL (or it closed the connection)
      AuthenticationError      the server answered 401/403: missing or wrong API key
      CapabilityError          the server lacks something a suite needs (echo + logprobs,
                               /tokenize, streaming); the message names the suite
      ServerRequestError       any other non-2xx answer, with the server's own message
      SuiteConfigError         an unknown suite, an unknown or mistyped config key, a bad
                               option (--limit, --concurrency, an --output that holds a run)
      ResultsError             a results directory that cannot be read or is malformed, or
                               a compare --output that holds an earlier comparison
      CacheError               a response cache file that cannot be opened (a folder, not
                               SQLite, no permission)
      MetricError              a metric plugin that raised or returned no MetricResult, or
                               an installed plugin set the host refuses (a name clash)
"""

from __future__ import annotations

__all__ = [
    "AuthenticationError",
    "CacheError",
    "CapabilityError",
    "EvalError",
    "MetricError",
    "ResultsError",
    "ServerRequestError",
    "ServerUnreachableError",
    "SuiteConfigError",
]


class EvalError(Exception):
    """Base class: an error whose message is meant for the user."""


class ServerUnreachableError(EvalError):
    pass


class AuthenticationError(EvalError):
    pass


class CapabilityError(EvalError):
    pass


class ServerRequestError(EvalError):
    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class SuiteConfigError(EvalError):
    pass


class ResultsError(EvalError):
    pass


class CacheError(EvalError):
    pass


class MetricError(EvalError):
    pass
