"""The ``ai.kiln`` domain: fused ops the graph passes emit where standard ONNX has no op for them.

These are reference implementations (plain torch, any device), so a graph rewritten by the passes
runs in kiln's executor and is checked against the original; the builder lowers the same nodes to
its fused layers. Each op is defined as the composition of standard ops it replaces:

- ``FusedConv(X, W, [B], [Z])``: ``act(Conv(X, W, B) + Z)``. Conv's attributes, plus ``activation``
  (``""``, Relu, Clip, LeakyRelu, Sigmoid, Tanh, HardSigmoid, HardSwish, Gelu, SiLU) and
  ``activation_params`` (Clip: min, max; LeakyRelu: alpha; HardSigmoid: alpha, beta; Gelu: 0 for
  erf, 1 for tanh).
- ``FusedAttention(Q, K_T, V, [mask])``: ``softmax(Q @ K_T * scale + mask) @ V`` with ``K_T`` as the
  exporters pass it (``[..., D, S]``), attribute ``scale``; ``nan_to_zero=1`` zeroes NaN
  probabilities (fully masked rows), as the exporters' ``Where(IsNaN(p), 0, p)`` does.
- ``Gelu``, ``LayerNormalization``, ``RMSNormalization``: the standard ops (opset 20, 17, 23) for
  models whose opset predates them, same attributes and semantics.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.ops import math as onnx_math
from kiln.ops import nn as onnx_nn
from kiln.ops.attention import rms_normalization
from kiln.ops.registry import OpContext, register

DOMAIN = "ai.kiln"

ACTIVATIONS = ("", "Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Gelu", "SiLU")


def apply_activation(name: str, params: list[float], y: torch.Tensor) -> torch.Tensor:
    """``y`` through the named activation (``FusedConv``'s ``activation`` + ``activation_params``)."""
    if name == "":
        return y
    if name == "Relu":
        return torch.relu(y)
    if name == "Clip":
        return torch.clamp(y, min=_param(params, 0, float("-inf")), max=_param(params, 1, float("inf")))
    if name == "LeakyRelu":
        return F.leaky_relu(y, _param(params, 0, 0.01))
    if name == "Sigmoid":
        return torch.sigmoid(y)
    if name == "Tanh":
        return torch.tanh(y)
    if name == "HardSigmoid":
        return torch.clamp(_param(params, 0, 0.2) * y + _param(params, 1, 0.5), 0.0, 1.0)
    if name == "HardSwish":
        return y * torch.clamp(y / 6.0 + 0.5, 0.0, 1.0)
    if name == "Gelu":
        return F.gelu(y, approximate="tanh" if _param(params, 0, 0.0) == 1 else "none")
    if name == "SiLU":
        return y * torch.sigmoid(y)
    raise ValueError(f"unknown FusedConv activation {name!r}; expected one of {ACTIVATIONS}")


def _param(params: list[float], index: int, default: float) -> float:
    return params[index] if len(params) > index else default


@register("FusedConv", since=1, domain=DOMAIN, reads_torch_flags=True)
def fused_conv(op: OpContext, x, w, b=None, z=None):
    y = onnx_nn.conv(op, x, w, b)
    if z is not None:
        y = y + z
    name = op.attr("activation", "")
    name = name.decode() if isinstance(name, bytes) else name
    if name not in ACTIVATIONS:
        raise op.fail(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    return apply_activation(name, [float(p) for p in op.attr("activation_params", [])], y)


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
