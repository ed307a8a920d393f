"""Run convolution regions in NHWC (channels_last) at low precision, with one layout change per border.

Playbook rule: "NHWC beats NCHW for tensor-core convolutions". cuDNN's fp16/bf16/int8 tensor-core
conv kernels read NHWC; fed NCHW they transpose in and out around every conv. Choosing NHWC per
conv still costs two layout changes per conv; choosing it per *region* (the convs and the pooling,
normalization and pointwise ops between them) costs one change where NCHW data enters the region
and one where it leaves.

Rewrite (only when ``ctx.low_precision``: fp16, bf16, int8, fp8). The pass only annotates, with node
and value metadata (valid ONNX: the model stays standard and computes the same), which the builder
reads to run each region channels_last:

1. every node of a region gets ``metadata_props["kiln.layout"] = "nhwc"``;
2. every value where NCHW data enters a region (a graph input, or the output of a node outside it)
   gets ``metadata_props["kiln.layout_change"] = "to_nhwc"``, and every region output read outside
   it (or a graph output) gets ``"to_nchw"``.

A region is a maximal connected set of 4-D convolution-friendly nodes joined by the values between
them, holding at least one convolution: Conv, ConvTranspose, ``ai.kiln::FusedConv``; MaxPool (without
its Indices output), AveragePool, LpPool and their Global forms; BatchNormalization and
InstanceNormalization; pointwise activations and Add/Sub/Mul/Div/Max/Min/Sum/PRelu/Where (other
operands constants or 4-D values, which then enter the region); Resize/Upsample (scales or sizes
may be computed: they are parameters, not data); Concat; Pad; Slice (as ``pad_for_tensor_cores``
writes it); DepthToSpace/SpaceToDepth; ReduceMean/Max/Min/Sum with keepdims (pooling as the dynamo
exporter writes it). Torch's channels_last keeps every op's logical semantics, so a region may
contain any of these on any axis. The log counts the layout changes a per-conv NHWC choice costs
(2 per conv) against the region borders'.

The builder's conv layers carry the node's mark (``layout``), and the conv tactics decide with this
module's ``runs_nhwc`` alone (the one place the rule is written): a marked conv runs NHWC; so does
every conv on the CPU (oneDNN's own layout: fp32 YOLOv8n at 640x640 runs 10% faster NHWC there)
and every fp16/bf16/tf32 conv on the GPU, where the layers are timed at that precision even when
the build's default is another (a conv outside any region, a layer constrained to fp16).

Does not fire: at fp32/tf32; for regions without a conv; for nodes whose values are not all known
to be 4-D (Flatten, Reshape, Transpose, Gemm, MatMul ... end a region); for nodes already annotated;
in subgraphs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx_ir as ir

from kiln.passes._conv import is_conv
from kiln.passes.framework import KILN_DOMAIN, Finding, Pass, PassContext, register_pass
from kiln.passes.rewriting import attrs_of, connected_components, node_names, shapes_of, unique_node_names

LAYOUT = "kiln.layout"
LAYOUT_CHANGE = "kiln.layout_change"

_CONVS = {"Conv", "ConvTranspose"}
_POOLS = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool"}
_NORMS = {"BatchNormalization", "InstanceNormalization"}
_POINTWISE = {"Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Clip", "Elu", "Selu",
              "Celu", "Softplus", "Softsign", "Gelu", "Erf", "Exp", "Log", "Sqrt", "Reciprocal", "Neg", "Abs",
              "Identity", "Dropout", "Mish", "ThresholdedRelu", "Add", "Sub", "Mul", "Div", "Max", "Min", "Sum",
              "Pow", "Where", "Cast"}
_RESHAPING = {"Resize", "Upsample", "Concat", "Pad", "Slice", "DepthToSpace", "SpaceToDepth"}
_REDUCES = {"ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum"}
_FIRST_INPUT_ONLY = (
    _POOLS
    | _NORMS
    | _REDUCES
    | {"Resize", "Upsample", "Pad", "Slice", "Clip", "Dropout", "DepthToSpace", "SpaceToDepth"}
)


# GPU precisions whose convs run NHWC even without a mark (tensor-core kernels read NHWC)
NHWC_PRECISIONS = ("fp16", "bf16", "tf32")


def runs_nhwc(mark: str | None, precision: str, device: str) -> bool:
    """Whether a conv runs NHWC (channels_last): marked ``nhwc`` by this pass (``mark``: its conv
    layer's ``layout``), on the CPU, or at ``NHWC_PRECISIONS`` on the GPU. The builder times such a
    conv with channels_last inputs, so an NCHW tactic pays its reformat, and tries NCHW only as a
    level 4-5 layout alternative."""
    return mark == "nhwc" or device == "cpu" or precision in NHWC_PRECISIONS


def _is_conv(node: ir.Node) -> bool:
    return is_conv(node) or (node.op_type == "ConvTranspose" and node.domain in ("", "ai.onnx"))


def _rank4(value: ir.Value | None) -> bool:
    return value is not None and value.shape is not None and len(value.shape) == 4


def _is_constant(value: ir.Value) -> bool:
    return ir.convenience.get_const_tensor(value) is not None


def _friendly(node: ir.Node) -> bool:
    """Whether ``node`` can run channels_last inside a region: a conv-friendly op whose computed
    inputs and used outputs are all 4-D."""
    if node.metadata_props.get(LAYOUT) == "nhwc":
        return False
    if node.domain == KILN_DOMAIN:
        if node.op_type not in ("FusedConv", "Gelu"):
            return False
    elif node.domain not in ("", "ai.onnx"):
        return False
    op = node.op_type
    if not (op in _CONVS or op in _POOLS or op in _NORMS or op in _POINTWISE or op in _RESHAPING
            or op in _REDUCES or _is_conv(node)):
        return False
    if op in _REDUCES and int(attrs_of(node).get("keepdims", 1)) == 0:
        return False
    used = [v for v in node.outputs if v.uses() or v.is_graph_output()]
    if not used or len(used) != 1 or used[0] is not node.outputs[0] or not _rank4(node.outputs[0]):
        return False  # MaxPool Indices, BatchNormalization training outputs: layout-dependent or rare
    computed = [v for v in _data_inputs(node) if not _is_constant(v)]
    return bool(computed) and all(_rank4(v) for v in computed)


def _data_inputs(node: ir.Node) -> list[ir.Value]:
    """The inputs that carry activations (a conv's X and FusedConv's residual Z; the first input of
    ops whose other inputs are parameters: Resize scales, Pad pads, Clip bounds, BatchNorm stats...)."""
    if _is_conv(node):
        return [v for i, v in enumerate(node.inputs) if v is not None and i in (0, 3)]
    if node.op_type in _FIRST_INPUT_ONLY:
        return [node.inputs[0]] if node.inputs and node.inputs[0] is not None else []
    return [v for v in node.inputs if v is not None]


@dataclass
class _Region:
    nodes: list[ir.Node]
    enter: list[ir.Value] = field(default_factory=list)
    leave: list[ir.Value] = field(default_factory=list)

    @property
    def convs(self) -> list[ir.Node]:
        return [n for n in self.nodes if _is_conv(n)]


def _regions(model: ir.Model, ctx: PassContext) -> list[_Region]:
    """Every conv region to run NHWC (the one matcher of find and apply), in graph order."""
    if not ctx.low_precision:
        return []
    graph = model.graph
    members = [n for n in graph if _friendly(n)]
    inside_members = {id(n) for n in members}
    links = [(node, producer) for node in members for value in _data_inputs(node)
             if (producer := value.producer() if value is not None else None) is not None
             and id(producer) in inside_members]
    regions = []
    for nodes in connected_components(members, links):
        if not any(_is_conv(n) for n in nodes):
            continue
        inside = {id(n) for n in nodes}
        region = _Region(nodes)
        seen: set[int] = set()
        for node in nodes:
            for value in _data_inputs(node):
                if id(value) in seen or _is_constant(value):
                    continue
                producer = value.producer()
                if producer is None or id(producer) not in inside:
                    seen.add(id(value))
                    region.enter.append(value)
            for value in node.outputs:
                if id(value) in seen:
                    continue
                if value.is_graph_output() or any(id(use.node) not in inside for use in value.uses()):
                    seen.add(id(value))
                    region.leave.append(value)
        regions.append(region)
    return regions


@register_pass
class ChooseLayout(Pass):
    name = "choose_layout"
    rule = "NHWC beats NCHW for tensor-core convolutions: one layout change per conv region border"

    def find(self, model: ir.Model, ctx: PassContext) -> list[Finding]:
        unique_node_names(model)
        findings = []
        for r in _regions(model, ctx):
            convs = r.convs
            before, after = 2 * len(convs), len(r.enter) + len(r.leave)
            findings.append(Finding(
                rule="nchw-conv-low-precision",
                title=f"{len(convs)} convs run NCHW at {ctx.precision} ({len(r.nodes)} nodes in one conv region)",
                nodes=node_names([convs[0]] + [n for n in r.nodes if n is not convs[0]]),
                why="tensor-core conv kernels read NHWC; NCHW data is transposed in and out around every conv "
                    "(2 layout changes per conv) unless the whole region runs NHWC",
                fix=f"fixed automatically by pass {self.name} (the builder runs the region channels_last)",
                pass_name=self.name,
                shapes=shapes_of(r.enter + r.leave),
                details={"convs": len(convs), "layout_changes_per_conv": before, "layout_changes_region": after,
                         "layout_changes_saved": before - after, "enter": [v.name for v in r.enter],
                         "leave": [v.name for v in r.leave]},
            ))
        return findings

    def apply(self, model: ir.Model, ctx: PassContext) -> int:
        unique_node_names(model)
        regions = _regions(model, ctx)
        before = after = 0
        for i, r in enumerate(regions):
            for node in r.nodes:
                node.metadata_props[LAYOUT] = "nhwc"
            for value in r.enter:
                value.metadata_props[LAYOUT_CHANGE] = "to_nhwc"
            for value in r.leave:
                value.metadata_props[LAYOUT_CHANGE] = "to_nchw"
            n_before, n_after = 2 * len(r.convs), len(r.enter) + len(r.leave)
            before, after = before + n_before, after + n_after
            ctx.log.append(f"region {i} (from {r.convs[0].name}): {len(r.convs)} convs, {len(r.nodes)} nodes NHWC; "
                           f"layout changes {n_before} per-conv -> {n_after} at its borders")
        if regions:
            ctx.log.append(
                f"{len(regions)} NHWC regions: layout changes {before} per-conv -> {after} at region borders"
            )
        return len(regions)
