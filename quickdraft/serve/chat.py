"""Chat templates: the exported tokenizer's ``chat_template`` rendered with jinja2 the way
transformers' ``apply_chat_template`` does (a sandboxed environment with ``trim_blocks``
and ``lstrip_blocks``, ``raise_exception``, ``strftime_now``, a ``tojson`` that keeps
non-ASCII text, and the special tokens as variables)."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

__all__ = ["ChatTemplate", "ChatTemplateError", "load_chat_template"]


class ChatTemplateError(ValueError):
    """The messages cannot be rendered (the template refused them)."""


def _token(value) -> str | None:
    if isinstance(value, dict):  # an AddedToken as transformers saves it
        value = value.get("content")
    return value if isinstance(value, str) else None


class ChatTemplate:
    """A compiled chat template and the special tokens it may use."""

    def __init__(self, source: str, special_tokens: dict[str, str], origin: str):
        import jinja2
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                              separators=separators, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[loopcontrols])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.source = source
        self.origin = origin
        self.special_tokens = dict(special_tokens)
        self._template = env.from_string(source)  # jinja2.TemplateSyntaxError if broken

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        import jinja2

        try:
            return self._template.render(messages=messages,
                                         add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None, **self.special_tokens)
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"the chat template refused the messages: {e}") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            raise ChatTemplateError(
                f"the chat template failed on these messages: {type(e).__name__}: {e}"
            ) from None


def load_chat_template(folder: str | Path) -> tuple[ChatTemplate | None, str]:
    """The chat template of a model folder's tokenizer (``tokenizer_config.json``'s
    ``chat_template``, or a ``chat_template.jinja`` file), or None and why there is none."""
    folder = Path(folder)
    config_path = folder / "tokenizer_config.json"
    config: dict = {}
    if config_path.is_file():
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            return None, f"{config_path} is not readable JSON ({e})"
    source = config.get("chat_template") if isinstance(config, dict) else None
    origin = str(config_path)
    if isinstance(source, list):  # named templates: the default one
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    jinja_file = folder / "chat_template.jinja"
    if not isinstance(source, str) and jinja_file.is_file():
        source, origin = jinja_file.read_text(encoding="utf-8"), str(jinja_file)
    if not isinstance(source, str) or not source.strip():
        return None, (f"the model's tokenizer has no chat template ({config_path} has no "
                      "chat_template): use /v1/completions with a prompt, or add a "
                      "chat_template to that file")
    special = {}
    for name in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token",
                 "cls_token", "mask_token"):
        value = _token(config.get(name))
        if value is not None:
            special[name] = value
    special.setdefault("bos_token", "")
    special.setdefault("eos_token", "")
    return ChatTemplate(source, special, origin), ""
