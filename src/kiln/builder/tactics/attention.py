"""Attention tactics: the exporters' decomposition in torch, and ``scaled_dot_product_attention``.

``softmax(q @ k * scale + mask) @ v`` (k arrives transposed, as ``[..., D, S]``; the mask is
additive and broadcasts). SDPA runs it as one fused kernel (FlashAttention or memory-efficient
attention on the GPU) without writing the ``L x S`` score matrix. Where the exporter cleaned up fully
masked rows (``Where(IsNaN(p), 0, p)``), both tactics return zeros for them; where it did not, both
return NaN there, as the model does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kiln.builder.tactics import Tactic, tactic


def _nan_to_zero(y: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isnan(y), torch.zeros((), dtype=y.dtype, device=y.device), y)


@tactic
class AttentionTorch(Tactic):
    """The reference: the decomposition as the model states it, one op at a time, in fp32 whatever the
    layer's precision (scores, softmax and the weighted sum all accumulate in fp32, as SDPA's do)."""

    name = "attention.torch"
    kind = "Attention"
    reference = True

    def runner(self, layer, prepared, precision, config, context):
        scale, has_mask, clean = layer.attrs["scale"], layer.attrs["mask"], layer.attrs["nan_to_zero"]

        def run(inputs):
            q, k, v = (t.float() for t in inputs[:3])
            scores = torch.matmul(q, k)
            if scale != 1.0:
                scores = scores * scale
            if has_mask:
                scores = scores + inputs[3].float()
            p = torch.softmax(scores, -1)
            if clean:
                p = _nan_to_zero(p)
            return [torch.matmul(p, v).to(inputs[0].dtype)]

        return run


@tactic
class AttentionSDPA(Tactic):
    """``torch.nn.functional.scaled_dot_product_attention`` with the layer's scale and additive mask."""

    name = "attention.sdpa"
    kind = "Attention"
    source = "sdpa"
    level = 1

    def heuristic(self, layer, precision, device):
        return 1

    def runner(self, layer, prepared, precision, config, context):
        scale, has_mask, clean = layer.attrs["scale"], layer.attrs["mask"], layer.attrs["nan_to_zero"]

        def run(inputs):
            q, k, v = inputs[:3]
            mask = inputs[3].to(q.dtype) if has_mask else None
            # the fused kernels need unit stride on the last axis: k arrives as [..., D, S]
            k = k.transpose(-2, -1).contiguous()
            y = F.scaled_dot_product_attention(q.contiguous(), k, v.contiguous(), attn_mask=mask, scale=scale)
            if clean:
                return [_nan_to_zero(y)]
            if has_mask:  # a row whose every key is masked with -inf is NaN in the model; SDPA may give 0
                y = y.masked_fill(torch.isneginf(mask).all(-1, keepdim=True), float("nan"))
            return [y]

        return run
