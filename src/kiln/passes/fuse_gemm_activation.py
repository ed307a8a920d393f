"""Fuse a GEMM with its bias Add and activation into one ``ai.kiln::FusedGemm``.

Playbook rule: "fuse conv + bias + relu", for matrix products: a MatMul followed by a bias Add and
an activation writes its output and reads it back once per op; fused (cuBLASLt's epilogue, kiln's
Triton GEMM) the bias and activation are applied in registers and the output is written once.

Rewrites, each matched with onnxscript's pattern matcher (``W`` a constant 2-D float weight, ``b`` a
constant bias that broadcasts along the last axis only: ``[N]``, ``[1, ..., 1, N]`` of no more dims
than ``A``, or one element; ``act`` an activation of ``kiln.passes.match_activation``):

1. ``act(MatMul(A, W) + b)`` (either operand order) -> ``FusedGemm(A, W, b, activation=act)``
2. ``MatMul(A, W) + b``                          -> ``FusedGemm(A, W, b)``
3. ``act(MatMul(A, W))``                         -> ``FusedGemm(A, W, activation=act)``
4. ``act(Gemm(A, W[, C]))``                      -> ``FusedGemm(A, W, [C], activation=act)`` with
   the Gemm's alpha, beta and transB (C a constant bias as b above).

``A`` may have any rank >= 2 for a MatMul (an unknown rank too, with a bias of at most one dim) (FusedGemm views
it as 2-D, one GEMM over all rows: the "4-D MatMul -> 2-D" rule as the builder's GEMM layers run it), rank 2 for a
Gemm. The longest chain wins (an activation is never left behind a fused bias). A MatMul or Gemm alone is left as it is:
the builder runs it as one GEMM layer already.

Does not fire when: W is not a constant of rank 2, or not float16/bfloat16/float; A's type is known
and not W's; A's rank is below 2 (or known and not 2 for a Gemm); the Gemm has ``transA=1`` or a
C that is not a constant bias; the bias Add's other operand is not such a constant (a full tensor:
the Add is not an epilogue); an intermediate value has a consumer outside the chain or is a graph
output; the activation has something FusedGemm cannot express. Only the main graph is rewritten;
every rewrite needs an ``ai.kiln`` op, so the pass runs only when ``ctx.kiln_ops``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir
from onnxscript.rewriter.pattern import Pattern

from kiln.errors import KilnError
from kiln.passes.framework import KILN_DOMAIN, KILN_DOMAIN_VERSION, Finding, Pass, PassContext, register_pass
from kiln.passes.match_activation import PATTERNS, activation_of, match_chains
from kiln.passes.rewriting import (
    constant_array,
    node_names,
    record_fusion,
    remove_unused_producers,
    shapes_of,
    unique_node_names,
)

FLOAT_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16)
GEMM_ATTRIBUTES = {"alpha", "beta", "transA", "transB"}


@dataclass(frozen=True)
class _Spec:
    producer: str  # "MatMul" or "Gemm"
    bias: str  # "", "right" (MatMul + b) or "left" (b + MatMul)
    activation: str  # a key of PATTERNS or ""

    @property
    def root(self) -> tuple[str, str]:
        if self.activation:
            return PATTERNS[self.activation][0], PATTERNS[self.activation][1]
        return "", "Add"

    def pattern(self) -> Pattern:
        def build(op, a, w, b):
            if self.producer == "Gemm":
                y = op.Gemm(a, w, _allow_other_inputs=True, _outputs=["gemm_out"])
            else:
                y = op.MatMul(a, w, _outputs=["gemm_out"])
            if self.bias:
                y = op.Add(y, b, _outputs=["bias_out"]) if self.bias == "right" else op.Add(b, y, _outputs=["bias_out"])
            return PATTERNS[self.activation][2](op, y) if self.activation else y

        return Pattern(build, name=f"{self.producer.lower()}-{self.bias or 'nobias'}-{self.activation or 'none'}")


def _phases() -> list[dict[tuple[str, str], list[tuple[_Spec, Pattern]]]]:
    """Pattern groups tried in turn, indexed by root op: every chain ending in an activation first
    (bias ones before bias-less ones), then MatMul + bias alone."""
    with_activation = [_Spec("MatMul", bias, act) for act in PATTERNS for bias in ("right", "left", "")]
    with_activation += [_Spec("Gemm", "", act) for act in PATTERNS]
    phases = []
    for group in (with_activation, [_Spec("MatMul", "right", ""), _Spec("MatMul", "left", "")]):
        index: dict[tuple[str, str], list[tuple[_Spec, Pattern]]] = {}
        for spec in group:
            index.setdefault(spec.root, []).append((spec, spec.pattern()))
        phases.append(index)
    return phases


_PHASES = _phases()


@dataclass
class _Fusion:
    """One matched chain and what FusedGemm gets for it."""

    gemm: ir.Node
    nodes: list[ir.Node]
    a: ir.Value
    w: ir.Value
    bias: ir.Value | None
    attributes: dict = field(default_factory=dict)  # alpha, beta, transB
    activation: str = ""
    params: list[float] = field(default_factory=list)
    output: ir.Value | None = None
    extra_inputs: list[ir.Value | None] = field(default_factory=list)  # Clip bounds, to clean up

    def describe(self) -> str:
        parts = [self.gemm.op_type] + (["bias Add"] if len(self.nodes) > 1 and self.gemm.op_type == "MatMul"
                                       and self.nodes[1].op_type == "Add" else [])
        return " + ".join(parts + ([self.activation] if self.activation else []))


def _is_bias(value: ir.Value | None, n: int | None, rank: int, dtype: ir.DataType | None) -> bool:
    """A constant of ``dtype`` that broadcasts along the last axis only and adds no dims to a rank-``rank`` result."""
    array = constant_array(value)
    if array is None or value is None or value.dtype != dtype or array.ndim > rank:
        return False
    if array.size == 1:
        return True
    return n is not None and array.size == n and array.shape[-1] == n


def _analyse(model: ir.Model, spec: _Spec, bindings: dict, nodes: list[ir.Node]) -> _Fusion | None:
    """The fusion a structural match stands for, or None where a precondition fails."""
    gemm = bindings["gemm_out"].producer()
    a, w = bindings["a"], bindings["w"]
    weight = constant_array(w)
    # MatMul and Gemm take one type: A's, where a pass left it unset, is W's
    if weight is None or weight.ndim != 2 or w.dtype not in FLOAT_TYPES or a.dtype not in (None, w.dtype):
        return None
    rank = len(a.shape) if a.shape is not None else None  # unknown: the bias may add no dims
    if rank is not None and rank < 2:
        return None
    fusion = _Fusion(gemm, nodes, a, w, None)
    trans_b = False
    if spec.producer == "Gemm":
        attrs = {k: v.value for k, v in gemm.attributes.items()}
        if not set(attrs) <= GEMM_ATTRIBUTES or attrs.get("transA", 0) or rank not in (None, 2) or len(gemm.inputs) > 3:
            return None
        trans_b = bool(attrs.get("transB", 0))
        fusion.attributes = {"alpha": float(attrs.get("alpha", 1.0)), "beta": float(attrs.get("beta", 1.0)),
                             "transB": int(trans_b)}
        c = gemm.inputs[2] if len(gemm.inputs) > 2 else None
        if c is not None:
            if not _is_bias(c, int(weight.shape[0] if trans_b else weight.shape[1]), 2, w.dtype):
                return None
            fusion.bias = c
    elif spec.bias:
        if not _is_bias(bindings["b"], int(weight.shape[1]), rank if rank is not None else 1, w.dtype):
            return None
        fusion.bias = bindings["b"]
    act = activation_of(model, spec.activation, bindings)
    if act is None:
        return None
    fusion.activation, fusion.params, fusion.extra_inputs = act
    fusion.output = nodes[-1].outputs[0] if not spec.activation else bindings["act_out"]
    return fusion


def _fusions(model: ir.Model) -> list[_Fusion]:
    """Every chain this pass fuses (the one matcher of find and apply)."""
    return match_chains(model, _PHASES, _analyse)


@register_pass
class FuseGemmActivation(Pass):
    name = "fuse_gemm_activation"
    rule = "fuse MatMul/Gemm + bias + activation into one GEMM with an epilogue"
    needs_kiln_ops = True

    def find(self, model: ir.Model, ctx: PassContext) -> list[Finding]:
        unique_node_names(model)
        return [Finding(
            rule="gemm-epilogue",
            title=f"{f.describe()} run as {len(f.nodes)} kernels",
            nodes=node_names(f.nodes),
            why="each op after the GEMM writes its output to memory and reads it back; a GEMM epilogue "
                "adds the bias and applies the activation before writing once",
            fix=f"fixed automatically by pass {self.name} "
                "(emits ai.kiln::FusedGemm: the builder, or kiln optimize --kiln-ops)",
            pass_name=self.name,
            shapes=shapes_of([f.a, f.w, f.output]),
            details={"activation": f.activation, "activation_params": list(f.params), "bias": f.bias is not None,
                     "ops_fused": len(f.nodes) - 1},
        ) for f in _fusions(model)]

    def apply(self, model: ir.Model, ctx: PassContext) -> int:
        if not ctx.kiln_ops:
            raise KilnError(f"pass {self.name} emits ai.kiln::FusedGemm; run it with kiln_ops=True (--kiln-ops)")
        graph = model.graph
        unique_node_names(model)
        replaced: dict[int, ir.Value] = {}  # id(old value) -> the value now computing it

        def current(value: ir.Value) -> ir.Value:
            while id(value) in replaced:
                value = replaced[id(value)]
            return value

        count = 0
        for f in _fusions(model):
            attributes = [ir.AttrFloat32("alpha", f.attributes["alpha"]), ir.AttrFloat32("beta", f.attributes["beta"]),
                          ir.AttrInt64("transB", f.attributes["transB"])] if f.attributes else []
            if f.activation:
                attributes.append(ir.AttrString("activation", f.activation))
            if f.params:
                attributes.append(ir.AttrFloat32s("activation_params", [float(p) for p in f.params]))
            inputs = [current(f.a), f.w] + ([f.bias] if f.bias is not None else [])
            node = ir.Node(KILN_DOMAIN, "FusedGemm", inputs, attributes=attributes, name=f.gemm.name)
            new_out, output = node.outputs[0], f.output
            assert output is not None, "_analyse sets every fusion's output"
            # onnx_ir types the dtype setter DataType, its getter DataType | None: an unknown dtype is copied as is
            new_out.dtype, new_out.shape = output.dtype, output.shape  # type: ignore[assignment]
            record_fusion([node], f.nodes)
            ir.convenience.replace_nodes_and_values(graph, f.nodes[-1], f.nodes, [node], [output], [new_out])
            replaced[id(output)] = new_out
            remove_unused_producers(graph, f.extra_inputs)
            ctx.log.append(f"{f.gemm.name}: {f.describe()} -> FusedGemm ({len(f.nodes)} nodes -> 1)")
            count += 1
        if count:
            model.opset_imports.setdefault(KILN_DOMAIN, KILN_DOMAIN_VERSION)
        return count
