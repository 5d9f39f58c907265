"""Chat prompts: a checkpoint's chat template (``tokenizer_config.json``'s ``chat_template``)
rendered as transformers' ``apply_chat_template`` renders it.

A template is untrusted input (it comes with a downloaded checkpoint), so it runs in jinja2's
``ImmutableSandboxedEnvironment`` with the environment transformers builds: ``trim_blocks``,
``lstrip_blocks``, the ``loopcontrols`` extension, a ``tojson`` filter that does not escape HTML,
the globals ``raise_exception`` and ``strftime_now``, and transformers' hardened ``dict`` and
``namespace`` (no underscore-prefixed names). The ``{% generation %}`` tag (assistant-mask
tracking) is not supported. The template sees ``messages``,
``add_generation_prompt`` and the special tokens (``bos_token``, ``eos_token``, ...).
"""

from __future__ import annotations

import datetime
import json
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jaxinfer import validation


class ChatTemplateError(validation.InvalidArgument):
    """The chat template is missing, does not compile, or refused the messages."""


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict` for templates without the type's attributes (transformers' TemplateDict)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace` that refuses underscore-prefixed names (transformers' TemplateNamespace)."""

    def __init__(*args, **kwargs):  # Jinja's own signature trick: `namespace(self=...)` works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed attributes on a namespace, "
                f"got {name!r}")


def compile_template(source: str) -> jinja2.Template:
    """The template compiled in the immutable sandbox (a syntax error is a ChatTemplateError)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as err:
        raise ChatTemplateError(f"the chat template does not compile: {err} (template line "
                                f"{err.lineno})") from None


def messages(value: Any) -> list[dict]:
    """A conversation: a non-empty list of {"role": str, "content": str, ...} dicts."""
    if isinstance(value, (str, bytes, dict)) or not isinstance(value, (list, tuple)) or not value:
        raise validation.fail("messages", value, 'a non-empty list of {"role": ..., '
                              '"content": ...} dicts')
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise validation.fail(f"messages[{i}]", m, 'a {"role": ..., "content": ...} dict')
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise validation.fail(f"messages[{i}][{key!r}]", m.get(key), "a string")
    return [dict(m) for m in value]


def render(tokenizer, conversation, add_generation_prompt: bool = True) -> str:
    """The prompt text of `conversation` under the tokenizer's chat template."""
    conversation = messages(conversation)
    validation.boolean("add_generation_prompt", add_generation_prompt)
    if tokenizer is None or tokenizer.chat_template is None:
        where = "no tokenizer" if tokenizer is None else \
            f"no chat_template in the tokenizer_config.json beside {tokenizer.path}"
        raise ChatTemplateError(f"this checkpoint has {where}, so chat prompts cannot be "
                                "formatted: pass the prompt text yourself")
    template = compile_template(tokenizer.chat_template)
    try:
        return template.render(messages=conversation, add_generation_prompt=add_generation_prompt,
                               **tokenizer.special_tokens)
    except jinja2.exceptions.TemplateError as err:  # SecurityError and raise_exception included
        raise ChatTemplateError(f"the chat template failed: {err}") from None
