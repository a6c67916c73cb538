"""The embedded GLM-4.7-Flash engine."""

from glmcode.engine.llm import LLM, Completion, RequestStats, StreamOutput
from glmcode.engine.sampler import SamplingParams

__all__ = ["LLM", "Completion", "RequestStats", "SamplingParams", "StreamOutput"]
