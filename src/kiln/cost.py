"""FLOPs and bytes moved per node, from the shapes and dtypes the loader inferred.

``kiln doctor`` ranks its findings by the share of the model's work they touch; this module is the
estimate behind that share. It is a static count, not a measurement:

- **MatMul**, MatMulInteger, QLinearMatMul: ``2 * K * numel(Y)`` (``2*M*N*K`` for each broadcast
  batch). **Gemm**: ``2 * K * numel(Y)``, plus ``numel(Y)`` when it adds ``C``.
- **Conv**, ConvInteger, QLinearConv, DeformConv, ``ai.kiln::FusedConv``, any spatial rank:
  ``2 * numel(Y) * Cin/group * prod(kernel)`` (``W`` is ``[Cout, Cin/group, k...]``), plus
  ``numel(Y)`` for each epilogue (bias; FusedConv's residual and activation).
  **ConvTranspose**: ``2 * numel(X) * Cout/group * prod(kernel)`` (``W`` is ``[Cin, Cout/group, k...]``),
  plus ``numel(Y)`` for a bias.
- **Attention** (opset 23, 3-D or 4-D) and ``ai.kiln::FusedAttention``: ``2 * numel(Q) * S`` for the
  scores, ``2 * numel(Y) * S`` for the weighted sum, and ``5`` per score for scale, mask and softmax.
- **RNN / GRU / LSTM**: ``2 * steps * batch * (directions * gates * H) * (I + H)``; the gate math is
  not counted.
- **Normalizations** (LayerNorm, BatchNorm, Instance/Group/RMS/Lp/MVN, Softmax, LogSoftmax,
  Hardmax): 5 per input element. **Reductions** (Reduce*, ArgMax/Min, Global*Pool, CumSum, TopK):
  1 per input element. **Pooling**: ``numel(Y) * prod(kernel_shape)``.
- **Pointwise** ops (arithmetic, activations, comparisons, logic, quantize/dequantize, Resize): 1 per
  output element. **Data movement** (reshapes, transposes, gathers, slices, concat, casts, shape
  ops): 0.
- **If**: its costlier branch; **Loop**, **Scan**, **SequenceMap**: their body once (the trip count
  is not known statically). Other ops count bytes only and are listed in ``ModelCost.unmodelled``.

Bytes moved by a node = the sizes of its distinct input and output tensors (weights included).
A value's shape is the one recorded for it in ``shapes`` (value name -> shape, e.g. from a reference
run at concrete input shapes), else its inferred shape. A symbolic dimension takes its value from
``dims`` (symbol name -> size; expressions such as ``2*s0`` are evaluated when their symbols are
known) and is otherwise taken as 1; every dimension assumed that way is listed in
``ModelCost.assumed``, so a report can say its numbers are per unit of that dimension. Values with
no shape or dtype count 0 bytes and are listed too.
"""

from __future__ import annotations

import ast
import math
import operator
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import onnx_ir as ir

KILN_DOMAIN = "ai.kiln"

MATMUL_OPS = frozenset({"MatMul", "MatMulInteger", "QLinearMatMul"})
CONV_OPS = frozenset({"Conv", "ConvInteger", "QLinearConv", "DeformConv", "FusedConv"})
RNN_GATES = {"RNN": 1, "GRU": 3, "LSTM": 4}
NORMALIZATION_OPS = frozenset({
    "LayerNormalization", "BatchNormalization", "InstanceNormalization", "GroupNormalization", "RMSNormalization",
    "LpNormalization", "MeanVarianceNormalization", "Softmax", "LogSoftmax", "Hardmax", "LRN", "SkipLayerNormalization",
})
NORMALIZATION_FLOPS = 5
REDUCTION_OPS = frozenset({
    "ReduceSum", "ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1", "ReduceL2", "ReduceLogSum",
    "ReduceLogSumExp", "ReduceSumSquare", "ArgMax", "ArgMin", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool",
    "CumSum", "CumProd", "TopK",
})
POOL_OPS = frozenset({"AveragePool", "MaxPool", "LpPool"})
POINTWISE_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Neg", "Abs", "Relu", "LeakyRelu", "PRelu", "Sigmoid", "Tanh", "Exp", "Log", "Sqrt",
    "Reciprocal", "Erf", "Pow", "Clip", "HardSigmoid", "HardSwish", "Gelu", "Elu", "Selu", "Softplus", "Softsign",
    "Max", "Min", "Mean", "Sum", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos", "Tan", "Asin", "Acos", "Atan",
    "Sinh", "Cosh", "Asinh", "Acosh", "Atanh", "Mish", "ThresholdedRelu", "Celu", "Shrink", "Swish", "Mod",
    "Equal", "Less", "LessOrEqual", "Greater", "GreaterOrEqual", "Not", "And", "Or", "Xor", "Where", "IsNaN",
    "IsInf", "BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot", "QuantizeLinear",
    "DequantizeLinear", "DynamicQuantizeLinear", "Resize", "Upsample", "GridSample",
})
MOVEMENT_OPS = frozenset({
    "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Concat", "Split", "Slice", "Gather", "GatherElements",
    "GatherND", "Scatter", "ScatterElements", "ScatterND", "Expand", "Tile", "Pad", "Identity", "Shape", "Size",
    "Constant", "ConstantOfShape", "Cast", "CastLike", "DepthToSpace", "SpaceToDepth", "Range", "NonZero",
    "Compress", "Dropout", "OneHot", "Trilu", "EyeLike", "ReverseSequence", "CenterCropPad", "SplitToSequence",
    "ConcatFromSequence", "SequenceAt", "SequenceConstruct", "SequenceEmpty", "SequenceErase", "SequenceInsert",
    "SequenceLength", "Optional", "OptionalGetElement", "OptionalHasElement",
})
LOOP_OPS = frozenset({"Loop", "Scan", "SequenceMap"})


@dataclass(frozen=True)
class Cost:
    """Estimated work of one node (or a sum of nodes)."""

    flops: float = 0.0
    bytes: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.flops + other.flops, self.bytes + other.bytes)


@dataclass
class ModelCost:
    """The model's totals, each main-graph node's cost by name, and what the estimate had to assume."""

    flops: float = 0.0
    bytes: float = 0.0
    nodes: dict[str, Cost] = field(default_factory=dict)
    assumed: list[str] = field(default_factory=list)  # symbolic dims with no given value, taken as 1
    unshaped: list[str] = field(default_factory=list)  # values with no inferred shape or dtype (0 bytes)
    unmodelled: dict[str, int] = field(default_factory=dict)  # op type -> nodes counted as bytes only

    def of(self, names: Iterable[str]) -> Cost:
        """The summed cost of the named nodes (names not in the main graph count nothing)."""
        total = Cost()
        for name in dict.fromkeys(names):
            total = total + self.nodes.get(name, Cost())
        return total

    def to_json(self) -> dict:
        return {"flops": self.flops, "bytes": self.bytes, "assumed_dims": list(self.assumed),
                "unshaped_values": list(self.unshaped), "unmodelled_ops": dict(self.unmodelled)}


class _Notes:
    """What one estimate assumed (shared by the nodes of a model)."""

    def __init__(self, shapes: Mapping[str, Sequence[int]] | None = None) -> None:
        self.shapes = shapes or {}
        self.assumed: dict[str, None] = {}
        self.unshaped: dict[str, None] = {}
        self.unmodelled: dict[str, int] = {}


_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.FloorDiv: operator.floordiv,
           ast.Div: operator.truediv, ast.Mod: operator.mod}


def _evaluate(expression: str, dims: Mapping[str, int]) -> int | None:
    """An integer expression of symbols (``2*s0``, ``s1 - 1``, ``(s0 + 1)//2``), or None."""
    try:
        tree = ast.parse(expression, mode="eval").body
    except (SyntaxError, ValueError):
        return None

    def walk(node: ast.AST) -> float:
        if isinstance(node, ast.Constant) and isinstance(node.value, int | float) and not isinstance(node.value, bool):
            return node.value
        if isinstance(node, ast.Name) and node.id in dims:
            return dims[node.id]
        if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
            return _BINARY[type(node.op)](walk(node.left), walk(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -walk(node.operand)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("floor", "ceil") \
                and len(node.args) == 1 and not node.keywords:
            return getattr(math, node.func.id)(walk(node.args[0]))
        raise ValueError(expression)

    try:
        value = walk(tree)
    except (ValueError, ZeroDivisionError):
        return None
    return int(value) if float(value).is_integer() and value >= 0 else None


def symbol_value(name: str, dims: Mapping[str, int]) -> int | None:
    """A symbolic dimension's size: its value in ``dims``, or its expression's (``2*s0``), or None."""
    if name in dims:
        return int(dims[name])
    return _evaluate(name, dims)


def resolve_dim(dim: int | ir.SymbolicDim | ir.SymbolicDimProtocol | None, dims: Mapping[str, int],
                notes: _Notes | None = None) -> int:
    """A dimension's size: its int, its symbol's value in ``dims`` (or the expression's), else 1. A
    negative int is an unknown dim (an in-memory model's ``-1``, as in a loaded file)."""
    if isinstance(dim, int) and dim >= 0:
        return dim
    name = None if isinstance(dim, int) else getattr(dim, "value", dim)
    if name is None:
        if notes is not None:
            notes.assumed["?"] = None
        return 1
    value = symbol_value(str(name), dims)
    if value is not None:
        return value
    name = str(name)
    if notes is not None:
        notes.assumed[name] = None
    return 1


def _shape(value: ir.Value | None, dims: Mapping[str, int], notes: _Notes) -> list[int] | None:
    if value is None:
        return None
    if value.name and value.name in notes.shapes:
        return [int(d) for d in notes.shapes[value.name]]
    shape: ir.Shape | ir.ShapeProtocol | None = value.shape
    if shape is None and value.const_value is not None:
        shape = value.const_value.shape
    if shape is None:
        if value.name:
            notes.unshaped[value.name] = None
        return None
    return [resolve_dim(d, dims, notes) for d in shape]


def _numel(value: ir.Value | None, dims: Mapping[str, int], notes: _Notes) -> int:
    shape = _shape(value, dims, notes)
    return 0 if shape is None else math.prod(shape)


def _itemsize(value: ir.Value) -> float | None:
    dtype = value.dtype
    if dtype is None and value.const_value is not None:
        dtype = value.const_value.dtype
    if dtype is None or dtype in (ir.DataType.UNDEFINED, ir.DataType.STRING):
        return None
    try:
        return dtype.itemsize
    except TypeError:
        return None


def _bytes(node: ir.Node, dims: Mapping[str, int], notes: _Notes) -> float:
    total = 0.0
    seen: set[int] = set()
    for value in [*node.inputs, *node.outputs]:
        if value is None or not value.name or id(value) in seen:
            continue
        seen.add(id(value))
        size = _itemsize(value)
        if size is None:
            notes.unshaped[value.name] = None
            continue
        total += _numel(value, dims, notes) * size
    return total


def _input(node: ir.Node, index: int) -> ir.Value | None:
    value = node.inputs[index] if index < len(node.inputs) else None
    return value if value is not None and value.name else None


def _attr(node: ir.Node, name: str, default):
    attribute = node.attributes.get(name)
    return default if attribute is None else attribute.value


def _conv_flops(node: ir.Node, dims: Mapping[str, int], notes: _Notes) -> float:
    op = node.op_type
    w = _input(node, 3 if op == "QLinearConv" else 1)
    w_shape = _shape(w, dims, notes)
    y = _numel(node.outputs[0], dims, notes)
    if w_shape is None or len(w_shape) < 2:
        return 0.0
    flops = 2.0 * y * w_shape[1] * math.prod(w_shape[2:])
    bias_index = {"Conv": 2, "FusedConv": 2, "DeformConv": 3, "QLinearConv": 8}.get(op)
    if bias_index is not None and _input(node, bias_index) is not None:
        flops += y
    if op == "FusedConv":
        flops += y * ((_input(node, 3) is not None) + bool(_attr(node, "activation", "")))
    return flops


def _attention_flops(node: ir.Node, dims: Mapping[str, int], notes: _Notes) -> float:
    q = _shape(_input(node, 0), dims, notes)
    k = _shape(_input(node, 1), dims, notes)
    y = _numel(node.outputs[0], dims, notes)
    if q is None or k is None or not q or not k:
        return 0.0
    q_numel = math.prod(q)
    if node.op_type == "FusedAttention":  # K arrives transposed: [..., D, S]
        seq = k[-1]
        rows = q_numel // max(q[-1], 1)
    else:  # opset-23 Attention: 4-D [B, H, S, D] or 3-D [B, S, H*D] with q_num_heads
        seq = k[-2] if len(k) == 4 else k[1]
        past = _shape(_input(node, 4), dims, notes)
        if past is not None and len(past) == 4:
            seq += past[-2]
        heads = 1 if len(q) == 4 else int(_attr(node, "q_num_heads", 1) or 1)
        rows = q_numel // max(q[-1] // max(heads, 1), 1)
    scores = rows * seq
    return 2.0 * q_numel * seq + 2.0 * y * seq + NORMALIZATION_FLOPS * scores


def _rnn_flops(node: ir.Node, dims: Mapping[str, int], notes: _Notes) -> float:
    x, w, r = (_shape(_input(node, i), dims, notes) for i in range(3))
    if x is None or w is None or r is None or len(x) != 3 or len(w) != 3 or len(r) != 3:
        return 0.0
    steps_times_batch = x[0] * x[1]
    return 2.0 * steps_times_batch * w[0] * w[1] * (w[2] + r[2])


def _subgraph_cost(node: ir.Node, dims: Mapping[str, int], notes: _Notes) -> Cost:
    """If: the costlier branch; Loop/Scan/SequenceMap: the body once."""
    branches = []
    for attribute in node.attributes.values():
        graphs = attribute.value if attribute.type == ir.AttributeType.GRAPHS else \
            [attribute.value] if attribute.type == ir.AttributeType.GRAPH else []
        for graph in graphs:
            total = Cost()
            for inner in graph:
                total = total + _node_cost(inner, dims, notes)
            branches.append(total)
    if not branches:
        return Cost()
    if node.op_type == "If":
        return max(branches, key=lambda c: (c.flops, c.bytes))
    return sum(branches, Cost())


def _flops(node: ir.Node, dims: Mapping[str, int], notes: _Notes) -> float | None:
    op = node.op_type
    first = _input(node, 0)
    if node.domain not in ("", "ai.onnx", KILN_DOMAIN):
        return None
    if op in MATMUL_OPS:
        a = _shape(first, dims, notes)
        return 0.0 if not a else 2.0 * a[-1] * _numel(node.outputs[0], dims, notes)
    if op == "Gemm":
        a = _shape(first, dims, notes)
        if a is None or len(a) != 2:
            return 0.0
        k = a[0] if _attr(node, "transA", 0) else a[1]
        y = _numel(node.outputs[0], dims, notes)
        return 2.0 * k * y + (y if _input(node, 2) is not None else 0)
    if op in CONV_OPS:
        return _conv_flops(node, dims, notes)
    if op == "ConvTranspose":
        w = _shape(_input(node, 1), dims, notes)
        if w is None or len(w) < 2:
            return 0.0
        bias = _numel(node.outputs[0], dims, notes) if _input(node, 2) is not None else 0
        return 2.0 * _numel(first, dims, notes) * w[1] * math.prod(w[2:]) + bias
    if op in ("Attention", "FusedAttention"):
        return _attention_flops(node, dims, notes)
    if op in RNN_GATES:
        return _rnn_flops(node, dims, notes)
    if op in NORMALIZATION_OPS:
        return float(NORMALIZATION_FLOPS * _numel(first, dims, notes))
    if op in REDUCTION_OPS:
        return float(_numel(first, dims, notes))
    if op in POOL_OPS:
        kernel = _attr(node, "kernel_shape", None)
        return float(_numel(node.outputs[0], dims, notes) * math.prod(kernel)) if kernel else 0.0
    if op in POINTWISE_OPS:
        return float(_numel(node.outputs[0], dims, notes))
    if op in MOVEMENT_OPS or op == "If" or op in LOOP_OPS:
        return 0.0
    return None


def _node_cost(node: ir.Node, dims: Mapping[str, int], notes: _Notes) -> Cost:
    flops = _flops(node, dims, notes)
    if flops is None:
        key = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}"
        notes.unmodelled[key] = notes.unmodelled.get(key, 0) + 1
        flops = 0.0
    cost = Cost(float(flops), _bytes(node, dims, notes))
    if node.op_type == "If" or node.op_type in LOOP_OPS:
        cost = cost + _subgraph_cost(node, dims, notes)
    return cost


def node_cost(node: ir.Node, dims: Mapping[str, int] | None = None,
              shapes: Mapping[str, Sequence[int]] | None = None) -> Cost:
    """The estimated FLOPs and bytes moved of one node (see the module docstring for the formulas)."""
    return _node_cost(node, dims or {}, _Notes(shapes))


def model_cost(model: ir.Model, dims: Mapping[str, int] | None = None,
               shapes: Mapping[str, Sequence[int]] | None = None) -> ModelCost:
    """Every main-graph node's cost by name, the totals, and the dims and values the estimate assumed.
    Node names should be unique (``kiln.passes.rewriting.unique_node_names``); a repeated name keeps the sum."""
    dims = dims or {}
    notes = _Notes(shapes)
    result = ModelCost()
    for node in model.graph:
        cost = _node_cost(node, dims, notes)
        result.nodes[node.name or ""] = result.nodes.get(node.name or "", Cost()) + cost
        result.flops += cost.flops
        result.bytes += cost.bytes
    result.assumed = sorted(notes.assumed)
    result.unshaped = sorted(notes.unshaped)
    result.unmodelled = dict(sorted(notes.unmodelled.items()))
    return result
