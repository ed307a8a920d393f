"""fuse_attention: attention written out as MatMul -> scale -> mask -> Softmax -> MatMul becomes one
fused attention node, which the builder runs on ``scaled_dot_product_attention`` (FlashAttention /
memory-efficient kernels on the GPU).

Playbook rule: "fuse attention" (TensorRT's MHA fusion): unfused, the ``[..., L, S]`` score matrix of
every head is written to memory and read back by each of the 3-6 ops between the two MatMuls; a
fused kernel keeps it on chip, so its memory traffic no longer grows with ``L * S``.

The pattern (both torch exporters, for transformers' BERT / DistilBERT / GPT-2 / ViT and
``nn.MultiheadAttention``, write attention this way; see ``tests/families.py``):

    scores = MatMul(Q', K_T')        Q' = Q | Q * s_q | Q / s_q,  K_T' = K_T | K_T * s_k | K_T / s_k
    scores = scores [* s | / s]       (TorchScript's SDPA export scales Q and K_T by sqrt(s) each)
    scores = scores [+ mask]          (any float mask of rank <= that of the scores, either order)
           | Where(cond, scores, fill) | Where(cond, fill, scores)   (masked_fill / torch.where)
    p = Softmax(scores)               (over the last axis)
    p = Where(IsNaN(p), 0, p)         (optional: the exporters' clean-up of fully masked rows)
    Y = MatMul(p, V)

with ``s_q``, ``s_k``, ``s`` single-element float constants. It becomes ONE node:

1. with ``ctx.kiln_ops``: ``ai.kiln::FusedAttention(Q, K_T, V[, mask], scale=s_q*s_k*s,
   nan_to_zero=0|1)`` (semantics in ``kiln.ops.kiln_domain``; ``Q`` and ``K_T`` are the values before
   any scaling);
2. else, when the model's opset is 23 or newer: the standard ``Attention(Q, K, V[, mask],
   scale=...)``, with ``K`` the input of a ``Transpose(perm=[0, 1, 3, 2])`` producing ``K_T`` when
   there is one, else a new such Transpose of ``K_T``; a ``Where(cond, scores, -inf)`` mask becomes
   Attention's boolean mask (``cond``, or a new ``Not(cond)`` for ``Where(cond, -inf, scores)``).
   Only where its semantics are exactly the pattern's (below).

For ``FusedAttention`` a ``Where`` mask becomes an additive one, ``Where(cond, 0, fill)`` (or
``Where(cond, fill, 0)``), computed by one new small node beside the fused one. That is exact where
``fill`` is ``-inf``, and where it is the lowest finite value of float32, float64 or bfloat16 (what
``torch.finfo(dtype).min`` gives): ``score + fill`` rounds to ``fill`` for every ``|score| < 1e31``, so
masked scores, fully masked rows (uniform) and all others are what the ``Where`` gives. Other fills
(e.g. -10000, or a float16 model's -65504, whose rounding is 32) are not rewritten.

The rule is an onnxscript ``RewriteRuleClassBase`` pattern (see ``_transformer``), in the manner of
onnxscript's ``rewriter.ort_fusions.sdpa``, which targets onnxruntime's private domain, takes only
4-D tensors and knows neither Where masks nor scales computed at run time.

The head split before (``Reshape``/``Transpose`` of the projections) and the head merge after stay
as they are: they only view the same data, and the builder runs them without copies, handing SDPA
strided views of ``Q``, ``K`` and ``V``.

Does NOT fire when: any value between the first MatMul and the last (the scores, the scaled and
masked scores, the probabilities, the IsNaN mask) has a consumer outside the pattern or is a graph
output; a scale is not a single-element constant (a Mul by some other tensor on ``Q`` or ``K_T`` is
left outside the fused node, which is exact; one on the scores blocks the fusion, reported by
``find()`` with what to do); a scale has more dims than ``Q`` or divides by zero; the Softmax is not
over the last axis (the opset < 13 Softmax coerces to 2-D at ``axis``, which is the last axis only
when ``axis`` is the last one; its default 1 is, only for rank 2); ``Q``, ``K_T``, ``V`` and the scores
do not all have the same known rank (>= 2) and float dtype; the mask's rank is unknown or larger
than the scores'; a Where's condition is not bool or its fill is not one of the values above.

``Attention`` (opset 23, without ``--kiln-ops``) is used only where, in addition, the tensors are 4-D
with batch and head dims known equal in ``Q``, ``K_T`` and ``V`` and the head size and key length
consistent, and where no row can be masked differently: ``Attention`` gives zeros for a row whose
bias is all ``-inf`` where the pattern gives NaN, so a masked pattern needs the IsNaN clean-up; and
for a row masked with the lowest finite value the pattern (and the spec) average ``V`` while
onnxruntime's Attention gives zeros, so the mask must be ``-inf``: a Where with a ``-inf`` fill, or an
additive mask made by ``Where(bool, 0, -inf)`` of constants (the TorchScript SDPA export). Elsewhere,
and on opsets before 23 without ``--kiln-ops``, nothing is rewritten; ``find()`` reports every such
attention with the reason and says to use ``--kiln-ops`` (kiln build does) or opset 23.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, pattern

from kiln.passes._transformer import (
    FLOAT_TYPES,
    FusionRule,
    Scalar,
    const_scalar,
    find_sites,
    numel,
    rank,
    rewrite_sites,
)
from kiln.passes.framework import KILN_DOMAIN, Finding, Pass, PassContext, register_pass
from kiln.passes.rewriting import constant_array, itemsize, opset, same_dim, shape_of, shapes_of

_MASK_SAFE_FILL: dict[ir.DataType, type[np.floating]] = {ir.DataType.FLOAT: np.float32, ir.DataType.DOUBLE: np.float64}
_NEEDS_OP = "no fused attention op to emit"
_FULL_ROW = ("a fully masked row gives NaN here but zeros in Attention (opset 23); the pattern has no "
             "Where(IsNaN(p), 0, p) clean-up to make them agree")
_FINITE_ROW = ("a row masked fully with the lowest finite value averages V here (and in the spec's Attention) but "
               "onnxruntime's Attention gives zeros there")


def _zero_or_minus_inf(mask: ir.Value) -> bool:
    """The mask is Where(bool, 0, -inf) or Where(bool, -inf, 0) of constants: only 0 and -inf."""
    node = mask.producer()
    if node is None or node.op_type != "Where" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 3:
        return False
    cond = node.inputs[0]
    values = {const_scalar(node.inputs[1]), const_scalar(node.inputs[2])}
    return cond is not None and cond.dtype == ir.DataType.BOOL and values == {0.0, float("-inf")}


def _lowest(dtype: ir.DataType) -> float | None:
    """The lowest finite value of a dtype whose rounding at that magnitude exceeds 1e31, else None."""
    if dtype in _MASK_SAFE_FILL:
        return float(np.finfo(_MASK_SAFE_FILL[dtype]).min)
    if dtype == ir.DataType.BFLOAT16:
        return -3.3895313892515355e38
    return None


class AttentionRule(FusionRule):
    """MatMul -> [scale] -> [mask] -> Softmax -> [NaN clean-up] -> MatMul, rooted at the last MatMul."""

    root_op = "MatMul"
    report_unremovable = True

    def __init__(self, target: tuple[str, str] | None, model_opset: int) -> None:
        super().__init__("Attention", target)
        self.model_opset = model_opset

    def pattern(self, op, q, k_t, v):
        qs, ks, post = Scalar(None, "q_scale"), Scalar(None, "k_scale"), Scalar(None, "post_scale")
        q_in = pattern.OrValue([op.Mul(q, qs), op.Mul(qs, q), op.Div(q, qs), q],
                               tag_var="q_scaling", tag_values=["mul", "mul", "div", "none"])
        k_in = pattern.OrValue([op.Mul(k_t, ks), op.Mul(ks, k_t), op.Div(k_t, ks), k_t],
                               tag_var="k_scaling", tag_values=["mul", "mul", "div", "none"])
        scores = op.MatMul(q_in, k_in, _outputs=["scores"])
        runtime = pattern.Var("runtime_scale")
        scaled = pattern.OrValue(
            [op.Mul(scores, post), op.Mul(post, scores), op.Div(scores, post),
             op.Mul(scores, runtime), op.Mul(runtime, scores), op.Div(scores, runtime), scores],
            tag_var="post_scaling", tag_values=["mul", "mul", "div", "runtime", "runtime", "runtime", "none"])
        mask, cond, fill = pattern.Var("mask"), pattern.Var("cond"), Scalar(None, "fill")
        masked = pattern.OrValue(
            [op.Add(scaled, mask), op.Add(mask, scaled), op.Where(cond, scaled, fill), op.Where(cond, fill, scaled),
             scaled],
            tag_var="masking", tag_values=["add", "add", "keep-where-true", "fill-where-true", "none"])
        probs = op.Softmax(masked, _outputs=["probs"])
        cleaned = pattern.OrValue([op.Where(op.IsNaN(probs), Scalar(0.0, "nan_zero"), probs), probs],
                                  tag_var="cleanup", tag_values=[True, False])
        return op.MatMul(cleaned, v)

    # -- conditions ----------------------------------------------------------------------------
    def scale(self, bindings: dict[str, Any]) -> float | None:
        """The product of every constant scale factor (a Div divides), or None if one is unusable."""
        total = 1.0
        for tag, name in (("q_scaling", "q_scale"), ("k_scaling", "k_scale"), ("post_scaling", "post_scale")):
            how = bindings.get(tag, "none")
            if how in ("none", "runtime"):
                continue
            factor = const_scalar(bindings.get(name))
            if factor is None or not np.isfinite(factor) or (how == "div" and factor == 0.0):
                return None
            total *= 1.0 / factor if how == "div" else factor
        return total if np.isfinite(total) else None

    # onnxscript passes the match's bindings as keywords; its base class declares (op, *args, **kwargs)
    def check(self, context, q, k_t, v, **bindings) -> MatchResult:  # type: ignore[override]
        result = MatchResult()
        reason = self._why_not(q, k_t, v, bindings)
        return result.fail(reason) if reason else result

    def _why_not(self, q: ir.Value, k_t: ir.Value, v: ir.Value, bindings: dict[str, Any]) -> str | None:
        scores = bindings["scores"]
        ranks = {rank(t) for t in (q, k_t, v, scores)}
        r = ranks.pop() if len(ranks) == 1 else None
        if r is None or r < 2:
            return "Q, K_T, V and the scores do not have one known rank >= 2"
        dtypes = {t.dtype for t in (q, k_t, v)}
        dtype = dtypes.pop() if len(dtypes) == 1 else None
        if dtype is None or dtype not in FLOAT_TYPES:
            return "Q, K_T and V are not of one float dtype"
        softmax = bindings["probs"].producer()
        default_axis = -1 if self.model_opset >= 13 else 1
        axis = int(softmax.attributes["axis"].value) if "axis" in softmax.attributes else default_axis
        if not -r <= axis < r or axis % r != r - 1:
            return f"the Softmax is over axis {axis}, not the last of rank {r}"
        for name in ("q_scale", "k_scale", "post_scale", "fill", "nan_zero"):
            array = constant_array(bindings.get(name))
            if array is not None and (array.ndim > r or array.dtype.kind != "f" and array.dtype.kind != "V"):
                return f"constant {name} is not a float of at most {r} dims"
        if self.scale(bindings) is None:
            return "a scale is not finite or divides by zero"
        if bindings.get("post_scaling") == "runtime":
            runtime = bindings["runtime_scale"]
            shape = runtime.shape
            if constant_array(runtime) is not None or shape is None or len(shape) > r or any(d != 1 for d in shape):
                return "the scores are multiplied by a tensor that is not a single-element scale"
        masking = bindings.get("masking", "none")
        if masking == "add":
            mask = bindings["mask"]
            mask_rank = rank(mask)
            if mask_rank is None or mask_rank > r or mask.dtype not in FLOAT_TYPES:
                return "the mask's rank is unknown or larger than the scores'"
        elif masking != "none":
            cond, fill = bindings["cond"], const_scalar(bindings["fill"])
            cond_rank = rank(cond)
            if cond.dtype != ir.DataType.BOOL or cond_rank is None or cond_rank > r:
                return "the Where condition is not a bool tensor of at most the scores' rank"
            if fill is None or not (fill == float("-inf") or fill == _lowest(dtype)):
                return f"the Where fill {fill} is neither -inf nor the dtype's lowest finite value"
        return None

    def blocked(self, bindings: dict[str, Any]) -> str | None:
        if bindings.get("post_scaling") == "runtime":
            return ("the scores are scaled by a value computed at run time (from shapes), not a constant: fold it "
                    "into a constant first (fold_constants with static head sizes)")
        if self.target is None:
            return f"{_NEEDS_OP}: the model's opset ({self.model_opset}) has none and --kiln-ops is off"
        if self.target[0] == KILN_DOMAIN:
            return None
        return self._why_not_standard(bindings)

    def _why_not_standard(self, bindings: dict[str, Any]) -> str | None:
        """Why opset 23's Attention would not compute exactly what the pattern does, or None."""
        q, k_t, v = bindings["q"], bindings["k_t"], bindings["v"]
        if rank(q) != 4:
            return f"{_NEEDS_OP}: Attention (opset 23) takes 4-D Q, K, V; these are not"
        qs, ks, vs = list(q.shape), list(k_t.shape), list(v.shape)
        if not (all(same_dim(qs[i], ks[i]) and same_dim(qs[i], vs[i]) for i in (0, 1))
                and same_dim(qs[3], ks[2]) and same_dim(ks[3], vs[2])):
            return f"{_NEEDS_OP}: the batch, head, head-size and key-length dims of Q, K_T, V are not known to agree"
        masking = bindings.get("masking", "none")
        if masking == "none":
            return None
        mask = bindings["mask"] if masking == "add" else bindings["cond"]
        scores = list(bindings["scores"].shape)
        if mask.shape is None or not all(d == 1 or same_dim(d, e)
                                         for d, e in zip(reversed(list(mask.shape)), reversed(scores))):
            return f"{_NEEDS_OP}: the mask is not known to broadcast to the scores' shape without growing it"
        if not bindings.get("cleanup"):
            return f"{_NEEDS_OP}: {_FULL_ROW}"
        if masking == "add" and not _zero_or_minus_inf(bindings["mask"]):
            return f"{_NEEDS_OP}: the mask's values are not known to be 0 or -inf; {_FINITE_ROW}"
        if masking != "add" and const_scalar(bindings["fill"]) != float("-inf"):
            return f"{_NEEDS_OP}: the Where fills a finite value; {_FINITE_ROW}"
        return None

    # -- the rewrite ---------------------------------------------------------------------------
    def rewrite(self, op, q, k_t, v, **bindings):
        domain, op_type = self.target
        scale = float(self.scale(bindings))
        if domain == KILN_DOMAIN:
            mask = self._additive_mask(op, q, bindings)
            inputs = [q, k_t, v] + ([mask] if mask is not None else [])
            return op.op(op_type, *inputs, _domain=domain, scale=scale, nan_to_zero=int(bool(bindings.get("cleanup"))))
        mask = bindings.get("mask") if bindings.get("masking") == "add" else self._bool_mask(op, bindings)
        inputs = [q, self._untransposed(op, k_t), v] + ([mask] if mask is not None else [])
        return op.op(op_type, *inputs, _domain=domain, scale=scale)

    def _bool_mask(self, op: Any, bindings: dict[str, Any]) -> ir.Value | None:
        """Attention's boolean mask (True attends, False is -inf) for a Where(cond, ., -inf) on the scores."""
        masking = bindings.get("masking", "none")
        if masking == "none":
            return None
        cond = bindings["cond"]
        if masking == "keep-where-true":
            return cond
        flipped = op.Not(cond)
        flipped.type, flipped.shape = cond.type, cond.shape
        return flipped

    def _additive_mask(self, op: Any, q: ir.Value, bindings: dict[str, Any]) -> ir.Value | None:
        """The additive mask: the matched one, or Where(cond, 0, fill) for a Where on the scores."""
        masking = bindings.get("masking", "none")
        if masking == "none":
            return None
        if masking == "add":
            return bindings["mask"]
        cond, fill = bindings["cond"], bindings["fill"]
        assert q.dtype is not None, "check() found Q, K_T and V of one float dtype"
        zero = op.Constant(value=ir.tensor(np.zeros((), dtype=q.dtype.numpy())))
        zero.type, zero.shape = ir.TensorType(q.dtype), ir.Shape([])
        mask = op.Where(cond, zero, fill) if masking == "keep-where-true" else op.Where(cond, fill, zero)
        mask.type = ir.TensorType(q.dtype)
        fill_array = constant_array(fill)
        assert fill_array is not None, "check() found the Where fill a constant"
        fill_rank = fill_array.ndim
        if cond.shape is not None and len(cond.shape) >= fill_rank:
            mask.shape = ir.Shape(list(cond.shape))
        return mask

    def _untransposed(self, op: Any, k_t: ir.Value) -> ir.Value:
        """K for Attention: the input of a Transpose(perm=[0,1,3,2]) producing K_T, or a new one."""
        producer = k_t.producer()
        if producer is not None and producer.op_type == "Transpose" and producer.domain in ("", "ai.onnx") \
                and "perm" in producer.attributes and list(producer.attributes["perm"].value) == [0, 1, 3, 2]:
            key = producer.inputs[0]
            assert key is not None, "a Transpose reads its data input"
            return key
        key = op.Transpose(k_t, perm=[0, 1, 3, 2])
        key.type = k_t.type
        if k_t.shape is not None:
            dims = list(k_t.shape)
            key.shape = ir.Shape([dims[0], dims[1], dims[3], dims[2]])
        return key


def _target(model: ir.Model, ctx: PassContext) -> tuple[str, str] | None:
    if ctx.kiln_ops:
        return KILN_DOMAIN, "FusedAttention"
    if opset(model) >= 23:
        return "", "Attention"
    return None


@register_pass
class FuseAttention(Pass):
    """MatMul -> scale -> mask -> Softmax -> MatMul -> one fused attention node."""

    name = "fuse_attention"
    rule = "fuse attention (MatMul, scale, mask, Softmax, MatMul) into one fused attention layer"

    def _sites(self, model: ir.Model, ctx: PassContext):
        return find_sites(model, [AttentionRule(_target(model, ctx), opset(model))])

    def find(self, model: ir.Model, ctx: PassContext) -> list[Finding]:
        findings = []
        for site in self._sites(model, ctx):
            b = site.bindings
            q, k_t, v = b["q"], b["k_t"], b["v"]
            scores = b["scores"]
            n_scores = numel(scores, ctx)
            inner = [n for n in site.nodes if n is not site.root]
            target = site.rule.target
            if site.blocked and site.blocked.startswith(_NEEDS_OP):
                fix = f"not fused: {site.blocked}. Run with --kiln-ops (kiln build does) to fuse it into " \
                      "ai.kiln's FusedAttention, or export at opset 23 for the standard Attention"
            elif site.blocked:
                fix = f"not fused: {site.blocked}"
            else:
                what = "ai.kiln FusedAttention" if target[0] == KILN_DOMAIN else "one Attention (opset 23)"
                fix = f"fused automatically by pass fuse_attention into {what}"
            mask_kind = {"none": "no mask", "add": "additive mask"}.get(b.get("masking", "none"), "Where mask")
            dims = shape_of(scores)
            lengths = f"{dims[-2]}x{dims[-1]}" if dims is not None else "LxS"
            findings.append(Finding(
                rule="unfused-attention",
                title=f"attention ({mask_kind}) as {len(site.nodes)} ops: the {lengths} score matrix of every head "
                      "goes through memory",
                nodes=[n.name for n in site.nodes],
                why=f"the {len(inner)} ops before the last MatMul each write (and the next reads) the whole score "
                    "tensor; a fused attention kernel (FlashAttention via scaled_dot_product_attention) "
                    "keeps it on chip",
                fix=fix,
                pass_name=None if site.blocked else self.name,
                shapes=shapes_of([q, k_t, v] + ([b["mask"]] if b.get("masking") == "add" else [])),
                details={
                    "Q": shape_of(q), "K_T": shape_of(k_t), "V": shape_of(v), "scores": shape_of(scores),
                    "scale": site.rule.scale(b), "mask": b.get("masking", "none"),
                    "nan_to_zero": bool(b.get("cleanup")),
                    "score_matrix_bytes": float(n_scores * itemsize(scores)) if n_scores is not None else None,
                    "blocked": site.blocked,
                },
            ))
        return findings

    def apply(self, model: ir.Model, ctx: PassContext) -> int:
        sites = self._sites(model, ctx)
        blocked = [s for s in sites if s.blocked]
        if blocked:
            reasons = "; ".join(sorted({s.blocked for s in blocked}))
            ctx.log.append(f"{len(blocked)} attention block(s) left unfused: " + reasons)
        return rewrite_sites(model, sites, ctx)
