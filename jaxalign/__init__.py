"""jaxalign: SFT, Expert Iteration and GRPO for Qwen2-family models in JAX/Flax NNX."""

__version__ = "0.1.0"
