"""Which layers of a plan run once per input shape, and which stream each of the others runs on.

Two playbook rules live here:

- *Shape arithmetic once per shape* (TensorRT's shape tensors): a layer that computes from input
  shapes alone (``Shape -> Gather -> Concat -> Reshape``'s shape) is *static*; an execution context
  runs it on the first run at a shape and reuses its values afterwards.
- *Auxiliary streams inside one context* (TensorRT's ``IBuilderConfig::setMaxAuxStreams``):
  independent branches (the Q/K/V projections of attention, the branches of an Inception or
  multi-branch convolution block) may run at the same time on up to ``max_aux_streams`` extra
  streams. ``assign_streams`` walks the layers in plan order (a topological order) and puts each
  one on

  1. a stream whose last layer is one of its producers (continuing that chain needs no wait; the
     producer read first wins);
  2. else a stream whose last layer is an ancestor of it (the stream is idle as far as this layer
     is concerned, so nothing concurrent is lost), the lowest-numbered first; an unused stream
     counts as idle;
  3. else the stream whose last layer came earliest (the least recently used).

  Static layers stay on stream 0 and are not counted: on the runs that use several streams their
  values are already cached. With ``max_aux_streams=0`` every layer is on stream 0. The runtime
  records an event after a layer whose output another stream reads and makes that stream wait for
  it (``kiln.runtime.program.cross_stream_waits``), so results equal the single-stream ones.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, cast

from kiln.ops.registry import op_facts


def static_layers(layers: Sequence[Mapping[str, Any]]) -> list[bool]:
    """Per layer: does it compute from input shapes alone (a Node layer fed only by Shape/Size and
    other such layers)?"""
    derived: set[str] = set()
    static = []
    for layer in layers:
        op = layer["op_types"][0]
        facts = op_facts(op, None)
        # random and control-flow ops run every time; metadata ops (Shape, Size) read shapes alone
        is_static = (layer["kind"] == "Node" and not (facts.random or facts.control_flow)
                     and not layer["attrs"].get("captured")
                     and (facts.metadata or all(name in derived for name in layer["inputs"])))
        static.append(is_static)
        if is_static:
            derived.update(n for n in layer["outputs"] if n)
    return static


def producers(layers: Sequence[Mapping[str, Any]], static: Sequence[bool]) -> list[list[int]]:
    """Per layer, the non-static layers that produce its inputs, in input order, without repeats."""
    made_by: dict[str, int] = {}
    result = []
    for index, layer in enumerate(layers):
        deps: list[int] = []
        if not static[index]:
            for name in layer["inputs"]:
                producer = made_by.get(name)
                if producer is not None and producer not in deps:
                    deps.append(producer)
        result.append(deps)
        for name in layer["outputs"]:
            if name and not static[index]:
                made_by[name] = index
    return result


def assign_streams(layers: Sequence[Mapping[str, Any]], max_aux_streams: int) -> list[int]:
    """The stream (0 = the context's own, 1..N = auxiliary) of every layer; see the module docstring."""
    if max_aux_streams < 0:
        raise ValueError(f"max_aux_streams must be >= 0, got {max_aux_streams}")
    static = static_layers(layers)
    streams = [0] * len(layers)
    if max_aux_streams == 0:
        return streams
    deps = producers(layers, static)
    ancestors: list[int] = [0] * len(layers)  # bit i set: layer i is an ancestor
    tails: list[int | None] = [None] * (max_aux_streams + 1)
    for index in range(len(layers)):
        if static[index]:
            continue
        mask = 0
        for d in deps[index]:
            mask |= ancestors[d] | (1 << d)
        ancestors[index] = mask
        chosen = next((s for d in deps[index] for s, tail in enumerate(tails) if tail == d), None)
        if chosen is None:
            chosen = next((s for s, tail in enumerate(tails) if tail is None or mask >> tail & 1), None)
        if chosen is None:
            # every stream has a tail here (a free one was taken above): the one that ends earliest
            chosen = min(range(len(tails)), key=lambda s: cast(int, tails[s]))
        streams[index] = chosen
        tails[chosen] = index
    return streams
