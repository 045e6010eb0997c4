"""Optional: llama.cpp (llama-cpp-python, where installed) reads EffLLM's GGUF and decodes as EffLLM does."""

import numpy as np
import pytest
import torch

from effllm.compress import W4A16, quantize_
from effllm.compress.gguf_export import export_gguf
from effllm.models import load_tokenizer
from effllm.models.default import default_model_path
from tests.compress.conftest import quant_model

llama_cpp = pytest.importorskip("llama_cpp")
pytest.importorskip("gguf")


def test_llama_cpp_greedy_tokens_equal_effllms_on_the_same_q4_0_codes(tmp_path):
    tokenizer = load_tokenizer(default_model_path())  # a trained BPE: llama.cpp needs merges
    model = quant_model(seed=4, tie=False, vocab_size=tokenizer.vocab_size)
    with torch.no_grad():
        model.lm_head.weight.mul_(30)  # sharp logits: small numeric differences cannot flip the argmax
    quantize_(model, W4A16(), show_progress=False)
    path = export_gguf(model, tokenizer, tmp_path / "m.gguf")
    prompt = [5, 17, 33, 2, 64, 80]
    seq, ours = list(prompt), []
    with torch.no_grad():
        for _ in range(8):
            ours.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
            seq.append(ours[-1])
    llm = llama_cpp.Llama(str(path), n_ctx=64, n_threads=2, verbose=False, logits_all=True)
    llm.eval(prompt)
    theirs = []
    for _ in range(8):
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([theirs[-1]])
    assert theirs == ours
