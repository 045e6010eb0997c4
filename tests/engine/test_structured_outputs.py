"""Structured outputs in the engine: every output obeys its constraint, greedy decoding equals masking
transformers' logits by hand with the same backend, padding ids are never allowed, drafts and speculative
decoding change nothing, and specs that cannot be enforced are refused before anything is queued."""

import json
import re

import pytest
import torch

from effllm.core.errors import ConfigError, InputError
from effllm.engine import LLM, SamplingParams
from effllm.engine.structured import StructuredOutputs
from effllm.engine.structured.grammar import allowed_tokens, new_bitmask, set_tokens
from effllm.engine.structured.manager import StructuredOutputManager, fill_rows
from effllm.engine.structured.trie import ChoiceGrammar, TokenTrie

from .structured_fixtures import PADDING, tiny_model_folder

xgrammar = pytest.importorskip("xgrammar")

SCHEMA = {
    "type": "object",
    "properties": {
        "colour": {"enum": ["red", "green", "blue"]},
        "ok": {"type": "boolean"},
        "name": {"type": "string", "pattern": "^[a-z ]{1,6}$"},
    },
    "required": ["colour", "ok", "name"],
    "additionalProperties": False,
}
PROMPTS = ["It is a truth", "Emma Woodhouse, handsome", "The family of Dashwood"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path, _ = tiny_model_folder(tmp_path_factory.mktemp("structured") / "tiny")
    return path


@pytest.fixture(scope="module")
def llm(folder):
    return LLM(str(folder), dtype="float32")


def generate(llm, prompts, **params):
    outs = llm.generate(prompts, SamplingParams(**params), use_tqdm=False)
    return [o.outputs[0] for o in outs]


def test_fifty_seeded_samples_all_validate_against_the_schema(llm):
    jsonschema = pytest.importorskip("jsonschema")
    prompts = [PROMPTS[i % 3] for i in range(50)]
    params = [
        SamplingParams(temperature=1.0, seed=i, max_tokens=64, structured={"json_schema": SCHEMA})
        for i in range(50)
    ]
    outs = [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]
    assert {o.finish_reason for o in outs} == {"stop"}
    for out in outs:
        jsonschema.validate(json.loads(out.text), SCHEMA)
    assert len({o.text for o in outs}) > 5  # sampled, not one forced string


def test_greedy_equals_masking_transformers_logits_by_hand(llm, folder):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    hf_tokenizer = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
    vocab = hf.config.vocab_size
    eos = hf_tokenizer.eos_token_id
    info = xgrammar.TokenizerInfo.from_huggingface(hf_tokenizer, vocab_size=vocab, stop_token_ids=[eos])
    compiler = xgrammar.GrammarCompiler(info)
    specs = {
        "json_schema": (compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False), SCHEMA),
        "regex": (
            compiler.compile_regex(r"[A-Z][a-z]{1,8}( [a-z]{2,6}){2}\."),
            r"[A-Z][a-z]{1,8}( [a-z]{2,6}){2}\.",
        ),
    }
    for kind, (compiled, value) in specs.items():
        for prompt in PROMPTS:
            ids = hf_tokenizer.encode(prompt)
            matcher = xgrammar.GrammarMatcher(compiled)
            expected = []
            with torch.no_grad():
                for _ in range(48):
                    logits = hf(torch.tensor([ids + expected])).logits[0, -1:].clone()
                    bitmask = xgrammar.allocate_token_bitmask(1, vocab)
                    matcher.fill_next_token_bitmask(bitmask)
                    xgrammar.apply_token_bitmask_inplace(logits, bitmask)
                    token = int(logits.argmax())
                    assert matcher.accept_token(token)
                    expected.append(token)
                    if token == eos:
                        break
            (out,) = generate(llm, [prompt], temperature=0, max_tokens=48, structured={kind: value})
            assert out.token_ids == expected, (kind, prompt)


def test_regex_and_choice_outputs_always_match(llm):
    pattern = r"(Miss|Mrs|Mr)\. [A-Z][a-z]{2,7}"
    outs = generate(llm, PROMPTS * 4, temperature=1.0, seed=3, max_tokens=32, structured={"regex": pattern})
    assert all(re.fullmatch(pattern, o.text) and o.finish_reason == "stop" for o in outs)
    names = ["Elizabeth", "Mr. Darcy", "Mr", "Lady Catherine de Bourgh"]
    outs = generate(llm, PROMPTS * 4, temperature=1.0, seed=5, max_tokens=32, structured={"choice": names})
    assert all(o.text in names and o.finish_reason == "stop" for o in outs)
    assert len({o.text for o in outs}) > 1


def test_padding_ids_past_the_tokenizer_are_never_allowed(llm, folder):
    vocab = llm.engine.model.config.vocab_size
    (free,) = generate(llm, ["It was"], temperature=0, max_tokens=3)
    assert all(t >= vocab - PADDING for t in free.token_ids)  # unconstrained, the padding ids win
    manager = llm.engine.structured
    for spec in ({"json_object": True}, {"regex": r".+"}, {"grammar": 'root ::= [^"]+'}, {"choice": ["a"]}):
        grammar = manager.grammar_for(StructuredOutputs.of(spec))
        bitmask = new_bitmask(1, vocab)
        grammar.fill(bitmask, 0)
        assert not allowed_tokens(bitmask, vocab)[0, vocab - PADDING :].any(), spec
    (out,) = generate(llm, ["It was"], temperature=0, max_tokens=20, structured={"regex": r"[a-z ]+"})
    assert max(out.token_ids) < vocab - PADDING


def test_filling_draft_rows_leaves_the_grammar_where_it_was():
    trie = TokenTrie([[1, 2, 3], [1, 4]])
    grammar = ChoiceGrammar(trie, [0])
    bitmask = new_bitmask(4, 8)
    fill_rows(grammar, [1, 2, 3], bitmask, 0)
    allowed = allowed_tokens(bitmask, 8)
    assert [allowed[i].nonzero().flatten().tolist() for i in range(4)] == [[1], [2, 4], [3], [0]]
    assert grammar.path == [0]  # rolled back
    bitmask = new_bitmask(3, 8)
    fill_rows(grammar, [1, 7], bitmask, 0)  # 7 breaks the grammar: the row after it is never used
    assert allowed_tokens(bitmask, 8)[2].all() and grammar.path == [0]


def test_choice_grammar_follows_one_string_then_an_end_token():
    trie = TokenTrie([[5, 6], [5], [7, 8, 9]])
    grammar = ChoiceGrammar(trie, [0, 1])
    assert grammar.accept(5) and not grammar.is_terminated
    bitmask = new_bitmask(1, 16)
    grammar.fill(bitmask, 0)  # "5" is complete, "5 6" may go on
    assert allowed_tokens(bitmask, 16)[0].nonzero().flatten().tolist() == [0, 1, 6]
    assert not grammar.accept(9)
    assert grammar.accept(1) and grammar.is_terminated and not grammar.accept(6)
    grammar.rollback(2)
    assert grammar.accept(7) and not grammar.accept(0)


def test_bitmask_bit_31_and_set_tokens_round_trip():
    bitmask = new_bitmask(1, 70)
    set_tokens(bitmask, 0, {0, 31, 32, 63, 69})
    assert allowed_tokens(bitmask, 70)[0].nonzero().flatten().tolist() == [0, 31, 32, 63, 69]


def test_speculative_decoding_gives_the_same_constrained_tokens(folder, llm):
    spec_llm = LLM(
        str(folder),
        dtype="float32",
        speculative_method="ngram",
        num_speculative_tokens=3,
        speculative_adaptive=False,
    )
    for structured in ({"json_schema": SCHEMA}, {"regex": r"([a-z]+ ){3,6}[a-z]+\."}):
        prompts = [p + " " + p for p in PROMPTS]  # repeats give the n-gram proposer something to copy
        plain = generate(llm, prompts, temperature=0, max_tokens=40, structured=structured)
        spec = generate(spec_llm, prompts, temperature=0, max_tokens=40, structured=structured)
        assert [o.token_ids for o in spec] == [o.token_ids for o in plain]
    assert spec_llm.engine.stats.num_draft_tokens > 0


def test_specs_that_cannot_be_enforced_are_refused_before_queueing(llm):
    engine = llm.engine
    bad = [
        ({"json_schema": '{"type": "object",'}, "not valid JSON"),
        ({"json_schema": {"type": "integer", "multipleOf": 3}}, "multipleOf"),
        ({"json_schema": {"type": "string", "format": "credit-card"}}, "credit-card"),
        ({"regex": "(unclosed"}, "could not be compiled"),
        ({"grammar": "root ::= missing_rule"}, "could not be compiled"),
        ({"regex": "a", "choice": ["b"]}, "exactly one"),
        ({"choice": []}, "at least one"),
        ({"colour": "red"}, "no field 'colour'"),
    ]
    for spec, message in bad:
        with pytest.raises(InputError, match=message):
            engine.add_request("bad", "It was", SamplingParams(structured=spec))
        assert not engine.has_unfinished_requests()
    with pytest.raises(InputError, match="min_tokens"):
        SamplingParams(min_tokens=2, structured={"choice": ["a"]})
    # A property named like an unsupported keyword is a name, not the keyword.
    StructuredOutputs(json_schema={"type": "object", "properties": {"contains": {"type": "string"}}})


def test_builtin_backend_does_choice_and_refuses_the_rest(folder):
    llm = LLM(str(folder), dtype="float32", structured_outputs_backend="builtin")
    (out,) = generate(llm, ["It was"], temperature=0, max_tokens=8, structured={"choice": ["yes", "no"]})
    assert out.text in ("yes", "no")
    with pytest.raises(InputError, match="pip install"):
        llm.engine.add_request("r", "It was", SamplingParams(structured={"regex": "a+"}))
    with pytest.raises(ConfigError, match="not one of"):
        StructuredOutputManager(None, 10, [0], backend="outlines")


def test_tokenizer_info_matches_xgrammars_reading_of_transformers_tokenizers(tmp_path):
    transformers = pytest.importorskip("transformers")
    import tokenizers
    from tokenizers import decoders, normalizers

    from effllm.engine.structured.xgrammar_backend import tokenizer_info
    from effllm.models import load_tokenizer
    from effllm.models.default import default_model_path
    from effllm.models.tokenizer import Tokenizer

    ours = load_tokenizer(default_model_path())
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_object=ours.backend)
    # A SentencePiece-style vocabulary (Llama 2's layout): "▁" for spaces, <0xXX> byte fallback.
    pieces = ["<unk>", "<s>", "</s>", *[f"<0x{b:02X}>" for b in range(256)], "▁", "▁the", "he", "▁t"]
    model = tokenizers.models.BPE(
        vocab={p: i for i, p in enumerate(pieces)},
        merges=[("▁t", "he")],
        byte_fallback=True,
        unk_token="<unk>",
    )
    sp = tokenizers.Tokenizer(model)
    sp.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    sp.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    for backend, hf in (
        (ours.backend, theirs),
        (sp, transformers.PreTrainedTokenizerFast(tokenizer_object=sp)),
    ):
        vocab = backend.get_vocab_size(with_added_tokens=True) + 3
        mine = tokenizer_info(Tokenizer(backend), vocab, [2])
        reference = xgrammar.TokenizerInfo.from_huggingface(hf, vocab_size=vocab, stop_token_ids=[2])
        assert mine.vocab_type == reference.vocab_type
        assert mine.add_prefix_space == reference.add_prefix_space
        assert mine.decoded_vocab == reference.decoded_vocab


def test_llm_embed_pools_the_final_hidden_states(llm):
    from effllm.engine.embeddings import embed

    model, tokenizer = llm.engine.model, llm.engine.tokenizer
    got = llm.embed(["It was", {"prompt_token_ids": [5, 6, 7]}], pooling="last")
    hidden = model.hidden_states(torch.tensor([tokenizer.encode("It was")]))[0, -1]
    torch.testing.assert_close(got[0], torch.nn.functional.normalize(hidden, dim=-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], embed(model, [[5, 6, 7]], "last")[0])
    with pytest.raises(InputError, match="pooling"):
        llm.embed("It was", pooling="max")


def test_ebnf_and_lark_grammars_both_constrain(llm):
    ebnf = 'root ::= ("Hello" | "Dear") " " [A-Z] [a-z]+ "!"'
    lark = 'start: greeting " " name "!"\ngreeting: "Hello" | "Dear"\nname: /[A-Z][a-z]+/'
    for grammar in (ebnf, lark):
        outs = generate(llm, PROMPTS, temperature=1.0, seed=7, max_tokens=24, structured={"grammar": grammar})
        for o in outs:
            assert re.fullmatch(r"(Hello|Dear) [A-Z][a-z]+!", o.text) or o.finish_reason == "length", o.text
