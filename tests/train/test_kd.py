"""SALT (`--teacher`, `--method salt`): the distillation loss against its formula and limits, plain
cross-entropy exactly after `--kd-until-step`, a teacher that never gets gradients, SALT_DS keeping exactly
the requested fraction, and exact resume after a kill."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from effllm.core.errors import ConfigError
from effllm.train import Trainer, train
from effllm.train.kd import SALTTraining, SelectedData, kd_loss, select_challenging
from effllm.train.loss import causal_lm_loss
from effllm.train.metrics import read_metrics
from effllm.train.packing import IGNORE_INDEX

from .test_resume import assert_resumes_like


def _logits_and_labels(seed=0, vocab=11):
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(2, 5, vocab, generator=g)
    teacher = torch.randn(2, 5, vocab, generator=g)
    labels = torch.randint(0, vocab, (2, 5), generator=g)
    labels[0, 0] = labels[1, 3] = IGNORE_INDEX
    return student, teacher, labels


def test_weight_zero_is_cross_entropy_and_kl_of_a_distribution_with_itself_is_zero():
    student, teacher, labels = _logits_and_labels()
    ce = F.cross_entropy(student.flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    assert torch.equal(kd_loss(student, teacher, labels, weight=0.0), ce)
    assert kd_loss(student, student, labels, weight=1.0, temperature=2.0).abs() < 1e-5


def test_kd_loss_equals_the_formula():
    student, teacher, labels = _logits_and_labels(1)
    w, tau = 0.3, 2.0
    keep = labels.flatten() != IGNORE_INDEX
    s, t, y = student.flatten(0, 1)[keep], teacher.flatten(0, 1)[keep], labels.flatten()[keep]
    ce = -torch.log_softmax(s, -1).gather(1, y[:, None]).sum()
    p = torch.softmax(t / tau, -1)
    kl = (p * (torch.log(p) - torch.log_softmax(s / tau, -1))).sum()
    torch.testing.assert_close(kd_loss(student, teacher, labels, w, tau), (1 - w) * ce + w * tau**2 * kl)
    # The soft-label cross-entropy (the paper's term) differs by the teacher's entropy only: same gradient.
    a = student.clone().requires_grad_(True)
    kd_loss(a, teacher, labels, 1.0, tau).backward()
    b = student.clone().requires_grad_(True)
    (-(p * torch.log_softmax(b.flatten(0, 1)[keep] / tau, -1)).sum() * tau**2).backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_selection_keeps_exactly_the_fraction_below_the_hardest():
    scores = np.array([5.0, 1.0, 9.0, 3.0, 7.0, 2.0, 8.0, 4.0, 6.0, 0.5])
    kept = select_challenging(scores, fraction=0.4, skip_hardest=0.1)
    assert kept.tolist() == [0, 4, 6, 8]  # 9.0 skipped; then 8, 7, 6, 5 in their original order
    assert len(select_challenging(np.arange(1000.0), 0.37, 0.0)) == 370
    with pytest.raises(ConfigError, match="more than every candidate"):
        select_challenging(scores, 0.95, 0.1)


def test_selected_data_maps_the_kd_stage_to_the_selection_then_continues_after_the_candidates():
    class Order:
        def __getitem__(self, i):
            return 100 + i

    class Packed:
        def batch(self, indices):
            return {"input_ids": torch.tensor(indices)}

    class Data:
        order, train, held_out_indices = Order(), Packed(), "held"

    view = SelectedData(Data(), np.array([1, 3, 4]), kd_sequences=5, candidates=7)
    assert view.micro_batch(0, 7)["input_ids"].tolist() == [101, 103, 104, 101, 103, 107, 108]
    assert view.held_out_indices == "held"


@pytest.fixture
def teacher(make_config, assets, tmp_path):
    """A smaller model (one layer) trained on the same corpus and tokenizer."""
    config = json.loads((assets / "config.json").read_text())
    small = tmp_path / "teacher-config.json"
    small.write_text(json.dumps(config | {"num_hidden_layers": 1}))
    run = make_config("teacher", model_config=str(small), steps=4)
    train(run)
    return run.out


def salt_run(make_config, teacher, name, **options):
    values = dict(teacher=teacher, kd_until_step=3, kd_weight=0.5, kd_temperature=2.0, steps=6, save_every=2)
    values.update(options)
    return make_config(name, **values)


def test_salt_distils_then_trains_plainly_and_the_teacher_gets_no_gradients(make_config, teacher):
    config = salt_run(make_config, teacher, "salt")
    assert config.method is None
    trainer = Trainer(config)
    trainer.setup()
    assert config.method == "salt"
    salt = next(c for c in trainer.callbacks if isinstance(c, SALTTraining))
    batch = trainer.data.micro_batch(0, 4)
    salt.on_step_begin(0)
    model = trainer.model
    kd = salt.loss(model, batch)
    assert not torch.equal(kd, causal_lm_loss(model, batch))
    kd.backward()
    assert all(p.grad is None and not p.requires_grad for p in salt.teacher.parameters())
    model.zero_grad()
    salt.on_step_begin(3)
    assert salt.teacher is None  # released at --kd-until-step
    assert torch.equal(salt.loss(model, batch), causal_lm_loss(model, batch))  # bit-exact CE
    trainer.train()
    rows = read_metrics(Path(config.out) / "metrics.jsonl")
    assert [r["kd"] for r in rows] == [1, 1, 1, 0, 0, 0]
    assert (Path(config.out) / "model.safetensors").exists()


def test_salt_ds_distils_on_the_selection(make_config, teacher):
    config = salt_run(make_config, teacher, "select", kd_select=0.5, kd_until_step=2)
    trainer = Trainer(config)
    trainer.setup()
    salt = next(c for c in trainer.callbacks if isinstance(c, SALTTraining))
    assert salt.candidates == 16  # 2 steps x 4 sequences at a fraction of 0.5
    expected = select_challenging(salt.scores(range(16)), 0.5, skip_hardest=0.1)
    data = trainer.data
    trainer.train()
    assert salt.selected.tolist() == expected.tolist() and len(expected) == 8
    assert isinstance(trainer.data, SelectedData)
    first = trainer.data.micro_batch(0, 4)["input_ids"]
    assert torch.equal(first, data.train.batch([data.order[int(i)] for i in expected[:4]])["input_ids"])
    after = trainer.data.micro_batch(8, 1)["input_ids"]  # the plain stage: the order after the candidates
    assert torch.equal(after, data.train.batch([data.order[16]])["input_ids"])


def test_salt_resumes_exactly_after_a_kill(make_config, teacher):
    reference = salt_run(make_config, teacher, "reference", kd_select=0.5)
    train(reference)
    killed = salt_run(make_config, teacher, "killed", kd_select=0.5, keep_last=1)
    extra = ["--teacher", teacher, "--kd-until-step", "3", "--kd-temperature", "2.0", "--kd-select", "0.5"]
    assert_resumes_like(reference, killed, extra, kill_step=2)  # killed inside the distillation stage


def test_salt_options_are_checked_up_front(make_config, teacher, tmp_path):
    with pytest.raises(ConfigError, match="--kd-until-step"):
        make_config("a", teacher=teacher).validate()
    with pytest.raises(ConfigError, match="--teacher"):
        make_config("b", method="salt", kd_until_step=2).validate()
    with pytest.raises(ConfigError, match="does not combine"):
        make_config("c", teacher=teacher, kd_until_step=2, method="lisa").validate()
    with pytest.raises(ConfigError, match="kd-select"):
        make_config("d", teacher=teacher, kd_until_step=2, kd_select=1.5).validate()
    other = tmp_path / "other-vocab"
    other.mkdir()
    for f in Path(teacher).iterdir():
        if f.is_file():
            (other / f.name).write_bytes(f.read_bytes())
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(config | {"vocab_size": config["vocab_size"] + 8}))
    with pytest.raises(ConfigError, match="vocab_size"):
        Trainer(make_config("e", teacher=str(other), kd_until_step=2)).setup()
