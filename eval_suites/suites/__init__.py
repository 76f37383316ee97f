"""The registry of evaluation suites: name -> suite class."""

from __future__ import annotations

from .base import RunContext, Suite, SuiteResult
from .generation import GenerationSuite
from .hallucination import HallucinationSuite
from .instruct import InstructSuite
from .latency import LatencySuite
from .perplexity import PerplexitySuite
from .retrieval import RetrievalSuite

__all__ = ["SUITES", "RunContext", "Suite", "SuiteResult"]

SUITES: dict[str, type[Suite]] = {
    suite.name: suite
    for suite in (PerplexitySuite, GenerationSuite, HallucinationSuite, LatencySuite)
}
SUITES[InstructSuite.name] = InstructSuite
SUITES[RetrievalSuite.name] = RetrievalSuite
