"""LayerNorm and Softmax tactics: torch, and Triton kernels that keep statistics in fp32.

LayerNorm layers may carry the residual ``Add`` that feeds them; the Triton kernel adds and
normalizes in one pass over the row. Whatever the layer's precision, means, variances and softmax
sums accumulate in fp32 (torch's kernels do the same for half types).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from kiln.builder.layers import Layer
from kiln.builder.tactics.base import Tactic, canonical_weights, tactic
from kiln.precision import PRECISION_DTYPES


@canonical_weights("LayerNorm")
def _canonical(layer: Layer, constants: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    weights = {"scale": constants[layer.weights["scale"]].float()}
    if "bias" in layer.weights:
        weights["bias"] = constants[layer.weights["bias"]].float()
    return weights


class _LayerNorm(Tactic):
    kind = "LayerNorm"

    def prepare(self, layer, weights, precision, config):
        dtype = PRECISION_DTYPES[precision]
        return {role: t.to(dtype).contiguous() for role, t in weights.items()}

    def prep_id(self, config):
        return "layernorm"


def _normalized_shape(x: torch.Tensor, axis: int) -> list[int]:
    return list(x.shape[axis:])


@tactic
class LayerNormTorch(_LayerNorm):
    """The reference: ``x + residual`` then ``F.layer_norm`` (fp32 statistics)."""

    name = "layernorm.torch"
    reference = True

    def runner(self, layer, prepared, precision, config, context):
        axis, eps, residual = layer.attrs["axis"], layer.attrs["epsilon"], layer.attrs["residual"]
        scale, bias = prepared["scale"], prepared.get("bias")

        def run(inputs):
            x = inputs[0] + inputs[1] if residual else inputs[0]
            shape = _normalized_shape(x, axis)
            w = scale.expand(shape) if list(scale.shape) != shape else scale
            b = bias.expand(shape) if bias is not None and list(bias.shape) != shape else bias
            return [F.layer_norm(x, shape, w, b, eps)]

        return run


@tactic
class LayerNormTriton(_LayerNorm):
    """``kiln.kernels.layernorm``: residual add + normalization in one kernel, one row per program."""

    name = "layernorm.triton"
    source = "triton"
    devices = ("cuda",)
    level = 1

    def heuristic(self, layer, precision, device):
        return 1

    def runner(self, layer, prepared, precision, config, context):
        from kiln.kernels.layernorm import layer_norm

        axis, eps, residual = layer.attrs["axis"], layer.attrs["epsilon"], layer.attrs["residual"]
        scale, bias = prepared["scale"], prepared.get("bias")

        def run(inputs):
            x = inputs[0].contiguous()
            shape = _normalized_shape(x, axis)
            n = 1
            for d in shape:
                n *= d
            w = scale.expand(shape).reshape(n) if scale is not None else None
            bb = bias.expand(shape).reshape(n) if bias is not None else None
            r = inputs[1].contiguous().view(-1, n) if residual else None
            return [layer_norm(x.view(-1, n), w, bb, eps, residual=r).view(x.shape)]

        return run


@tactic
class SoftmaxTorch(Tactic):
    """The reference: ``torch.softmax`` / ``log_softmax`` over the last axis."""

    name = "softmax.torch"
    kind = "Softmax"
    reference = True

    def runner(self, layer, prepared, precision, config, context):
        fn = torch.log_softmax if layer.attrs["log"] else torch.softmax
        return lambda inputs: [fn(inputs[0], -1)]


@tactic
class SoftmaxTriton(Tactic):
    """``kiln.kernels.softmax``: one row per program, fp32 max and sum."""

    name = "softmax.triton"
    kind = "Softmax"
    source = "triton"
    devices = ("cuda",)
    level = 2

    def runner(self, layer, prepared, precision, config, context):
        from kiln.kernels.softmax import softmax

        log = layer.attrs["log"]
        return lambda inputs: [softmax(inputs[0].contiguous(), log=log)]
