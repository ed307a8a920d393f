"""What every pass test needs: run a pass on a model, list ops, and check the rewritten graph against
the original on fresh random inputs (never zeros), in kiln's executor and, when the result is
standard ONNX, in onnxruntime too."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

import kiln
from kiln.cost import Cost, model_cost
from kiln.passes.framework import KILN_DOMAIN, PassContext, PassReport, get_pass, op_counts, run_passes

FP32_RTOL = 1e-4


def load(proto: onnx.ModelProto) -> ir.Model:
    """The IR of a ModelProto as kiln loads it (checked, shapes inferred)."""
    return kiln.load_model_proto(copy.deepcopy(proto), name=proto.graph.name or "model")


def run_pass(proto: onnx.ModelProto, name: str, **ctx) -> tuple[ir.Model, int, PassContext]:
    """``proto`` loaded and rewritten by the one pass ``name``; returns (model, rewrites, context)."""
    model = load(proto)
    context = PassContext(**ctx)
    count = get_pass(name).apply(model, context)
    return model, count, context


def run_all(proto: onnx.ModelProto, **ctx) -> tuple[ir.Model, PassReport]:
    model = load(proto)
    return model, run_passes(model, PassContext(**ctx))


def ops(model: ir.Model) -> list[str]:
    """The main graph's op types in order (``domain::Op`` outside the default domain)."""
    return [n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}" for n in model.graph]


def counts(model: ir.Model) -> dict[str, int]:
    return op_counts(model)


def to_proto(model: ir.Model) -> onnx.ModelProto:
    return ir.serde.serialize_model(model)


def random_feeds(proto: onnx.ModelProto, dims: Mapping[str, int] | None = None, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal floats (ints in [0, 2), bools at random) for each graph input; symbolic dims
    come from ``dims`` (default 2)."""
    rng = np.random.default_rng(seed)
    dims = dims or {}
    initializers = {t.name for t in proto.graph.initializer}
    feeds = {}
    for value in proto.graph.input:
        if value.name in initializers:
            continue
        tt = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else dims.get(d.dim_param, 2) for d in tt.shape.dim]
        np_type = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type)
        if np_type == np.bool_:
            feeds[value.name] = rng.random(shape) < 0.5
        elif np.issubdtype(np_type, np.floating):
            feeds[value.name] = rng.standard_normal(shape).astype(np_type)
        else:
            feeds[value.name] = rng.integers(0, 2, size=shape).astype(np_type)
    return feeds


def assert_same(
    before: onnx.ModelProto,
    after: ir.Model,
    dims: Mapping[str, int] | None = None,
    rtol: float = FP32_RTOL,
    seeds: Sequence[int] = (0, 1),
    onnxruntime: bool | None = None,
) -> None:
    """The rewritten model computes what the original does: kiln's executor on both, and
    onnxruntime on the rewritten one when it is standard ONNX (``onnxruntime=None``: when it has no
    ai.kiln op). Relative difference max|a-b| / max|b| per output."""
    after_proto = to_proto(after)
    onnx.checker.check_model(after_proto)
    reference = kiln.Executor(load(before))
    rewritten = kiln.Executor(kiln.load_model_proto(copy.deepcopy(after_proto), name="rewritten"))
    use_ort = onnxruntime if onnxruntime is not None else not any(n.domain == KILN_DOMAIN for n in after.graph)
    for seed in seeds:
        feeds = random_feeds(before, dims, seed)
        want = {k: np.asarray(v) for k, v in reference.run(feeds).items()}
        got = {k: np.asarray(v) for k, v in rewritten.run(feeds).items()}
        assert set(got) == set(want), (sorted(got), sorted(want))
        for name in want:
            _close(name, got[name], want[name], rtol, "kiln")
        if use_ort:
            import onnxruntime as ort

            session = ort.InferenceSession(after_proto.SerializeToString(), providers=["CPUExecutionProvider"])
            outs = session.run(None, feeds)
            for value, out in zip(session.get_outputs(), outs):
                _close(value.name, np.asarray(out), want[value.name], rtol, "onnxruntime")


def _close(name: str, got: np.ndarray, want: np.ndarray, rtol: float, who: str) -> None:
    assert got.shape == want.shape, f"{who}: output {name!r} has shape {got.shape}, expected {want.shape}"
    if want.dtype.kind not in "fc":
        assert np.array_equal(got, want), f"{who}: output {name!r} differs"
        return
    scale = max(float(np.max(np.abs(want.astype(np.float64)))), 1e-30) if want.size else 1.0
    err = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64)))) if want.size else 0.0
    assert err / scale <= rtol, f"{who}: output {name!r} relative difference {err / scale:.3g} > {rtol}"


def finding_cost(model: ir.Model, finding, dims: Mapping[str, int] | None = None) -> Cost:
    """The FLOPs and bytes ``kiln doctor`` reports for ``finding``: ``kiln.cost``'s estimate of its nodes."""
    return model_cost(model, dims).of(finding.nodes)


def assert_matches_unfused(before: onnx.ModelProto, after: ir.Model, precision: str = "fp32",
                           dims: Mapping[str, int] | None = None, seeds: Sequence[int] = (0, 1)) -> None:
    """The fused model, run by kiln's executor (it holds ai.kiln ops), computes what onnxruntime
    computes on the unfused original, on fresh random inputs: ``|a - ref| <= atol + rtol * |ref|``
    elementwise, with ``kiln.precision.TOLERANCES[precision]``."""
    import onnxruntime as ort

    from kiln.precision import TOLERANCES

    tol = TOLERANCES[precision]
    after_proto = to_proto(after)
    onnx.checker.check_model(after_proto)
    fused = kiln.Executor(kiln.load_model_proto(copy.deepcopy(after_proto), name="fused"))
    session = ort.InferenceSession(before.SerializeToString(), providers=["CPUExecutionProvider"])
    for seed in seeds:
        feeds = random_feeds(before, dims, seed)
        want = dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds), strict=True))
        got = {k: np.asarray(v) for k, v in fused.run(feeds).items()}
        assert set(got) == set(want), (sorted(got), sorted(want))
        for name, ref in want.items():
            a, ref = got[name].astype(np.float64), np.asarray(ref).astype(np.float64)
            assert a.shape == ref.shape, (name, a.shape, ref.shape)
            excess = np.abs(a - ref) - (tol.atol + tol.rtol * np.abs(ref))
            assert not np.any(excess > 0), (
                f"output {name!r}: {int(np.sum(excess > 0))} elements beyond {precision} tolerance"
            )
