"""Rollout engines: one interface, a JAX sampler in-process, an HTTP sidecar client, vLLM.

The sidecar client and ``VllmEngine`` are imported on first use
(``jaxalign.rollout.SidecarEngine``): ``python -m jaxalign.rollout.server`` then runs the
server module once (not also as a package import), and ``VllmEngine`` imports vllm only
when constructed, so this package never needs vllm installed.
"""

from jaxalign.rollout.jax_engine import JaxEngine
from jaxalign.rollout.types import Completion, RolloutEngine, SamplingParams

__all__ = [
    "Completion",
    "JaxEngine",
    "RolloutEngine",
    "SamplingParams",
    "SidecarEngine",
    "SidecarError",
    "VllmEngine",
    "WeightsVersionError",
]

_LAZY = {
    "SidecarEngine": "jaxalign.rollout.client",
    "SidecarError": "jaxalign.rollout.client",
    "WeightsVersionError": "jaxalign.rollout.client",
    "VllmEngine": "jaxalign.rollout.vllm_engine",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
