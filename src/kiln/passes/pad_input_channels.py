"""Pad the first convolution's 3 input channels (RGB) to 4.

Playbook rule: "first layer C=3 -> pad to 4". Tensor-core convolution kernels read the channel axis
in vectors: cuDNN's fp16/bf16 (and int8) NHWC kernels need C to be a multiple of 4 or 8, and for
C=4 there are dedicated first-layer kernels. With C=3 cuDNN falls back to a much slower non-tensor-
core kernel (or an implicit reformat), so an image model's first conv, small as its FLOPs are, can
take a large share of the time. One zero channel costs a third more input bytes and nothing else.

Rewrite (only when ``ctx.low_precision``: fp16, bf16, int8, fp8):

1. ``Conv(X, W, ...)`` (or ``ai.kiln::FusedConv``) where ``X`` is a graph input ``[N, 3, H, W]``
   with a static 3, ``W`` is a constant ``[M, 3, kH, kW]`` and ``group`` is 1
   -> ``Conv(Pad(X, channel axis +1, zeros), W', ...)`` with ``W'`` the weights plus one zero input
   channel. The model stays standard ONNX (``Pad`` with ``pads`` as an input from opset 11, as an
   attribute before) and exact: the zero channel meets zero weights. Every conv reading the same
   input shares one Pad; other consumers of ``X`` keep the unpadded ``X``.

Does not fire: at fp32/tf32; when X is not a graph input (or is an initializer), is not 4-D, or its
channel count is not a static 3; when W is not constant or group is not 1; at opset 1 (Pad-1 is
not written); in subgraphs.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from kiln.passes._conv import (
    can_pad,
    elements,
    is_conv,
    make_pad,
    pad_array,
)
from kiln.passes.framework import Finding, Pass, PassContext, register_pass
from kiln.passes.rewriting import (
    Names,
    add_initializer,
    attrs_of,
    constant_array,
    itemsize,
    node_names,
    remove_unused_producers,
    shapes_of,
    unique_node_names,
)


@dataclass
class _Site:
    conv: ir.Node
    x: ir.Value
    w: ir.Value
    weights: np.ndarray


def _sites(model: ir.Model, ctx: PassContext) -> list[_Site]:
    """Every first-layer conv with C=3 this pass pads (the one matcher of find and apply)."""
    if not ctx.low_precision or not can_pad(model):
        return []
    graph = model.graph
    graph_inputs = {id(v) for v in graph.inputs}
    sites = []
    for node in graph:
        if not is_conv(node) or len(node.inputs) < 2:
            continue
        x, w = node.inputs[0], node.inputs[1]
        if x is None or id(x) not in graph_inputs or x.const_value is not None or x.shape is None:
            continue
        if len(x.shape) != 4 or x.shape[1] != 3 or int(attrs_of(node).get("group", 1)) != 1:
            continue
        weights = constant_array(w)
        if w is None or weights is None or weights.ndim != 4 or weights.shape[1] != 3:
            continue
        sites.append(_Site(node, x, w, weights))
    return sites


@register_pass
class PadInputChannels(Pass):
    name = "pad_input_channels"
    rule = "first layer C=3 -> pad to 4 so tensor-core (NHWC, C=4) conv kernels apply"

    def find(self, model: ir.Model, ctx: PassContext) -> list[Finding]:
        unique_node_names(model)
        findings = []
        for s in _sites(model, ctx):
            n_in, known = elements(s.x.shape, ctx)
            findings.append(Finding(
                rule="first-conv-c3",
                title=f"first conv {s.conv.name} reads 3 input channels",
                nodes=node_names([s.conv]),
                why="tensor-core conv kernels need the channel count to be a multiple of 4/8; cuDNN's "
                    "NHWC kernels for C=4 are much faster than the fallback it runs for C=3",
                fix=f"fixed automatically by pass {self.name} (a zero weight channel; the input is padded to C=4)",
                pass_name=self.name,
                shapes=shapes_of([s.x, s.w, s.conv.outputs[0]]),
                details={"extra_input_bytes": n_in / 3 * itemsize(s.x), "shape_known": known},
            ))
        return findings

    def apply(self, model: ir.Model, ctx: PassContext) -> int:
        graph = model.graph
        unique_node_names(model)
        names = Names(graph)
        padded: dict[int, ir.Value] = {}  # id(graph input) -> its padded value
        count = 0
        for s in _sites(model, ctx):
            if id(s.x) not in padded:
                pad = make_pad(model, names, s.x, 1, 4, s.x.name or "input")
                graph.insert_before(s.conv, pad)
                padded[id(s.x)] = pad.outputs[0]
            w4 = add_initializer(graph, names, f"{s.w.name or s.conv.name}_c4", pad_array(s.weights, 1, 4))
            s.conv.replace_input_with(0, padded[id(s.x)])
            s.conv.replace_input_with(1, w4)
            remove_unused_producers(graph, [s.w])
            ctx.log.append(f"{s.conv.name}: input {s.x.name} padded from 3 to 4 channels (zero weight channel)")
            count += 1
        return count
