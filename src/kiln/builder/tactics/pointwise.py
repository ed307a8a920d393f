"""Pointwise tactics: a fused chain of elementwise ops as one Triton kernel, or op by op in torch.

The chain is a small program (``ai.kiln::FusedPointwise``'s, see ``kiln.passes.fuse_pointwise``); both tactics
compute it in fp32 and store the result in the layer's precision, so a chain costs one rounding, not one per op.
"""

from __future__ import annotations

import torch

from kiln.activations import evaluate
from kiln.builder.tactics.base import Tactic, tactic
from kiln.precision import PRECISION_DTYPES


class _Pointwise(Tactic):
    kind = "Pointwise"

    def prepare(self, layer, weights, precision, config):
        return {role: t.float().contiguous() for role, t in weights.items()}

    def prep_id(self, config):
        return "pointwise"


def _extra(layer, prepared) -> list[torch.Tensor]:
    return [prepared[f"c{i}"] for i in range(len(layer.weights))]


def _out_dtype(layer, precision, inputs) -> torch.dtype:
    if precision == "native":
        return inputs[0].dtype
    return PRECISION_DTYPES[precision]


@tactic
class PointwiseTorch(_Pointwise):
    """The reference: each op in torch, in fp32, one kernel per op."""

    name = "pointwise.torch"
    reference = True

    def runner(self, layer, prepared, precision, config, context):
        program, extra = layer.attrs["program"], _extra(layer, prepared)
        dtype = PRECISION_DTYPES.get(precision)

        def run(inputs):
            out = evaluate(program, list(inputs) + extra)
            return [out.to(dtype or inputs[0].dtype)]

        return run


@tactic
class PointwiseTriton(_Pointwise):
    """The chain as one generated Triton kernel (``kiln.kernels.pointwise``): one read of each
    input and one write, whatever the chain's length."""

    name = "pointwise.triton"
    source = "triton"
    devices = ("cuda",)
    level = 1

    def heuristic(self, layer, precision, device):
        return 1

    def configs(self, layer, level, precision, device):
        if level <= 3:
            return [{"block": 1024, "num_warps": 4}]
        return [{"block": b, "num_warps": w} for b in (512, 1024, 2048) for w in (4, 8)]

    def runner(self, layer, prepared, precision, config, context):
        from kiln.kernels.pointwise import PointwiseKernel

        extra = _extra(layer, prepared)
        kernel = PointwiseKernel(layer.attrs["program"], len(layer.inputs) + len(extra),
                                 block=config.get("block", 1024), num_warps=config.get("num_warps", 4))
        dtype = PRECISION_DTYPES.get(precision)

        def run(inputs):
            return [kernel(list(inputs) + extra, dtype or inputs[0].dtype)]

        return run


