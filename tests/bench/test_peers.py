"""Peers run by a script in their own venv, printing one JSON object; the benchmark reads and compares it."""

import json
import sys

import pytest

from effllm.bench import generate
from effllm.bench.peers import run as peers
from effllm.core.errors import ConfigError

FAKE = """
import json, sys
args = sys.argv[1:]
assert args[args.index("--dtype") + 1] == "float32"
print("some log line")
print(json.dumps({"engine": "fake", "prefill_tokens_per_s": 100.0, "decode_tokens_per_s": 10.0}))
"""


def test_a_peer_script_runs_with_its_python_and_is_compared(tmp_path, monkeypatch):
    script = tmp_path / "fake_runner.py"
    script.write_text(FAKE)
    monkeypatch.setitem(peers.PEERS, "fake", str(script))
    monkeypatch.setattr(generate, "PEERS", peers.PEERS)
    result = generate.run_generate_bench(
        shape="tiny",
        prompt_tokens=16,
        new_tokens=4,
        reps=1,
        peers=["fake"],
        hardware="a100-80g",
        peer_pythons=f"fake={sys.executable}",
    )
    assert result["fake"]["decode_tokens_per_s"] == 10.0
    assert result["decode_speedup_vs_fake"] == pytest.approx(
        result["effllm"]["decode_tokens_per_s"] / 10.0, rel=1e-2
    )
    json.dumps(result)


def test_unknown_peers_and_broken_peer_pythons_are_one_line_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown peer 'vllm2'; choose from transformers, llama.cpp, vllm"):
        generate.run_generate_bench(shape="tiny", peers=["vllm2"], hardware="a100-80g")
    with pytest.raises(ConfigError, match="does not exist"):
        peers.run_peer_script(
            "llama_cpp_runner.py", str(tmp_path / "nope" / "python"), "m", "float32", 4, 2, 1
        )
    with pytest.raises(ConfigError, match="peer failed"):  # this venv has no llama_cpp
        peers.run_peer_script("llama_cpp_runner.py", sys.executable, str(tmp_path), "float32", 4, 2, 1)
    with pytest.raises(ConfigError, match="not a peer"):
        peers.peer_python("llama.cpp=a,vlm=b", "vllm")


def test_peer_python_is_one_path_or_one_per_peer():
    assert peers.peer_python("/p/python", "vllm") == "/p/python"
    assert peers.peer_python("llama.cpp=/a/python,vllm=/b/python", "vllm") == "/b/python"
    assert (
        peers.peer_python("vllm=/b/python", "llama.cpp") is None and peers.peer_python(None, "vllm") is None
    )


FAKE_VLLM = """
import json, sys
args = sys.argv[1:]
prompts = json.load(open(args[args.index("--prompts") + 1]))
n = int(args[args.index("--new-tokens") + 1])
print(json.dumps({"elapsed_s": 1.0, "output_tokens_per_s": float(len(prompts) * n), "total_tokens_per_s": 1.0,
                  "requests_per_s": float(len(prompts)), "output_tokens": len(prompts) * n}))
"""


def test_throughput_hands_vllm_the_same_prompts(tmp_path, monkeypatch):
    from effllm.bench import throughput

    script = tmp_path / "fake_vllm.py"
    script.write_text(FAKE_VLLM)
    monkeypatch.setitem(peers.PEERS, "vllm", str(script))
    result = throughput.run_throughput(
        shape="tiny",
        num_requests=5,
        input_len_min=4,
        input_len_max=12,
        output_len=3,
        peers=["vllm"],
        peer_pythons=sys.executable,
        max_num_batched_tokens=32,
    )
    assert result["vllm"]["output_tokens"] == 15 and "transformers" not in result
    assert result["speedup_vs_vllm"] == pytest.approx(
        result["effllm"]["output_tokens_per_s"] / 15.0, rel=1e-2
    )
    with pytest.raises(ConfigError, match="unknown throughput peer"):
        throughput.run_throughput(shape="tiny", peers=["llama.cpp"])


def test_the_result_is_the_last_json_line_even_with_logs_after_it(tmp_path):
    script = tmp_path / "noisy.py"
    script.write_text(
        'import json\nprint(json.dumps({"decode_tokens_per_s": 3.0}))\nprint("(EngineCore) INFO shutdown")\n'
    )
    result = peers.run_peer_script(str(script), sys.executable, str(tmp_path), "float32", 4, 2, 1)
    assert result == {"decode_tokens_per_s": 3.0}
    script.write_text('print("no json here")\n')
    with pytest.raises(ConfigError, match="no JSON"):
        peers.run_peer_script(str(script), sys.executable, str(tmp_path), "float32", 4, 2, 1)
