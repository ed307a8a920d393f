"""The Node tactic: a layer kiln has no faster kernel for runs its reference op function.

In a reduced-precision layer the float inputs arrive cast (the engine casts them); ops whose
numerics need range or many-term sums (``ACCUMULATE_FP32``: sums of squares, products, norms)
compute in fp32 and round their result once. Constant inputs are cast once, at build time.
"""

from __future__ import annotations

import torch

from kiln.builder.tactics.base import Tactic, tactic
from kiln.precision import PRECISION_DTYPES

# Ops that compute in fp32 inside a reduced-precision layer (the "statistics in fp32" rule).
ACCUMULATE_FP32 = frozenset({
    "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceProd", "CumSum",
    "InstanceNormalization", "GroupNormalization", "LpNormalization", "MeanVarianceNormalization",
    "RMSNormalization", "BatchNormalization", "LpPool", "GlobalLpPool", "LRN", "Softmax", "LogSoftmax",
    "Hardmax", "Einsum",
})

# (op, input index) pairs that carry parameters, not data: never cast to a reduced precision.
PARAMETER_INPUTS = frozenset({("Resize", 1), ("Resize", 2), ("Upsample", 1), ("Range", 0), ("Range", 1), ("Range", 2)})


# (op, input) positions the reference ops read with ``tolist()``: constants there stay on the CPU,
# so reading them neither waits for the GPU nor breaks CUDA-graph capture.
_REDUCE_OPS = ("ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2",
               "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
HOST_INPUTS = frozenset({("Reshape", 1), ("Expand", 1), ("Slice", 1), ("Slice", 2), ("Slice", 3), ("Slice", 4),
                         ("Squeeze", 1), ("Unsqueeze", 1), ("ConstantOfShape", 0), ("Tile", 1), ("Split", 1),
                         ("Pad", 1), ("Pad", 3), ("Resize", 2), ("Resize", 3), ("Upsample", 1), ("TopK", 1),
                         ("OneHot", 1), ("CenterCropPad", 1), ("Trilu", 1), ("CumSum", 1),
                         *((op, 1) for op in _REDUCE_OPS)})


def castable(op_type: str, index: int) -> bool:
    return (op_type, index) not in PARAMETER_INPUTS


@tactic
class NodeReference(Tactic):
    """The node's registered reference op (``kiln.ops``), run as it is."""

    name = "node.reference"
    kind = "Node"
    reference = True
    precisions = frozenset(PRECISION_DTYPES) | {"native"}

    def prepare(self, layer, weights, precision, config):
        dtype = PRECISION_DTYPES.get(precision)
        op_type = layer.op_types[0]
        prepared = {}
        for slot, arg in enumerate(layer.attrs["args"]):
            if arg is None or "weight" not in arg:
                continue
            name = arg["weight"]
            tensor = weights[name]
            if dtype is not None and tensor.dtype == torch.float32 and castable(op_type, slot) \
                    and op_type not in ACCUMULATE_FP32:
                tensor = tensor.to(dtype)
            prepared[name] = tensor
        for name in layer.attrs.get("captured_weights", []):
            prepared[name] = weights[name]
        return prepared

    def runner(self, layer, prepared, precision, config, context):
        step = context.node_step(layer.nodes[0])
        fn, op = step.fn, step.op
        plan = []
        op_type = layer.op_types[0]
        for position, arg in enumerate(layer.attrs["args"]):
            if arg is None:
                plan.append((0, None))
            elif "weight" in arg:
                value = prepared[arg["weight"]]
                plan.append((1, value.cpu() if (op_type, position) in HOST_INPUTS else value))
            else:
                plan.append((2, arg["input"]))
        captured = layer.attrs.get("captured", [])
        first_captured = len(layer.inputs) - len(captured)
        captured_weights = {name: prepared[name] for name in layer.attrs.get("captured_weights", [])}
        dtype = PRECISION_DTYPES.get(precision)
        upcast = dtype in (torch.float16, torch.bfloat16) and layer.op_types[0] in ACCUMULATE_FP32

        def run(inputs):
            args = [value if kind == 1 else inputs[value] if kind == 2 else None for kind, value in plan]
            if upcast:
                args = [a.float() if isinstance(a, torch.Tensor) and a.dtype == dtype else a for a in args]
            if captured or captured_weights:
                op._outer = {**captured_weights, **dict(zip(captured, inputs[first_captured:]))}
            try:
                result = fn(op, *args)
            finally:
                op._outer = None
            if not isinstance(result, tuple):
                result = (result,)
            if upcast:
                result = tuple(r.to(dtype) if isinstance(r, torch.Tensor) and r.dtype == torch.float32 else r for r in result)
            return list(result)

        return run
