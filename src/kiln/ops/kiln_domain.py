"""The ``ai.kiln`` domain: fused ops the graph passes emit where standard ONNX has no op for them.

These are reference implementations (plain torch, any device), so a graph rewritten by the passes
runs in kiln's executor and is checked against the original; the builder lowers the same nodes to
its fused layers. Each op is defined as the composition of standard ops it replaces:

- ``FusedConv(X, W, [B], [Z])``: ``act(Conv(X, W, B) + Z)``. Conv's attributes, plus ``activation``
  (``""`` or a name of ``kiln.activations.FUSED``: Relu, Clip, LeakyRelu, Sigmoid, Tanh, HardSigmoid,
  HardSwish, Gelu, SiLU) and ``activation_params`` (Clip: min, max; LeakyRelu: alpha; HardSigmoid:
  alpha, beta; Gelu: 0 for erf, 1 for tanh).
- ``FusedAttention(Q, K_T, V, [mask])``: ``softmax(Q @ K_T * scale + mask) @ V`` with ``K_T`` as the
  exporters pass it (``[..., D, S]``), attribute ``scale``; ``nan_to_zero=1`` zeroes NaN
  probabilities (fully masked rows), as the exporters' ``Where(IsNaN(p), 0, p)`` does.
- ``FusedGemm(A, W, [C])``: ``act(alpha * A @ W' + beta * C)``, ``W' = W`` or its transpose
  (``transB``); Gemm's attributes (no ``transA``) plus ``activation`` and ``activation_params`` as
  FusedConv's. ``A`` 2-D is Gemm's arithmetic; ``A`` of more dims is MatMul's (one GEMM over all rows).
- ``AddLayerNormalization(A, R, Scale, [B])``: ``LayerNormalization(A + R, Scale, B)`` (``axis``,
  ``epsilon``), the residual Add before a transformer's LayerNorm; only output Y.
- ``FusedPointwise(X...)``: a chain of elementwise ops, attribute ``program`` (JSON text: the steps
  of ``kiln.kernels.pointwise``'s program, ``input`` steps indexing the node's inputs), computed in
  fp32 and rounded once to the first input's dtype.
- ``Gelu``, ``LayerNormalization``, ``RMSNormalization``: the standard ops (opset 20, 17, 23) for
  models whose opset predates them, same attributes and semantics.
"""

from __future__ import annotations

import json

import torch

from kiln.activations import FUSED, apply_activation, evaluate
from kiln.ops import math as onnx_math
from kiln.ops import nn as onnx_nn
from kiln.ops.attention import rms_normalization
from kiln.ops.registry import OpContext, register

DOMAIN = "ai.kiln"

@register("FusedConv", since=1, domain=DOMAIN, reads_torch_flags=True)
def fused_conv(op: OpContext, x, w, b=None, z=None):
    y = onnx_nn.conv(op, x, w, b)
    if z is not None:
        y = y + z
    return _activation(op, y)


def _activation(op: OpContext, y):
    """``y`` through the node's ``activation`` and ``activation_params`` (kiln.activations.FUSED)."""
    name = op.attr("activation", "")
    name = name.decode() if isinstance(name, bytes) else name
    if name != "" and name not in FUSED:
        raise op.fail(f"activation must be one of {('', *FUSED)}, got {name!r}")
    return apply_activation(name, [float(p) for p in op.attr("activation_params", [])], y)


@register("FusedGemm", since=1, domain=DOMAIN, reads_torch_flags=True)
def fused_gemm(op: OpContext, a, w, c=None):
    """Gemm's arithmetic for a 2-D ``a``; MatMul's for more dims (every leading dim a batch of rows)."""
    if a.ndim == 2:
        y = onnx_nn.gemm(op, a, w, c)
    else:
        y = torch.matmul(a, w.transpose(0, 1) if op.attr("transB", 0) else w)
        alpha, beta = float(op.attr("alpha", 1.0)), float(op.attr("beta", 1.0))
        y = y * alpha if alpha != 1.0 else y
        if c is not None:
            y = y + (c * beta if beta != 1.0 else c)
    return _activation(op, y)


@register("AddLayerNormalization", since=1, domain=DOMAIN)
def add_layer_normalization(op: OpContext, a, r, scale, bias=None):
    return onnx_nn.layer_normalization(op, a + r, scale, bias)[0]


@register("FusedPointwise", since=1, domain=DOMAIN)
def fused_pointwise(op: OpContext, *inputs):
    """The chain in fp32, rounded once to the first input's dtype (as the pointwise layers store it)."""
    program = op.attr("program")
    program = json.loads(program.decode() if isinstance(program, bytes) else program)
    return evaluate(program, list(inputs)).to(inputs[0].dtype)


@register("FusedAttention", since=1, domain=DOMAIN, reads_torch_flags=True)
def fused_attention(op: OpContext, q, k_t, v, mask=None):
    """In q's dtype, as the decomposition it replaces runs."""
    scores = torch.matmul(q, k_t) * float(op.attr("scale", 1.0))
    if mask is not None:
        scores = scores + mask
    p = torch.softmax(scores, dim=-1)
    if op.attr("nan_to_zero", 0):
        p = torch.where(torch.isnan(p), torch.zeros((), dtype=p.dtype, device=p.device), p)
    return torch.matmul(p, v)


register("Gelu", since=1, domain=DOMAIN)(onnx_math.gelu)
register("LayerNormalization", since=1, domain=DOMAIN)(onnx_nn.layer_normalization)
register("RMSNormalization", since=1, domain=DOMAIN)(rms_normalization)
