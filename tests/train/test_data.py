import json

import numpy as np
import pytest

from effllm.models.tokenizer import load_tokenizer
from effllm.train.data import load_stream, prepare_data
from effllm.train.encoding import RecordEncoder
from effllm.train.packing import IGNORE_INDEX, PackedSequences, ShuffledOrder, split_indices

CHATS = [
    {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hi"},
            {"role": "assistant", "content": "Hi there"},
            {"role": "user", "content": "Again"},
            {"role": "assistant", "content": "Hello"},
        ]
    },
    {"messages": [{"role": "user", "content": "Name a colour"}, {"role": "assistant", "content": "Blue"}]},
]


@pytest.fixture
def tokenizer(assets):
    return load_tokenizer(assets / "tok")


def stream_of(paths, assets, cache_dir, **kw):
    tok = load_tokenizer(assets / "tok")
    return load_stream(
        [str(p) for p in paths],
        RecordEncoder(tok),
        assets / "tok",
        cache_dir,
        tok.vocab_size,
        log=lambda _: None,
        **kw,
    )


def test_packed_sequences_are_inputs_with_next_token_labels(assets, tmp_path, tokenizer):
    stream = stream_of([assets / "corpus.txt"], assets, tmp_path)
    ids = tokenizer.encode((assets / "corpus.txt").read_text(), add_special_tokens=False) + [
        tokenizer.eos_token_id
    ]
    assert len(stream) == len(ids)
    packed = PackedSequences(stream, 32)
    assert len(packed) == (len(ids) - 1) // 32
    batch = packed.batch([0, 5])
    assert batch["input_ids"][1].tolist() == ids[160:192]
    assert batch["labels"][1].tolist() == ids[161:193]


def test_chat_loss_mask_covers_exactly_the_assistant_replies(assets, tmp_path, tokenizer):
    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps(c) + "\n" for c in CHATS))
    stream = stream_of([data], assets, tmp_path / "cache")
    ids, mask = stream.read(0, len(stream))
    assert tokenizer.decode(ids.tolist()) == "".join(
        tokenizer.apply_chat_template(c["messages"]) for c in CHATS
    )
    # Contiguous runs of target tokens are the assistant messages with their end-of-turn, nothing else.
    runs, current = [], []
    for token, target in zip(ids.tolist(), mask.tolist(), strict=True):
        if target:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    runs += [tokenizer.decode(current)] if current else []
    assert runs == ["Hi there<|im_end|>\n", "Hello<|im_end|>\n", "Blue<|im_end|>\n"]
    packed = PackedSequences(stream, 16)
    labels = packed.batch(range(len(packed)))["labels"].flatten().numpy()
    n = len(labels)  # the label of input i is token i + 1, ignored unless the mask marks it
    assert labels.tolist() == np.where(mask[1 : n + 1], ids[1 : n + 1], IGNORE_INDEX).tolist()
    assert 0 < (labels != IGNORE_INDEX).sum() < n


def test_shards_are_cached_and_rebuilt_only_when_the_file_changes(assets, tmp_path):
    data = tmp_path / "a.txt"
    data.write_text("hello world\n" * 10)
    stream_of([data], assets, tmp_path / "cache")
    shard_files = sorted((tmp_path / "cache").glob("*.tokens"))
    assert len(shard_files) == 1
    stamp = shard_files[0].stat().st_mtime_ns
    stream_of([data], assets, tmp_path / "cache")
    assert shard_files[0].stat().st_mtime_ns == stamp
    data.write_text("changed text\n" * 10)
    assert len(stream_of([data], assets, tmp_path / "cache")) == 13 * 10 + 1
    assert len(list((tmp_path / "cache").glob("*.tokens"))) == 2


def test_folder_of_text_and_jsonl_reads_as_one_stream(assets, tmp_path, tokenizer):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.txt").write_text("first file")
    (folder / "b.jsonl").write_text(
        json.dumps({"body": "second"}) + "\n" + json.dumps({"body": "third"}) + "\n"
    )
    (folder / "ignored.bin").write_bytes(b"\0\1")
    stream = stream_of([folder], assets, tmp_path / "cache", text_field="body")
    ids, mask = stream.read(0, len(stream))
    eos = "<|endoftext|>"
    assert tokenizer.decode(ids.tolist()) == f"first file{eos}second{eos}third{eos}"
    assert mask.all()
    across = stream.read(8, 6)[0].tolist()  # spans the boundary of the two shards
    assert across == ids[8:14].tolist()


def test_held_out_split_and_order_are_fixed_by_the_seed():
    train, held = split_indices(100, 0.1, seed=3)
    assert len(held) == 10 and not set(train) & set(held) and len(train) + len(held) == 100
    assert np.array_equal(split_indices(100, 0.1, seed=3)[1], held)
    assert not np.array_equal(split_indices(100, 0.1, seed=4)[1], held)
    order = ShuffledOrder(train, seed=3)
    epoch0, epoch1 = [order[i] for i in range(90)], [order[i] for i in range(90, 180)]
    assert sorted(epoch0) == sorted(train.tolist()) == sorted(epoch1) and epoch0 != epoch1
    assert [ShuffledOrder(train, seed=3)[i] for i in range(95)] == epoch0 + epoch1[:5]


def test_prepare_data_holds_out_a_fraction(make_config, assets):
    config = make_config(eval_fraction=0.25)
    tok = load_tokenizer(assets / "tok")
    data = prepare_data(config, tok, assets / "tok", log=lambda _: None)
    n = len(data.train)
    assert len(data.held_out_indices) == round(n * 0.25)
    assert set(data.order.indices) | set(data.held_out_indices) == set(range(n))
    batches = list(data.held_out_batches(batch_size=2, rank=1, world_size=2))
    assert len(batches) == -(-len(data.held_out_indices) // 4)


def test_eval_data_is_held_out_whole_and_training_keeps_all_of_data(make_config, assets, tmp_path):
    held = tmp_path / "held.txt"
    held.write_text("a different text to measure perplexity on. " * 5)
    config = make_config(eval_data=[str(held)])
    data = prepare_data(config, load_tokenizer(assets / "tok"), assets / "tok", log=lambda _: None)
    assert len(data.order.indices) == len(data.train)
    assert len(data.held_out_indices) == len(data.held_out) == (len(held.read_text()) + 1 - 1) // 32
