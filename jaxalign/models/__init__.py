"""Models: the Qwen2 port and Hugging Face checkpoint conversion."""

from jaxalign.models.hf_io import (
    CheckpointError,
    from_pretrained,
    load_config,
    load_tokenizer,
    save_pretrained,
)
from jaxalign.models.qwen2 import (
    Qwen2Config,
    Qwen2ForCausalLM,
    abstract_model,
    init_model,
    qwen2p5_0p5b,
    qwen2p5_math_1p5b,
    tiny,
)

__all__ = [
    "CheckpointError",
    "Qwen2Config",
    "Qwen2ForCausalLM",
    "abstract_model",
    "from_pretrained",
    "init_model",
    "load_config",
    "load_tokenizer",
    "qwen2p5_0p5b",
    "qwen2p5_math_1p5b",
    "save_pretrained",
    "tiny",
]
