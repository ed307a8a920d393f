"""The one table of activations and elementwise ops: names, attributes with their defaults, and the
torch implementation. The fusion passes, the ``ai.kiln`` reference ops, the tactics and the Triton
pointwise kernel all read it, so an op is added (or a default corrected) in one place.

Two tables:

- ``FUSED``: the activations a fused op applies after its conv or GEMM (``ai.kiln::FusedConv`` and
  ``FusedGemm``'s ``activation`` attribute, with ``activation_params`` in the order of
  ``Activation.params``). ``layer_spec`` turns one into the spec the builder's layers carry
  (``{"op": "relu"}``, ``{"op": "clip", "min": 0.0, "max": 6.0}``), and ``apply_spec`` applies a spec in
  place, as the tactics do.
- ``ELEMENTWISE``: the ONNX elementwise ops a pointwise chain (``ai.kiln::FusedPointwise``) may hold,
  with the float attributes each reads and their ONNX defaults; ``evaluate`` runs a chain's program
  (see ``kiln.kernels.pointwise`` for its form) op by op in fp32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SELU_ALPHA = 1.67326319217681884765625
SELU_GAMMA = 1.05070102214813232421875


@dataclass(frozen=True)
class Activation:
    """One activation a fused op may apply: its ``activation`` name, its ``activation_params`` (ONNX
    attribute names and defaults, in order), and its reference implementation."""

    name: str
    params: tuple[tuple[str, float], ...]
    reference: Callable[[torch.Tensor, Sequence[float]], torch.Tensor]

    def values(self, params: Sequence[float]) -> list[float]:
        """The params with defaults filled in."""
        return [float(params[i]) if len(params) > i else default for i, (_, default) in enumerate(self.params)]


FUSED: dict[str, Activation] = {a.name: a for a in (
    Activation("Relu", (), lambda y, p: torch.relu(y)),
    Activation("Clip", (("min", -math.inf), ("max", math.inf)), lambda y, p: torch.clamp(y, min=p[0], max=p[1])),
    Activation("LeakyRelu", (("alpha", 0.01),), lambda y, p: F.leaky_relu(y, p[0])),
    Activation("Sigmoid", (), lambda y, p: torch.sigmoid(y)),
    Activation("Tanh", (), lambda y, p: torch.tanh(y)),
    Activation("HardSigmoid", (("alpha", 0.2), ("beta", 0.5)), lambda y, p: torch.clamp(p[0] * y + p[1], 0.0, 1.0)),
    Activation("HardSwish", (), lambda y, p: y * torch.clamp(y / 6.0 + 0.5, 0.0, 1.0)),
    # approximate: 0 for erf, 1 for tanh
    Activation("Gelu", (("approximate", 0.0),), lambda y, p: F.gelu(y, approximate="tanh" if p[0] == 1 else "none")),
    Activation("SiLU", (), lambda y, p: y * torch.sigmoid(y)),
)}  # fmt: skip


def apply_activation(name: str, params: Sequence[float], y: torch.Tensor) -> torch.Tensor:
    """``y`` through the named fused activation (``""``: none); the reference ops use it."""
    if name == "":
        return y
    if name not in FUSED:
        raise ValueError(f"unknown activation {name!r}; expected one of {('', *FUSED)}")
    activation = FUSED[name]
    return activation.reference(y, activation.values(params))


def layer_spec(name: str, params: Sequence[float]) -> dict | None:
    """The activation spec a conv or GEMM layer carries for a fused op's ``activation`` and params."""
    if name == "":
        return None
    p = FUSED[name].values(params)
    if name == "LeakyRelu":
        return {"op": "leaky_relu", "alpha": p[0]}
    if name == "HardSigmoid":
        return {"op": "hardsigmoid", "alpha": p[0], "beta": p[1]}
    if name == "Clip":
        return {"op": "clip", "min": None if p[0] == -math.inf else p[0], "max": None if p[1] == math.inf else p[1]}
    if name == "Gelu":
        return {"op": "gelu_tanh" if p[0] == 1 else "gelu_erf"}
    return {"op": name.lower()}


# the layer specs the Triton GEMM (kiln.kernels.gemm) computes in its epilogue, in registers
TRITON_EPILOGUES = ("relu", "gelu_erf", "gelu_tanh", "sigmoid", "silu")


def apply_spec(y: torch.Tensor, spec: Mapping | None) -> torch.Tensor:
    """``y`` after a layer's activation spec; ``y`` is a fresh tensor the caller owns, so it may be
    overwritten (the tactics' epilogue)."""
    if spec is None:
        return y
    op = spec["op"]
    if op == "relu":
        return y.relu_()
    if op == "sigmoid":
        return y.sigmoid_()
    if op == "tanh":
        return y.tanh_()
    if op == "silu":
        return F.silu(y, inplace=True)
    if op == "hardswish":
        return F.hardswish(y, inplace=True)
    if op == "hardsigmoid":
        alpha, beta = spec["alpha"], spec["beta"]
        if math.isclose(alpha, 1 / 6) and beta == 0.5:
            return F.hardsigmoid(y, inplace=True)
        return y.mul_(alpha).add_(beta).clamp_(0.0, 1.0)
    if op == "leaky_relu":
        return F.leaky_relu(y, spec["alpha"], inplace=True)
    if op == "gelu_erf":
        return F.gelu(y)
    if op == "gelu_tanh":
        return F.gelu(y, approximate="tanh")
    if op == "clip":
        lo, hi = spec["min"], spec["max"]
        if lo is None and hi is None:
            return y
        return y.clamp_(lo, hi)
    raise ValueError(f"unknown activation {op!r}")


# -- elementwise ops of a pointwise chain ---------------------------------------------------------

# Float attributes each op reads, with ONNX's defaults. None means "absent" (Clip's bounds).
FLOAT_ATTRS: dict[str, dict[str, float | None]] = {
    "LeakyRelu": {"alpha": 0.01},
    "HardSigmoid": {"alpha": 0.2, "beta": 0.5},
    "Elu": {"alpha": 1.0},
    "Selu": {"alpha": SELU_ALPHA, "gamma": SELU_GAMMA},
    "ThresholdedRelu": {"alpha": 1.0},
    "Celu": {"alpha": 1.0},
    "Clip": {"min": None, "max": None},  # opset < 11 gives the bounds as attributes
}
# The attributes of each op a chain may hold that are not floats (a node with any other attribute,
# an old-opset Add's broadcast/axis say, stays out of a chain).
OTHER_ATTRS: dict[str, set[str]] = {"Gelu": {"approximate"}}


def _celu(x: torch.Tensor, a: float) -> torch.Tensor:
    return torch.clamp(x, min=0) + torch.clamp(a * (torch.exp(x / a) - 1), max=0)


UNARY: dict[str, Callable] = {
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
    "HardSigmoid": lambda a, x: torch.clamp(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0.0, 1.0),
    "HardSwish": lambda a, x: x * torch.clamp(x / 6 + 0.5, 0.0, 1.0),
    "Gelu": lambda a, x: F.gelu(x, approximate="tanh" if a.get("approximate", "none") == "tanh" else "none"),
    "Elu": lambda a, x: torch.where(x > 0, x, a.get("alpha", 1.0) * (torch.exp(x) - 1)),
    "Selu": lambda a, x: (
        a.get("gamma", SELU_GAMMA) * torch.where(x > 0, x, a.get("alpha", SELU_ALPHA) * (torch.exp(x) - 1))
    ),
    "Softplus": lambda a, x: F.softplus(x),
    "Softsign": lambda a, x: x / (1 + x.abs()),
    "Identity": lambda a, x: x,
    "Floor": lambda a, x: torch.floor(x),
    "Ceil": lambda a, x: torch.ceil(x),
    "Sin": lambda a, x: torch.sin(x),
    "Cos": lambda a, x: torch.cos(x),
    "Mish": lambda a, x: x * torch.tanh(F.softplus(x)),
    "ThresholdedRelu": lambda a, x: torch.where(x > a.get("alpha", 1.0), x, torch.zeros_like(x)),
    "Celu": lambda a, x: _celu(x, a.get("alpha", 1.0)),
}
BINARY: dict[str, Callable] = {
    "Add": lambda a, x, y: x + y,
    "Sub": lambda a, x, y: x - y,
    "Mul": lambda a, x, y: x * y,
    "Div": lambda a, x, y: x / y,
    "Pow": lambda a, x, y: torch.pow(x, y),
}
# Max and Min take any number of inputs in ONNX; a chain holds their two-input form.
VARIADIC: dict[str, Callable] = {
    "Max": lambda a, x, y: torch.maximum(x, y),
    "Min": lambda a, x, y: torch.minimum(x, y),
}
ELEMENTWISE: frozenset[str] = frozenset(UNARY) | frozenset(BINARY) | frozenset(VARIADIC) | {"Clip"}


def evaluate(program: Sequence[Mapping], inputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """A pointwise chain's output, computed op by op with torch in fp32."""
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
            fn = UNARY.get(op) or BINARY.get(op) or VARIADIC[op]
            values.append(fn(step.get("attrs", {}), *[values[i] for i in step["args"]]))
    return values[-1]
