"""Attention tactics: the exporters' decomposition in torch, and ``scaled_dot_product_attention``.

``softmax(q @ k * scale + mask) @ v`` (k arrives transposed, as ``[..., D, S]``; the mask is
additive and broadcasts). SDPA runs it as one fused kernel (FlashAttention or memory-efficient
attention on the GPU) without writing the ``L x S`` score matrix. Where the exporter cleaned up fully
masked rows (``Where(IsNaN(p), 0, p)``), both tactics return zeros for them; where it did not, both
return NaN there, as the model does. SDPA cleans the output rather than the probabilities, which
is the same except where ``v`` itself holds NaN (the model keeps that NaN, SDPA gives 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.builder.tactics.base import Tactic, tactic


def _nan_to_zero(y: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(y), torch.zeros((), dtype=y.dtype, device=y.device), y)


class _Attention(Tactic):
    """What both tactics share: a constant mask arrives as the layer's weight, not as an input."""

    kind = "Attention"

    def prepare(self, layer, weights, precision, config):
        return {"mask": weights["mask"]} if "mask" in weights else {}

    def prep_id(self, config):
        return "attention"


def _mask(inputs, prepared):
    return inputs[3] if len(inputs) > 3 else prepared["mask"]


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last axis has unit stride (a transposed view of a projection usually
    has: the fused kernels read such views in place), else a contiguous copy."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


@tactic
class AttentionTorch(_Attention):
    """The reference: the decomposition as the model states it, one op at a time, in fp32 whatever the
    layer's precision (scores, softmax and the weighted sum all accumulate in fp32, as SDPA's do)."""

    name = "attention.torch"
    reference = True

    def runner(self, layer, prepared, precision, config, context):
        scale, has_mask, clean = layer.attrs["scale"], layer.attrs["mask"], layer.attrs["nan_to_zero"]

        def run(inputs):
            q, k, v = (t.float() for t in inputs[:3])
            scores = torch.matmul(q, k)
            if scale != 1.0:
                scores = scores * scale
            if has_mask:
                scores = scores + _mask(inputs, prepared).float()
            p = torch.softmax(scores, -1)
            if clean:
                p = _nan_to_zero(p)
            return [torch.matmul(p, v).to(inputs[0].dtype)]

        return run


@tactic
class AttentionSDPA(_Attention):
    """``torch.nn.functional.scaled_dot_product_attention`` with the layer's scale and additive mask."""

    name = "attention.sdpa"
    source = "sdpa"
    level = 1

    def heuristic(self, layer, precision, device):
        return 1

    def runner(self, layer, prepared, precision, config, context):
        scale, has_mask, clean = layer.attrs["scale"], layer.attrs["mask"], layer.attrs["nan_to_zero"]

        def run(inputs):
            q, k, v = inputs[:3]
            mask = _mask(inputs, prepared).to(q.dtype) if has_mask else None
            # The fused kernels need unit stride on the last axis. k arrives as [..., D, S]: when it
            # is the exporter's Transpose of [..., S, D] (a view), transposing back costs no copy.
            k = _unit_stride(k.transpose(-2, -1))
            y = F.scaled_dot_product_attention(_unit_stride(q), k, _unit_stride(v), attn_mask=mask, scale=scale)
            if clean:
                # A softmax row is NaN all through or not at all (one NaN or +inf score poisons its
                # sum), so zeroing NaN outputs equals zeroing NaN probabilities; in place, one
                # kernel, and the output keeps SDPA's layout so the exporter's Transpose + Reshape
                # after it stay views.
                return [y.nan_to_num_(nan=0.0, posinf=float("inf"), neginf=float("-inf"))]
            if has_mask:  # a row whose every key is masked with -inf is NaN in the model; SDPA may give 0
                y = y.masked_fill(torch.isneginf(mask).all(-1, keepdim=True), float("nan"))
            return [y]

        return run
