"""LLM2LLM (arXiv 2403.15042; SqueezeAILab/LLM2LLM): grow a small fine-tuning set where the student fails.

    effllm llm2llm --model BASE --seed seed.jsonl --teacher-url http://127.0.0.1:8000/v1 --out runs/l2l \\
        --rounds 3 --steps 200 --lr 1e-4 [--match number] [--per-seed 1]

The reference loop (`GSM8K/generate_data.py`, `filter.py`), with D_0 the seed set:

    for round i:  M_i = fine-tune(BASE, D_i)               # always from the base checkpoint
                  W_i = seed items M_i answers wrongly      # only seed items are judged, never new ones
                  D_{i+1} = D_i + teacher(one new item per wrong seed item)

Data: JSON lines with `prompt` and `completion` (text). A round trains on chat records (the prompt as the
user's turn, the completion as the assistant's, the loss on the completion only) when the tokenizer has a
chat template, otherwise on prompt + completion as plain text; it judges the student's greedy completion
of each seed prompt against the seed's completion (`--match`: `exact` after stripping whitespace,
`contains` the reference, or `number`, the last number in each, as the GSM8K code compares answers).

The teacher is any OpenAI-compatible server (`effllm serve` with a larger model, vLLM, a hosted API): for
each wrong item it is asked, with the item as an example, for `--per-seed` new items of the same kind, in
JSON constrained by `response_format` (a JSON schema of `prompt` and `completion`); answers that do not
parse are retried, then skipped and counted. Every round writes `round-K/` under `--out`: the training
data, the fine-tuned model, the wrong items, the new ones and `summary.json`; a finished round is skipped
when the command is run again, and an interrupted one resumes its training.
"""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from effllm.core.errors import ConfigError, InputError

MATCHES = ("exact", "contains", "number")
SCHEMA = {
    "type": "object",
    "properties": {"prompt": {"type": "string"}, "completion": {"type": "string"}},
    "required": ["prompt", "completion"],
    "additionalProperties": False,
}
INSTRUCTION = (
    "Here is an example of a task and its correct answer, which a student model got wrong.\n\n"
    "Task: {prompt}\nAnswer: {completion}\n\n"
    "Write one new task of the same kind and difficulty (different details, not a copy), with its correct "
    'answer in the same format. Reply with JSON: {{"prompt": ..., "completion": ...}}.'
)

Item = dict[str, str]
Teacher = Callable[[Item], Item | None]
Judge = Callable[[Item, str], bool]


def read_items(path: str | Path) -> list[Item]:
    """The `prompt`/`completion` records of a JSON-lines file; InputError names the first bad line."""
    items = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InputError(f"no seed file at {path}; pass JSON lines with prompt and completion") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n} is not JSON ({e.msg})") from None
        if not isinstance(record, dict) or not all(
            isinstance(record.get(k), str) for k in ("prompt", "completion")
        ):
            raise InputError(f"{path}:{n} needs string fields 'prompt' and 'completion'")
        items.append({"prompt": record["prompt"], "completion": record["completion"]})
    if not items:
        raise InputError(f"{path} holds no items")
    return items


def write_items(path: Path, items: Sequence[Item]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(item) + "\n" for item in items))


def _last_number(text: str) -> str | None:
    numbers = re.findall(r"-?\d[\d,]*\.?\d*", text)
    return numbers[-1].replace(",", "").rstrip(".") if numbers else None


def make_judge(match: str) -> Judge:
    """Whether the student's answer to an item is right, by `match`."""
    if match not in MATCHES:
        raise ConfigError(f"--match must be one of {', '.join(MATCHES)}, got {match!r}")

    def judge(item: Item, answer: str) -> bool:
        reference = item["completion"].strip()
        if match == "exact":
            return answer.strip() == reference
        if match == "contains":
            return reference in answer
        expected = _last_number(reference)
        return expected is not None and _last_number(answer) == expected

    return judge


def openai_teacher(url: str, model: str | None = None, temperature: float = 0.7, retries: int = 2) -> Teacher:
    """A teacher reached over HTTP at an OpenAI-compatible `url` (…/v1), asked for JSON by schema."""
    base = url.rstrip("/")

    def post(path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, OSError, json.JSONDecodeError) as e:
            raise InputError(f"the teacher at {base} did not answer ({e}); is the server up?") from None

    name = model or post("/models")["data"][0]["id"]

    def ask(item: Item) -> Item | None:
        body = {
            "model": name,
            "messages": [{"role": "user", "content": INSTRUCTION.format(**item)}],
            "temperature": temperature,
            "max_tokens": 512,
            "response_format": {"type": "json_schema", "json_schema": {"name": "item", "schema": SCHEMA}},
        }
        for _ in range(retries + 1):
            reply = post("/chat/completions", body)["choices"][0]["message"].get("content") or ""
            try:
                new = json.loads(reply)
            except json.JSONDecodeError:
                continue
            if isinstance(new, dict) and all(
                isinstance(new.get(k), str) and new[k].strip() for k in SCHEMA["required"]
            ):
                return {"prompt": new["prompt"], "completion": new["completion"]}
        return None

    return ask


@dataclass
class RoundResult:
    round: int
    train_items: int
    wrong: int
    accuracy: float
    new_items: int
    failed_requests: int
    model: str
    wrong_indices: list[int] = field(default_factory=list)


def training_records(items: Sequence[Item], chat: bool) -> list[dict[str, Any]]:
    if chat:
        return [
            {
                "messages": [
                    {"role": "user", "content": i["prompt"]},
                    {"role": "assistant", "content": i["completion"]},
                ]
            }
            for i in items
        ]
    return [{"text": i["prompt"] + i["completion"]} for i in items]


def student_answers(model_folder: str | Path, prompts: Sequence[str], max_tokens: int) -> list[str]:
    """The fine-tuned model's greedy completions (chat-rendered when its tokenizer has a template)."""
    from effllm.engine import LLM, SamplingParams

    llm = LLM(str(model_folder))
    tok = llm.tokenizer
    if tok is not None and tok.chat_template:
        prompts = [
            tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
            for p in prompts
        ]
    outs = llm.generate(list(prompts), SamplingParams(temperature=0, max_tokens=max_tokens), use_tqdm=False)
    return [o.outputs[0].text for o in outs]


def run_llm2llm(
    base: str,
    seed: Sequence[Item],
    out: str | Path,
    teacher: Teacher,
    train_options: dict[str, Any],
    rounds: int = 3,
    per_seed: int = 1,
    judge: Judge | None = None,
    max_tokens: int = 128,
    answer: Callable[[str | Path, Sequence[str]], list[str]] | None = None,
    log: Callable[[str], None] = print,
) -> list[RoundResult]:
    """The LLM2LLM loop (see the module docstring); returns each round's result."""
    from effllm.models.tokenizer import load_tokenizer
    from effllm.train import TrainConfig, train

    if rounds < 1 or per_seed < 1:
        raise ConfigError(f"--rounds and --per-seed must be at least 1, got {rounds} and {per_seed}")
    judge = judge or make_judge("exact")
    answer = answer or (lambda folder, prompts: student_answers(folder, prompts, max_tokens))
    out = Path(out)
    tokenizer = load_tokenizer(train_options.get("tokenizer") or base)
    chat = bool(tokenizer.chat_template)
    data = list(seed)
    results: list[RoundResult] = []
    for r in range(rounds):
        folder = out / f"round-{r}"
        summary = folder / "summary.json"
        if summary.exists():  # finished before: take its data and go on
            results.append(RoundResult(**json.loads(summary.read_text())))
            data = read_items(folder / "next.jsonl") if (folder / "next.jsonl").exists() else data
            continue
        write_items(folder / "items.jsonl", data)
        records = folder / "train.jsonl"
        records.write_text("".join(json.dumps(x) + "\n" for x in training_records(data, chat)))
        log(f"LLM2LLM round {r}: fine-tuning {base} on {len(data)} items")
        values = {
            **train_options,
            "model": base,
            "data": [str(records)],
            "out": str(folder / "model"),
            "resume": True,
        }
        train(TrainConfig(**values))  # always from the base checkpoint
        answers = answer(folder / "model", [item["prompt"] for item in seed])
        wrong = [i for i, (item, a) in enumerate(zip(seed, answers, strict=True)) if not judge(item, a)]
        write_items(folder / "wrong.jsonl", [seed[i] | {"student": answers[i]} for i in wrong])
        new, failed = [], 0
        known = {(i["prompt"], i["completion"]) for i in data}
        for i in wrong:
            for _ in range(per_seed):
                made = teacher(seed[i])
                if made is None:
                    failed += 1
                elif (made["prompt"], made["completion"]) not in known:
                    known.add((made["prompt"], made["completion"]))
                    new.append(made)
        write_items(folder / "new.jsonl", new)
        data = data + new
        write_items(folder / "next.jsonl", data)
        result = RoundResult(
            r,
            len(data) - len(new),
            len(wrong),
            1 - len(wrong) / len(seed),
            len(new),
            failed,
            str(folder / "model"),
            wrong,
        )
        summary.write_text(json.dumps(result.__dict__, indent=2))
        results.append(result)
        log(
            f"LLM2LLM round {r}: {len(seed) - len(wrong)}/{len(seed)} seed items right; "
            f"{len(new)} new items from the teacher ({failed} requests failed)"
        )
        if not wrong:
            break
    return results
