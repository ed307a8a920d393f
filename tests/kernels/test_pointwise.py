"""The generated pointwise kernels against ONNX semantics computed by torch in float64."""

from __future__ import annotations

import hashlib
import json
import os

import pytest
import torch
import torch.nn.functional as F

from kiln.kernels import pointwise
from kiln.kernels.pointwise import SUPPORTED_OPS, PointwiseKernel

# NaN, inf and masked-off lanes make numpy warn inside the interpreter; the results are checked.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

SELU_ALPHA, SELU_GAMMA = 1.67326319217681884765625, 1.05070102214813232421875


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """Each test writes its sources to a fresh cache folder, and imports them anew."""
    monkeypatch.setenv("KILN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(pointwise, "_KERNELS", {})


def randn(gen: torch.Generator, *shape: int, dtype=torch.float32, device="cpu") -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(device=device, dtype=dtype)


def softplus(x):
    return torch.log1p(torch.exp(-x.abs())) + x.clamp(min=0)


# op -> (number of inputs, attrs, float64 reference implementing the ONNX definition)
ONNX = {
    "Add": (2, {}, lambda x, y: x + y),
    "Sub": (2, {}, lambda x, y: x - y),
    "Mul": (2, {}, lambda x, y: x * y),
    "Div": (2, {}, lambda x, y: x / y),
    "Pow": (2, {}, torch.pow),
    "Max": (2, {}, torch.maximum),
    "Min": (2, {}, torch.minimum),
    "Clip": (1, {}, lambda x: x),
    "Neg": (1, {}, torch.neg),
    "Abs": (1, {}, torch.abs),
    "Relu": (1, {}, torch.relu),
    "LeakyRelu": (1, {}, lambda x: torch.where(x < 0, 0.01 * x, x)),
    "Sigmoid": (1, {}, torch.sigmoid),
    "Tanh": (1, {}, torch.tanh),
    "Exp": (1, {}, torch.exp),
    "Log": (1, {}, torch.log),
    "Sqrt": (1, {}, torch.sqrt),
    "Reciprocal": (1, {}, torch.reciprocal),
    "Erf": (1, {}, torch.erf),
    "HardSigmoid": (1, {}, lambda x: (0.2 * x + 0.5).clamp(0, 1)),
    "HardSwish": (1, {}, lambda x: x * (x / 6 + 0.5).clamp(0, 1)),
    "Gelu": (1, {}, lambda x: 0.5 * x * (1 + torch.erf(x / 2**0.5))),
    "Elu": (1, {}, lambda x: torch.where(x < 0, torch.exp(x) - 1, x)),
    "Selu": (
        1,
        {},
        lambda x: torch.where(x <= 0, SELU_GAMMA * (SELU_ALPHA * torch.exp(x) - SELU_ALPHA), SELU_GAMMA * x),
    ),
    "Softplus": (1, {}, lambda x: torch.log(torch.exp(x) + 1)),
    "Softsign": (1, {}, lambda x: x / (1 + x.abs())),
    "Identity": (1, {}, lambda x: x),
    "Floor": (1, {}, torch.floor),
    "Ceil": (1, {}, torch.ceil),
    "Sin": (1, {}, torch.sin),
    "Cos": (1, {}, torch.cos),
    "Mish": (1, {}, lambda x: x * torch.tanh(torch.log(torch.exp(x) + 1))),
    "ThresholdedRelu": (1, {}, lambda x: torch.where(x > 1.0, x, 0.0)),
    "Celu": (1, {}, lambda x: x.clamp(min=0) + (torch.exp(x) - 1).clamp(max=0)),
}


def single_op(op: str, arity: int, attrs: dict) -> list[dict]:
    inputs = [{"op": "input", "index": k} for k in range(arity)]
    return inputs + [{"op": op, "args": list(range(arity)), "attrs": attrs}]


def test_every_supported_op_has_a_reference():
    assert set(ONNX) == SUPPORTED_OPS


@pytest.mark.parametrize("op", sorted(ONNX))
def test_each_op(op, gen, device, rel_err):
    arity, attrs, reference = ONNX[op]
    inputs = [randn(gen, 3, 37, device=device) * 3 for _ in range(arity)]
    if op in ("Log", "Sqrt"):
        inputs[0] = inputs[0].abs() + 0.1
    inputs[0][0, :4] = torch.tensor([40.0, -40.0, 100.0, -100.0])  # saturation and overflow
    if op in ("Exp", "Reciprocal", "Pow", "Div"):
        inputs[0][0, :4] = torch.tensor([5.0, -5.0, 2.0, -2.0])
    out = PointwiseKernel(single_op(op, arity, attrs), arity)(inputs, torch.float32)
    assert out.dtype == torch.float32 and out.shape == (3, 37)
    assert rel_err(out, reference(*[t.double() for t in inputs])) < 1e-4


@pytest.mark.parametrize(
    "op,attrs,reference",
    [
        ("LeakyRelu", {"alpha": 0.2}, lambda x: torch.where(x < 0, 0.2 * x, x)),
        ("HardSigmoid", {"alpha": 0.3, "beta": 0.4}, lambda x: (0.3 * x + 0.4).clamp(0, 1)),
        ("Elu", {"alpha": 0.5}, lambda x: torch.where(x < 0, 0.5 * (torch.exp(x) - 1), x)),
        (
            "Selu",
            {"alpha": 1.5, "gamma": 2.0},
            lambda x: torch.where(x <= 0, 2.0 * (1.5 * torch.exp(x) - 1.5), 2.0 * x),
        ),
        ("ThresholdedRelu", {"alpha": 0.5}, lambda x: torch.where(x > 0.5, x, 0.0)),
        ("Celu", {"alpha": 2.0}, lambda x: x.clamp(min=0) + (2.0 * (torch.exp(x / 2.0) - 1)).clamp(max=0)),
        ("Gelu", {"approximate": "tanh"}, lambda x: F.gelu(x, approximate="tanh")),
        ("Gelu", {"approximate": "none"}, lambda x: F.gelu(x)),
        ("Clip", {"min": -0.5, "max": 0.7}, lambda x: x.clamp(-0.5, 0.7)),
        ("Clip", {"min": None, "max": 0.7}, lambda x: x.clamp(max=0.7)),
        ("Clip", {"min": 0.2, "max": -1.0}, lambda x: torch.full_like(x, -1.0)),  # min > max gives max
    ],
)
def test_attributes(op, attrs, reference, gen, device, rel_err):
    x = randn(gen, 5, 29, device=device) * 3
    out = PointwiseKernel(single_op(op, 1, attrs), 1)([x], torch.float32)
    assert rel_err(out, reference(x.double())) < 1e-4


@pytest.mark.parametrize("lo,hi", [(-0.5, None), (None, 0.3), (-0.5, 0.3), (None, None)])
def test_clip_bounds_as_args(lo, hi, gen, device, rel_err):
    x = randn(gen, 4, 21, device=device)
    program = [{"op": "input", "index": 0}]
    args = [0]
    for bound in (lo, hi):
        if bound is None:
            args.append(None)
        else:
            program.append({"op": "const", "value": bound})
            args.append(len(program) - 1)
    program.append({"op": "Clip", "args": args})
    out = PointwiseKernel(program, 1)([x], torch.float32)
    assert rel_err(out, x.double() if lo is None and hi is None else x.double().clamp(lo, hi)) < 1e-4


@pytest.mark.parametrize("exponent", [2.0, 0.5, 1.0, 3.0, 1.7, -2.0, 0.0])
def test_pow_by_constant(exponent, gen, device, rel_err):
    x = randn(gen, 3, 40, device=device)
    program = [{"op": "input", "index": 0}, {"op": "const", "value": exponent}, {"op": "Pow", "args": [0, 1]}]
    out = PointwiseKernel(program, 1)([x], torch.float32)
    assert rel_err(out, torch.pow(x.double(), exponent)) < 1e-4


def test_pow_with_integer_exponents_of_negative_bases(gen, device, rel_err):
    x = randn(gen, 4, 30, device=device) * 2
    y = torch.randint(-3, 4, (4, 30), generator=gen).float().to(device)
    out = PointwiseKernel(single_op("Pow", 2, {}), 2)([x, y], torch.float32)
    assert rel_err(out, torch.pow(x.double(), y.double())) < 1e-4


def test_max_min_propagate_nan_and_take_more_args(gen, device, rel_err):
    x, y, z = (randn(gen, 2, 33, device=device) for _ in range(3))
    x[0, 3], y[1, 5] = float("nan"), float("nan")
    for op, fold in (("Max", torch.maximum), ("Min", torch.minimum)):
        program = [{"op": "input", "index": k} for k in range(3)] + [{"op": op, "args": [0, 1, 2]}]
        out = PointwiseKernel(program, 3)([x, y, z], torch.float32)
        assert rel_err(out, fold(fold(x.double(), y.double()), z.double())) < 1e-4


GELU_OF_SCALED_SUM = [
    {"op": "input", "index": 0},
    {"op": "input", "index": 1},
    {"op": "const", "value": 1.5},
    {"op": "Mul", "args": [0, 2]},
    {"op": "Add", "args": [3, 1]},
    {"op": "Gelu", "args": [4], "attrs": {"approximate": "tanh"}},
    {"op": "Sub", "args": [5, 0]},
]


def gelu_of_scaled_sum(x, y):
    x, y = x.double(), y.double()
    return F.gelu(x * 1.5 + y, approximate="tanh") - x


def test_program_survives_a_json_round_trip(gen, device, rel_err):
    x, y = randn(gen, 3, 8, device=device), randn(gen, 8, device=device)
    out = PointwiseKernel(json.loads(json.dumps(GELU_OF_SCALED_SUM)), 2)([x, y], torch.float32)
    assert rel_err(out, gelu_of_scaled_sum(x, y)) < 1e-4


@pytest.mark.parametrize(
    "x_shape,y_shape",
    [
        ((1500,), (1500,)),  # not a multiple of the block
        ((7, 130), (130,)),  # row vector
        ((7, 130), (7, 1)),  # column vector
        ((7, 130), ()),  # scalar
        ((6, 1, 5), (1, 4, 1)),  # both broadcast: neither input has the output's shape
        ((2, 3, 4, 5), (3, 1, 1)),  # per-channel bias
    ],
)
def test_chain_with_broadcasting(x_shape, y_shape, gen, device, rel_err):
    x, y = randn(gen, *x_shape, device=device), randn(gen, *y_shape, device=device)
    out = PointwiseKernel(GELU_OF_SCALED_SUM, 2)([x, y], torch.float32)
    assert out.shape == torch.broadcast_shapes(x.shape, y.shape) and out.is_contiguous()
    assert rel_err(out, gelu_of_scaled_sum(x, y)) < 1e-4


def test_channels_last_output_follows_the_input(gen, device, rel_err):
    x = randn(gen, 2, 3, 5, 7, device=device).to(memory_format=torch.channels_last)
    bias = randn(gen, 3, 1, 1, device=device)
    out = PointwiseKernel(GELU_OF_SCALED_SUM, 2)([bias, x], torch.float32)  # the output copies x, not bias
    assert out.stride() == x.stride()
    assert rel_err(out, gelu_of_scaled_sum(bias, x)) < 1e-4


def test_inputs_with_other_strides_than_the_output(gen, device, rel_err):
    x = randn(gen, 9, 40, device=device)
    y = randn(gen, 40, 9, device=device).T  # same shape, transposed strides
    z = randn(gen, 9, 80, device=device)[:, ::2]  # same shape, gaps between elements
    program = [{"op": "input", "index": k} for k in range(3)] + [
        {"op": "Mul", "args": [0, 1]},
        {"op": "Add", "args": [3, 2]},
    ]
    out = PointwiseKernel(program, 3)([x, y, z], torch.float32)
    assert rel_err(out, x.double() * y.double() + z.double()) < 1e-4
    out = PointwiseKernel(program, 3)([y, x, z], torch.float32)  # the output copies y's layout
    assert out.stride() == y.stride()
    assert rel_err(out, x.double() * y.double() + z.double()) < 1e-4
    out = PointwiseKernel(program, 3)([z, y, x], torch.float32)  # z has gaps: the output is dense
    assert out.is_contiguous()
    assert rel_err(out, z.double() * y.double() + x.double()) < 1e-4


def test_mixed_dtypes_in_and_out(gen, device, rel_err):
    x = randn(gen, 5, 70, dtype=torch.float16, device=device)
    y = randn(gen, 70, dtype=torch.bfloat16, device=device)
    z = randn(gen, 5, 1, device=device)
    program = [{"op": "input", "index": k} for k in range(3)] + [
        {"op": "Mul", "args": [0, 1]},
        {"op": "Add", "args": [3, 2]},
    ]
    reference = x.double() * y.double() + z.double()
    for out_dtype in (torch.float32, torch.float16, torch.bfloat16):
        out = PointwiseKernel(program, 3)([x, y, z], out_dtype)
        assert out.dtype == out_dtype
        assert rel_err(out, reference) < (1e-4 if out_dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("block,num_warps", [(128, 4), (2048, 8)])
def test_block_and_warps(block, num_warps, gen, device, rel_err):
    x, y = randn(gen, 3, 1001, device=device), randn(gen, 1001, device=device)
    out = PointwiseKernel(GELU_OF_SCALED_SUM, 2, block=block, num_warps=num_warps)([x, y], torch.float32)
    assert rel_err(out, gelu_of_scaled_sum(x, y)) < 1e-4


def test_result_of_scalars_only_fills_the_output(gen, device):
    s, x = torch.tensor(0.25, device=device), randn(gen, 4, 6, device=device)
    program = [{"op": "input", "index": 0}, {"op": "Exp", "args": [0]}]
    out = PointwiseKernel(program, 2)([s, x], torch.float32)
    assert out.shape == (4, 6) and torch.allclose(out.cpu(), torch.full((4, 6), 0.25).exp())
    program = [{"op": "input", "index": 1}, {"op": "const", "value": 3.0}]  # the output is the const
    assert torch.equal(
        PointwiseKernel(program, 2)([s, x], torch.float16).cpu(), torch.full((4, 6), 3.0, dtype=torch.float16)
    )


def test_repeated_input_and_input_as_output(gen, device, rel_err):
    x = randn(gen, 4, 10, device=device)
    program = [{"op": "input", "index": 0}, {"op": "Mul", "args": [0, 0]}, {"op": "input", "index": 0}]
    assert torch.equal(PointwiseKernel(program, 1)([x], torch.float32).cpu(), x.cpu())
    assert rel_err(PointwiseKernel(program[:2], 1)([x], torch.float32), x.double() ** 2) < 1e-4


def test_empty_and_zero_dim_outputs(gen, device):
    program = single_op("Add", 2, {})
    assert PointwiseKernel(program, 2)(
        [torch.empty(0, 5, device=device), torch.ones(5, device=device)], torch.float32
    ).shape == (0, 5)
    a, b = torch.tensor(2.0, device=device), torch.tensor(3.0, device=device)
    out = PointwiseKernel(program, 2)([a, b], torch.float32)
    assert out.shape == () and out.item() == 5.0


def test_64_bit_offsets(gen, device, rel_err, monkeypatch):
    monkeypatch.setattr(pointwise, "_INT32_LIMIT", 64)  # big tensors cannot be made here; lower the bar
    x, y = randn(gen, 9, 40, device=device), randn(gen, 40, 9, device=device).T
    kernel = PointwiseKernel(single_op("Add", 2, {}), 2)
    out = kernel([x, y], torch.float32)
    assert rel_err(out, x.double() + y.double()) < 1e-4
    assert all(layout.int64 for layout in kernel._compiled)


def test_fast_path_has_no_index_arithmetic(gen, device):
    x, y = randn(gen, 2, 3, 4, device=device), randn(gen, 2, 3, 4, device=device)
    kernel = PointwiseKernel(GELU_OF_SCALED_SUM, 2)
    kernel([x, y], torch.float32)
    ((layout, _),) = kernel._compiled.items()
    assert layout.kinds == ("flat", "flat") and layout.rank == 1
    source, _ = pointwise._generate(kernel.steps, layout)
    assert "%" not in source.split("def pointwise_kernel")[1]


def test_collapses_broadcast_bias_to_two_dims(gen, device):
    x, bias = randn(gen, 2, 3, 4, 5, device=device), randn(gen, 5, device=device)
    kernel = PointwiseKernel(single_op("Add", 2, {}), 2)
    kernel([x, bias], torch.float32)
    ((layout, _),) = kernel._compiled.items()
    assert layout.rank == 2 and layout.kinds == ("flat", "strided") and layout.zero[1] == (True, False)


def test_constants_are_arguments_not_source(gen, device):
    x = randn(gen, 10, device=device)
    scaled = [{"op": "input", "index": 0}, {"op": "const", "value": 2.0}, {"op": "Mul", "args": [0, 1]}]
    other = json.loads(json.dumps(scaled).replace("2.0", "-7.5"))
    for program, factor in ((scaled, 2.0), (other, -7.5)):
        assert torch.allclose(PointwiseKernel(program, 1)([x], torch.float32).cpu(), x.cpu() * factor)
    files = os.listdir(pointwise.cache_dir())
    assert len(files) == 1


def test_source_file_is_named_by_its_hash(gen, device):
    PointwiseKernel(single_op("Exp", 1, {}), 1)([randn(gen, 8, device=device)], torch.float32)
    (name,) = os.listdir(pointwise.cache_dir())
    with open(os.path.join(pointwise.cache_dir(), name), "rb") as handle:
        assert name == hashlib.sha256(handle.read()).hexdigest() + ".py"


@pytest.mark.parametrize(
    "program,num_inputs",
    [
        ([], 1),
        ([{"op": "input", "index": 1}], 1),  # no such input
        ([{"op": "input", "index": True}], 1),
        ([{"op": "input", "index": 0}, {"op": "Conv", "args": [0]}], 1),  # unsupported op
        ([{"op": "input", "index": 0}, {"op": "Relu", "args": [1]}], 1),  # refers to itself
        ([{"op": "input", "index": 0}, {"op": "Relu", "args": [0, 0]}], 1),  # too many args
        ([{"op": "input", "index": 0}, {"op": "Add", "args": [0]}], 1),  # too few args
        ([{"op": "input", "index": 0}, {"op": "Relu", "args": [0], "attrs": {"alpha": 1.0}}], 1),  # unknown attr
        ([{"op": "input", "index": 0}, {"op": "Gelu", "args": [0], "attrs": {"approximate": "fast"}}], 1),
        ([{"op": "input", "index": 0}, {"op": "Elu", "args": [0], "attrs": {"alpha": "big"}}], 1),
        ([{"op": "const", "value": "1"}], 1),
        ([{"op": "input", "index": 0}], 0),
        ([{"index": 0}], 1),
    ],
)
def test_invalid_programs_raise(program, num_inputs):
    with pytest.raises(ValueError):
        PointwiseKernel(program, num_inputs)


def test_invalid_calls_raise(device):
    kernel = PointwiseKernel(single_op("Add", 2, {}), 2)
    x = torch.ones(3, 4, device=device)
    with pytest.raises(ValueError):
        kernel([x], torch.float32)  # too few inputs
    with pytest.raises(ValueError):
        kernel([x, torch.ones(5, device=device)], torch.float32)  # shapes do not broadcast
    with pytest.raises(ValueError):
        kernel([x, torch.ones(4, dtype=torch.int32, device=device)], torch.float32)
    with pytest.raises(ValueError):
        kernel([x, x], torch.int32)
    with pytest.raises(ValueError):
        PointwiseKernel(single_op("Add", 2, {}), 2, block=1000)
