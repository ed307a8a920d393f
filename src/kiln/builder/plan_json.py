"""The build's decisions written down: each layer's chosen tactics' prepared weights (named
``<layer>.<prep id>.<role>``), the plan as JSON (inputs, outputs, layers with their tactics,
precisions, shapes, notes and streams, profiles, config), and the model's graph without its
weights. ``kiln.builder.plan.BuiltPlan`` carries the three on.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import onnx
import onnx_ir as ir
import torch

from kiln import dtypes
from kiln.builder.schedule import assign_streams
from kiln.builder.state import BuildState, PlannedLayer
from kiln.builder.tactics import registry as tactic_registry
from kiln.errors import UnsupportedModelError


def prepare_weights(state: BuildState, planned: list[PlannedLayer]):
    """Every layer's weights as its chosen tactics (one per profile) prepare them, each preparation
    once; returns the tensors by name and, per layer, (prep name, roles) per choice."""
    tensors: dict[str, torch.Tensor] = {}
    records = []
    for index, item in enumerate(planned):
        state.progress("weights", index, len(planned))
        state.check_time(f"preparing the weights of layer {item.layer.name!r}")
        record = []
        roles: dict[str, list[str]] = {}
        for choice in item.choices:
            t = tactic_registry.get(choice.tactic)
            assert t is not None, f"{choice.tactic} was chosen from the registered tactics"
            prep = f"{index}.{t.prep_id(choice.config)}"
            if prep not in roles:
                prepared = t.prepare(item.layer, state.weights(index, item.layer), item.precision, choice.config)
                for role, tensor in prepared.items():
                    tensors[f"{prep}.{role}"] = tensor.detach()
                roles[prep] = sorted(prepared)
            record.append((prep, roles[prep]))
        records.append(record)
        state.canonical.pop(index, None)
    state.progress("weights", len(planned), len(planned))
    return tensors, records


def plan_json(state: BuildState, planned: list[PlannedLayer], records, tensors: dict[str, torch.Tensor]) -> dict:
    """The plan (see the module docstring); outputs that are constants join ``tensors``."""
    declared = []
    for value in state.executor.inputs:
        assert value.dtype is not None, "the loader's checker requires a type on every graph input"
        declared.append({"name": value.name, "dtype": dtypes.onnx_name(value.dtype),
                         "shape": [d if isinstance(d, int) else None for d in value.shape]
                         if value.shape is not None else None})
    layers: list[dict[str, Any]] = []
    for item, prep in zip(planned, records):
        layer = item.layer
        layers.append({
            "name": layer.name, "kind": layer.kind, "nodes": layer.nodes, "op_types": layer.op_types,
            "origins": layer.origins,
            "inputs": layer.inputs, "outputs": layer.outputs, "attrs": layer.attrs, "weights": layer.weights,
            "precision": item.precision, "cast_inputs": item.cast_inputs, "shapes": item.shapes,
            "choices": [{"tactic": c.tactic, "config": c.config, "time_ms": c.time_ms, "weights": p, "roles": r}
                        for c, (p, r) in zip(item.choices, prep)],
            "notes": item.notes,
        })
    config = state.config
    streams = assign_streams(layers, config.max_aux_streams)
    for entry, stream in zip(layers, streams):
        entry["stream"] = stream
    used = max(streams, default=0)
    if config.max_aux_streams:
        busy = sum(1 for s in streams if s)
        state.report.log(f"auxiliary streams: {used} of {config.max_aux_streams} used, {busy} of {len(layers)} "
                         f"layers on them")
    return {
        "name": os.path.basename(state.name),
        "aux_streams": used,
        "inputs": declared,
        "outputs": _outputs_json(state, planned, tensors),
        "opsets": {d or "": v for d, v in sorted(state.model.opset_imports.items())},
        "profiles": [p.to_json() for p in state.profiles],
        "config": config.to_json(),
        "passes": {name: n for name, n in state.pass_report.rewrites.items()},
        "layers": layers,
    }


def _outputs_json(state: BuildState, planned: list[PlannedLayer], tensors: dict[str, torch.Tensor]) -> list[dict]:
    """The engine's outputs: each graph output once (a value listed twice is one output). One
    that no layer computes and that is no input, an initializer or a value folded from
    constants alone, is stored as a tensor of the engine (``constant``: its name)."""
    facts = state.facts[0]
    produced = {name for item in planned for name in item.layer.outputs if name}
    produced |= {v.name or "" for v in state.executor.inputs}
    outputs: list[dict[str, Any]] = []
    for value in state.model.graph.outputs:
        if any(spec["name"] == value.name for spec in outputs):
            continue
        name = value.name or ""
        dtype = facts.dtypes[name] if name in facts.dtypes else value.dtype
        assert dtype is not None, "the loader's checker requires a type on every graph output"
        spec = {"name": value.name, "dtype": dtypes.onnx_name(dtype)}
        if name not in produced:
            constant = state.constants.get(name)
            if not isinstance(constant, torch.Tensor):
                raise UnsupportedModelError(f"{state.name}: output {value.name!r} is a constant kiln cannot store in "
                                            f"an engine ({type(constant).__name__}); run the model with kiln run "
                                            f"instead")
            spec["constant"] = key = f"output.{len(outputs)}"
            tensors[key] = constant.detach()
        outputs.append(spec)
    return outputs


def stripped_graph(model: ir.Model) -> bytes:
    """The model without its weights (they live in the engine's tensors), as ONNX bytes: the engine
    rebuilds its Node layers' ops (attributes, subgraphs) from it. Initializers become typed graph
    inputs so every name still resolves. The weights are lifted off while the graph is serialized,
    so their bytes are never copied (onnx-ir would copy every one into the proto)."""
    graph = model.graph
    weights = {name: value.const_value for name, value in graph.initializers.items()}
    serde_log = logging.getLogger("onnx_ir.serde")  # it warns once per initializer without a value
    level = serde_log.level
    try:
        serde_log.setLevel(logging.ERROR)
        for value in graph.initializers.values():
            value.const_value = None
        proto = ir.serde.serialize_model(model)
    finally:
        serde_log.setLevel(level)
        for name, tensor in weights.items():
            graph.initializers[name].const_value = tensor
    kept_inputs = {i.name for i in proto.graph.input}
    for name, tensor in weights.items():
        if name not in kept_inputs and tensor is not None:
            shape = list(tensor.shape.numpy())
            proto.graph.input.append(onnx.helper.make_tensor_value_info(name, tensor.dtype.value, shape))
    return proto.SerializeToString(deterministic=True)
