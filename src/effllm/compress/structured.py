"""LLM-Pruner's structured pruning (Ma et al. 2023, horseee/LLM-Pruner): remove whole groups, get a smaller
dense model in the Hugging Face layout.

    from effllm.compress.structured import prune_structured
    small = prune_structured(model, calibration=ids, mlp_ratio=0.25, kv_group_ratio=0.0)

Groups of a Llama-family decoder layer, as LLM-Pruner's dependency graph couples them:
- an MLP channel c: row c of gate_proj and up_proj, column c of down_proj;
- a KV group j (GQA respected): the rows of head j in k_proj and v_proj, the rows of the q heads that read
  it in q_proj, and those heads' columns in o_proj (biases with their rows).

Importance: Taylor saliency from the calibration loss's gradient, per weight `first` |w g|, `second`
|w h w| (h the mean squared gradient over the calibration batches, a diagonal Fisher), or `mix`
|w g - w h w / 2|; a group's importance is the sum over its weights (LLM-Pruner's `sum` reduction).
Every layer loses the same number of its lowest groups (round(ratio * count)), so the widths stay uniform
and the result is an ordinary checkpoint transformers loads; ratios that need per-layer widths are not
offered. Recovery fine-tuning is `effllm train --model PRUNED ...` (docs/compression.md).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from effllm.core.errors import ConfigError
from effllm.models.transformer import CausalLM

IMPORTANCE_KINDS = ("first", "second", "mix")


def taylor_saliency(
    model: CausalLM, calibration: torch.Tensor, kind: str = "first", batch_size: int = 4
) -> dict[str, torch.Tensor]:
    """Per decoder-linear weight (by parameter name), the elementwise Taylor saliency |.| of `kind`."""
    if kind not in IMPORTANCE_KINDS:
        raise ConfigError(f"--importance must be one of {', '.join(IMPORTANCE_KINDS)}, got {kind!r}")
    params = {n: p for n, p in model.named_parameters() if ".layers." in n and p.dim() == 2}
    grad = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    was_training = model.training
    model.eval()
    batches = calibration.split(batch_size)
    try:
        for batch in batches:
            model.zero_grad(set_to_none=True)
            logits = model(batch[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), batch[:, 1:].flatten())
            loss.backward()
            for n, p in params.items():
                grad[n] += p.grad.float()
                fisher[n] += p.grad.float() ** 2 / len(batches)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {n: weight_saliency(p.detach().float(), grad[n], fisher[n], kind) for n, p in params.items()}


def weight_saliency(w: torch.Tensor, grad: torch.Tensor, fisher: torch.Tensor, kind: str) -> torch.Tensor:
    """Elementwise Taylor saliency: `first` |w g|, `second` |w h w|, `mix` |w g - w h w / 2|."""
    first, second = w * grad, w * fisher * w
    return {"first": first, "second": second, "mix": first - 0.5 * second}[kind].abs()


def obs_remove_columns(
    weight: torch.Tensor, hessian: torch.Tensor, remove: torch.Tensor, damp: float = 0.01
) -> torch.Tensor:
    """`weight` [out, n] with input columns `remove` zeroed and the other columns updated to compensate:
    the group Optimal Brain Surgeon step (Hassibi & Stork; Frantar & Alistarh's OBC, ZipLM for structures).

    With H = X^T X of the layer's inputs X [tokens, n], the update that keeps W X^T closest to its value
    (least squares over X) once the columns R are zero is dW = -W[:, R] ([H^-1]_RR)^-1 [H^-1]_R,: ,
    with H dampened by `damp` times its mean diagonal. Returns a new float32 tensor."""
    w = weight.detach().float().clone()
    if len(remove) == 0:
        return w
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0  # inputs that never fire (e.g. columns already removed): keep them out of H
    h[dead, dead] = 1.0
    h += torch.eye(len(h), device=h.device) * damp * torch.diag(h).mean()
    hinv = torch.linalg.inv(h)
    rows = hinv[remove]  # [R, n]
    w -= w[:, remove] @ torch.linalg.solve(rows[:, remove], rows)
    w[:, remove] = 0.0
    return w


def group_importance(
    model: CausalLM, saliency: dict[str, torch.Tensor]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, (importance of each MLP channel [I], importance of each KV group [KV])."""
    c = model.config
    per_group = c.num_attention_heads // c.num_key_value_heads
    d = c.head_dim
    out = []
    for i in range(c.num_hidden_layers):
        s = {
            k.removeprefix(f"model.layers.{i}."): v
            for k, v in saliency.items()
            if k.startswith(f"model.layers.{i}.")
        }
        mlp = (
            s["mlp.gate_proj.weight"].sum(1)
            + s["mlp.up_proj.weight"].sum(1)
            + s["mlp.down_proj.weight"].sum(0)
        )
        k = s["self_attn.k_proj.weight"].sum(1).reshape(c.num_key_value_heads, d).sum(1)
        v = s["self_attn.v_proj.weight"].sum(1).reshape(c.num_key_value_heads, d).sum(1)
        q = s["self_attn.q_proj.weight"].sum(1).reshape(c.num_key_value_heads, per_group * d).sum(1)
        o = s["self_attn.o_proj.weight"].sum(0).reshape(c.num_key_value_heads, per_group * d).sum(1)
        out.append((mlp, k + v + q + o))
    return out


def _removed(count: int, ratio: float, what: str) -> int:
    n = ratio * count
    if not 0 <= ratio < 1:
        raise ConfigError(f"the {what} ratio must be in [0, 1), got {ratio}")
    if what == "KV-group" and abs(n - round(n)) > 1e-9:
        raise ConfigError(
            f"a {what} ratio of {ratio} removes {n:g} of each layer's {count} KV groups; the widths must stay "
            f"uniform across layers, so choose a multiple of 1/{count}"
        )
    return round(n)


@torch.no_grad()
def remove_groups(
    model: CausalLM, drop_channels: list[torch.Tensor], drop_kv: list[torch.Tensor]
) -> CausalLM:
    """A new, smaller model: `model` without the listed MLP channels and KV groups of each layer (the same
    number in every layer; a KV group goes with the q heads that read it)."""
    c = model.config
    n_channels = {len(x) for x in drop_channels} or {0}
    n_kv = {len(x) for x in drop_kv} or {0}
    if len(n_channels) > 1 or len(n_kv) > 1:
        raise ConfigError("every layer must lose the same number of groups (uniform widths)")
    removed_c, removed_kv = n_channels.pop(), n_kv.pop()
    if removed_kv and c.model_type == "qwen2":
        raise ConfigError(
            "qwen2 checkpoints take head_dim from hidden_size / heads in transformers, so removing heads "
            "would not load there; prune MLP channels only (--kv-group-ratio 0)"
        )
    per_group, d = c.num_attention_heads // c.num_key_value_heads, c.head_dim
    kv_heads = c.num_key_value_heads - removed_kv
    config = dataclasses.replace(
        c,
        intermediate_size=c.intermediate_size - removed_c,
        num_key_value_heads=kv_heads,
        num_attention_heads=kv_heads * per_group,
    )
    state = model.state_dict()
    for i in range(c.num_hidden_layers):
        keep_c = _kept(c.intermediate_size, drop_channels[i] if drop_channels else [])
        keep_g = _kept(c.num_key_value_heads, drop_kv[i] if drop_kv else [])
        kv_rows = (keep_g[:, None] * d + torch.arange(d)).flatten()
        q_rows = (keep_g[:, None] * per_group * d + torch.arange(per_group * d)).flatten()
        pre = f"model.layers.{i}."
        rows = {"mlp.gate_proj": keep_c, "mlp.up_proj": keep_c, "self_attn.q_proj": q_rows}
        rows |= {"self_attn.k_proj": kv_rows, "self_attn.v_proj": kv_rows}
        for name, index in rows.items():
            for kind in ("weight", "bias"):
                if pre + name + "." + kind in state:
                    state[pre + name + "." + kind] = state[pre + name + "." + kind][index]
        for name, index in (("mlp.down_proj", keep_c), ("self_attn.o_proj", q_rows)):
            state[pre + name + ".weight"] = state[pre + name + ".weight"][:, index]
    small = CausalLM(config).to(device=model.device, dtype=model.dtype)
    small.load_state_dict(state)
    return small.eval()


def _kept(count: int, dropped) -> torch.Tensor:
    drop = {int(x) for x in dropped}
    return torch.tensor([j for j in range(count) if j not in drop], dtype=torch.long)


def prune_structured(
    model: CausalLM,
    calibration: torch.Tensor,
    mlp_ratio: float = 0.25,
    kv_group_ratio: float = 0.0,
    importance: str = "first",
) -> CausalLM:
    """A smaller copy of `model`: each layer without its least important MLP channels and KV groups."""
    c = model.config
    n_channels = _removed(c.intermediate_size, mlp_ratio, "MLP-channel")
    n_kv = _removed(c.num_key_value_heads, kv_group_ratio, "KV-group")
    if n_kv >= c.num_key_value_heads:
        raise ConfigError("that KV-group ratio would remove every head of a layer; lower it")
    scores = group_importance(model, taylor_saliency(model, calibration, importance))
    drop_c = [mlp.topk(n_channels, largest=False).indices for mlp, _ in scores]
    drop_g = [kv.topk(n_kv, largest=False).indices for _, kv in scores]
    return remove_groups(model, drop_c, drop_g)
