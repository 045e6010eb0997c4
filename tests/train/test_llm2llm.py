"""LLM2LLM: only the seed items the student gets wrong are augmented, the set grows by exactly
|wrong| x per-seed, every round fine-tunes from the base, finished rounds are not redone, the answer
judges, and the HTTP teacher against a stub OpenAI server (schema-constrained JSON, retries)."""

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import yaml

from effllm.core.errors import InputError
from effllm.train.llm2llm import make_judge, openai_teacher, read_items, run_llm2llm

SEED = [{"prompt": f"Q{i}: what is {i} plus {i}? ", "completion": f"{2 * i}"} for i in range(6)]


def paraphrase(item):
    return {"prompt": item["prompt"] + "(again) ", "completion": item["completion"]}


@pytest.fixture
def options(make_config):
    config = make_config()
    return dict(
        tokenizer=config.tokenizer,
        steps=2,
        seq_len=16,
        batch_size=2,
        lr=1e-3,
        tensorboard=False,
        log_every=1000,
    )


@pytest.fixture
def base(make_config):
    from effllm.train import train

    config = make_config("base", steps=2)
    train(config)
    return config.out


def test_only_wrong_seed_items_are_augmented_from_the_base_each_round(base, options, tmp_path):
    calls = []

    def teacher(item):
        calls.append(item["prompt"])
        return paraphrase(item) | {"completion": item["completion"] + f" #{len(calls)}"}

    right = {0, 2, 3}  # the judge says the student answers these seed items right, whatever it writes
    judge = lambda item, answer: int(item["prompt"][1]) in right  # noqa: E731
    results = run_llm2llm(base, SEED, tmp_path / "run", teacher, options, rounds=2, per_seed=2, judge=judge)
    assert [r.wrong_indices for r in results] == [[1, 4, 5], [1, 4, 5]]
    assert [r.train_items for r in results] == [6, 12] and [r.new_items for r in results] == [6, 6]
    assert calls == [SEED[i]["prompt"] for i in (1, 1, 4, 4, 5, 5)] * 2  # only wrong items, k = 2 each
    for r in range(2):
        folder = tmp_path / "run" / f"round-{r}"
        assert yaml.safe_load((folder / "model" / "train_config.yaml").read_text())["model"] == base
        assert len(read_items(folder / "items.jsonl")) == 6 + 6 * r
        wrong = [json.loads(line) for line in (folder / "wrong.jsonl").read_text().splitlines()]
        assert [w["prompt"] for w in wrong] == [SEED[i]["prompt"] for i in (1, 4, 5)] and "student" in wrong[
            0
        ]
    # Run again with one more round: the finished rounds are read back, not redone.
    calls.clear()
    again = run_llm2llm(base, SEED, tmp_path / "run", teacher, options, rounds=3, per_seed=2, judge=judge)
    assert len(again) == 3 and again[2].train_items == 18 and len(calls) == 6


def test_a_round_with_nothing_wrong_ends_the_loop(base, options, tmp_path):
    results = run_llm2llm(
        base, SEED[:2], tmp_path / "run", paraphrase, options, rounds=3, judge=lambda item, answer: True
    )
    assert len(results) == 1 and results[0].accuracy == 1.0 and results[0].new_items == 0


def test_judges():
    exact, contains, number = make_judge("exact"), make_judge("contains"), make_judge("number")
    item = {"prompt": "p", "completion": "The answer is 1,200."}
    assert exact(item, "  The answer is 1,200.\n") and not exact(item, "The answer is 1200")
    assert contains(item, "so... The answer is 1,200. Done") and not contains(item, "1200")
    assert number(item, "first 3 then 1200") and not number(item, "1200 then 3")
    assert not number({"prompt": "p", "completion": "none"}, "none")


class StubOpenAI(BaseHTTPRequestHandler):
    replies: list[str] = []
    bodies: list[dict] = []

    def do_GET(self):  # /v1/models
        self._send({"data": [{"id": "teacher-model"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        StubOpenAI.bodies.append(body)
        self._send({"choices": [{"message": {"content": StubOpenAI.replies.pop(0)}}]})

    def _send(self, payload):
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub_server():
    server = HTTPServer(("127.0.0.1", 0), StubOpenAI)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    server.shutdown()


def test_the_http_teacher_asks_for_schema_json_and_retries(stub_server):
    StubOpenAI.replies[:] = ["not json", json.dumps({"prompt": "Q: 7 + 7?", "completion": "14"})]
    StubOpenAI.bodies.clear()
    teacher = openai_teacher(stub_server)
    assert teacher(SEED[1]) == {"prompt": "Q: 7 + 7?", "completion": "14"}
    body = StubOpenAI.bodies[0]
    assert body["model"] == "teacher-model" and body["response_format"]["type"] == "json_schema"
    assert SEED[1]["prompt"] in body["messages"][0]["content"]
    StubOpenAI.replies[:] = ["{}", "[]", '{"prompt": "", "completion": "x"}']
    assert teacher(SEED[1]) is None  # three bad answers: skipped, counted by the loop


def test_unreachable_teacher_and_bad_seed_files_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="did not answer"):
        openai_teacher("http://127.0.0.1:9/v1")
    bad = tmp_path / "seed.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3}\n')
    with pytest.raises(InputError, match="seed.jsonl:2"):
        read_items(bad)
    with pytest.raises(InputError, match="no seed file"):
        read_items(tmp_path / "missing.jsonl")


def test_the_cli_runs_a_round_against_the_stub_teacher(base, stub_server, tmp_path, capsys):
    from effllm.cli import main

    seed = tmp_path / "seed.jsonl"
    seed.write_text("".join(json.dumps(x) + "\n" for x in SEED[:2]))
    StubOpenAI.replies[:] = [json.dumps({"prompt": f"new {i}", "completion": "x"}) for i in range(2)]
    args = [
        "llm2llm",
        "--model",
        base,
        "--seed",
        str(seed),
        "--teacher-url",
        stub_server,
        "--out",
        str(tmp_path / "r"),
    ]
    args += ["--rounds", "1", "--steps", "1", "--seq-len", "16", "--batch-size", "2", "--max-tokens", "4"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| 0 | 2 | 0.000 | 2 |" in out
