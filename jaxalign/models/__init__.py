"""Models: the Qwen2 port, Hugging Face checkpoint conversion and LoRA adapters."""

from jaxalign.models.hf_io import (
    CheckpointError,
    from_pretrained,
    load_config,
    load_tokenizer,
    save_pretrained,
)
from jaxalign.models.lora import (
    LoraConfig,
    apply_lora,
    frozen_filter,
    lora_filter,
    merge_lora,
    strip_lora,
)
from jaxalign.models.lora_io import load_adapter, save_adapter
from jaxalign.models.qwen2 import (
    Qwen2Config,
    Qwen2ForCausalLM,
    abstract_model,
    init_model,
    qwen2p5_0p5b,
    qwen2p5_7b,
    qwen2p5_math_1p5b,
    tiny,
)

__all__ = [
    "CheckpointError",
    "LoraConfig",
    "Qwen2Config",
    "Qwen2ForCausalLM",
    "abstract_model",
    "apply_lora",
    "from_pretrained",
    "frozen_filter",
    "init_model",
    "load_adapter",
    "load_config",
    "load_tokenizer",
    "lora_filter",
    "merge_lora",
    "qwen2p5_0p5b",
    "qwen2p5_7b",
    "qwen2p5_math_1p5b",
    "save_adapter",
    "save_pretrained",
    "strip_lora",
    "tiny",
]
