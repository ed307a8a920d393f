"""Conv tactics: cuDNN (oneDNN on CPU) in NCHW, in NHWC (channels_last), and cuDNN's fused
conv + bias (+ residual add) + ReLU.

NHWC is the tensor-core layout, and oneDNN's own on the CPU (an NCHW conv there pays a reorder of
its input and output on every call). Which one a conv layer runs in is choose_layout's decision
(``kiln.passes.choose_layout.runs_nhwc``: the pass's mark in the layer's ``layout``, the device and
the precision): an NHWC conv is tried in NHWC from level 1, with NCHW only at levels 4-5 (a layout
alternative); an NCHW conv the other way round. An NHWC conv leaves its output channels_last, so the next
conv in the region reads it without a reformat; torch's pointwise ops keep the layout.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from kiln.activations import apply_spec
from kiln.builder.layers import Layer
from kiln.builder.tactics.base import Tactic, canonical_weights, tactic
from kiln.passes.choose_layout import runs_nhwc
from kiln.precision import PRECISION_DTYPES


@canonical_weights("Conv")
def _canonical(layer: Layer, constants: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    weights = {"w": constants[layer.weights["w"]].float()}
    if "b" in layer.weights:
        weights["b"] = constants[layer.weights["b"]].float().reshape(-1)
    return weights


def _symmetric(layer: Layer) -> bool:
    top, left, bottom, right = layer.attrs["pads"]
    return top == bottom and left == right


def _conv(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, attrs: Mapping) -> torch.Tensor:
    top, left, bottom, right = attrs["pads"]
    if top == bottom and left == right:
        return F.conv2d(x, w, b, attrs["strides"], [top, left], attrs["dilations"], attrs["group"])
    x = F.pad(x, [left, right, top, bottom])
    return F.conv2d(x, w, b, attrs["strides"], 0, attrs["dilations"], attrs["group"])


class _ConvTorch(Tactic):
    kind = "Conv"
    memory_format = torch.contiguous_format

    def prepare(self, layer, weights, precision, config):
        dtype = PRECISION_DTYPES[precision]
        prepared = {"w": weights["w"].to(dtype).contiguous(memory_format=self.memory_format)}
        if "b" in weights:
            prepared["b"] = weights["b"].to(dtype)
        return prepared

    def runner(self, layer, prepared, precision, config, context):
        w, b, attrs = prepared["w"], prepared.get("b"), layer.attrs
        act, fmt = attrs["activation"], self.memory_format

        def run(inputs):
            y = _conv(inputs[0].contiguous(memory_format=fmt), w, b, attrs)
            if attrs["residual"]:
                y = y.add_(inputs[1])
            return [apply_spec(y, act)]

        return run


def conv_runs_nhwc(layer: Layer, precision: str, device: str) -> bool:
    """Whether this conv layer runs NHWC: choose_layout's rule on its mark, the device and the precision."""
    return runs_nhwc(layer.attrs.get("layout"), precision, device)


@tactic
class ConvNCHW(_ConvTorch):
    """The reference: torch's conv2d in NCHW (cuDNN on CUDA, oneDNN on CPU), epilogue as separate ops."""

    name = "conv.nchw"
    reference = True

    def configs(self, layer, level, precision, device):
        return [{}] if level >= 4 or not conv_runs_nhwc(layer, precision, device) else []

    def heuristic(self, layer, precision, device):
        return 0 if conv_runs_nhwc(layer, precision, device) else 1


@tactic
class ConvNHWC(_ConvTorch):
    """conv2d with channels_last input and weights: cuDNN's tensor-core layout."""

    name = "conv.nhwc"
    memory_format = torch.channels_last
    level = 1

    def configs(self, layer, level, precision, device):
        return [{}] if level >= (1 if conv_runs_nhwc(layer, precision, device) else 4) else []

    def prep_id(self, config):
        return "conv.nhwc"

    def heuristic(self, layer, precision, device):
        return 2 if conv_runs_nhwc(layer, precision, device) else 0


@tactic
class ConvCudnnFused(Tactic):
    """cuDNN's fused conv + bias + ReLU, and conv + bias + residual add + ReLU, as one call
    (``torch.cudnn_convolution_relu`` / ``torch.cudnn_convolution_add_relu``). ReLU layers with
    symmetric padding only: that is what cuDNN's fused kernels implement."""

    name = "conv.cudnn_fused"
    kind = "Conv"
    source = "cudnn"
    devices = ("cuda",)
    level = 2

    def supports(self, layer, precision, device):
        act = layer.attrs["activation"]
        return (
            act is not None and act["op"] == "relu" and _symmetric(layer) and hasattr(torch, "cudnn_convolution_relu")
        )

    def configs(self, layer, level, precision, device):
        preferred = "nhwc" if conv_runs_nhwc(layer, precision, device) else "nchw"
        layouts = ["nhwc", "nchw"] if level >= 4 else [preferred]
        return [{"layout": layout} for layout in layouts]

    def heuristic(self, layer, precision, device):
        return 3

    def prep_id(self, config):
        return f"conv.cudnn_fused.{config.get('layout', 'nchw')}"

    def prepare(self, layer, weights, precision, config):
        dtype = PRECISION_DTYPES[precision]
        fmt = torch.channels_last if config.get("layout") == "nhwc" else torch.contiguous_format
        w = weights["w"].to(dtype).contiguous(memory_format=fmt)
        b = weights["b"].to(dtype) if "b" in weights else torch.zeros(w.shape[0], dtype=dtype, device=w.device)
        return {"w": w, "b": b}

    def runner(self, layer, prepared, precision, config, context):
        w, b, attrs = prepared["w"], prepared["b"], layer.attrs
        fmt = torch.channels_last if config.get("layout") == "nhwc" else torch.contiguous_format
        top, left, _, _ = attrs["pads"]
        stride, padding, dilation, groups = attrs["strides"], [top, left], attrs["dilations"], attrs["group"]

        if attrs["residual"]:
            def run(inputs):
                x = inputs[0].contiguous(memory_format=fmt)
                z = inputs[1].contiguous(memory_format=fmt)
                return [torch.cudnn_convolution_add_relu(x, w, z, 1.0, b, stride, padding, dilation, groups)]
        else:
            def run(inputs):
                x = inputs[0].contiguous(memory_format=fmt)
                return [torch.cudnn_convolution_relu(x, w, b, stride, padding, dilation, groups)]
        return run
