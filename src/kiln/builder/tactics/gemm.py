"""GEMM tactics for Gemm and MatMul-by-a-constant layers: cuBLAS, cuBLASLt with a fused epilogue,
and a Triton GEMM whose epilogue adds the bias and applies the activation in registers.

Inputs of any rank are viewed as 2-D ``[M, K]`` (the "4-D MatMul as 2-D" rule); weights are
prepared once as ``[N, K]`` with Gemm's alpha folded in, and the bias with beta folded in.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from kiln.activations import TRITON_EPILOGUES, apply_spec
from kiln.builder.layers import Layer
from kiln.builder.tactics.base import Tactic, canonical_weights, tactic
from kiln.precision import PRECISION_DTYPES


@canonical_weights("Gemm")
def _canonical(layer: Layer, constants: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    attrs = layer.attrs
    w = constants[layer.weights["w"]].float()
    w_nk = (w if attrs["trans_b"] else w.t()) * attrs["alpha"]
    weights = {"w": w_nk.contiguous()}
    if "b" in layer.weights:
        b = constants[layer.weights["b"]].float().reshape(-1) * attrs["beta"]
        weights["b"] = b.expand(attrs["n"]).contiguous()
    return weights


def _flat(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.reshape(-1, k)


def _unflat(y: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    return y.view(*x.shape[:-1], n) if x.dim() != 2 else y


class _Gemm(Tactic):
    kind = "Gemm"

    def prepare(self, layer, weights, precision, config):
        dtype = PRECISION_DTYPES[precision]
        prepared = {"w": weights["w"].to(dtype).contiguous()}
        if "b" in weights:
            prepared["b"] = weights["b"].to(dtype)
        return prepared

    def prep_id(self, config):
        return "gemm.nk"


@tactic
class GemmTorch(_Gemm):
    """The reference: ``x @ W`` through cuBLAS (MKL on CPU), then the bias and activation as ops."""

    name = "gemm.torch"
    reference = True

    def runner(self, layer, prepared, precision, config, context):
        w_t, b = prepared["w"].t(), prepared.get("b")
        k, n, act = layer.attrs["k"], layer.attrs["n"], layer.attrs["activation"]

        def run(inputs):
            x = inputs[0]
            y = torch.mm(_flat(x, k), w_t)
            if b is not None:
                y = y.add_(b)
            return [_unflat(apply_spec(y, act), x, n)]

        return run


@tactic
class GemmCublasLt(_Gemm):
    """``addmm`` with a 1-D bias: torch hands it to cuBLASLt with the bias epilogue, and
    ``_addmm_activation`` adds the ReLU or tanh-GELU epilogue. Other activations follow as one op."""

    name = "gemm.cublaslt"
    source = "cublaslt"
    devices = ("cuda",)
    level = 1

    def supports(self, layer, precision, device):
        return "b" in layer.weights

    def heuristic(self, layer, precision, device):
        return 2

    def runner(self, layer, prepared, precision, config, context):
        w_t, b = prepared["w"].t(), prepared["b"]
        k, n, act = layer.attrs["k"], layer.attrs["n"], layer.attrs["activation"]
        op = act["op"] if act else None
        if op in ("relu", "gelu_tanh"):
            use_gelu = op == "gelu_tanh"

            def run(inputs):
                x = inputs[0]
                return [_unflat(torch._addmm_activation(b, _flat(x, k), w_t, use_gelu=use_gelu), x, n)]
        else:
            def run(inputs):
                x = inputs[0]
                return [_unflat(apply_spec(torch.addmm(b, _flat(x, k), w_t), act), x, n)]
        return run


@tactic
class GemmTriton(_Gemm):
    """A Triton GEMM (``kiln.kernels.gemm``) with bias and activation in its epilogue; block sizes
    are configs: a short list at levels 2-3, a wide one at 4-5."""

    name = "gemm.triton"
    source = "triton"
    devices = ("cuda",)
    level = 2

    def supports(self, layer, precision, device):
        act = layer.attrs["activation"]
        return act is None or act["op"] in TRITON_EPILOGUES

    def heuristic(self, layer, precision, device):
        return 1

    def configs(self, layer, level, precision, device):
        from kiln.kernels.gemm import SHORT_CONFIGS, WIDE_CONFIGS

        if level < 2:
            return []
        chosen = SHORT_CONFIGS[:1] if level == 2 else SHORT_CONFIGS if level == 3 else WIDE_CONFIGS
        return [c.as_dict() for c in chosen]

    def runner(self, layer, prepared, precision, config, context):
        from kiln.kernels.gemm import GemmConfig, gemm

        w, b = prepared["w"], prepared.get("b")
        k, n, act = layer.attrs["k"], layer.attrs["n"], layer.attrs["activation"]
        name = act["op"] if act else "none"
        cfg = GemmConfig.from_dict(config)

        def run(inputs):
            x = inputs[0]
            return [_unflat(gemm(_flat(x, k), w, b, name, cfg, precision), x, n)]

        return run
