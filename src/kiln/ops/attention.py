"""Transformer ops of opset 23+: Attention, RotaryEmbedding, RMSNormalization and their relatives."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from kiln import dtypes
from kiln.ops.registry import OpContext, register

_HALF = (torch.float16, torch.bfloat16)


def _wide(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 widened to float32 for accumulation; other dtypes unchanged."""
    return x.float() if x.dtype in _HALF else x


def _precision(op: OpContext, code: int | None, default: torch.dtype) -> torch.dtype:
    if code is None:
        return default
    try:
        dtype = dtypes.to_torch_dtype(code)
    except (KeyError, ValueError):
        raise op.fail(f"softmax_precision={code} is not a type torch computes in") from None
    if not dtype.is_floating_point:
        raise op.fail(f"softmax_precision={code} must be a floating-point type (1, 10, 11 or 16)")
    return dtype


def _softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last axis with each step rounded to x's type (as the spec's precision rule
    says); an all -inf row gives zeros, not NaN."""
    top = x.amax(dim=-1, keepdim=True)
    top = torch.where(torch.isneginf(top), torch.zeros_like(top), top)
    e = torch.exp(x - top)
    total = e.sum(dim=-1, keepdim=True)
    return e / torch.where(total == 0, torch.ones_like(total), total)


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, S, H*D) -> (B, H, S, D)."""
    b, s, hidden = x.shape
    return x.reshape(b, s, heads, hidden // heads).transpose(1, 2)


def _attention(op: OpContext, q, k, v, attn_mask, past_key, past_value, nonpad_kv_seqlen):
    """Attention with the spec's bias rules (bottom-right causal, -inf padding, zero fully-masked rows)."""
    if (past_key is None) != (past_value is None):
        raise op.fail("past_key and past_value must be given together")
    if nonpad_kv_seqlen is not None and past_key is not None:
        raise op.fail("nonpad_kv_seqlen cannot be combined with past_key/past_value")
    if not (q.dim() == k.dim() == v.dim()) or q.dim() not in (3, 4):
        raise op.fail(f"Q, K, V must all be 3-D or all 4-D, got ranks {q.dim()}, {k.dim()}, {v.dim()}")
    dtype = q.dtype
    rank3 = q.dim() == 3
    if rank3:
        qh, kvh = op.attr("q_num_heads"), op.attr("kv_num_heads")
        if not qh or not kvh:
            raise op.fail("3-D Q/K/V need the q_num_heads and kv_num_heads attributes")
        q, k, v = _split_heads(q, qh), _split_heads(k, kvh), _split_heads(v, kvh)
    if past_key is not None:
        k = torch.cat([past_key, k], dim=2)
        v = torch.cat([past_value, v], dim=2)
    present_k, present_v = k, v
    batch, heads, q_len, head_size = q.shape
    kv_len = k.shape[2]
    device = q.device

    scale = op.attr("scale")
    if scale is None:
        scale = 1.0 / math.sqrt(head_size)
    root = torch.tensor(math.sqrt(scale), dtype=dtype, device=device)  # cast to T1 as the function body does

    # Additive bias, in Q's type; -inf where a key is not attended.
    neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=device)
    zero = torch.zeros((), dtype=dtype, device=device)
    bias = torch.zeros((q_len, kv_len), dtype=dtype, device=device)
    if attn_mask is not None:
        pad = kv_len - attn_mask.shape[-1]
        if pad > 0:
            attn_mask = F.pad(attn_mask, (0, pad), value=False if attn_mask.dtype == torch.bool else float("-inf"))
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.where(attn_mask, zero, neg_inf)
        bias = bias + attn_mask.to(dtype)
    if past_key is not None:
        offset = torch.tensor([past_key.shape[2]], device=device)
    elif nonpad_kv_seqlen is not None:
        offset = nonpad_kv_seqlen.reshape(-1).to(torch.int64) - q_len
    else:
        offset = torch.zeros(1, dtype=torch.int64, device=device)
    # diff[b, i, j] = (i + offset[b]) - j: how far key j lies left of query i's absolute position.
    i = torch.arange(q_len, device=device).reshape(1, q_len, 1)
    j = torch.arange(kv_len, device=device).reshape(1, 1, kv_len)
    diff = (i + offset.reshape(-1, 1, 1)) - j
    allowed = None
    if op.attr("is_causal", 0):
        allowed = diff >= 0
    left, right = op.attr("left_window_size", -1), op.attr("right_window_size", -1)
    if left < -1 or right < -1:
        raise op.fail("left_window_size/right_window_size must be -1 or non-negative")
    if left >= 0:
        allowed = diff <= left if allowed is None else allowed & (diff <= left)
    if right >= 0:
        allowed = -diff <= right if allowed is None else allowed & (-diff <= right)
    if allowed is not None:
        # (B or 1, q, kv) -> (B or 1, 1, q, kv) so a rank-3 mask keeps its (head, q, kv) meaning.
        bias = bias + torch.where(allowed, zero, neg_inf).unsqueeze(1)
    if nonpad_kv_seqlen is not None:
        valid = torch.arange(kv_len, device=device) < nonpad_kv_seqlen.reshape(-1, 1).to(torch.int64)
        bias = bias + torch.where(valid, zero, neg_inf).reshape(batch, 1, 1, kv_len)

    kv_heads = k.shape[1]
    if heads != kv_heads:
        if heads % kv_heads:
            raise op.fail(f"q_num_heads {heads} is not a multiple of kv_num_heads {kv_heads}")
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)

    qk = torch.matmul(_wide(q * root), _wide(k * root).transpose(-1, -2)).to(dtype)
    raw = qk
    softcap = op.attr("softcap", 0.0)
    if softcap > 0:
        qk = (torch.tanh(_wide(qk) / softcap) * softcap).to(dtype)
    mode = op.attr("qk_matmul_output_mode", 0)
    scores = qk + bias
    masked_rows = torch.isneginf(bias.amax(dim=-1, keepdim=True)) if kv_len else None
    soft_dtype = _precision(op, op.attr("softmax_precision"), dtype)
    probs = _softmax(scores.to(soft_dtype)) if kv_len else scores.to(soft_dtype)
    if masked_rows is not None:
        probs = torch.where(masked_rows, torch.zeros((), dtype=soft_dtype, device=device), probs)
    probs = probs.to(dtype)
    y = torch.matmul(_wide(probs), _wide(v)).to(dtype)
    if rank3:
        y = y.transpose(1, 2).reshape(batch, q_len, -1)
    if mode not in (0, 1, 2, 3):
        raise op.fail(f"qk_matmul_output_mode={mode} is not 0, 1, 2 or 3")
    qk_out = (raw, qk, scores.expand(batch, heads, q_len, kv_len), probs)[mode]
    return y, present_k, present_v, qk_out


@register("Attention", since=23)
def attention_23(op: OpContext, q, k, v, attn_mask=None, past_key=None, past_value=None):
    return _attention(op, q, k, v, attn_mask, past_key, past_value, None)


@register("Attention", since=24)
def attention_24(op: OpContext, q, k, v, attn_mask=None, past_key=None, past_value=None, nonpad_kv_seqlen=None):
    return _attention(op, q, k, v, attn_mask, past_key, past_value, nonpad_kv_seqlen)


@register("Attention", since=25, reads_torch_flags=True)
def attention_25(op: OpContext, q, k, v, attn_mask=None, past_key=None, past_value=None, nonpad_kv_seqlen=None):
    """Adds left/right sliding windows (offset-aligned like is_causal); q/kv_num_heads only for 3-D inputs."""
    if q.dim() == 4 and (op.attr("q_num_heads") is not None or op.attr("kv_num_heads") is not None):
        raise op.fail("q_num_heads/kv_num_heads must not be given for 4-D inputs (opset 25)")
    return _attention(op, q, k, v, attn_mask, past_key, past_value, nonpad_kv_seqlen)


@register("RotaryEmbedding", since=23)
def rotary_embedding(op: OpContext, x, cos_cache, sin_cache, position_ids=None):
    """RoPE on (B, H, S, D) or (B, S, H*D); halves (default) or even/odd pairs (interleaved) rotate."""
    shape = x.shape
    if x.dim() == 4:
        x = x.transpose(1, 2)  # (B, S, H, D)
    elif x.dim() == 3:
        heads = op.attr("num_heads")
        if not heads:
            raise op.fail("a 3-D input needs the num_heads attribute")
        x = x.reshape(shape[0], shape[1], heads, shape[2] // heads)
    else:
        raise op.fail(f"input must be 3-D or 4-D, got rank {x.dim()}")
    dim = op.attr("rotary_embedding_dim", 0) or x.shape[-1]
    half = dim // 2
    if position_ids is not None:
        cos_cache, sin_cache = cos_cache[position_ids.long()], sin_cache[position_ids.long()]
    if cos_cache.shape[-1] != half or sin_cache.shape[-1] != half:
        raise op.fail(f"cos/sin cache last dimension must be rotary_embedding_dim/2 = {half}")
    cos, sin = cos_cache.unsqueeze(2), sin_cache.unsqueeze(2)  # (B, S, 1, half)
    rot, rest = x[..., :dim], x[..., dim:]
    if op.attr("interleaved", 0):
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    else:
        x1, x2 = rot[..., :half], rot[..., half:]
    real = cos * x1 - sin * x2
    imag = sin * x1 + cos * x2
    if op.attr("interleaved", 0):
        rot = torch.stack([real, imag], dim=-1).reshape(rot.shape)
    else:
        rot = torch.cat([real, imag], dim=-1)
    y = torch.cat([rot.to(x.dtype), rest], dim=-1)
    return y.reshape(shape) if len(shape) == 3 else y.transpose(1, 2)


@register("RMSNormalization", since=23, accumulate_fp32=True)
def rms_normalization(op: OpContext, x, scale):
    """x / sqrt(mean(x^2 over axis..-1) + eps) in stash_type precision, then * scale in x's type."""
    axis = op.attr("axis", -1)
    if axis < 0:
        axis += x.dim()
    if not 0 <= axis < x.dim():
        raise op.fail(f"axis {op.attr('axis', -1)} out of range for rank {x.dim()}")
    stash = _precision(op, op.attr("stash_type", 1), torch.float32)
    xs = x.to(stash)
    dims = tuple(range(axis, x.dim()))
    rms = torch.sqrt(torch.mean(xs * xs, dim=dims, keepdim=True) + op.attr("epsilon", 1e-5))
    return (xs / rms).to(x.dtype) * scale


@register("SwiGLU", since=28)
def swiglu(op: OpContext, a, b):
    """a * sigmoid(alpha * a) * b, computed in float32 for half types."""
    if a.shape != b.shape:
        raise op.fail(f"A {list(a.shape)} and B {list(b.shape)} must have the same shape (no broadcasting)")
    alpha = op.attr("alpha", 1.0)
    wa = _wide(a)
    return (wa * torch.sigmoid(alpha * wa) * _wide(b)).to(a.dtype)


@register("CausalConvWithState", since=27)
def causal_conv_with_state(op: OpContext, x, weight, bias=None, past_state=None):
    """Depthwise causal conv1d over [past_state | x] (zeros when no state); state = its last k-1 steps."""
    activation = op.attr("activation", "none")
    if activation not in ("none", "silu", "swish"):
        raise op.fail(f"activation {activation!r} is not 'none', 'silu' or 'swish'")
    if x.dim() != 3 or weight.dim() != 3:
        raise op.fail("input and weight must be rank 3")
    batch, channels, _ = x.shape
    k = weight.shape[2]
    if past_state is None:
        past_state = torch.zeros((batch, channels, k - 1), dtype=x.dtype, device=x.device)
    padded = torch.cat([past_state.to(x.dtype), x], dim=2)
    out = F.conv1d(_wide(padded), _wide(weight), None if bias is None else _wide(bias), groups=channels)
    out = out.to(x.dtype)
    if activation != "none":
        out = F.silu(out.float()).to(x.dtype)
    return out, padded[:, :, padded.shape[2] - (k - 1) :]


@register("LinearAttention", since=27)
def linear_attention(op: OpContext, query, key, value, past_state=None, decay=None, beta=None):
    """The spec's recurrence run token by token in float32 (chunk_size is only a tuning hint)."""
    rule = op.attr("update_rule", "gated_delta")
    if rule not in ("linear", "gated", "delta", "gated_delta"):
        raise op.fail(f"update_rule {rule!r} is not linear, gated, delta or gated_delta")
    qh, kvh = op.attr("q_num_heads"), op.attr("kv_num_heads")
    if not qh or not kvh or qh % kvh:
        raise op.fail("q_num_heads and kv_num_heads are required, q_num_heads a multiple of kv_num_heads")
    gated, delta = rule in ("gated", "gated_delta"), rule in ("delta", "gated_delta")
    if gated != (decay is not None):
        raise op.fail(f"update_rule {rule!r} {'needs' if gated else 'forbids'} the decay input")
    if delta != (beta is not None):
        raise op.fail(f"update_rule {rule!r} {'needs' if delta else 'forbids'} the beta input")
    b, t, _ = query.shape
    d_k = query.shape[-1] // qh
    d_v = value.shape[-1] // kvh
    q = _split_heads(query, qh).float()
    k = _split_heads(key, kvh).float()
    v = _split_heads(value, kvh).float()
    if gated:
        if decay.shape[-1] == kvh:
            g = decay.reshape(b, t, kvh, 1).transpose(1, 2)
        elif decay.shape[-1] == kvh * d_k:
            g = _split_heads(decay, kvh)
        else:
            raise op.fail(f"decay last dimension must be kv_num_heads or kv_num_heads*d_k, got {decay.shape[-1]}")
        g = torch.exp(g.float())
    if delta:
        if beta.shape[-1] not in (kvh, 1):
            raise op.fail(f"beta last dimension must be kv_num_heads or 1, got {beta.shape[-1]}")
        bt = beta.reshape(b, t, beta.shape[-1], 1).transpose(1, 2).float()
    if past_state is not None:
        state = past_state.float()
        state_dtype = past_state.dtype
    else:
        state = torch.zeros((b, kvh, d_k, d_v), dtype=torch.float32, device=query.device)
        state_dtype = query.dtype
    scale = op.attr("scale", 0.0) or 1.0 / math.sqrt(d_k)
    group = qh // kvh
    outputs = []
    for step in range(t):
        k_t, v_t = k[:, :, step], v[:, :, step]
        if gated:
            state = state * g[:, :, step].unsqueeze(-1)
        if delta:
            retrieved = torch.einsum("bhdm,bhd->bhm", state, k_t)
            v_t = bt[:, :, step] * (v_t - retrieved)
        state = state + k_t.unsqueeze(-1) * v_t.unsqueeze(-2)
        read = state.repeat_interleave(group, dim=1) if group > 1 else state
        outputs.append(scale * torch.einsum("bhd,bhdm->bhm", q[:, :, step], read))
    out = torch.stack(outputs, dim=2) if outputs else q.new_zeros((b, qh, 0, d_v))
    out = out.transpose(1, 2).reshape(b, t, qh * d_v).to(query.dtype)
    return out, state.to(state_dtype)


@register("FlexAttention", since=1, domain="ai.onnx.preview")
def flex_attention(op: OpContext, q, k, v):
    """Scaled-dot-product attention with score_mod / prob_mod subgraphs run on the (B, H, L, S) tensors."""
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise op.fail("Q, K and V must be rank 4")
    heads, kv_heads = q.shape[1], k.shape[1]
    if heads != kv_heads:
        if heads % kv_heads:
            raise op.fail(f"q heads {heads} is not a multiple of kv heads {kv_heads}")
        k = k.repeat_interleave(heads // kv_heads, dim=1)
        v = v.repeat_interleave(heads // kv_heads, dim=1)
    scale = op.attr("scale")
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    root = torch.tensor(math.sqrt(scale), dtype=torch.float32).to(q.dtype).to(q.device)
    default = q.dtype if q.dtype in (torch.float32, torch.float64) else torch.float32
    compute = _precision(op, op.attr("softmax_precision"), default)
    scores = torch.matmul(_wide(q * root), _wide(k * root).transpose(-1, -2)).to(q.dtype).to(compute)
    score_mod, prob_mod = op.attr("score_mod"), op.attr("prob_mod")
    if score_mod is not None:
        scores = op.run_graph(score_mod, [scores])[0].to(compute)
    probs = torch.softmax(_wide(scores), dim=-1).to(compute)
    if prob_mod is not None:
        probs = op.run_graph(prob_mod, [probs])[0].to(compute)
    return torch.matmul(_wide(probs), _wide(v.to(compute))).to(v.dtype)
