"""kiln.builder.schedule (static layers, auxiliary-stream assignment) and kiln.runtime.program (the waits between
streams), on hand-written plans and on a built engine (whose results must not depend on its streams)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kiln
from kiln.builder.schedule import assign_streams, static_layers
from kiln.engine import Engine
from kiln.errors import EngineLoadError
from kiln.runtime.program import cross_stream_waits
from tests.runtime.conftest import build_branches, feeds, reference


def layer(name, inputs, outputs, op="Relu", kind="Pointwise"):
    return {"name": name, "kind": kind, "op_types": [op], "inputs": inputs, "outputs": outputs, "attrs": {}}


def fork_join(branches: int) -> list[dict]:
    """x -> stem -> branches b0..bk (two layers each) -> one join layer."""
    layers = [layer("stem", ["x"], ["s"])]
    for i in range(branches):
        layers += [layer(f"a{i}", ["s"], [f"a{i}"]), layer(f"b{i}", [f"a{i}"], [f"b{i}"])]
    layers.append(layer("join", [f"b{i}" for i in range(branches)], ["y"], op="Sum"))
    return layers


def test_no_aux_streams_keeps_every_layer_on_the_context_stream():
    assert assign_streams(fork_join(3), 0) == [0] * 8


def test_each_branch_gets_its_own_stream_and_the_chain_stays_on_it():
    streams = assign_streams(fork_join(3), 2)
    assert streams == [0, 0, 0, 1, 1, 2, 2, 0]
    waits = cross_stream_waits(fork_join(3), streams)
    assert waits[3] == [0] and waits[5] == [0]  # the branches wait for the stem
    assert waits[7] == [4, 6]  # the join waits for the last layer of each other branch
    assert waits[1] == [] and waits[2] == [] and waits[4] == []


def test_more_branches_than_streams_share_the_least_recently_used():
    streams = assign_streams(fork_join(4), 1)
    assert streams == [0, 0, 0, 1, 1, 0, 0, 1, 1, 0]
    assert set(streams) == {0, 1}


def test_a_sequential_chain_never_leaves_stream_zero():
    chain = [layer(f"l{i}", [f"v{i}"], [f"v{i + 1}"]) for i in range(6)]
    assert assign_streams(chain, 3) == [0] * 6


def test_a_stream_idle_for_a_layer_is_reused():
    """After the branch on stream 1 joined, a new independent branch may take stream 1 again."""
    layers = fork_join(2) + [
        layer("c0", ["y"], ["c0"]),
        layer("c1", ["y"], ["c1"]),
        layer("end", ["c0", "c1"], ["z"], op="Sum"),
    ]
    streams = assign_streams(layers, 3)
    assert streams[layers.index(layers[-2])] == 1  # c1: stream 1 is idle (its tail b1 is an ancestor)


def test_waits_are_not_repeated():
    layers = fork_join(2) + [layer("after", ["y", "b1"], ["z"], op="Add")]
    streams = assign_streams(layers, 1)
    waits = cross_stream_waits(layers, streams)
    assert waits[-2] == [4] and waits[-1] == []  # the join already waited for b1


def test_static_layers_are_shape_arithmetic_only():
    layers = [
        layer("shape", ["x"], ["xs"], op="Shape", kind="Node"),
        layer("slice", ["xs", "c"], ["n"], op="Slice", kind="Node"),
        layer("relu", ["x"], ["r"]),
        layer("reshape", ["r", "n"], ["y"], op="Reshape", kind="Node"),
        layer("random", [], ["u"], op="RandomUniform", kind="Node"),
    ]
    layers[1]["inputs"] = ["xs"]
    assert static_layers(layers) == [True, True, False, False, False]
    assert assign_streams(layers, 2)[:2] == [0, 0]


def test_negative_aux_streams_is_refused():
    with pytest.raises(ValueError):
        assign_streams(fork_join(2), -1)
    with pytest.raises(kiln.KilnError, match="max_aux_streams"):
        kiln.BuildConfig(max_aux_streams=-1).validate()


def test_built_engine_puts_the_branches_on_aux_streams(engine):
    streams = {layer["name"]: layer["stream"] for layer in engine.plan["layers"]}
    assert engine.aux_streams == 2
    assert {streams["up0"], streams["up1"], streams["up2"]} == {0, 1, 2}
    assert streams["shape"] == 0 and streams["reshape"] == 0
    assert engine.program.event_count >= 2
    assert any("auxiliary streams: 2 of 2 used" in line for line in engine.report.lines)


def test_streams_survive_save_and_load_and_change_no_result(engine, tmp_path):
    engine.save(tmp_path / "b.kiln")
    loaded = kiln.load_engine(tmp_path / "b.kiln")
    assert [layer["stream"] for layer in loaded.plan["layers"]] == [layer["stream"] for layer in engine.plan["layers"]]
    single = build_branches("cpu", aux=0)
    assert single.aux_streams == 0 and all(layer["stream"] == 0 for layer in single.plan["layers"])
    for batch in (1, 3, 9):
        x = feeds(batch, seed=batch)
        got = loaded.run(x)["y"]
        assert torch.equal(got, single.run(x)["y"])
        np.testing.assert_allclose(got.numpy(), reference(x["x"]), rtol=1e-4, atol=1e-5)


def test_a_plan_with_streams_outside_its_range_is_refused(engine):
    plan = dict(engine.plan)
    plan["layers"] = [dict(layer) for layer in plan["layers"]]
    plan["layers"][2]["stream"] = 5
    with pytest.raises(EngineLoadError, match="streams outside"):
        Engine(plan, engine.tensors, engine.graph, device="cpu")
