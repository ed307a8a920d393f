"""The Node tactic: a layer kiln has no faster kernel for runs its reference op function.

In a reduced-precision layer the float inputs arrive cast (the engine casts them); ops whose
numerics need range or many-term sums (the op fact ``accumulate_fp32``: sums of squares, products, norms)
compute in fp32 and round their result once. Constant inputs are cast once, at build time.
"""

from __future__ import annotations

import torch

from kiln.builder.tactics.base import Tactic, tactic
from kiln.ops.registry import op_facts
from kiln.precision import PRECISION_DTYPES


def castable(op_type: str, index: int) -> bool:
    """Whether input ``index`` of ``op_type`` carries data that a reduced-precision layer may cast (not a
    parameter such as Resize's scales: the op's ``parameter_inputs`` fact)."""
    return index not in op_facts(op_type, None).parameter_inputs


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
        facts = op_facts(op_type, None)
        prepared = {}
        for slot, arg in enumerate(layer.attrs["args"]):
            if arg is None or "weight" not in arg:
                continue
            name = arg["weight"]
            tensor = weights[name]
            if dtype is not None and tensor.dtype == torch.float32 and castable(op_type, slot) \
                    and not facts.accumulate_fp32:
                tensor = tensor.to(dtype)
            prepared[name] = tensor
        for name in layer.attrs.get("captured_weights", []):
            prepared[name] = weights[name]
        return prepared

    def runner(self, layer, prepared, precision, config, context):
        step = context.node_step(layer.nodes[0])
        fn, op = step.fn, step.op
        plan = []
        facts = op_facts(layer.op_types[0], None)
        for position, arg in enumerate(layer.attrs["args"]):
            if arg is None:
                plan.append((0, None))
            elif "weight" in arg:
                value = prepared[arg["weight"]]
                plan.append((1, value.cpu() if position in facts.host_inputs else value))
            else:
                plan.append((2, arg["input"]))
        captured = layer.attrs.get("captured", [])
        first_captured = len(layer.inputs) - len(captured)
        captured_weights = {name: prepared[name] for name in layer.attrs.get("captured_weights", [])}
        dtype = PRECISION_DTYPES.get(precision)
        upcast = dtype in (torch.float16, torch.bfloat16) and facts.accumulate_fp32

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
                result = tuple(
                    r.to(dtype) if isinstance(r, torch.Tensor) and r.dtype == torch.float32 else r for r in result
                )
            return list(result)

        return run
