"""Chat templates (`Model.chat`, `--chat`, `jaxinfer.chat.render`) against transformers' own
`apply_chat_template` rendering of the same template, and the sandbox."""

import json
import shutil

import pytest
import transformers

import jaxinfer
from jaxinfer import chat
from jaxinfer.builtin import builtin_path
from jaxinfer.cli import main
from jaxinfer.tokenizer import Tokenizer

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "{% if loop.first and m['role'] == 'system' %}<<SYS>>{{ m['content'] | trim }}<</SYS>>\n"
    "{% else %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
    "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
    "{% if ns.n > 50 %}{% break %}{% endif %}{% endfor %}"
    "{{ {'count': ns.n, 'html': '<b>'} | tojson }}")
MESSAGES = [{"role": "system", "content": "  Be brief. "},
            {"role": "user", "content": "Write fib in Python — é"},
            {"role": "assistant", "content": "def fib(n): ..."},
            {"role": "user", "content": "Shorter?"}]


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory):
    """The built-in checkpoint with a tokenizer_config.json holding TEMPLATE."""
    path = tmp_path_factory.mktemp("chat") / "builtin-chat"
    shutil.copytree(builtin_path("builtin"), path)
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": TEMPLATE, "bos_token": "<bos>", "eos_token": "<eos>"}))
    return path


def _hf_tokenizer(path):
    return transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(path / "tokenizer.json"), chat_template=TEMPLATE,
        bos_token="<bos>", eos_token="<eos>")


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_equals_transformers(chat_checkpoint, add_generation_prompt):
    tok = Tokenizer.from_dir(str(chat_checkpoint))
    mine = chat.render(tok, MESSAGES, add_generation_prompt)
    theirs = _hf_tokenizer(chat_checkpoint).apply_chat_template(
        MESSAGES, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert mine == theirs
    assert mine.startswith("<bos><<SYS>>Be brief.<</SYS>>\n<|user|>")
    assert mine.endswith('{"count": 4, "html": "<b>"}')


def test_model_chat_generates_from_the_rendered_ids(chat_checkpoint):
    m = jaxinfer.load(str(chat_checkpoint))
    hf_ids = _hf_tokenizer(chat_checkpoint).apply_chat_template(
        MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=False)
    res = m.chat(MESSAGES, max_new_tokens=6)
    want = m.generate([list(hf_ids)], max_new_tokens=6)
    assert res.tokens == want.tokens and res.text == want.text


def test_cli_chat(chat_checkpoint, capsys):
    m = jaxinfer.load(str(chat_checkpoint))
    assert main(["generate", "--model", str(chat_checkpoint), "--chat", "--prompt", "Hi",
                 "--max-new-tokens", "5"]) == 0
    want = m.chat([{"role": "user", "content": "Hi"}], max_new_tokens=5).text[0]
    assert capsys.readouterr().out == want + "\n"


def test_no_template_is_an_error(capsys):
    m = jaxinfer.load("builtin")
    with pytest.raises(chat.ChatTemplateError, match="no chat_template in the tokenizer_config"):
        m.chat(MESSAGES)
    assert main(["generate", "--chat", "--prompt", "Hi"]) == 2
    assert "no chat_template" in capsys.readouterr().err


class _Tok:
    """A tokenizer stand-in holding only a template (what `render` reads)."""

    def __init__(self, template):
        self.chat_template, self.special_tokens, self.path = template, {}, "x"


@pytest.mark.parametrize("template", [
    "{{ messages.__class__.__mro__ }}",
    "{% set _ = messages.append({'role': 'x'}) %}",
    "{{ ''.__class__.__subclasses__() }}",
    "{% set ns = namespace(_x=1) %}",
])
def test_sandbox_refuses_unsafe_templates(template):
    with pytest.raises(chat.ChatTemplateError, match="the chat template failed"):
        chat.render(_Tok(template), MESSAGES)


def test_template_and_message_errors():
    with pytest.raises(chat.ChatTemplateError, match="unknown role tool"):
        chat.render(_Tok(TEMPLATE), [{"role": "tool", "content": "x"}])
    with pytest.raises(chat.ChatTemplateError, match="does not compile"):
        chat.render(_Tok("{% for %}"), MESSAGES)
    with pytest.raises(jaxinfer.InvalidArgument, match=r"messages\[0\]\['content'\] must be"):
        chat.render(_Tok(TEMPLATE), [{"role": "user"}])
    with pytest.raises(jaxinfer.InvalidArgument, match="messages must be a non-empty list"):
        chat.render(_Tok(TEMPLATE), "hello")


def test_save_keeps_the_chat_template(chat_checkpoint, tmp_path):
    """`Model.save` copies tokenizer_config.json beside tokenizer.json: the reloaded model chats
    exactly as the original."""
    m = jaxinfer.load(str(chat_checkpoint))
    m.save(str(tmp_path / "saved"))
    again = jaxinfer.load(str(tmp_path / "saved"))
    assert again.tokenizer.chat_template == TEMPLATE
    assert again.chat(MESSAGES, max_new_tokens=4).tokens == m.chat(MESSAGES, max_new_tokens=4).tokens
