"""Flatten an N-D x 2-D MatMul into one 2-D MatMul between views.

Playbook rule: "4-D MatMul -> 2-D/3-D". ``A[..., M, K] @ B[K, N]`` with a rank-2 ``B`` is one GEMM
of ``prod(...) * M`` rows; written as an N-D MatMul it reaches the GEMM libraries as a broadcast
batched product (or is flattened at run time behind the builder's back). Rewriting it as

    Reshape(A, [-1, K]) -> MatMul(., B) -> Reshape(., [..., M, N])

makes the single large GEMM explicit in the graph; both Reshapes are views of contiguous tensors
(no kernel), so later passes (tensor-core padding, layouts) and the builder see one 2-D GEMM.

The shape the result is reshaped back to is a constant when every leading size of ``A`` and ``N``
are known, or when exactly one of them is unknown (it becomes -1). Otherwise (e.g. BERT's
``[batch, sequence, d]``) it is computed at run time from ``A``'s shape: ``Shape(A)[:-1]``
(``Shape`` with ``start``/``end`` from opset 15, ``Shape`` + ``Slice`` before) concatenated with
``N`` (a constant, or ``Shape(B)[1:]``), and the Reshape uses ``allowzero=1`` so that an empty batch
stays correct; the model stays correct for any batch and sequence length.

Rewrites (onnxscript rewrite rules, ``check()`` holding the conditions; one sweep in graph order):

1. ``MatMul(A, B)`` -> the three nodes above.
2. ``Add(MatMul(A, B), c)`` (either operand order) where ``c`` is a constant that broadcasts along
   the last axis only (``[N]``, ``[1, ..., 1, N]``, ``[1]``, a scalar) -> ``Reshape(A) -> MatMul ->
   Add(., c as 1-D) -> Reshape back``: the Add commutes with the reshape, so the bias stays next to
   its MatMul and the builder still fuses the pair (rule 1 leaves such a MatMul to this rule).

MatMuls reading the same ``A`` (q, k and v projections) share the one view of ``A`` and, when it
is computed at run time, the target shape.

Builds skip this pass unless ``BuildConfig.passes`` names it (``in_builds = False``): in a build
the GEMM is ``ai.kiln::FusedGemm`` or a Gemm layer, both of which view an N-D ``A`` as 2-D with no
copy, and the Reshapes would stand between the MatMul and the activation ``fuse_gemm_activation``
fuses into it (and each be a layer of its own). It serves ``kiln optimize``, whose output other
runtimes read.

Does not fire when:
- ``A`` has rank 2 or less, or its rank is unknown;
- ``B`` is not rank 2 (a batched ``B`` of rank >= 3, or a vector);
- ``K`` is unknown (neither ``A``'s last size nor ``B``'s first is a known int), or any known size
  is 0 (empty tensors);
- the target shape needs run-time arithmetic and the model's opset is below 14 (no ``allowzero``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase

from kiln.passes._shuffles import apply_rules, int64s, rule_matches
from kiln.passes.framework import Finding, Pass, PassContext, register_pass
from kiln.passes.rewriting import Names, node_names, opset, shapes_of, single_consumer, unique_node_names


def _plan(model_opset: int, a: ir.Value, b: ir.Value) -> dict | str:
    """How to flatten ``a @ b``: K, N and the constant target shape (None: computed at run time),
    or why it cannot be flattened."""
    if a.shape is None or len(a.shape) < 3:
        return "A is not of known rank >= 3"
    if b.shape is None or len(b.shape) != 2:
        return "B is not of rank 2"
    k_a, k_b = a.shape[-1], b.shape[0]
    k = k_a if isinstance(k_a, int) else k_b if isinstance(k_b, int) else None
    if k is None:
        return "K is unknown"
    if isinstance(k_a, int) and isinstance(k_b, int) and k_a != k_b:
        return "K differs between A and B"
    dims = [*a.shape[:-1], b.shape[1]]
    if k == 0 or any(isinstance(d, int) and d <= 0 for d in dims):
        return "a size is 0 (empty tensor)"
    rows = None if any(not isinstance(d, int) for d in a.shape[:-1]) else _prod(a.shape[:-1])
    plan: dict[str, Any] = {"k": k, "n": b.shape[1], "rows": rows, "target": None}
    if sum(not isinstance(d, int) for d in dims) <= 1:
        plan["target"] = [d if isinstance(d, int) else -1 for d in dims]
    elif model_opset < 14:
        return "the target shape needs run-time arithmetic, which needs Reshape's allowzero (opset 14)"
    return plan


def _prod(dims) -> int:
    n = 1
    for d in dims:
        n *= d
    return n


def _bias(y: ir.Value) -> tuple[ir.Node, ir.Value, np.ndarray] | None:
    """(Add, its constant, the constant as 1-D) when ``y``'s one consumer adds a constant that
    broadcasts along the last axis only (``[N]``, ``[1, ..., 1, N]``, a scalar): that Add commutes
    with the Reshape back, so it stays next to its MatMul (the builder fuses the pair)."""
    add = single_consumer(y)
    if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    other = add.inputs[1] if add.inputs[0] is y else add.inputs[0]
    if other is None or other is y or other.is_graph_input():
        return None
    tensor = ir.convenience.get_const_tensor(other)
    if tensor is None or tensor.dtype != y.dtype or y.shape is None:
        return None
    c = tensor.numpy()
    n = y.shape[-1]
    if c.ndim > len(y.shape) or any(d != 1 for d in c.shape[:-1]):
        return None
    if c.ndim and c.shape[-1] != 1 and c.shape[-1] != n:
        return None
    return add, other, c.reshape(-1) if c.ndim > 1 else c


class _FlattenMatMul(RewriteRuleClassBase):
    """``MatMul(A[..., M, K], B[K, N])`` [``+ bias``] -> ``Reshape(MatMul(Reshape(A, [-1, K]), B)
    [+ bias], [..., M, N])``."""

    def __init__(self, model_opset: int, bias: str | None, shared: dict) -> None:
        super().__init__(name=f"flatten_matmul{'_bias_' + bias if bias else ''}")
        self.opset, self.bias, self.shared = model_opset, bias, shared

    def pattern(self, op, a, b, c):
        if self.bias == "right":
            return op.Add(op.MatMul(a, b, _outputs=["y"]), c)
        if self.bias == "left":
            return op.Add(c, op.MatMul(a, b, _outputs=["y"]))
        return op.MatMul(a, b, _outputs=["y"])

    def check(self, context, a: ir.Value, b: ir.Value, y: ir.Value, c: ir.Value | None = None) -> MatchResult:
        plan = _plan(self.opset, a, b)
        if isinstance(plan, str):
            return MatchResult().fail(plan)
        if (self.bias is not None) != (_bias(y) is not None):
            return MatchResult().fail("the bias rule takes a MatMul followed by a bias Add, the plain rule the others")
        return MatchResult()

    def rewrite(self, op, a: ir.Value, b: ir.Value, y: ir.Value, c: ir.Value | None = None):
        plan = _plan(self.opset, a, b)
        assert isinstance(plan, dict)  # check() accepted this match
        k, n, base = plan["k"], plan["n"], y.name or "matmul"
        a2 = self.shared.get(("rows", id(a), k))
        if a2 is None:  # MatMuls reading the same A (q, k, v projections) share one view
            a2 = op.Reshape(a, op.initializer(ir.tensor(int64s([-1, k])), name=f"{base}/rows_shape"))
            a2.dtype, a2.shape = a.dtype, ir.Shape([plan["rows"], k])
            self.shared[("rows", id(a), k)] = a2
        out = op.MatMul(a2, b)
        out.dtype, out.shape = y.dtype, ir.Shape([plan["rows"], n])
        if self.bias is not None:
            found = _bias(y)
            assert found is not None, "check() found the bias Add"
            _, constant, bias = found
            bias_value = op.initializer(ir.tensor(bias), name=f"{constant.name}/flat")
            out = op.Add(out, bias_value) if self.bias == "right" else op.Add(bias_value, out)
            out.dtype, out.shape = y.dtype, ir.Shape([plan["rows"], n])
        return op.Reshape(
            out, self._target(op, a, b, plan, base), **({} if plan["target"] is not None else {"allowzero": 1})
        )

    def _target(self, op, a: ir.Value, b: ir.Value, plan: dict, base: str) -> ir.Value:
        """The shape to reshape back to: a constant, or Shape(A)[:-1] ++ N (shared per A and N)."""
        if plan["target"] is not None:
            return op.initializer(ir.tensor(int64s(plan["target"])), name=f"{base}/shape")
        n = plan["n"]
        key = ("target", id(a), n if isinstance(n, int) else id(b))
        if key in self.shared:
            return self.shared[key]
        assert a.shape is not None, "_plan found A's rank"
        lead = self._shape_slice(op, a, 0, len(a.shape) - 1, base)
        if isinstance(n, int):
            last = op.initializer(ir.tensor(int64s([n])), name=f"{base}/n")
        else:
            last = self._shape_slice(op, b, 1, 2, base)
        target = op.Concat(lead, last, axis=0)
        target.dtype, target.shape = ir.DataType.INT64, ir.Shape([len(a.shape)])
        self.shared[key] = target
        return target

    def _shape_slice(self, op, value: ir.Value, start: int, end: int, base: str) -> ir.Value:
        """``Shape(value)[start:end]``: Shape's start/end attributes from opset 15, Shape + Slice before."""
        if self.opset >= 15:
            out = op.Shape(value, start=start, end=end)
        else:
            whole = op.Shape(value)
            assert value.shape is not None, "_plan found A's and B's ranks"
            whole.dtype, whole.shape = ir.DataType.INT64, ir.Shape([len(value.shape)])
            out = op.Slice(whole, op.initializer(ir.tensor(int64s([start])), name=f"{base}/starts"),
                           op.initializer(ir.tensor(int64s([end])), name=f"{base}/ends"),
                           op.initializer(ir.tensor(int64s([0])), name=f"{base}/axes"))
        out.dtype, out.shape = ir.DataType.INT64, ir.Shape([end - start])
        return out


def _rules(model: ir.Model) -> list:
    """The bias rules first (they take a MatMul with its bias Add), then the plain one; one cache
    of shared views and target shapes for the sweep."""
    shared: dict = {}
    return [_FlattenMatMul.rule(opset(model), bias, shared) for bias in ("right", "left", None)]


@register_pass
class FlattenMatMul(Pass):
    name: ClassVar[str] = "flatten_matmul"
    rule: ClassVar[str] = "N-D MatMul by a 2-D matrix -> one 2-D MatMul between views (4-D MatMul -> 2-D)"
    in_builds: ClassVar[bool] = False

    def find(self, model: ir.Model, ctx: PassContext) -> list[Finding]:
        unique_node_names(model)
        return [self._finding(match.nodes, ctx) for match in rule_matches(model, _rules(model))]

    def apply(self, model: ir.Model, ctx: PassContext) -> int:
        unique_node_names(model)

        def log(match) -> None:
            node = _matmul(match.nodes)
            shapes = " x ".join(str(shapes_of([v]).get(v.name or "", "?")) for v in node.inputs if v is not None)
            bias = " with its bias Add" if len(match.nodes) > 1 else ""
            ctx.log.append(f"flattened {node.name} ({shapes}){bias} into one 2-D MatMul")

        return len(apply_rules(model, _rules(model), Names(model.graph), before=log))

    def _finding(self, nodes, ctx: PassContext) -> Finding:
        node = _matmul(nodes)
        a, b = node.inputs[0], node.inputs[1]
        assert a is not None and a.shape is not None, "_plan accepted A of known rank"
        y = node.outputs[0]
        return Finding(
            rule="matmul-nd",
            title=f"rank-{len(a.shape)} MatMul by a 2-D matrix is one GEMM written as a batched one",
            nodes=node_names([node] + [n for n in nodes if n is not node]),
            why="an N-D MatMul reaches the GEMM libraries as a broadcast batched product; one 2-D GEMM "
                "over all rows gives larger tiles and the tensor-core paths (playbook: 4-D MatMul -> 2-D)",
            fix=f"fixed automatically by pass {self.name} (kiln optimize); "
                "kiln build views the input as 2-D without a copy",
            pass_name=self.name,
            shapes=shapes_of([a, b, y]),
        )


def _matmul(nodes) -> ir.Node:
    return next(n for n in nodes if n.op_type == "MatMul")
