"""kiln.runtime.Program: the public fields an execution context reads describe a built engine (steps
per profile, static layers, slots, outputs, the stream plan) and check its inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kiln.errors import InputError
from kiln.runtime import ExecutionContext, Program, Step
from tests.runtime.conftest import WIDTH, feeds, reference


def test_program_fields_describe_the_built_engine(engine):
    program = engine.program
    assert isinstance(program, Program) and program.name == engine.name and program.device == engine.device
    layers = [layer["name"] for layer in engine.plan["layers"]]
    assert len(program.profiles) == len(program.steps) == len(program.lean) == 2
    for steps, lean in zip(program.steps, program.lean):
        assert all(isinstance(step, Step) for step in steps)
        assert [step.name for step in steps] == layers
        assert lean == [step for step in steps if not step.static]
    static = {step.name for step in program.steps[0] if step.static}
    assert "shape" in static and "up0" not in static
    assert [spec["name"] for spec in program.outputs] == ["y"] and program.output_dtypes == [torch.float32]
    assert [spec["name"] for spec in program.inputs] == ["x"] and len(program.input_slots) == 1
    assert all(0 <= slot < program.slot_count for slot in (*program.input_slots, *program.output_slots))
    produced = {slot for step in program.steps[0] if step.static for slot in step.out_slots}
    assert program.cached_slots and set(program.cached_slots) <= produced
    assert program.held_slots == set(program.input_slots) and program.constant_slots == {}
    assert program.aux_streams == engine.aux_streams == 2 and program.event_count >= 2
    assert {step.stream for step in program.lean[0]} == {0, 1, 2}
    assert not program.reads_torch_flags  # a CPU program never touches the CUDA switches


def test_program_checks_inputs_and_picks_the_profile(engine):
    program = engine.program
    values, profile = program.check_inputs(feeds(9))
    assert profile == 1 and isinstance(values[0], torch.Tensor) and tuple(values[0].shape) == (9, WIDTH)
    assert program.profile_for({"x": (3, WIDTH)}) == 0
    with pytest.raises(InputError, match="outside optimization profile 0"):
        program.check_inputs(feeds(9), profile=0)


def test_a_context_runs_a_program(engine):
    context = ExecutionContext(engine.program)
    x = feeds(5, seed=11)
    np.testing.assert_allclose(context.run(x)["y"].numpy(), reference(x["x"]), rtol=1e-4, atol=1e-5)
