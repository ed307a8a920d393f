"""What ``kiln bench`` times: a ``Target`` runs one model on fixed inputs, one iteration at a time,
split as trtexec splits it: copy the inputs to the device (``h2d``), compute (``compute``), copy the
outputs back (``d2h``). ``KilnTarget`` runs a kiln engine in an execution context on bound buffers
(so an iteration copies nothing beyond those two copies); the peers (``kiln.bench.peers``) follow
the same contract.

On a GPU target (``gpu_timed``), each call only queues its work on the current CUDA stream, so
``kiln.bench.measure`` can put CUDA events between the three parts; a host-timed target (the CPU,
onnxruntime) does its work before returning and is timed by the host clock.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from kiln.dtypes import tensor_from_numpy, tensor_to_numpy


class Target:
    """One model under test. ``setup(feeds)`` once per input set, then iterations of
    ``h2d(); compute(); d2h()``; ``outputs()`` after the device is synchronized."""

    name: str = ""
    device: torch.device = torch.device("cpu")
    gpu_timed: bool = False  # True: calls queue work on the current CUDA stream (CUDA events time them)

    def setup(self, feeds: Mapping[str, np.ndarray]) -> None:
        raise NotImplementedError

    def h2d(self) -> None:
        """Copy the host inputs into the target's device inputs (nothing to do on the CPU)."""

    def compute(self) -> None:
        raise NotImplementedError

    def d2h(self) -> None:
        """Copy the device outputs to the host (nothing to do on the CPU)."""

    def outputs(self) -> dict[str, np.ndarray]:
        """The last iteration's outputs on the host, by output name."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what ``setup`` made."""


def host_buffers(feeds: Mapping[str, np.ndarray], device: torch.device) -> dict[str, torch.Tensor | np.ndarray]:
    """The inputs as torch tensors on the host, pinned when they are to be copied to a GPU (so the
    copies are asynchronous, as trtexec's are); string inputs stay numpy arrays on the host."""
    result = {}
    for name, array in feeds.items():
        tensor = tensor_from_numpy(np.asarray(array), "cpu")
        result[name] = tensor.pin_memory() if device.type == "cuda" and isinstance(tensor, torch.Tensor) else tensor
    return result


def empty_like_on(tensor: torch.Tensor, device: torch.device, pinned: bool = False) -> torch.Tensor:
    out = torch.empty(tuple(tensor.shape), dtype=tensor.dtype, device=device)
    return out.pin_memory() if pinned else out


class KilnTarget(Target):
    """A kiln engine in one execution context, on bound buffers: the inputs are copied into device
    buffers the context reads, the outputs are written into device buffers and copied back."""

    def __init__(self, engine, *, name: str = "kiln", **context_options) -> None:
        self.engine = engine
        self.name = name
        self.device = engine.device
        self.gpu_timed = self.device.type == "cuda"
        self.context = engine.create_context(**context_options)
        self._host_in: dict[str, torch.Tensor | np.ndarray] = {}
        self._device_in: dict[str, torch.Tensor | np.ndarray] = {}
        self._device_out: dict[str, torch.Tensor] = {}
        self._host_out: dict[str, torch.Tensor] = {}

    def setup(self, feeds: Mapping[str, np.ndarray]) -> None:
        on_gpu = self.device.type == "cuda"
        self._host_in = host_buffers(feeds, self.device)
        self._device_in = {n: t.to(self.device) if on_gpu and isinstance(t, torch.Tensor) else t
                           for n, t in self._host_in.items()}
        first = self.context.run(self._device_in)  # shape arithmetic, and the CUDA graph, for this shape
        self._device_out = {n: torch.empty_like(v) for n, v in first.items() if isinstance(v, torch.Tensor)}
        self._host_out = {n: empty_like_on(v, torch.device("cpu"), pinned=on_gpu) for n, v in self._device_out.items()}
        self.context.bind(self._device_in, self._device_out)

    def h2d(self) -> None:
        if self.device.type == "cuda":
            for name, host in self._host_in.items():
                device = self._device_in[name]
                if isinstance(host, torch.Tensor) and isinstance(device, torch.Tensor):  # strings stay on the host
                    device.copy_(host, non_blocking=True)

    def compute(self) -> None:
        if self.gpu_timed:
            self.context.execute_async(torch.cuda.current_stream(self.device))
        else:
            self.context.execute()

    def d2h(self) -> None:
        if self.device.type == "cuda":
            for name, device in self._device_out.items():
                self._host_out[name].copy_(device, non_blocking=True)

    def outputs(self) -> dict[str, np.ndarray]:
        source = self._host_out if self.device.type == "cuda" else self._device_out
        return {name: tensor_to_numpy(tensor) for name, tensor in source.items()}
