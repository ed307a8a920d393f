"""Time limits and cancellation (kiln.deadline): the issue's three unbounded Loops stop at
--timeout-s in kiln run, kiln build and kiln bench (exit 2, one line saying where), cancel() from
another thread stops a run, and engines built from a Loop model honour timeout_s. No test asserts
a time: only that the work stops, and where."""

from __future__ import annotations

import re
import threading

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import kiln
from kiln.cli import main
from kiln.deadline import Deadline, RunStopped, time_limit
from kiln.errors import KilnError

F, I64, BOOL = TensorProto.FLOAT, TensorProto.INT64, TensorProto.BOOL
STOPPED = r"stopped after [0-9.]+ s at node 'loop' \(op Loop, iteration \d+\): over the 0\.5 s time limit"
# a build or benchmark may reach its limit before the model's run does (in the passes, say): where it stops varies
STOPPED_ANYWHERE = r"stopped after [0-9.]+ s at .+: over the 0\.5 s time limit \(timeout_s, --timeout-s\)"


def _loop_model(trips: int | None, scan: bool = False, trips_input: bool = False) -> onnx.ModelProto:
    """x + 1 per iteration while a condition that stays true holds: a trip count of ``trips``
    (None: no trip count at all), with a scan output that grows by a row per iteration (``scan``),
    the trip count a graph input (``trips_input``)."""
    nodes = [helper.make_node("Identity", ["cond"], ["cond_out"]), helper.make_node("Add", ["x_in", "one"], ["x_out"])]
    outputs = [helper.make_tensor_value_info("cond_out", BOOL, []), helper.make_tensor_value_info("x_out", F, [1])]
    if scan:
        nodes.append(helper.make_node("Identity", ["x_in"], ["row"]))
        outputs.append(helper.make_tensor_value_info("row", F, [1]))
    body = helper.make_graph(nodes, "body", [helper.make_tensor_value_info("i", I64, []),
                                             helper.make_tensor_value_info("cond", BOOL, []),
                                             helper.make_tensor_value_info("x_in", F, [1])], outputs,
                             [numpy_helper.from_array(np.ones(1, np.float32), "one")])
    inputs = [helper.make_tensor_value_info("x", F, [1])]
    initializers = [numpy_helper.from_array(np.array(True), "keep")]
    if trips_input:
        inputs.append(helper.make_tensor_value_info("trips", I64, []))
    elif trips is not None:
        initializers.append(numpy_helper.from_array(np.array(trips, np.int64), "trips"))
    trip_name = "trips" if trips is not None or trips_input else ""
    graph_outputs = [helper.make_tensor_value_info("y", F, [1])] + ([helper.make_tensor_value_info("rows", F, ["n", 1])]
                                                                     if scan else [])
    loop = helper.make_node("Loop", [trip_name, "keep", "x"], ["y"] + (["rows"] if scan else []), name="loop",
                            body=body)
    graph = helper.make_graph([loop], "loops", inputs, graph_outputs, initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


CASES = {"trip count 2^62": dict(trips=1 << 62), "scan output growing": dict(trips=1 << 62, scan=True),
         "no trip count": dict(trips=None)}


@pytest.fixture(params=sorted(CASES))
def loop_path(request, tmp_path):
    path = tmp_path / "loop.onnx"
    onnx.save(_loop_model(**CASES[request.param]), path)
    return path


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_kiln_run_stops_each_unbounded_loop_at_the_timeout(loop_path, capsys):
    assert main(["run", str(loop_path), "--device", "cpu", "--timeout-s", "0.5"]) == 2
    assert re.fullmatch(rf"kiln: error: {re.escape(str(loop_path))}: {STOPPED} \(timeout_s, --timeout-s\)",
                        _one_error_line(capsys))


def test_kiln_build_stops_each_unbounded_loop_at_the_timeout(loop_path, tmp_path, capsys):
    out = tmp_path / "loop.kiln"
    assert main(["build", str(loop_path), "-o", str(out), "--device", "cpu", "--quiet", "--timeout-s", "0.5"]) == 2
    assert re.fullmatch(rf"kiln: error: {re.escape(str(loop_path))}: {STOPPED_ANYWHERE}", _one_error_line(capsys))
    assert not out.exists()


def test_kiln_bench_stops_at_the_timeout(tmp_path, capsys):
    path = tmp_path / "loop.onnx"
    onnx.save(_loop_model(None), path)
    assert main(["bench", str(path), "--device", "cpu", "--timeout-s", "0.5", "--iterations", "1"]) == 2
    assert re.fullmatch(rf"kiln: error: {re.escape(str(path))}: {STOPPED_ANYWHERE}", _one_error_line(capsys))


def test_a_bad_timeout_is_refused(tmp_path, capsys):
    path = tmp_path / "loop.onnx"
    onnx.save(_loop_model(3), path)
    assert main(["run", str(path), "--device", "cpu", "--timeout-s", "0"]) == 2
    assert "a time limit (timeout_s, --timeout-s) is a positive number of seconds, got 0.0" in _one_error_line(capsys)
    with pytest.raises(KilnError, match="positive number of seconds"):
        kiln.BuildConfig(device="cpu", timeout_s=float("nan")).validate()


def _executor(proto: onnx.ModelProto) -> kiln.Executor:
    return kiln.Executor(kiln.load_model_proto(proto, name="loop.onnx"), name="loop.onnx")


def test_a_finished_run_is_unaffected_by_its_timeout():
    outputs = _executor(_loop_model(5)).run({"x": np.zeros(1, np.float32)}, timeout_s=60)
    assert outputs["y"].tolist() == [5.0]


def _cancel_from_another_thread(run, cancel) -> BaseException:
    """Start ``run()`` in a thread, call ``cancel()`` until it says it stopped a run, and return
    what the run raised."""
    raised: list[BaseException] = []

    def work() -> None:
        try:
            run()
        except BaseException as error:  # noqa: BLE001 - checked by the caller
            raised.append(error)

    thread = threading.Thread(target=work, daemon=True)  # a run that never stops must not keep pytest alive
    thread.start()
    while not cancel() and thread.is_alive():
        thread.join(0.01)
    thread.join(60)
    assert not thread.is_alive(), "the run did not stop"
    assert raised, "the run ended without an error"
    return raised[0]


def test_executor_cancel_from_another_thread_stops_a_long_run():
    executor = _executor(_loop_model(None))
    error = _cancel_from_another_thread(lambda: executor.run({"x": np.zeros(1, np.float32)}), executor.cancel)
    assert isinstance(error, RunStopped)
    # where it stopped depends on when the cancel came: before the Loop node, or at one of its iterations
    assert re.fullmatch(r"loop\.onnx: cancelled after [0-9.]+ s at node 'loop' \(op Loop(, iteration \d+)?\)",
                        str(error))
    assert not executor.cancel()  # no run in progress now


def test_a_time_limit_in_effect_bounds_every_run_inside_it():
    executor = _executor(_loop_model(1 << 62))
    with time_limit(0.5), pytest.raises(RunStopped, match=STOPPED):
        executor.run({"x": np.zeros(1, np.float32)}, timeout_s=3600)  # the enclosing limit is the earlier
    limits: list[Deadline] = []

    def run() -> None:
        with time_limit() as limit:  # no limit of its own, but cancellable; in effect in this thread
            limits.append(limit)
            executor.run({"x": np.zeros(1, np.float32)})

    error = _cancel_from_another_thread(run, lambda: bool(limits) and (limits[0].cancel() or True))
    assert isinstance(error, RunStopped) and "cancelled after" in str(error)


def test_deadline_nesting():
    outer = Deadline(3600)
    inner = Deadline(None, outer)
    assert not inner.expired()
    outer.cancel()
    assert inner.expired() and inner.cancelled
    assert str(inner.stopped("here")).startswith("cancelled after")


@pytest.fixture(scope="module")
def loop_engine(tmp_path_factory):
    """An engine of a Loop whose trip count is an input: built on 3 trips, saved and loaded."""
    folder = tmp_path_factory.mktemp("loop_engine")
    onnx.save(_loop_model(None, scan=True, trips_input=True), folder / "loop.onnx")
    engine = kiln.build(folder / "loop.onnx", kiln.BuildConfig(device="cpu", opt_level=0),
                        calibration={"x": np.zeros(1, np.float32), "trips": np.array(3, np.int64)})
    engine.save(folder / "loop.kiln")
    return folder / "loop.kiln"


def test_an_engine_built_from_a_loop_honours_timeout_s(loop_engine):
    engine = kiln.load_engine(loop_engine)
    outputs = engine.run({"x": np.zeros(1, np.float32), "trips": np.array(3, np.int64)}, timeout_s=60)
    assert outputs["y"].tolist() == [3.0] and outputs["rows"].reshape(-1).tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(RunStopped) as caught:
        engine.run({"x": np.zeros(1, np.float32), "trips": np.array(1 << 62, np.int64)}, timeout_s=0.5)
    assert re.fullmatch(rf"{re.escape(str(loop_engine))}: {STOPPED} \(timeout_s, --timeout-s\)", str(caught.value))


def test_execution_context_cancel_from_another_thread(loop_engine):
    context = kiln.load_engine(loop_engine).create_context()
    feeds = {"x": np.zeros(1, np.float32), "trips": np.array(1 << 62, np.int64)}
    error = _cancel_from_another_thread(lambda: context.run(feeds), context.cancel)
    assert isinstance(error, RunStopped)
    assert re.fullmatch(rf"{re.escape(str(loop_engine))}: cancelled after [0-9.]+ s at "
                        r"(layer 'loop' \(op Loop\)|node 'loop' \(op Loop, iteration \d+\))", str(error))
    assert context.run({"x": np.zeros(1, np.float32), "trips": np.array(2, np.int64)})["y"].tolist() == [2.0]


def test_kiln_run_of_an_engine_stops_at_the_timeout(loop_engine, tmp_path, capsys):
    np.savez(tmp_path / "in.npz", x=np.zeros(1, np.float32), trips=np.array(1 << 62, np.int64))
    assert main(["run", str(loop_engine), "--inputs", str(tmp_path / "in.npz"), "--timeout-s", "0.5"]) == 2
    assert re.fullmatch(rf"kiln: error: {re.escape(str(loop_engine))}: {STOPPED} \(timeout_s, --timeout-s\)",
                        _one_error_line(capsys))
