"""Chat templates rendered as transformers' apply_chat_template renders them, end-of-turn stops,
``chat``/``LLM.chat`` over one or many conversations, templates from checkpoint folders, and
templates that fail to render."""
from __future__ import annotations

import json
from types import SimpleNamespace

import gguf
import pytest
import torch
import transformers as tf
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

from pagemem.models import LLM, SamplingParams, load_model
from pagemem.models.chat import chat, chat_prompt, end_of_turn_ids, render_chat
from pagemem.models.tokenizer import HFTokenizer, load_tokenizer
from test_gguf import _add_tiny_vocab, random_hf, write_gguf
from test_real_model import hf_greedy, hf_smollm_tokenizer, our_smollm

CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nBe brief.<|im_end|>\n"
          "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA3 = """{{ bos_token }}
{%- for m in messages %}
    {%- if m['role'] == 'tool' %}{% continue %}{% endif %}
    {{- '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' }}
    {%- if m['role'] == 'assistant' %}{% generation %}{{ m['content'] | trim }}{% endgeneration %}
    {%- else %}{{ m['content'] | trim }}{% endif %}
    {{- '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"""
MULTILINE = """{% for m in messages %}
    {% if m['role'] == 'user' %}
User: {{ m['content'] }}
    {% elif m['role'] != 'tool' %}
{{ m['role'] | capitalize }}: {{ m['content'] }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
Assistant:
{% endif %}"""
TOOLS_JSON = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] | tojson }}"
              "{% if m['role'] not in ['user', 'assistant', 'system'] %}{{ raise_exception('bad role ' + m['role']) }}"
              "{% endif %}\n{% endfor %}{{ eos_token }}")
CONV = [{"role": "system", "content": "You answer in <html> & \"quotes\"."},
        {"role": "user", "content": "  Héllo?  "}, {"role": "assistant", "content": "Hi!"},
        {"role": "tool", "content": "ignored"}, {"role": "user", "content": "Again"}]
SPECIALS = ["<s>", "</s>", "<|im_start|>", "<|im_end|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def _tokenizers_object() -> Tokenizer:
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tok = Tokenizer(models.BPE(vocab, [], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    return tok


@pytest.fixture(scope="module")
def toks():
    """(ours, transformers') over the same byte-level vocabulary with the specials above."""
    obj = _tokenizers_object()
    ours = HFTokenizer(obj, bos_token="<s>", eos_token="</s>")
    ref = tf.PreTrainedTokenizerFast(tokenizer_object=obj.__class__.from_str(obj.to_str()), bos_token="<s>",
                                     eos_token="</s>")
    return ours, ref


@pytest.mark.parametrize("template", [CHATML, LLAMA3, MULTILINE], ids=["chatml", "llama3", "multiline"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_equals_apply_chat_template(toks, template, add_generation_prompt):
    ours, ref = toks
    conv = [m for m in CONV if template is not CHATML or m["role"] != "tool"]
    want = ref.apply_chat_template(conv, chat_template=template, tokenize=False,
                                   add_generation_prompt=add_generation_prompt)
    assert render_chat(ours, conv, chat_template=template, add_generation_prompt=add_generation_prompt) == want


def test_tojson_and_eos_token_as_transformers(toks):
    """tojson does not escape HTML and keeps non-ASCII; eos_token is the tokenizer's string."""
    ours, ref = toks
    conv = [m for m in CONV if m["role"] != "tool"]
    text = render_chat(ours, conv, chat_template=TOOLS_JSON)
    assert text == ref.apply_chat_template(conv, chat_template=TOOLS_JSON, tokenize=False)
    assert '"You answer in <html> & \\"quotes\\"."' in text and "Héllo" in text and text.endswith("</s>")


def test_end_of_turn_token_from_the_template(toks):
    ours, _ = toks
    assert end_of_turn_ids(ours, CHATML) == (ours.encode("<|im_end|>")[0],)
    assert end_of_turn_ids(ours, LLAMA3) == (ours.encode("<|eot_id|>")[0],)
    assert end_of_turn_ids(ours, "{% for m in messages %}{{ m['content'] }}\n{% endfor %}") == ()


def test_failing_templates_name_their_origin(toks):
    ours, _ = toks
    with pytest.raises(ValueError, match=r"chat template chat_template=\.\.\. failed to render: TemplateError: bad role tool"):
        render_chat(ours, CONV, chat_template=TOOLS_JSON)
    with pytest.raises(ValueError, match=r"failed to render \(line 2\): TemplateSyntaxError"):
        render_chat(ours, CONV, chat_template="ok\n{% for m in messages %}")
    with pytest.raises(ValueError, match="the model has no chat template"):
        render_chat(ours, CONV)
    with pytest.raises(TypeError, match="chat_template must be a str"):
        render_chat(ours, CONV, chat_template=3)


def _vocab_with_own_eos(w: gguf.GGUFWriter) -> None:
    """The tiny byte-level vocabulary with a ChatML template, but EOS is <|endoftext|> (0), not the
    template's end-of-turn <|im_end|> (2), so the two stops stay apart."""
    _add_tiny_vocab(w)
    w.kv_data[0]["tokenizer.ggml.eos_token_id"] = gguf.GGUFValue(0, gguf.GGUFValueType.UINT32)


@pytest.fixture(scope="module")
def tiny_llm(tmp_path_factory):
    """A random tiny Llama in a GGUF file with a byte-level vocabulary and a ChatML template, whose
    EOS (<|endoftext|>, 0) differs from the end-of-turn token (<|im_end|>, 2)."""
    path = write_gguf(tmp_path_factory.mktemp("chat") / "tiny.gguf", random_hf("llama"), "F32", "llama",
                      tokenizer=_vocab_with_own_eos)
    llm = LLM(path, device="cpu", num_pages=64, page_size=4)
    assert llm.model.eos_token_ids == (0,) and end_of_turn_ids(llm.model.tokenizer, None) == (2,)
    return llm


def test_gguf_template_error_names_the_file_and_field(tiny_llm, tmp_path):
    bad = "{{ raise_exception('no system turns, please') }}"
    def vocab(w):
        _add_tiny_vocab(w)
        w.add_chat_template(bad)
    path = write_gguf(tmp_path / "badtemplate.gguf", random_hf("llama"), "F32", "llama", tokenizer=vocab)
    llm = LLM(path, device="cpu", num_pages=16, page_size=4)
    with pytest.raises(ValueError, match=r"badtemplate.gguf: tokenizer.chat_template failed to render: "
                                         r"TemplateError: no system turns, please"):
        llm.chat([{"role": "user", "content": "hi"}])
    assert not llm.has_unfinished()


def test_chat_renders_each_conversation_and_adds_stops(tiny_llm):
    """One conversation or several; prompts are the rendered template tokenized without specials
    added; each conversation's stops are its own, then the end-of-turn token (<|im_end|>, 2), then
    EOS (<|endoftext|>, 0), without repeats; ignore_eos adds none."""
    seen = {}
    fake = SimpleNamespace(model=tiny_llm.model, generate=lambda p, sp, use_tqdm: seen.update(p=p, sp=sp) or "out")
    convs = [[{"role": "user", "content": "the cat"}], [{"role": "user", "content": "in"}]]
    assert chat(fake, convs[0], SamplingParams(stop_token_ids=(7,))) == "out"
    tok = tiny_llm.model.tokenizer
    assert seen["p"] == [tok.encode(render_chat(tok, convs[0]), add_special_tokens=False)]
    assert seen["p"][0][0] == 1 and seen["sp"][0].stop_token_ids == (7, 2, 0)     # <|im_start|> ... ; <|im_end|>, EOS
    chat(fake, convs, [SamplingParams(), SamplingParams(stop_token_ids=(0, 9))])
    assert seen["p"] == [tok.encode(render_chat(tok, c), add_special_tokens=False) for c in convs]
    assert [p.stop_token_ids for p in seen["sp"]] == [(2, 0), (0, 9, 2)]
    chat(fake, convs, [SamplingParams(ignore_eos=True), SamplingParams(ignore_eos=True, stop_token_ids=(9,))])
    assert [p.stop_token_ids for p in seen["sp"]] == [(), (9,)]


def test_chat_through_the_engine_in_order(tiny_llm):
    convs = [[{"role": "user", "content": "the cat"}], [{"role": "user", "content": "sat on the mat, the cat"}]]
    params = SamplingParams(temperature=0.0, max_tokens=6)
    outs = tiny_llm.chat(convs, params)
    singles = [tiny_llm.chat(c, params)[0] for c in convs]
    assert [o.token_ids for o in outs] == [o.token_ids for o in singles]
    assert [o.prompt_token_ids for o in outs] == [chat_prompt(tiny_llm.model, c)[0] for c in convs]


@pytest.mark.parametrize("messages, error", [
    ([], ValueError), ("hi", ValueError), ([[]], ValueError),
    ([{"content": "no role"}], TypeError), ([[{"role": "user", "content": "ok"}], [{"role": 3, "content": "x"}]], TypeError),
])
def test_bad_messages_queue_nothing(tiny_llm, messages, error):
    with pytest.raises(error, match="messages"):
        tiny_llm.chat(messages)
    assert not tiny_llm.has_unfinished()


def test_params_count_must_match(tiny_llm):
    with pytest.raises(ValueError, match="2 SamplingParams for 1 conversations"):
        tiny_llm.chat([{"role": "user", "content": "x"}], [SamplingParams(), SamplingParams()])


def _tokenizer_folder(tmp_path, config: dict | None = None, jinja: str | None = None):
    _tokenizers_object().save(str(tmp_path / "tokenizer.json"))
    if config is not None:
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    if jinja is not None:
        (tmp_path / "chat_template.jinja").write_text(jinja)
    return load_tokenizer(tmp_path, 300, None, ())


@pytest.mark.parametrize("layout", ["string", "named", "jinja-file"])
def test_folder_templates(tmp_path, layout):
    """tokenizer_config.json's chat_template (a string, or named templates: "default"), or
    chat_template.jinja, which wins; bos/eos strings from tokenizer_config.json (also as dicts)."""
    config = {"bos_token": {"content": "<s>"}, "eos_token": "</s>",
              "chat_template": CHATML if layout == "string" else [{"name": "tool_use", "template": "x"},
                                                                   {"name": "default", "template": CHATML}]}
    tok = _tokenizer_folder(tmp_path, config, LLAMA3 if layout == "jinja-file" else None)
    assert tok.chat_template == (LLAMA3 if layout == "jinja-file" else CHATML)
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    origin = "chat_template.jinja" if layout == "jinja-file" else "tokenizer_config.json: chat_template"
    assert tok.template_origin.endswith(origin)


@pytest.mark.slow
def test_real_model_chat_equals_transformers():
    """LLM.chat on SmolLM2: the prompt is transformers' apply_chat_template, the reply its greedy
    tokens, ending on <|im_end|> (the template's end-of-turn) before max_tokens."""
    conv = [{"role": "user", "content": "What is the capital of France?"}]
    out = LLM(our_smollm(), num_pages=64).chat(conv, SamplingParams(temperature=0.0, max_tokens=48))[0]
    ref_ids = hf_smollm_tokenizer().apply_chat_template(conv, add_generation_prompt=True, tokenize=True,
                                                        return_dict=False)
    assert out.prompt_token_ids == ref_ids
    assert out.token_ids == hf_greedy(ref_ids, 48)
    assert out.finish_reason == "stop" and out.token_ids[-1] == 2 and len(out.token_ids) < 48
    assert "Paris" in out.text and "<|im_end|>" not in out.text
