"""kiln as an ``onnx.backend`` so onnx's own node tests (its conformance suite) can run it.

    rep = kiln.backend.prepare(model_proto, device="CPU")
    outputs = rep.run([x, y])          # numpy arrays, in graph-input order
"""

from __future__ import annotations

from typing import Any

import onnx
from onnx.backend.base import Backend, BackendRep

from kiln import dtypes
from kiln.executor import Executor
from kiln.onnx_io import load_model_proto


def _device(device: str) -> str:
    return "cuda" if device.upper().startswith("CUDA") else "cpu"


def _to_numpy(value: Any) -> Any:
    if isinstance(value, list):
        return [_to_numpy(item) for item in value]
    if value is None:
        return None
    return dtypes.tensor_to_numpy(value)


class KilnRep(BackendRep):
    """A prepared model: runs positional numpy inputs, returns numpy outputs in graph order."""

    def __init__(self, executor: Executor) -> None:
        self.executor = executor

    def run(self, inputs: Any, **kwargs: Any) -> tuple[Any, ...]:
        if isinstance(inputs, dict):
            feeds = dict(inputs)
        else:
            if not isinstance(inputs, (list, tuple)):
                inputs = [inputs]
            feeds = {v.name: x for v, x in zip(self.executor.inputs, inputs)}
        outputs = self.executor.run(feeds)
        # read from a proto, every graph output has a name (str, possibly ""): never None
        return tuple(_to_numpy(outputs[v.name or ""]) for v in self.executor.outputs)


class KilnBackend(Backend):
    @classmethod
    def prepare(cls, model: onnx.ModelProto, device: str = "CPU", **kwargs: Any) -> KilnRep:
        ir_model = load_model_proto(model, name=model.graph.name or "model")
        return KilnRep(Executor(ir_model, device=_device(device)))

    @classmethod
    def run_model(cls, model: onnx.ModelProto, inputs: Any, device: str = "CPU", **kwargs: Any) -> tuple[Any, ...]:
        return cls.prepare(model, device).run(inputs)

    @classmethod
    def supports_device(cls, device: str) -> bool:
        if _device(device) == "cuda":
            import torch

            return torch.cuda.is_available()
        return True


prepare = KilnBackend.prepare
run_model = KilnBackend.run_model
supports_device = KilnBackend.supports_device
