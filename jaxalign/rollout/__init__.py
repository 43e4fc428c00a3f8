"""Rollout engines: one interface, a JAX sampler in-process, and (later) an HTTP sidecar / vLLM."""

from jaxalign.rollout.jax_engine import JaxEngine
from jaxalign.rollout.types import Completion, RolloutEngine, SamplingParams

__all__ = ["Completion", "JaxEngine", "RolloutEngine", "SamplingParams"]
