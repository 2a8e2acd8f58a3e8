"""The Gemma chat format, implemented natively (no template engine runs on file contents).

Rendered form (reference: transformers-gemma3.md §4.4; llama.cpp's built-in ``gemma``)::

    <bos><start_of_turn>user
    {system}\n\n{user}<end_of_turn>
    <start_of_turn>model
    {assistant}<end_of_turn>
    <start_of_turn>model

A leading system message is folded into the first user turn; ``assistant`` is spelled ``model``;
each text item is stripped (the system text is not, as in the reference template); image items become ``<start_of_image>``; roles must alternate user/model.
The result is a list of segments ``(text, is_markup)``: markup is tokenized with special tokens
parsed, user text without, so a message cannot smuggle control tokens into the prompt.
"""

from __future__ import annotations

from typing import Any

Segment = tuple[str, bool]


def _content_parts(content: Any, role: str) -> list[tuple[str, Any]]:
    """-> [("text", str) | ("image", obj)]"""
    if isinstance(content, str):
        return [("text", content)]
    if not isinstance(content, list):
        raise TypeError(f"{role} message content must be a str or a list of items, "
                        f"got {type(content).__name__}")
    parts = []
    for item in content:
        if not isinstance(item, dict) or "type" not in item:
            raise TypeError(f"content items are dicts with a 'type', got {item!r}")
        if item["type"] == "text":
            text = item.get("text", "")
            if not isinstance(text, str):
                raise TypeError(f"a text item's 'text' must be a str, got {type(text).__name__}")
            parts.append(("text", text))
        elif item["type"] == "image":
            img = item.get("image", item.get("url", item.get("path")))
            if img is None:
                raise ValueError("an image item needs an 'image' value")
            parts.append(("image", img))
        else:
            raise ValueError(f"unknown content item type {item['type']!r}")
    return parts


def render(messages: list[dict[str, Any]], add_generation_prompt: bool = True
           ) -> tuple[list[Segment], list[Any]]:
    """-> (segments, images in order). BOS is not included (the tokenizer adds it)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts")
    for m in messages:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"each message needs 'role' and 'content', got {m!r}")
    system = None
    msgs = list(messages)
    if msgs[0]["role"] == "system":
        sys_parts = _content_parts(msgs[0]["content"], "system")
        if not sys_parts or sys_parts[0][0] != "text":
            raise ValueError("a system message must start with text")
        system = sys_parts[0][1]  # the reference template uses the first text item, untrimmed
        msgs = msgs[1:]
    if not msgs:
        raise ValueError("a conversation needs a user message")
    segs: list[Segment] = []
    images: list[Any] = []
    for i, m in enumerate(msgs):
        role = {"assistant": "model"}.get(m["role"], m["role"])
        if role not in ("user", "model"):
            raise ValueError(f"message {i}: role must be 'system' (first only), 'user' or "
                             f"'assistant'/'model', got {m['role']!r}")
        if (role == "user") != (i % 2 == 0):
            raise ValueError(f"message {i}: roles must alternate user/assistant starting with "
                             f"user, got {m['role']!r}")
        segs.append((f"<start_of_turn>{role}\n", True))
        if i == 0 and system is not None:
            segs.append((system + "\n\n", False))
        for kind, val in _content_parts(m["content"], role):
            if kind == "image":
                segs.append(("<start_of_image>", True))
                images.append(val)
            elif val.strip():
                segs.append((val.strip(), False))
        segs.append(("<end_of_turn>\n", True))
    if add_generation_prompt:
        segs.append(("<start_of_turn>model\n", True))
    return segs, images


def render_text(messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """The prompt as one string (without BOS), e.g. for display."""
    segs, _ = render(messages, add_generation_prompt)
    return "".join(t for t, _ in segs)
