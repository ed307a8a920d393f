"""Optimization profiles and the inputs at their opt shapes.

Every input gets (min, opt, max) shapes in every profile: the config's where it gives them, the
model's own where its dimensions are fixed; a dynamic dimension without a profile is an error that
says which flags give it. The build runs the model at each profile's opt shapes on the calibration
arrays where given and on seeded random values otherwise (``random_feeds``).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir
import torch

from kiln import dtypes
from kiln.builder.config import BuildConfig, Profile
from kiln.builder.state import BuildState
from kiln.errors import InputError
from kiln.inputs import random_array


def opt_dims(model: ir.Model, config: BuildConfig) -> dict[str, int]:
    """Symbolic input dimension name -> its size in the first profile that gives it (opt shape)."""
    dims: dict[str, int] = {}
    for profile in config.profiles:
        for value in model.graph.inputs:
            if value.name is None or value.name not in profile.shapes or value.shape is None:
                continue
            opt = profile.shapes[value.name][1]
            for axis, dim in enumerate(value.shape):
                name = getattr(dim, "value", None)
                if not isinstance(dim, int) and isinstance(name, str) and axis < len(opt):
                    dims.setdefault(name, int(opt[axis]))
    return dims


def full_profiles(state: BuildState) -> list[Profile]:
    """The config's profiles with every input of the model in each, checked against the model."""
    name = state.name
    inputs = list(state.executor.inputs)
    names = {v.name or "" for v in inputs}
    profiles = list(state.config.profiles) or [Profile({})]
    for index, profile in enumerate(profiles):
        unknown = sorted(set(profile.shapes) - names)
        if unknown:
            raise InputError(f"{name}: profile {index} names unknown input(s) {unknown}; inputs are {sorted(names)}")
        full = dict(profile.shapes)
        for value in inputs:
            declared = value.shape
            if value.name in full:
                lo, opt, hi = full[value.name]
                if declared is not None:
                    if len(declared) != len(opt):
                        raise InputError(f"{name}: profile {index} gives input {value.name!r} rank {len(opt)}, "
                                         f"the model declares rank {len(declared)}")
                    for axis, dim in enumerate(declared):
                        if isinstance(dim, int) and not (lo[axis] == opt[axis] == hi[axis] == dim):
                            raise InputError(f"{name}: profile {index} gives input {value.name!r} axis {axis} "
                                             f"sizes {lo[axis]}/{opt[axis]}/{hi[axis]}, the model fixes it at {dim}")
                continue
            if declared is None or any(not isinstance(d, int) for d in declared):
                shown = "?" if declared is None else "x".join(str(d) if isinstance(d, int) else "N" for d in declared)
                raise InputError(
                    f"{name}: input {value.name!r} has dynamic dimensions ({shown}); give its shapes with "
                    f"--min-shapes/--opt-shapes/--max-shapes {value.name}:{shown.replace('N', '1')}"
                )
            static = declared.numpy()  # every dim an int (checked above)
            full[value.name or ""] = (static, static, static)
        profiles[index] = Profile(full)
    return profiles


def random_feeds(state: BuildState, shapes: Mapping[str, tuple[int, ...]],
                 strict: bool = True) -> dict[str, torch.Tensor | np.ndarray]:
    """Inputs at ``shapes``: the calibration arrays where given, seeded random values for the rest
    (floats standard normal, integers in [0, 2), bools coin flips; see ``record.failed_run``), noted
    in ``state.made_up``. ``strict``: a calibration array must have its shape (the first profile's
    opt shapes); other profiles use the arrays whose shape fits and random values for the others."""
    generator = np.random.default_rng(state.config.seed)
    feeds = {}
    for value in state.executor.inputs:
        name = value.name or ""
        shape = shapes[name]
        dtype = value.dtype
        given = None if state.calibration is None else state.calibration.get(name)
        if given is not None and tuple(np.shape(given)) != tuple(shape):
            if strict:
                raise InputError(f"{state.name}: calibration input {value.name!r} has shape {list(np.shape(given))}, "
                                 f"the profile's opt shape is {list(shape)}")
            given = None
        if given is not None:
            array = np.asarray(given)
        elif dtype is not None and dtype != ir.DataType.STRING:
            array = random_array(generator, shape, dtype, f"{state.name}: random input {value.name!r}")
        else:
            raise InputError(f"{state.name}: cannot make inputs for {value.name!r} of type {value.type}")
        if given is None:
            state.made_up.add(name)
        feeds[name] = dtypes.tensor_from_numpy(array, state.device)
    return feeds
