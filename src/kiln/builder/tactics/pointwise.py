"""Pointwise tactics: a fused chain of elementwise ops as one Triton kernel, or op by op in torch.

The chain is a small program (see ``kiln.builder.layers``); both tactics compute it in fp32 and
store the result in the layer's precision, so a chain costs one rounding, not one per op.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from kiln.builder.tactics.base import Tactic, tactic
from kiln.precision import PRECISION_DTYPES

_SELU_ALPHA = 1.67326319217681884765625
_SELU_GAMMA = 1.05070102214813232421875


def _celu(x, a):
    return torch.clamp(x, min=0) + torch.clamp(a * (torch.exp(x / a) - 1), max=0)


_TORCH_OPS: dict[str, Callable] = {
    "Add": lambda a, x, y: x + y,
    "Sub": lambda a, x, y: x - y,
    "Mul": lambda a, x, y: x * y,
    "Div": lambda a, x, y: x / y,
    "Neg": lambda a, x: -x,
    "Abs": lambda a, x: x.abs(),
    "Relu": lambda a, x: torch.relu(x),
    "LeakyRelu": lambda a, x: F.leaky_relu(x, a.get("alpha", 0.01)),
    "Sigmoid": lambda a, x: torch.sigmoid(x),
    "Tanh": lambda a, x: torch.tanh(x),
    "Exp": lambda a, x: torch.exp(x),
    "Log": lambda a, x: torch.log(x),
    "Sqrt": lambda a, x: torch.sqrt(x),
    "Reciprocal": lambda a, x: torch.reciprocal(x),
    "Erf": lambda a, x: torch.erf(x),
    "Pow": lambda a, x, y: torch.pow(x, y),
    "HardSigmoid": lambda a, x: torch.clamp(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0.0, 1.0),
    "HardSwish": lambda a, x: x * torch.clamp(x / 6 + 0.5, 0.0, 1.0),
    "Gelu": lambda a, x: F.gelu(x, approximate="tanh" if a.get("approximate", "none") == "tanh" else "none"),
    "Elu": lambda a, x: torch.where(x > 0, x, a.get("alpha", 1.0) * (torch.exp(x) - 1)),
    "Selu": lambda a, x: a.get("gamma", _SELU_GAMMA) * torch.where(x > 0, x, a.get("alpha", _SELU_ALPHA) * (torch.exp(x) - 1)),
    "Softplus": lambda a, x: F.softplus(x),
    "Softsign": lambda a, x: x / (1 + x.abs()),
    "Max": lambda a, x, y: torch.maximum(x, y),
    "Min": lambda a, x, y: torch.minimum(x, y),
    "Identity": lambda a, x: x,
    "Floor": lambda a, x: torch.floor(x),
    "Ceil": lambda a, x: torch.ceil(x),
    "Sin": lambda a, x: torch.sin(x),
    "Cos": lambda a, x: torch.cos(x),
    "Mish": lambda a, x: x * torch.tanh(F.softplus(x)),
    "ThresholdedRelu": lambda a, x: torch.where(x > a.get("alpha", 1.0), x, torch.zeros_like(x)),
    "Celu": lambda a, x: _celu(x, a.get("alpha", 1.0)),
}


def evaluate(program: list[Mapping], inputs: list[torch.Tensor]) -> torch.Tensor:
    """The program's output, computed op by op with torch in fp32."""
    values: list[torch.Tensor] = []
    device = inputs[0].device if inputs else None
    for step in program:
        op = step["op"]
        if op == "input":
            values.append(inputs[step["index"]].float())
        elif op == "const":
            values.append(torch.tensor(step["value"], dtype=torch.float32, device=device))
        elif op == "Clip":
            x = values[step["args"][0]]
            lo, hi = step["attrs"].get("min"), step["attrs"].get("max")
            values.append(x if lo is None and hi is None else torch.clamp(x, lo, hi))
        else:
            values.append(_TORCH_OPS[op](step.get("attrs", {}), *[values[i] for i in step["args"]]))
    return values[-1]


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


