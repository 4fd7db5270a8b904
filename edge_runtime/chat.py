"""Chat messages -> prompt text, with the chat template stored in the GGUF.

The template is Jinja (the Hugging Face convention), rendered in a sandbox the
way transformers does it, so the edge needs jinja2 but not transformers. A GGUF
without a template falls back to ChatML, which is what most small instruct
models use.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from edge_runtime.errors import invalid

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] "
          "+ '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
ROLES = ("system", "developer", "user", "assistant", "tool")


def _raise(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


class ChatTemplate:
    """A compiled chat template plus the special-token strings it may refer to."""

    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source or CHATML
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self._template = env.from_string(self.source)
        self.bos_token = bos_token
        self.eos_token = eos_token

    def render(self, messages: list[dict[str, Any]]) -> str:
        """Prompt text for `messages` (already validated), ending with the assistant's turn."""
        try:
            return self._template.render(messages=messages, add_generation_prompt=True,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.exceptions.TemplateError as e:
            raise invalid(f"the model's chat template rejected the messages: {e}", "messages") from None


def normalize_messages(raw: Any) -> list[dict[str, Any]]:
    """Check OpenAI chat messages and flatten text-part lists into strings."""
    if not isinstance(raw, list) or not raw:
        raise invalid("'messages' must be a non-empty array", "messages")
    out = []
    for i, m in enumerate(raw):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise invalid(f"{where} must be an object", where)
        role = m.get("role")
        if role not in ROLES:
            raise invalid(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}", f"{where}.role")
        content = m.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise invalid(f"{where}.content[{j}] must be a text part "
                                  "({\"type\": \"text\", \"text\": ...}); this model reads text only",
                                  f"{where}.content")
                parts.append(part["text"])
            content = "".join(parts)
        if not isinstance(content, str):
            raise invalid(f"{where}.content must be a string or an array of text parts", f"{where}.content")
        msg: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": content}
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        out.append(msg)
    return out
