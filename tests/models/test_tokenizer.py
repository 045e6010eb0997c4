"""The tokenizer matches transformers: same ids, text and chat prompts; streaming adds up to the full text."""

from __future__ import annotations

import json
import types
from pathlib import Path

import numpy as np
import pytest
import transformers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as Backend

from effllm.core.errors import EffLLMError, InputError, TokenizerError
from effllm.models.detokenize import IncrementalDetokenizer
from effllm.models.tokenizer import Tokenizer, load_tokenizer
from effllm.models.tokenizer_training import CHATML_TEMPLATE, build_byte_level_tokenizer, train_bpe_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello, world! How are you today?",
    "Café, naïve, résumé, façade, jalapeño, Straße, über, smørrebrød, Ångström.",
    "東京は日本の首都です。中文文本也在这里。한국어 문장도 있습니다。",
    "Emoji time: 😀 🎉 👍🏽 🇫🇷 ❤️ and numbers 12345 67.89 and code: def f(x): return x + 1",
    "    indented line\n\ttabbed line\r\nwindows line end, multiple   spaces here.",
    "Привет, мир! Γειά σου Κόσμε! مرحبا بالعالم שלום עולם",
] * 20

SAMPLES = [
    "",
    " ",
    "hello",
    " hello  world ",
    "Café naïve ☕",
    "東京 中文 한국어",
    "😀🎉👍🏽🇫🇷❤️",
    "line one\nline two\r\n\ttab",
    "<|im_start|>user\nhi<|im_end|>",
    "<s>[INST] hi [/INST]</s>",
    "unseen: ꙮ 𓀀 ᚠ ∮ ⅓",
    "a" * 300,
]

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

# A Qwen2.5-style ChatML template with tools, tool calls and tool responses.
CHATML_TOOLS_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""

# Exercises the environment: trim/lstrip blocks (no dashes), loop controls, namespace, dict, tojson options,
# strftime_now, the generation tag, reasoning aliases, documents and a caller variable.
FEATURES_TEMPLATE = """{% set ns = namespace(turns=0) %}
{% set meta = dict(year=strftime_now('%Y'), think=enable_thinking | default(true)) %}
    {{ meta | tojson }}
{% if documents %}
  {% for doc in documents %}
DOC {{ loop.index }}: {{ doc.title }} = {{ doc | tojson(indent=2, sort_keys=true) }}
  {% endfor %}
{% endif %}
{% for message in messages %}
  {% if message.role == 'skip' %}{% continue %}{% endif %}
  {% if message.role == 'stop' %}{% break %}{% endif %}
  {% set ns.turns = ns.turns + 1 %}
<|im_start|>{{ message.role }}
  {% if message.role == 'assistant' %}
    {% if message.reasoning_content is defined %}<think>{{ message.reasoning_content }}</think>{% endif %}
{% generation %}{{ message.content | trim }}{% endgeneration %}
  {% else %}
{{ message.content }}
  {% endif %}
<|im_end|>
{% endfor %}
turns={{ ns.turns }} eos={{ eos_token }} bos={{ bos_token | default('none') }}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are terse. Réponds en français, 简体中文 OK."},
        {"role": "user", "content": "  What is 2+2?  "},
        {"role": "assistant", "content": "4 😀"},
        {"role": "user", "content": "And <b>3+3</b> & more?"},
    ],
    [
        {"role": "user", "content": "first"},
        {"role": "assistant", "content": "reply", "reasoning_content": "let me think"},
        {"role": "user", "content": "second"},
    ],
]

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city <in °C> & wind, e.g. Zürich or 東京",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                "required": ["city"],
            },
        },
    }
]

TOOL_CONVERSATION = [
    {"role": "system", "content": "Use tools when needed."},
    {"role": "user", "content": "Weather in Zürich?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "type": "function",
                "function": {"name": "get_weather", "arguments": {"city": "Zürich", "days": 2}},
            }
        ],
    },
    {"role": "tool", "content": '{"temp": 21, "sky": "☀️"}'},
    {"role": "tool", "content": '{"wind": "5 km/h"}'},
    {"role": "assistant", "content": "It is sunny, 21 °C."},
    {"role": "user", "content": "Thanks"},
]

TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="\ufffd"), max_size=60
)
MIXED_TEXT = st.one_of(TEXT, st.lists(st.sampled_from(SAMPLES + CORPUS[:6]), max_size=4).map("".join))
FAST = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])


def _write_config(folder: Path, config: dict) -> None:
    (folder / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")


def _byte_level_folder(folder: Path) -> Path:
    """A byte-level BPE trained here, saved by us, with the tools template in chat_template.jinja."""
    train_bpe_tokenizer(CORPUS, 500, chat_template=CHATML_TOOLS_TEMPLATE, folder=folder)
    return folder


def _llama_like_folder(folder: Path) -> Path:
    """A Llama-2-style SentencePiece BPE: "▁" for spaces, byte-fallback tokens <0x00>..<0xFF>, BOS added."""
    trained = Backend(models.BPE(unk_token="<unk>"))
    trained.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trained.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False),
    )
    model = json.loads(trained.to_str())["model"]
    pieces = sorted((i, t) for t, i in model["vocab"].items() if i > 2)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    vocab.update({t: 259 + n for n, (_, t) in enumerate(pieces)})
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    backend = Backend(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    backend.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in ("<unk>", "<s>", "</s>")]
    )
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    special = {"content": "<s>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    _write_config(
        folder,
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": {**special, "__type": "AddedToken"},
            "eos_token": "</s>",
            "unk_token": {"content": "<unk>", "__type": "AddedToken"},
            "add_bos_token": True,
            "add_eos_token": False,
            "legacy": False,
            "chat_template": LLAMA2_TEMPLATE,
        },
    )
    return folder


def _unigram_folder(folder: Path) -> Path:
    """A T5-style Unigram with a Metaspace pre-tokenizer and decoder."""
    backend = Backend(models.Unigram())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(
        vocab_size=300, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", show_progress=False
    )
    backend.train_from_iterator(CORPUS, trainer)
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "</s>", "pad_token": "<pad>"}
    _write_config(folder, {**config, "unk_token": "<unk>", "chat_template": FEATURES_TEMPLATE})
    return folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "byte_level": _byte_level_folder(root / "byte_level"),
        "llama": _llama_like_folder(root / "llama"),
        "unigram": _unigram_folder(root / "unigram"),
    }


@pytest.fixture(scope="module")
def pairs(folders) -> dict[str, tuple[Tokenizer, object]]:
    """Ours and transformers' tokenizer for each folder."""
    return {
        name: (load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder))
        for name, folder in folders.items()
    }


KINDS = ["byte_level", "llama", "unigram"]


def _stream(tokenizer: Tokenizer, ids: list[int], **options) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, **options)
    return [detokenizer.add(i) for i in ids] + [detokenizer.flush()]


# ---- encode and decode ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_encode_and_decode_match_transformers_on_samples(pairs, kind):
    ours, theirs = pairs[kind]
    for text in SAMPLES + CORPUS[:6]:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == theirs.encode(text, add_special_tokens=special), text
            for skip in (True, False):
                assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(
                    ids, skip_special_tokens=skip
                )


@pytest.mark.parametrize("kind", KINDS)
def test_encode_and_decode_match_transformers_on_random_text(pairs, kind):
    ours, theirs = pairs[kind]

    @FAST
    @given(MIXED_TEXT)
    def check(text):
        ids = ours.encode(text)
        assert ids == theirs.encode(text)
        assert ours.decode(ids) == theirs.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)

    check()


@pytest.mark.parametrize("kind", ["byte_level", "llama"])
def test_byte_level_and_byte_fallback_round_trip_any_text(pairs, kind):
    ours, _ = pairs[kind]

    @FAST
    @given(TEXT)
    def check(text):
        assert ours.decode(ours.encode(text, add_special_tokens=False)) == text

    check()


@pytest.mark.parametrize("kind", KINDS)
def test_special_token_ids_and_vocab_size_match_transformers(pairs, kind):
    ours, theirs = pairs[kind]
    assert ours.vocab_size == len(theirs) == len(ours)
    assert ours.bos_token_id == theirs.bos_token_id
    assert ours.eos_token_id == theirs.eos_token_id
    assert ours.pad_token_id == theirs.pad_token_id
    assert ours.special_token_ids == set(theirs.all_special_ids) | {
        i for i, t in theirs.added_tokens_decoder.items() if t.special
    }
    assert ours.eos_token_ids == [theirs.eos_token_id]


def test_llama_like_tokenizer_adds_bos_and_falls_back_to_bytes(pairs):
    ours, _ = pairs["llama"]
    ids = ours.encode("ꙮ")
    assert ids[0] == ours.bos_token_id == 1
    assert all(3 <= i < 259 for i in ids[2:])  # "▁" then the character's UTF-8 bytes as <0xNN> tokens
    assert ours.decode(ids, skip_special_tokens=True) == "ꙮ"


# ---- streaming detokenization ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_stream_of_encoded_text_adds_up_to_decode_without_broken_characters(pairs, kind):
    ours, _ = pairs[kind]

    @FAST
    @given(MIXED_TEXT, st.booleans())
    def check(text, skip):
        ids = ours.encode(text)
        deltas = _stream(ours, ids, skip_special_tokens=skip)
        assert "".join(deltas) == ours.decode(ids, skip_special_tokens=skip)
        assert not any("\ufffd" in delta for delta in deltas)

    check()


@pytest.mark.parametrize("kind", KINDS)
def test_stream_of_random_ids_adds_up_to_decode(pairs, kind):
    ours, _ = pairs[kind]

    @FAST
    @given(st.lists(st.integers(0, ours.vocab_size - 1), max_size=40), st.booleans())
    def check(ids, skip):
        assert "".join(_stream(ours, ids, skip_special_tokens=skip)) == ours.decode(
            ids, skip_special_tokens=skip
        )

    check()


def test_stream_holds_a_split_emoji_until_its_last_byte(pairs):
    ours, _ = pairs["llama"]
    ids = ours.encode("a 𓀀 b", add_special_tokens=False)
    deltas = _stream(ours, ids)
    assert "".join(deltas) == "a 𓀀 b"
    at = next(k for k, delta in enumerate(deltas) if "𓀀" in delta)
    assert deltas[at - 4 : at] == ["", "", "", ""] and deltas[at].startswith("𓀀")  # held over its 4 bytes


@pytest.mark.parametrize("kind", ["llama", "unigram"])
def test_stream_after_a_prompt_keeps_the_first_tokens_leading_space(pairs, kind):
    ours, _ = pairs[kind]
    prompt = ours.encode("The quick brown", add_special_tokens=False)
    full = ours.encode("The quick brown fox jumps", add_special_tokens=False)
    generated = full[len(prompt) :]
    assert full[: len(prompt)] == prompt
    deltas = _stream(ours, generated, prompt_ids=prompt)
    assert "".join(deltas) == ours.decode(full)[len(ours.decode(prompt)) :] == " fox jumps"


def test_stream_decodes_a_bounded_window_per_token(pairs):
    ours, _ = pairs["byte_level"]
    lengths = []

    class Spy:
        def decode(self, ids, skip_special_tokens):
            lengths.append(len(ids))
            return ours.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    spied = types.SimpleNamespace(backend=Spy(), special_token_ids=ours.special_token_ids, byte_token_ids=())
    ids = ours.encode(" ".join(CORPUS[:6]) * 5)
    assert "".join(_stream(spied, ids)) == ours.decode(ids)
    assert len(ids) > 1000 and max(lengths) <= 16  # the longest emoji is 8 byte tokens


# ---- chat templates -------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_chat_template_renders_like_transformers(pairs, kind, conversation, add_generation_prompt):
    ours, theirs = pairs[kind]
    if kind == "llama" and len(conversation) == 3 and "reasoning_content" in conversation[1]:
        conversation = [conversation[0]]  # Llama-2's template would raise: the roles alternate from user
    expected = theirs.apply_chat_template(
        conversation, add_generation_prompt=add_generation_prompt, tokenize=False
    )
    text = ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt)
    assert text == expected
    ids = ours.apply_chat_template(conversation, add_generation_prompt=add_generation_prompt, tokenize=True)
    assert (
        ids
        == theirs.encode(expected, add_special_tokens=False)
        == ours.encode(text, add_special_tokens=False)
    )


@pytest.mark.parametrize("with_tools", [False, True])
def test_chatml_tool_calls_and_tool_responses_render_like_transformers(pairs, with_tools):
    ours, theirs = pairs["byte_level"]
    tools = TOOLS if with_tools else None
    expected = theirs.apply_chat_template(
        TOOL_CONVERSATION, tools=tools, add_generation_prompt=True, tokenize=False
    )
    assert ours.apply_chat_template(TOOL_CONVERSATION, True, tools=tools) == expected
    if with_tools:
        assert "<in °C> & wind" in expected and "東京" in expected  # tojson neither escapes HTML nor ASCII


def test_template_features_and_variables_render_like_transformers(pairs):
    ours, theirs = pairs["unigram"]
    messages = [
        {"role": "user", "content": "  first  "},
        {"role": "skip", "content": "hidden"},
        {"role": "assistant", "content": "  answer  ", "thinking": "hmm"},
        {"role": "stop", "content": "end"},
        {"role": "user", "content": "never shown"},
    ]
    documents = [{"title": "Doc <1>", "text": "naïve & café"}]
    for kwargs in ({}, {"enable_thinking": False, "documents": documents}):
        expected = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
        assert ours.apply_chat_template(messages, add_generation_prompt=True, **kwargs) == expected
    assert "<think>hmm</think>" in expected and "never shown" not in expected


def test_continue_final_message_renders_like_transformers(pairs):
    ours, theirs = pairs["byte_level"]
    messages = [
        {"role": "user", "content": "Write a haiku"},
        {"role": "assistant", "content": "Autumn moon "},
    ]
    expected = theirs.apply_chat_template(messages, continue_final_message=True, tokenize=False)
    assert ours.apply_chat_template(messages, continue_final_message=True) == expected
    assert expected.endswith("Autumn moon ")


def test_template_exceptions_and_bad_messages_are_input_errors(pairs):
    ours, theirs = pairs["llama"]
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(Exception, match="must alternate"):
        theirs.apply_chat_template(messages, tokenize=False)
    with pytest.raises(InputError, match="must alternate"):
        ours.apply_chat_template(messages)
    with pytest.raises(InputError, match="non-empty list"):
        ours.apply_chat_template([])
    with pytest.raises(InputError, match="exclude each other"):
        ours.apply_chat_template(messages[:1], add_generation_prompt=True, continue_final_message=True)


def test_several_named_templates_pick_tool_use_when_tools_are_given(folders, tmp_path):
    folder = tmp_path / "named"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(
        (folders["byte_level"] / "tokenizer.json").read_text("utf-8"), "utf-8"
    )
    config = json.loads((folders["byte_level"] / "tokenizer_config.json").read_text("utf-8"))
    config["chat_template"] = [
        {"name": "default", "template": CHATML_TEMPLATE},
        {"name": "tool_use", "template": CHATML_TOOLS_TEMPLATE},
    ]
    _write_config(folder, config)
    ours, theirs = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    for tools in (None, TOOLS):
        expected = theirs.apply_chat_template(TOOL_CONVERSATION[:2], tools=tools, tokenize=False)
        assert ours.apply_chat_template(TOOL_CONVERSATION[:2], tools=tools) == expected
    assert ours.apply_chat_template(TOOL_CONVERSATION[:2], chat_template="tool_use").startswith(
        "<|im_start|>system"
    )
    saved = ours.save_pretrained(tmp_path / "saved")
    assert load_tokenizer(saved).chat_template == ours.chat_template


# ---- loading, saving and building -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_save_pretrained_round_trips_through_transformers(pairs, kind, tmp_path):
    ours, _ = pairs[kind]
    folder = ours.save_pretrained(tmp_path / "saved")
    reloaded, theirs = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    conversation = CONVERSATIONS[1]
    for text in SAMPLES:
        assert reloaded.encode(text) == ours.encode(text) == theirs.encode(text)
    assert reloaded.apply_chat_template(conversation, True) == ours.apply_chat_template(conversation, True)
    assert theirs.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False) == (
        ours.apply_chat_template(conversation, True)
    )
    assert (reloaded.eos_token_id, reloaded.vocab_size) == (ours.eos_token_id, len(theirs))


def test_byte_level_tokenizer_maps_each_byte_to_its_id_and_loads_in_transformers(tmp_path):
    ours = build_byte_level_tokenizer(tmp_path)
    assert ours.encode("A é") == [65, 32, 0xC3, 0xA9]
    assert (
        ours.vocab_size == 259 and ours.eos_token_id == ours.pad_token_id == 256 and ours.bos_token_id is None
    )
    assert ours.encode("<|im_start|>x<|im_end|>") == [257, 120, 258]
    assert ours.decode(np.array([65, 66, 256])) == "AB<|endoftext|>"
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path)
    messages = CONVERSATIONS[1]
    assert theirs.apply_chat_template(messages, tokenize=False) == ours.apply_chat_template(messages)
    assert theirs.encode("héllo 😀<|endoftext|>") == ours.encode("héllo 😀<|endoftext|>")


def test_train_bpe_tokenizer_from_files_learns_merges_and_puts_special_tokens_first(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS), encoding="utf-8")
    from_file = train_bpe_tokenizer(corpus, 400, special_tokens=["<|endoftext|>", "<pad>"], pad_token="<pad>")
    from_paths = train_bpe_tokenizer(
        [corpus], 400, special_tokens=["<|endoftext|>", "<pad>"], pad_token="<pad>"
    )
    assert from_file.vocab_size == from_paths.vocab_size == 400
    assert (from_file.eos_token_id, from_file.pad_token_id) == (0, 1)
    text = "The quick brown fox"
    assert (
        len(from_file.encode(text)) < len(text.encode()) and from_file.decode(from_file.encode(text)) == text
    )


def test_generation_config_eos_ids_join_the_tokenizers(folders, tmp_path):
    folder = tmp_path / "with_generation"
    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((folders["llama"] / name).read_bytes())
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert load_tokenizer(folder).eos_token_ids == [2, 7]


def test_config_special_tokens_missing_from_the_vocab_are_added_like_transformers(folders, tmp_path):
    folder = tmp_path / "extra"
    folder.mkdir()
    (folder / "tokenizer.json").write_bytes((folders["unigram"] / "tokenizer.json").read_bytes())
    _write_config(
        folder, {"eos_token": "</s>", "pad_token": "<pad>", "mask_token": "<mask>", "image_token": "<img>"}
    )
    ours, theirs = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
    text = "see <img> and <mask> here"
    assert ours.encode(text) == theirs.encode(text)
    assert ours.vocab_size == len(theirs)
    assert ours.decode(ours.encode(text), skip_special_tokens=True) == theirs.decode(
        theirs.encode(text), skip_special_tokens=True
    )


def test_legacy_special_tokens_map_names_the_special_tokens(folders, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((folders["unigram"] / "tokenizer.json").read_bytes())
    special = {"eos_token": {"content": "</s>", "lstrip": False, "normalized": False}, "pad_token": "<pad>"}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special))
    ours, theirs = load_tokenizer(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (ours.eos_token_id, ours.pad_token_id) == (theirs.eos_token_id, theirs.pad_token_id) == (1, 0)


def test_add_bos_token_applies_when_tokenizer_json_has_no_post_processor(tmp_path):
    backend = Backend(models.WordLevel({"<s>": 0, "</s>": 1, "a": 2, "<unk>": 3}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = Tokenizer(
        backend, {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "add_eos_token": True}
    )
    assert tokenizer.encode("a a") == [0, 2, 2, 1]
    assert tokenizer.encode("a", add_special_tokens=False) == [2]


# ---- bad input ------------------------------------------------------------------------------------------


def test_folder_without_tokenizer_json_is_a_tokenizer_error(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"\x00")
    with pytest.raises(TokenizerError, match="convert it once with transformers"):
        load_tokenizer(tmp_path)


def test_missing_folder_is_an_effllm_error(tmp_path):
    with pytest.raises(EffLLMError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere" / "model")


@pytest.mark.parametrize("content", ["{not json", '{"model": {"type": "BPE", "vocab": 3}}', "[]"])
def test_corrupt_tokenizer_json_is_a_tokenizer_error(tmp_path, content):
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(TokenizerError, match="not a valid tokenizer file") as info:
        load_tokenizer(tmp_path)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("tokenizer_config.json", "{broken", "not valid JSON"),
        ("tokenizer_config.json", "[1, 2]", "must hold a JSON object"),
        ("tokenizer_config.json", '{"eos_token": 5}', "make it a string"),
        ("tokenizer_config.json", '{"chat_template": 3}', "chat_template must be"),
        ("generation_config.json", "{", "not valid JSON"),
    ],
)
def test_corrupt_configs_are_tokenizer_errors(folders, tmp_path, name, content, match):
    (tmp_path / "tokenizer.json").write_bytes((folders["byte_level"] / "tokenizer.json").read_bytes())
    (tmp_path / name).write_text(content)
    with pytest.raises(TokenizerError, match=match):
        load_tokenizer(tmp_path)


def test_missing_or_invalid_chat_template_is_a_tokenizer_error(folders, tmp_path):
    (tmp_path / "tokenizer.json").write_bytes((folders["byte_level"] / "tokenizer.json").read_bytes())
    tokenizer = load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    with pytest.raises(TokenizerError, match="not valid Jinja"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], chat_template="{% for %}")


def test_bad_training_input_is_a_tokenizer_error(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        train_bpe_tokenizer(tmp_path / "missing.txt", 400)
    with pytest.raises(TokenizerError, match="below 256 bytes"):
        train_bpe_tokenizer(["text"], 100)
