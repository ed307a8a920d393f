"""Private helpers shared by the cleanup passes (fold_constants, fold_batchnorm, drop_noop_shuffles,
flatten_matmul, reduce_to_last_axis): shape reasoning for shuffles (permutations, layout-keeping transposes, Reshape
targets with 0/-1 semantics) and the loop that runs an onnxscript
rewrite rule the way kiln needs it (matches listed without changing anything, new nodes named after
the node they replace, new values named uniquely, graph output names kept).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import MatchResult, RewriteRule

from kiln.passes.rewriting import Names, record_fusion, remove_unused_producers, same_dim

Dim = int | ir.SymbolicDim | None


def int64s(values: Sequence[int]) -> np.ndarray:
    return np.asarray(list(values), dtype=np.int64)


# -- dimensions and shapes -----------------------------------------------------------------------

def same_shape(a: ir.Shape | None, b: ir.Shape | None) -> bool:
    return a is not None and b is not None and len(a) == len(b) and all(same_dim(x, y) for x, y in zip(a, b))


def reshape_target(source: ir.Shape | None, target: ir.Shape | None) -> list[int] | None:
    """A constant Reshape shape (allowzero=0) that turns a tensor of shape ``source`` into one of
    shape ``target``, or None when no constant can say it: known sizes are written out, a symbolic
    size at the same position as the same symbol in ``source`` becomes 0 (copy), one remaining
    unknown becomes -1. Zero-size dimensions are refused (0 would mean copy and -1 would be
    ambiguous)."""
    if source is None or target is None:
        return None
    out: list[int] = []
    unknown = 0
    for i, d in enumerate(target):
        if isinstance(d, int):
            if d <= 0:
                return None
            out.append(d)
        elif i < len(source) and same_dim(source[i], d):
            out.append(0)
        else:
            out.append(-1)
            unknown += 1
    if unknown > 1 or any(isinstance(d, int) and d == 0 for d in source):
        return None
    return out


def perm_of(node: ir.Node, rank: int | None) -> list[int] | None:
    """A Transpose's permutation (default: reversed axes, which needs the rank)."""
    attr = node.attributes.get("perm")
    if attr is not None:
        if attr.is_ref():
            return None
        return [int(p) for p in attr.as_ints()]
    return None if rank is None else list(reversed(range(rank)))


def compose(first: Sequence[int], second: Sequence[int]) -> list[int]:
    """The one permutation equal to Transpose(perm=first) followed by Transpose(perm=second)."""
    return [first[p] for p in second]


def keeps_layout(perm: Sequence[int], shape: ir.Shape | None) -> bool:
    """True when transposing ``shape`` by ``perm`` moves only size-1 axes: the axes that may be
    larger than 1 keep their relative order, so the memory order of the elements is unchanged and
    the transpose is a reshape."""
    if shape is None or len(shape) != len(perm):
        return False
    big = [p for p in perm if not (isinstance(shape[p], int) and shape[p] == 1)]
    return big == sorted(big)


# -- running onnxscript rewrite rules ----------------------------------------------------------------

def rule_matches(model: ir.Model, rules: Sequence[RewriteRule]) -> list[MatchResult]:
    """Every place one of ``rules`` matches in the main graph (the first rule that matches a node),
    in graph order, without changing anything."""
    found = []
    for node in list(model.graph):
        for rule in rules:
            match = rule.match(model, model.graph, node, check_nodes_are_removable=rule.remove_nodes)
            if match:
                found.append(match)
                break
    return found


def apply_rules(
    model: ir.Model, rules: Sequence[RewriteRule], names: Names,
    before: Callable[[MatchResult], None] | None = None,
) -> list[MatchResult]:
    """Rewrite every match of ``rules`` in the main graph, in one sweep in graph order (the first
    rule that matches a node rewrites it); returns the matches rewritten (their nodes are detached
    by then: ``before(match)`` is called first, while they are still connected).

    Unlike ``RewriteRuleSet.apply_to_model``, a new node takes the name of the matched node of its
    op type (the Conv that absorbed a BatchNorm keeps the Conv's name), other new nodes are named
    after the node they replace (``<root>/<Op>``), new values get fresh names instead of a
    graph-wide rename afterwards, and the replaced output keeps its name (so graph outputs keep
    theirs). Initializers and producers that only the replaced nodes used are removed."""
    graph = model.graph
    done = []
    for node in list(graph):
        if node.graph is not graph:  # removed by an earlier rewrite in this sweep
            continue
        for rule in rules:
            delta = rule.try_rewrite(model, graph, node)
            if delta is not None:
                break
        else:
            continue
        if before is not None:
            before(delta.match)
        for value in delta.new_initializers:
            value.name = names.fresh(value.name or f"{node.name}/const")
            graph.register_initializer(value)
        reusable = {n.op_type: n.name for n in reversed(delta.match.nodes) if n.name}
        for new in delta.new_nodes:
            kept = reusable.pop(new.op_type, None)  # the node that does the same work keeps its name
            new.name = kept if kept is not None else names.fresh(f"{node.name}/{new.op_type}")
            for i, out in enumerate(new.outputs):
                if out not in delta.new_outputs:
                    out.name = names.fresh(f"{new.name}_out{i}" if len(new.outputs) > 1 else f"{new.name}_out")
        old_inputs = [v for n in delta.match.nodes for v in n.inputs]
        record_fusion(delta.new_nodes, delta.match.nodes)
        ir.convenience.replace_nodes_and_values(
            graph, node, delta.match.nodes, delta.new_nodes, delta.match.outputs, delta.new_outputs
        )
        remove_unused_producers(graph, old_inputs)
        done.append(delta.match)
    return done
