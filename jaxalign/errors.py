"""``ConfigError`` and ``check``: a config value that cannot work, with a message that says
what to change.

Their own leaf module (no third-party import) so that code which also runs in the vLLM
sidecar's environment (the model, hf_io, LoRA) can raise them without importing
``jaxalign.config`` and its ml_collections, which that environment does not install.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value that cannot work; the message says what to change."""


def check(condition: bool, message: str) -> None:
    """Raises ``ConfigError(message)`` unless ``condition`` holds."""
    if not condition:
        raise ConfigError(message)
