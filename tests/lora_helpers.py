"""LoRA test helpers shared by the model, engine and sidecar tests."""

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign.models import lora


def randomize_adapters(model, seed=1, std=0.1):
    """Nonzero A and B everywhere (a fresh adapter has B = 0 and changes nothing)."""
    rng = np.random.default_rng(seed)
    for mod in lora.lora_modules(model).values():
        for var in (mod.lora_A, mod.lora_B):
            value = jnp.asarray(std * rng.standard_normal(var.shape), var.dtype)
            sharding = getattr(var[...], "sharding", None)
            var.set_value(jax.device_put(value, sharding) if sharding is not None else value)
    return model


def adapted(model, seed, rank=4, alpha=8.0, std=0.3):
    """``model`` with rank-``rank`` adapters on every projection, A and B random."""
    return randomize_adapters(lora.apply_lora(model, lora.LoraConfig(rank=rank, alpha=alpha)),
                              seed=seed, std=std)
