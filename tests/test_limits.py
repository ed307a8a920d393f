"""kiln.limits: the ceiling on one tensor's bytes, where it comes from, and what its refusal says."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
import torch

from kiln import limits
from kiln.errors import KilnError, ResourceLimitError


@pytest.fixture(autouse=True)
def _no_setting(monkeypatch):
    monkeypatch.delenv(limits.ENVIRONMENT, raising=False)
    previous = limits.set_max_tensor_bytes(None)
    yield
    limits.set_max_tensor_bytes(previous)


def test_default_is_half_the_machines_memory():
    import os

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert limits.max_tensor_bytes() == memory // 2


def test_setting_overrides_environment_overrides_default(monkeypatch):
    monkeypatch.setenv(limits.ENVIRONMENT, "5000")
    assert limits.max_tensor_bytes() == 5000
    with limits.max_tensor_bytes_set(100):
        assert limits.max_tensor_bytes() == 100
    assert limits.max_tensor_bytes() == 5000  # restored after the block


@pytest.mark.parametrize("value", ["lots", "-5", "0", "1e9"])
def test_a_bad_environment_value_is_a_kiln_error(monkeypatch, value):
    monkeypatch.setenv(limits.ENVIRONMENT, value)
    with pytest.raises(KilnError, match=limits.ENVIRONMENT):
        limits.max_tensor_bytes()


@pytest.mark.parametrize("value", [0, -1, 1.5, True])
def test_a_bad_setting_is_a_kiln_error(value):
    with pytest.raises(KilnError, match="--max-tensor-bytes"):
        limits.set_max_tensor_bytes(value)


@pytest.mark.parametrize("dtype", [ir.DataType.FLOAT, np.float32, np.dtype("<f4"), torch.float32])
def test_bytes_from_any_kind_of_dtype(dtype):
    assert limits.tensor_bytes((2, 3), dtype) == 24


def test_strings_count_their_objects():
    assert limits.tensor_bytes((2,), ir.DataType.STRING) == 2 * limits.STRING_ELEMENT_BYTES
    assert limits.tensor_bytes((2,), np.dtype("<U3")) == 2 * (12 + limits.STRING_ELEMENT_BYTES)


def test_refusal_names_the_tensor_the_sizes_and_how_to_raise_the_limit():
    with limits.max_tensor_bytes_set(1000):
        limits.check_tensor_bytes((10, 25), np.float32, "m.onnx: input 'x'")  # exactly 1000 bytes: allowed
        with pytest.raises(ResourceLimitError) as info:
            limits.check_tensor_bytes((2**31, 4), ir.DataType.FLOAT, "m.onnx: input 'x'")
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith("m.onnx: input 'x': 2147483648x4 float is 32.0 GiB (34,359,738,368 bytes), "
                              "over the 1,000 bytes")
    assert "--max-tensor-bytes" in message and limits.ENVIRONMENT in message


def test_an_explicit_limit_wins():
    with pytest.raises(ResourceLimitError):
        limits.check_tensor_bytes((100,), np.uint8, "t", limit=99)
    limits.check_tensor_bytes((100,), np.uint8, "t", limit=100)


def test_empty_tensor_whose_other_dims_overflow_an_index_is_refused():
    """numpy and torch refuse [0, 2^62] float32 (its strides overflow); the check says so first."""
    with pytest.raises(ResourceLimitError, match="is empty, but its other dims multiply past"):
        limits.check_tensor_bytes((0, 2**62), np.float32, "t")
    limits.check_tensor_bytes((0, 2**20), np.float32, "t")
    np.empty((0, 2**20), np.float32)


def test_cli_flag_sets_the_limit_for_the_command_only(tmp_path, capsys):
    from kiln.cli import main

    np.savez(tmp_path / "in.npz", x=np.zeros((2, 3), np.float32))
    import onnx
    from model_builders import add_relu_model

    onnx.save(add_relu_model((2, 3)), tmp_path / "m.onnx")
    assert main(["run", str(tmp_path / "m.onnx"), "--inputs", str(tmp_path / "in.npz"),
                 "--max-tensor-bytes", "8"]) == 2
    err = capsys.readouterr().err
    assert "inflate to more than 8 bytes, the limit on one tensor (raise it with --max-tensor-bytes" in err
    assert limits.max_tensor_bytes() > 8  # back to the default after the command
    assert main(["run", str(tmp_path / "m.onnx"), "--inputs", str(tmp_path / "in.npz")]) == 0


@pytest.mark.cuda
def test_cuda_default_is_half_the_smaller_of_host_and_gpu_memory():
    gpu = torch.cuda.get_device_properties(0).total_memory
    assert limits.max_tensor_bytes("cuda") == min(limits.max_tensor_bytes(), gpu // 2)
    assert limits.max_tensor_bytes(torch.device("cuda", 0)) == limits.max_tensor_bytes("cuda:0")
