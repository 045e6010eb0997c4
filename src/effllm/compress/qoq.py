"""QoQ, QServe's W4A8KV4 recipe: rotation, smoothing, progressive group quantization, int4 keys and values.

    from effllm.compress import quantize_, W4A8KV4
    quantize_(model, W4A8KV4(), calibration=ids)   # then serve with the int4 KV cache

The steps, in the order the authors' code (deepcompressor's qoq configs) runs them, each switchable:
1. `rotate`: the residual stream is rotated by an orthogonal Hadamard matrix Q (QuaRot's block-input
   rotation, no online rotation). RMSNorm weights are first folded into the linears that read them, so
   RMSNorm(x Q) = RMSNorm(x) Q; then the embeddings and every reader (q/k/v, gate/up, lm_head) take W Q,
   every writer (o_proj, down_proj) Q^T W. The model computes the same function; outliers spread across
   channels. For a hidden size that is not a power of two, Q is block-diagonal: Sylvester Hadamard blocks
   of the largest power of two dividing it, with random signs (seeded).
2. `smooth_attention` (SmoothAttention, for the 4-bit keys): per kv channel i, lambda_i =
   max_t |K_t,i|^0.5 over the calibration keys after RoPE; channels i and i + d/2 (RoPE's pairs) share the
   larger, the query heads of a kv group share their kv head's. K is divided and Q multiplied by lambda,
   folded into k_proj's and q_proj's rows: q . k is unchanged, RoPE commutes with the scaling.
3. `smooth_linear` (SmoothLinear): SmoothQuant's s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) with QoQ's
   alpha 0.3 (g128), for the q/k/v and gate/up inputs (folded into the norms), down_proj's (into up_proj)
   and o_proj's where v_proj has its width (no GQA).
4. Weights on the progressive grid (`progressive`): s1 = max|W_o| / 119 per channel, W8 = round(W / s1) in
   [-119, 119]; per group of 128 an integer step s2 = ceil(range / 15) and zero z of W8, u = round(W8 / s2) + z in [0, 15]
   (clamped so that (u - z) s2 stays in int8). `method="gptq"` (QoQ's default) runs GPTQ on that grid,
   `rtn` rounds. `clip` searches s1's range (shrink 1.0 to 0.8) for the least output error.
5. Activations per token to int8 at run time (`models/qoq_linear.py`); with `W4A8KV4` the checkpoint asks
   the engine for the int4 KV cache (`kv_cache_dtype` in config.json).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from effllm.compress import awq, gptq, smoothquant
from effllm.compress.calibration import LAYER_LINEARS, LayerByLayer
from effllm.compress.rtn import QuantSpec
from effllm.compress.schemes import W4A8, W4A8KV4, register_scheme, target_linears
from effllm.eval.progress import progress_bar
from effllm.models.layouts import set_module
from effllm.models.qoq_linear import QoQLinear
from effllm.models.rope import apply_rotary

PROTECTIVE_RANGE = 119  # |W8| bound after the first level, so that the second level's error stays in int8
CLIP_GRID = 20  # shrink ratios tried by the clipping search, from 1.0 down to 1 - CLIP_MAX_SHRINK
CLIP_MAX_SHRINK = 0.2
CLIP_TOKENS = 512


# ----------------------------------------------------------------------------- progressive grid
def first_level(w: torch.Tensor, shrink: torch.Tensor | None = None) -> torch.Tensor:
    """s1 [N]: per-channel symmetric step onto [-119, 119] (times `shrink` [N] when clipping)."""
    amax = w.float().abs().amax(1)
    if shrink is not None:
        amax = amax * shrink
    return (amax / PROTECTIVE_RANGE).clamp_min(torch.finfo(torch.float32).tiny)


def second_level(w8: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(s2, z) [N, G]: the asymmetric 4-bit grid of each group of the int8 values w8 [N, K], integer step.

    s2 = ceil((max - min) / 15), so the 16 levels span the group and every value rounds to within s2 / 2
    (rounding s2 to nearest would clip the top by up to 7.5); with |w8| <= 119, s2 <= 16 and the nearest
    level stays within 119 + 8 = 127."""
    n, k = w8.shape
    g = w8.reshape(n, k // group_size, group_size)
    lo, hi = g.amin(-1), g.amax(-1)
    s2 = torch.ceil((hi - lo) / 15).clamp(1, 127)
    z = torch.round(-lo / s2).clamp(0, 15)
    return s2, z


def codes(w8: torch.Tensor, s2: torch.Tensor, z: torch.Tensor, group_size: int) -> torch.Tensor:
    """u [N, K] in 0..15 for int8 values w8 on the grid (s2, z), clamped so that (u - z) s2 is an int8."""
    n, k = w8.shape
    s2g, zg = s2.unsqueeze(-1), z.unsqueeze(-1)
    u = torch.round(w8.reshape(n, -1, group_size) / s2g) + zg
    lo = torch.maximum(torch.zeros_like(zg), zg - torch.floor(128 / s2g))
    hi = torch.minimum(torch.full_like(zg, 15), zg + torch.floor(127 / s2g))
    return torch.maximum(torch.minimum(u, hi), lo).reshape(n, k)


def progressive(
    w: torch.Tensor, group_size: int, s1: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest on the progressive grid: (u [N, K], s1 [N], s2 [N, G], z [N, G])."""
    s1 = first_level(w) if s1 is None else s1
    w8 = torch.round(w.float() / s1[:, None]).clamp(-PROTECTIVE_RANGE, PROTECTIVE_RANGE)
    s2, z = second_level(w8, group_size)
    return codes(w8, s2, z, group_size), s1, s2, z


def int8_values(u: torch.Tensor, s2: torch.Tensor, z: torch.Tensor, group_size: int) -> torch.Tensor:
    """The intermediate W8 = u s2 - z s2 (as float; every value an integer in [-128, 127])."""
    n, k = u.shape
    return (u.reshape(n, -1, group_size) * s2.unsqueeze(-1) - z.unsqueeze(-1) * s2.unsqueeze(-1)).reshape(
        n, k
    )


def dequantize(u, s1, s2, z, group_size: int) -> torch.Tensor:
    return int8_values(u.float(), s2.float(), z.float(), group_size) * s1.float()[:, None]


def clip_search(w: torch.Tensor, x: torch.Tensor, group_size: int) -> torch.Tensor:
    """s1 [N] minimising ||(W - W_q) x^T||^2 per output channel over shrink ratios of max|W|."""
    wf, xf = w.float(), x.float()
    reference = wf @ xf.t()
    best_err = torch.full((w.shape[0],), torch.inf)
    best = first_level(wf)
    for i in range(CLIP_GRID):
        shrink = torch.full((w.shape[0],), 1 - CLIP_MAX_SHRINK * i / (CLIP_GRID - 1))
        s1 = first_level(wf, shrink)
        err = ((dequantize(*progressive(wf, group_size, s1), group_size) @ xf.t() - reference) ** 2).sum(1)
        better = err < best_err
        best_err, best = torch.where(better, err, best_err), torch.where(better, s1, best)
    return best


def gptq_progressive(w: torch.Tensor, hessian: torch.Tensor, s1: torch.Tensor, config: W4A8):
    """GPTQ on the progressive grid: each group's (s2, z) from its error-updated columns, as GPTQ does for
    groups; the float grid is s1 * s2 with zero z (codes u - 8 on a signed 4-bit grid)."""

    def grid(columns: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w8 = torch.round(columns / s1[:, None]).clamp(-PROTECTIVE_RANGE, PROTECTIVE_RANGE)
        s2, z = second_level(w8, columns.shape[1])
        return s1[:, None] * s2, z - 8

    spec = QuantSpec(4, config.group_size, symmetric=False)
    qw = gptq.gptq(w, hessian, spec, config.damp, config.block_size, grid=grid)
    s2 = torch.round(qw.scale / s1[:, None]).clamp(1, 127)
    z = qw.zero + 8
    w8_from_gptq = (qw.q.float() + 8 - z.repeat_interleave(config.group_size, 1)) * s2.repeat_interleave(
        config.group_size, 1
    )
    return codes(w8_from_gptq, s2, z, config.group_size).round(), s1, s2, z


# ----------------------------------------------------------------------------- rotation
def hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """An orthogonal [n, n] matrix: random signs times block-diagonal Sylvester Hadamard blocks of the
    largest power of two dividing n (the full Hadamard when n is a power of two), float64."""
    block = n & -n
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < block:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    q = torch.block_diag(*[h / math.sqrt(block)] * (n // block))
    signs = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(seed)).double() * 2 - 1
    return signs[:, None] * q


def _fold_norm(norm: nn.Module, linears: list[nn.Linear]) -> None:
    for linear in linears:
        linear.weight.data = (linear.weight.data.double() * norm.weight.data.double()).to(linear.weight.dtype)
    norm.weight.data.fill_(1)


def _rotate(linear: nn.Linear, q: torch.Tensor, side: str) -> None:
    w = linear.weight.data.double()
    linear.weight.data = (w @ q if side == "input" else q.t() @ w).to(linear.weight.dtype)
    if side == "output" and linear.bias is not None:
        linear.bias.data = (linear.bias.data.double() @ q).to(linear.bias.dtype)


def rotate_(model: nn.Module, seed: int = 0) -> None:
    """Rotate `model`'s residual stream by `hadamard(hidden_size)`: the same function, norms folded, head untied."""
    stack = model.model
    if getattr(model.config, "tie_word_embeddings", False):
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    q = hadamard(model.config.hidden_size, seed)
    for layer in stack.layers:
        attn, mlp = layer.self_attn, layer.mlp
        _fold_norm(layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj])
        _fold_norm(layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj])
        for linear in (attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj):
            _rotate(linear, q, "input")
        for linear in (attn.o_proj, mlp.down_proj):
            _rotate(linear, q, "output")
    _fold_norm(stack.norm, [model.lm_head])
    _rotate(model.lm_head, q, "input")
    embed = stack.embed_tokens.weight
    embed.data = (embed.data.double() @ q).to(embed.dtype)


# ----------------------------------------------------------------------------- smoothing
class KeyMax:
    """Running max |K| per (kv head, channel) of one layer's rotated keys."""

    def __init__(self):
        self.value: torch.Tensor | None = None

    def add(self, k: torch.Tensor) -> None:
        m = k.detach().abs().float().flatten(0, -3).amax(0).cpu()  # [Hkv, D]
        self.value = m if self.value is None else torch.maximum(self.value, m)


def key_max(layer: nn.Module, runner: LayerByLayer) -> torch.Tensor:
    """max |K| [Hkv, D] of `layer` over the calibration batches, keys after RoPE (what the cache stores)."""
    attn, stat = layer.self_attn, KeyMax()
    with torch.no_grad():
        for h in runner.hidden:
            x = layer.input_layernorm(h)
            b, t, _ = x.shape
            k = attn.k_proj(x).view(b, t, attn.num_kv_heads, attn.head_dim)
            stat.add(apply_rotary(k, runner.cos, runner.sin))
    return stat.value


def smooth_attention_scales(kmax: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """lambda [Hkv, D] = kmax^alpha, RoPE's pairs (i, i + D/2) sharing the larger."""
    lam = kmax.clamp_min(1e-5).pow(alpha)
    half = lam.shape[-1] // 2
    shared = torch.maximum(lam[..., :half], lam[..., half:])
    return torch.cat([shared, shared], dim=-1)


def fold_smooth_attention(attn: nn.Module, lam: torch.Tensor) -> None:
    """K / lambda into k_proj's rows, Q * lambda into q_proj's (each query head its kv head's lambda)."""
    group = attn.num_heads // attn.num_kv_heads
    k_scale = lam.reshape(-1).double()
    q_scale = lam.repeat_interleave(group, dim=0).reshape(-1).double()
    for linear, scale in ((attn.k_proj, 1 / k_scale), (attn.q_proj, q_scale)):
        linear.weight.data = (linear.weight.data.double() * scale[:, None]).to(linear.weight.dtype)
        if linear.bias is not None:
            linear.bias.data = (linear.bias.data.double() * scale).to(linear.bias.dtype)


SMOOTH_GROUPS = {  # reader group -> (what precedes it, whose output is the readers' input)
    "attn_in": (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "input_layernorm"),
    "attn_out": (("self_attn.o_proj",), "self_attn.v_proj"),
    "mlp_in": (("mlp.gate_proj", "mlp.up_proj"), "post_attention_layernorm"),
    "mlp_out": (("mlp.down_proj",), "mlp.up_proj"),
}


def smooth_linear_(layer: nn.Module, runner: LayerByLayer, names: set[str], alpha: float) -> None:
    for members, previous in SMOOTH_GROUPS.values():
        members = [m for m in members if m in names]
        if not members:
            continue
        prev = layer.get_submodule(previous)
        linears = [layer.get_submodule(m) for m in members]
        if isinstance(prev, nn.Linear) and prev.out_features != linears[0].in_features:
            continue  # o_proj under GQA: v_proj is narrower than o_proj's input
        stat = smoothquant.ChannelMax(linears[0].in_features)
        runner.run(layer, observe={members[0]: stat.add})
        s = smoothquant.smoothing_scales(stat.value, [m.weight for m in linears], alpha)
        awq.fold_scales(prev, linears, s.to(linears[0].weight.device))


# ----------------------------------------------------------------------------- the scheme
def _swap(module_owner: nn.Module, name: str, linear: nn.Linear, u, s1, s2, z, group_size: int) -> None:
    q = QoQLinear.like(linear, group_size)
    q.set_codes(u, s1, s2, z)
    if linear.bias is not None:
        q.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
    set_module(module_owner, name, q)


@register_scheme(W4A8)
@register_scheme(W4A8KV4)
def quantize_qoq(model: nn.Module, config: W4A8, ids: torch.Tensor | None, show: bool) -> None:
    if config.rotate:
        rotate_(model)
    targets = target_linears(model, config)
    done: set[str] = set()
    if ids is not None:
        runner = LayerByLayer(model, ids)
        layers = list(runner.layers())
        with progress_bar(len(layers), "qoq calibration", show, unit="layer") as bar:
            for i, layer in layers:
                prefix = f"model.layers.{i}."
                names = {n for n in LAYER_LINEARS if prefix + n in targets}
                if config.smooth_attention:
                    fold_smooth_attention(layer.self_attn, smooth_attention_scales(key_max(layer, runner)))
                if config.smooth_linear:
                    smooth_linear_(layer, runner, names, config.alpha)
                _quantize_layer(layer, sorted(names), runner, config)
                done.update(prefix + n for n in names)
                runner.run(layer, advance=True)
                bar.update(1)
    for name in targets:
        if name not in done:
            linear = model.get_submodule(name)
            _swap(
                model,
                name,
                linear,
                *progressive(linear.weight.detach(), config.group_size),
                config.group_size,
            )


def _quantize_layer(layer: nn.Module, names: list[str], runner: LayerByLayer, config: W4A8) -> None:
    inputs: dict[str, list[torch.Tensor]] = {n: [] for n in names} if config.clip else {}
    hessians = {n: gptq.HessianAccumulator(layer.get_submodule(n).in_features) for n in names}

    def observer(n: str):
        def add(x: torch.Tensor) -> None:
            if config.method == "gptq":
                hessians[n].add(x)
            if config.clip:
                inputs[n].append(x.reshape(-1, x.shape[-1]).float())

        return add

    if config.method == "gptq" or config.clip:
        runner.run(layer, observe={n: observer(n) for n in names})
    for n in names:
        linear = layer.get_submodule(n)
        w = linear.weight.detach().float()
        s1 = None
        if config.clip:
            x = torch.cat(inputs[n])
            if x.shape[0] > CLIP_TOKENS:
                x = x[torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(0))[:CLIP_TOKENS]]
            s1 = clip_search(w, x, config.group_size)
        if config.method == "gptq":
            grid = gptq_progressive(w, hessians[n].hessian(), first_level(w) if s1 is None else s1, config)
        else:
            grid = progressive(w, config.group_size, s1)
        _swap(layer, n, linear, *grid, config.group_size)
