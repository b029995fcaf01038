"""The ChatML conversation template of Keye-VL (Qwen2 style), as Jinja and as plain Python.

A message's content is a string or a list of parts {"type": "text", "text": ...},
{"type": "image"} or {"type": "video"}. Each image part becomes
`<|vision_start|><|image_pad|><|vision_end|>` and each video part
`<|vision_start|><|video_pad|><|vision_end|>`; the single pad is later expanded into the image's
or video's tokens (`vision_tokens.expand_vision_placeholders`). A conversation without a system
message gets "You are a helpful assistant.". The Jinja string is written into the shipped
tokenizer's `tokenizer_config.json` so `transformers`' `apply_chat_template` renders the same text
as `render_chat`.
"""

from __future__ import annotations

from megatron_keye.data.text.tokenizer import (
    IM_END,
    IM_START,
    IMAGE_PAD,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
)

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_PLACEHOLDER = f"{VISION_START}{IMAGE_PAD}{VISION_END}"
VIDEO_PLACEHOLDER = f"{VISION_START}{VIDEO_PAD}{VISION_END}"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}"
    + IMAGE_PLACEHOLDER
    + "{% elif part['type'] == 'video' %}"
    + VIDEO_PLACEHOLDER
    + "{% else %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _content_text(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ValueError(f"{where}: content must be a string or a list of parts")
    pieces = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            pieces.append(IMAGE_PLACEHOLDER)
        elif kind == "video":
            pieces.append(VIDEO_PLACEHOLDER)
        elif kind == "text" and isinstance(part.get("text"), str):
            pieces.append(part["text"])
        else:
            raise ValueError(f"{where}: part {index} must be text, image or video, got {part!r}")
    return "".join(pieces)


def render_chat(messages: list[dict], *, add_generation_prompt: bool = False) -> str:
    """The conversation as ChatML text, identical to rendering CHAT_TEMPLATE."""
    lines = []
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if not isinstance(role, str):
            raise ValueError(f"message {index}: needs a string 'role'")
        if index == 0 and role != "system":
            lines.append(f"{IM_START}system\n{DEFAULT_SYSTEM_PROMPT}{IM_END}\n")
        text = _content_text(message.get("content"), f"message {index}")
        lines.append(f"{IM_START}{role}\n{text}{IM_END}\n")
    if add_generation_prompt:
        lines.append(f"{IM_START}assistant\n")
    return "".join(lines)
