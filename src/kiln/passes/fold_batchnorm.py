"""Fold an inference BatchNormalization into the Conv, ConvTranspose or Gemm before it.

Playbook rule: fuse what can be fused; a per-channel scale and shift after a linear layer is free
when it is baked into that layer's weights (TensorRT folds BatchNorm the same way).

Rewrites (one onnxscript rewrite rule per producer op):

1. ``BatchNormalization(Conv(x, W[, B]))`` -> ``Conv(x, W', B')`` for any spatial rank and group:
   with ``s = scale / sqrt(var + epsilon)``, ``W' = W * s`` along the output channels (axis 0)
   and ``B' = (B - mean) * s + bias`` (``B`` = 0 when the Conv has none).
2. ``BatchNormalization(ConvTranspose(x, W[, B]))`` -> ``ConvTranspose(x, W', B')``: the weight is
   ``[C_in, C_out / group, k...]``, so ``s`` is applied per group along axis 1.
3. ``BatchNormalization(Gemm(a, W[, C]))`` -> ``Gemm(a, W', C')``: ``s`` along the output columns
   of ``W`` (axis 0 with ``transB=1``, axis 1 without); ``C' = (beta * C - mean) * s + bias`` and
   ``beta`` becomes 1; ``alpha`` and ``transA`` are kept.

The arithmetic runs in float64 and the results are cast to the weight's dtype (BatchNormalization
from opset 15 may hold its statistics in another float type than the data). New weights are new
initializers, so a weight shared with another node is left intact for it.

onnxscript ships these three rules (``fuse_batchnorm_into_conv_rule`` and friends), but they do not
fit: they fold a BatchNormalization in training mode (``training_mode=1`` with one output, or
unused running-statistic outputs), accept only initializers (not Constant nodes), and write
float32 weights for float16 layers whose statistics are float32. The rules here are written with
the same rewriter (``RewriteRuleClassBase``) and check those cases.

Does not fire when:
- the BatchNormalization is in training form: ``training_mode`` other than 0, more than one
  output, ``spatial=0`` (opset < 9, per-activation statistics), or the model's opset is below 7
  (``is_test`` semantics);
- the producer's output has another consumer or is a graph output;
- the weight, the producer's bias, or any of scale / bias / mean / var is not a constant
  (initializer or Constant node), or is a graph input (an initializer a user may override);
- the statistics are not 1-D of the producer's output-channel count, the weight is not float32,
  float16, bfloat16 or float64 (folding into float8 or integer weights would lose the scale), or
  a ConvTranspose's input channels do not divide by its group.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRuleClassBase

from kiln.passes._shuffles import apply_rules, rule_matches
from kiln.passes.framework import Finding, Pass, PassContext, register_pass
from kiln.passes.rewriting import Names, constant_array, node_names, shapes_of, unique_node_names

PRODUCERS = ("Conv", "ConvTranspose", "Gemm")
FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


def _const(value: ir.Value | None) -> np.ndarray | None:
    """A constant's array, or None (also for graph inputs: an overridable initializer is not constant)."""
    return None if value is None or value.is_graph_input() else constant_array(value)


def _int_attr(node: ir.Node, name: str, default: int) -> int | None:
    attr = node.attributes.get(name)
    if attr is None:
        return default
    if attr.is_ref() or attr.type != ir.AttributeType.INT:
        return None
    return attr.as_int()


def _fold(producer: ir.Node, bn: ir.Node) -> tuple[np.ndarray, np.ndarray] | str:
    """The folded (weight, bias), or why the pair cannot be folded."""
    if len(bn.outputs) != 1:
        return "BatchNormalization has running-statistic outputs (training form)"
    if _int_attr(bn, "training_mode", 0) != 0:
        return "BatchNormalization in training mode"
    if _int_attr(bn, "spatial", 1) != 1:
        return "BatchNormalization with spatial=0 (per-activation statistics)"
    if len(bn.inputs) != 5:
        return "BatchNormalization without its four statistics"
    stats = [_const(v) for v in bn.inputs[1:]]
    if any(a is None for a in stats):
        return "BatchNormalization statistics are not constant"
    scale, shift, mean, var = (np.asarray(a, dtype=np.float64) for a in stats)
    if any(a.ndim != 1 or a.shape != scale.shape for a in (scale, shift, mean, var)):
        return "BatchNormalization statistics are not 1-D of one length"
    channels = scale.shape[0]
    weight_value = producer.inputs[1] if len(producer.inputs) > 1 else None
    weight = _const(weight_value)
    if weight_value is None or weight is None:
        return f"{producer.op_type} weight is not constant"
    if weight_value.dtype not in FLOATS:
        return f"{producer.op_type} weight is not float32/float16/bfloat16/float64"
    bias_value = producer.inputs[2] if len(producer.inputs) > 2 else None
    bias = _const(bias_value) if bias_value is not None else np.zeros((), dtype=weight.dtype)
    if bias is None:
        return f"{producer.op_type} bias is not constant"
    epsilon_attr = bn.attributes.get("epsilon")
    epsilon = 1e-5 if epsilon_attr is None else epsilon_attr.as_float()
    s = scale / np.sqrt(var + epsilon)
    w = weight.astype(np.float64)
    b = bias.astype(np.float64)

    if producer.op_type == "Conv":
        if w.ndim < 3 or w.shape[0] != channels:
            return "Conv weight's output channels differ from the statistics"
        w = w * s.reshape((-1,) + (1,) * (w.ndim - 1))
        if b.ndim > 1:
            return "Conv bias is not 1-D"
    elif producer.op_type == "ConvTranspose":
        group = _int_attr(producer, "group", 1)
        if group is None or group < 1 or w.ndim < 3 or w.shape[0] % group or group * w.shape[1] != channels:
            return "ConvTranspose weight does not match its group and the statistics"
        grouped = w.reshape((group, w.shape[0] // group) + w.shape[1:])
        grouped = grouped * s.reshape((group, 1, w.shape[1]) + (1,) * (w.ndim - 2))
        w = grouped.reshape(w.shape)
        if b.ndim > 1:
            return "ConvTranspose bias is not 1-D"
    else:  # Gemm
        trans_b = _int_attr(producer, "transB", 0)
        if trans_b is None or w.ndim != 2:
            return "Gemm weight is not 2-D"
        axis = 0 if trans_b else 1
        if w.shape[axis] != channels:
            return "Gemm output columns differ from the statistics"
        w = w * (s[:, None] if axis == 0 else s[None, :])
        beta_attr = producer.attributes.get("beta")
        b = b * (1.0 if beta_attr is None else beta_attr.as_float())
    try:
        new_bias = (b - mean) * s + shift
    except ValueError:
        return "bias does not broadcast with the statistics"
    return w.astype(weight.dtype), new_bias.astype(weight.dtype)


class _FoldIntoProducer(RewriteRuleClassBase):
    """``BatchNormalization(<Producer>(x, W[, B]))`` -> ``<Producer>(x, W', B')``."""

    def __init__(self, producer: str) -> None:
        super().__init__(name=f"fold_batchnorm_into_{producer.lower()}")
        self.producer = producer

    def pattern(self, op, x):
        inbound = getattr(op, self.producer)(x, _allow_other_inputs=True, _outputs=["inbound"])
        return op.BatchNormalization(inbound, _allow_other_inputs=True, _outputs=["normalized"])

    def check(self, context, x, inbound: ir.Value, normalized: ir.Value) -> MatchResult:
        result = MatchResult()
        if context.model.opset_imports.get("", 0) < 7:
            return result.fail("opset below 7: BatchNormalization's is_test semantics")
        producer, bn = inbound.producer(), normalized.producer()
        assert producer is not None and bn is not None, "the pattern matched both nodes"
        folded = _fold(producer, bn)
        return result.fail(folded) if isinstance(folded, str) else result

    def rewrite(self, op, x, inbound: ir.Value, normalized: ir.Value):
        producer, bn = inbound.producer(), normalized.producer()
        assert producer is not None and bn is not None, "the pattern matched both nodes"
        folded = _fold(producer, bn)
        assert not isinstance(folded, str), "check() accepted this pair"
        weight, bias = folded
        attributes = {k: v for k, v in producer.attributes.items() if not (self.producer == "Gemm" and k == "beta")}
        weight_value = producer.inputs[1]
        assert weight_value is not None, "check() found the producer's constant weight"
        w_name = weight_value.name or f"{producer.name}.weight"
        new_weight = op.initializer(ir.tensor(weight), name=f"{w_name}.bn_folded")
        new_bias = op.initializer(ir.tensor(bias), name=f"{bn.name}.bias_folded")
        return op.op(self.producer, x, new_weight, new_bias, **attributes)


RULES = [_FoldIntoProducer.rule(name) for name in PRODUCERS]


@register_pass
class FoldBatchNorm(Pass):
    name: ClassVar[str] = "fold_batchnorm"
    rule: ClassVar[str] = "fold BatchNormalization (inference) into the preceding Conv/ConvTranspose/Gemm weights"

    def find(self, model: ir.Model, ctx: PassContext) -> list[Finding]:
        unique_node_names(model)
        return [self._finding(match.nodes, ctx) for match in rule_matches(model, RULES)]

    def apply(self, model: ir.Model, ctx: PassContext) -> int:
        unique_node_names(model)
        names = Names(model.graph)

        def log(match) -> None:
            producer, bn = _ordered(match.nodes)
            ctx.log.append(f"folded {bn.name} into {producer.op_type} {producer.name}")

        return len(apply_rules(model, RULES, names, before=log))

    def _finding(self, nodes, ctx: PassContext) -> Finding:
        producer, bn = _ordered(nodes)
        out = bn.outputs[0]
        return Finding(
            rule="unfolded-batchnorm",
            title=f"BatchNormalization after {producer.op_type} can be folded into its weights",
            nodes=node_names([producer, bn]),
            why="a separate BatchNormalization reads and writes the whole activation once more for a "
                "per-channel scale and shift that the producer's weights and bias can absorb",
            fix=f"fixed automatically by pass {self.name}",
            pass_name=self.name,
            shapes=shapes_of([producer.inputs[0], producer.outputs[0], out]),
        )


def _ordered(nodes) -> tuple[ir.Node, ir.Node]:
    producer = next(n for n in nodes if n.op_type in PRODUCERS)
    bn = next(n for n in nodes if n.op_type == "BatchNormalization")
    return producer, bn
