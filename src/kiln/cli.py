"""The ``kiln`` command line: thin wrappers over the Python API, one subcommand each.

Exit codes: 0 success; 1 outputs differ from the reference beyond tolerance; 2 bad input (a
``KilnError``: one line on stderr, no traceback, nothing written); 3 an internal error, a bug in
kiln (one line on stderr naming the file the traceback was written to); 130 interrupted (Ctrl-C);
141 stdout closed by its reader (``kiln inspect X --json | head``), quietly.

kiln's notes (logger ``kiln``: the CPU fallback, onnx's warnings about a model) and any Python
warning print as one line each on stderr. ``--timeout-s`` (run, build, bench) bounds the work
after the model is loaded (the runs, the build, the benchmark) with one ``kiln.deadline`` time
limit; past it the command stops with exit code 2, saying where.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import shlex
import sys
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from kiln import limits
from kiln.errors import KilnError, PrecisionError, first_line
from kiln.precision import ALL_PRECISIONS, TOLERANCES

EXIT_MISMATCH = 1
EXIT_BAD_INPUT = 2
EXIT_INTERNAL = 3
EXIT_INTERRUPTED = 130
EXIT_PIPE_CLOSED = 141  # 128 + SIGPIPE, what a shell reports for a command killed by a closed pipe


def _is_engine(path: Path) -> bool:
    return path.suffix == ".kiln"


def _cmd_run(args: argparse.Namespace) -> int:
    from rich.markup import escape

    from kiln import compare, inputs
    from kiln.device import resolve_device
    from kiln.dtypes import tensor_to_numpy
    from kiln.precision import engine_precision
    from kiln.tables import Column, make_console, print_table

    console = make_console()
    shapes = inputs.parse_shapes(args.shapes)
    atol, rtol = _tolerance_flags(args)
    onnx_path = args.model
    runtime = {"--cuda-graph": args.cuda_graph, "--contexts": args.contexts is not None,
               "--aux-streams": args.aux_streams is not None, "--profile": args.profile is not None}
    contexts, engine = [], None
    if _is_engine(args.model):
        from kiln.engine import load_engine

        if args.device is not None:
            resolve_device(args.device)
        engine = load_engine(args.model, device=args.device)  # refuses a device it was not built for
        device = engine.device.type
        specs = inputs.engine_input_values(engine)
        count = 1 if args.contexts is None else args.contexts
        if count < 1:
            raise KilnError(f"--contexts must be 1 or more, got {count}")
        contexts = [engine.create_context(profile=args.profile, cuda_graph=args.cuda_graph,
                                          aux_streams=args.aux_streams)
                    for _ in range(count)]
        run: Callable[[Mapping[str, Any]], dict[str, Any]] = contexts[0].run
        onnx_path = args.onnx
        computed_in = engine_precision(engine)
        if args.compare and onnx_path is None:
            raise KilnError(f"{args.model}: an engine does not carry its ONNX weights; "
                            "give --onnx MODEL.onnx to compare it")
    else:
        given = [flag for flag, on in runtime.items() if on]
        if given:
            raise KilnError(f"{args.model}: {', '.join(given)} run a built engine; "
                            "build one with kiln build and run the .kiln file")
        from kiln.executor import Executor
        from kiln.onnx_io import load_model

        model = (load_model(args.model, max_bytes=args.max_model_bytes) if args.max_model_bytes
                 else load_model(args.model))
        device = resolve_device(args.device)  # after loading: a bad model is one line, without the CPU note
        executor = Executor(model, device=device, name=str(args.model))
        specs, run, computed_in = executor.inputs, executor.run, None
    feeds = inputs.read_npz(args.inputs) if args.inputs else {}
    missing = [v for v in specs if v.name not in feeds]
    if engine is not None:
        shapes.update(_profile_shapes(engine, args.profile or 0, missing, shapes, console))
    feeds.update(inputs.random_inputs(missing, shapes, model=str(args.model)))
    with _time_limit(args.timeout_s):
        start = time.perf_counter()
        outputs = run(feeds)
        elapsed = time.perf_counter() - start
        arrays = {name: tensor_to_numpy(value) for name, value in outputs.items()}
        disagree = _run_other_contexts(contexts[1:], feeds, outputs, console) if len(contexts) > 1 else []
        diffs = {}
        if args.compare:
            reference = compare.run_onnxruntime(onnx_path, feeds)
            diffs = {d.name: d for d in compare.compare_outputs(arrays, reference, computed_in=computed_in,
                                                                 atol=atol, rtol=rtol)}

    columns = [Column("output"), Column("shape"), Column("dtype")]
    if diffs:
        columns += [Column("max abs diff", numeric=True), Column("max rel diff", numeric=True),
                    Column("atol", numeric=True, optional=True), Column("rtol", numeric=True, optional=True),
                    Column("over", numeric=True), Column("verdict")]
    rows = []
    for name, array in arrays.items():
        row = [name, "x".join(map(str, array.shape)) or "scalar", str(array.dtype)]
        if diffs:
            d = diffs[name]
            row += [f"{d.max_abs:.3g}", f"{d.max_rel:.3g}", f"{d.tolerance.atol:g}", f"{d.tolerance.rtol:g}",
                    str(d.bad), d.verdict]
        rows.append(row)
    against = " against onnxruntime (CPU)" if diffs else ""
    print_table(console, columns, rows, title=f"{args.model} on {device} ({elapsed * 1e3:.1f} ms){against}")
    if diffs:
        _say(console, "over: elements beyond atol + rtol * |onnxruntime| (per element, as numpy's allclose); "
                      "max rel diff: max |kiln - onnxruntime| / max |onnxruntime|")
    if args.save_outputs:
        inputs.write_npz(args.save_outputs, arrays)
        _say(console, f"outputs written to {args.save_outputs}")
    if contexts and (args.cuda_graph or args.contexts):
        first = contexts[0]
        graph = "captured" if first.stats.captures else "off" if not args.cuda_graph else "not captured"
        _say(console, f"{len(contexts)} context(s) on their own streams; aux streams {first.aux_streams}; "
                      f"CUDA graph: {graph}"
                      + (f" ({'; '.join(first.graph_errors)})" if first.graph_errors else ""))
    if diffs and not all(d.ok for d in diffs.values()):
        over = ", ".join(f"{d.name} ({d.bad} of {d.size} elements)" for d in diffs.values() if not d.ok)
        console.print(f"[bold red]kiln differs from onnxruntime beyond tolerance:[/] {escape(over)}", highlight=False)
        return EXIT_MISMATCH
    if disagree:
        console.print(f"[bold red]contexts {', '.join(map(str, disagree))} gave other outputs than context 0[/]")
        return EXIT_MISMATCH
    return 0


def _say(console, text: str) -> None:
    """One plain line: no markup, no highlighting, never wrapped by rich."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _tolerance_flags(args: argparse.Namespace) -> tuple[float | None, float | None]:
    """--atol/--rtol, checked before anything runs (None: the table's value for each output)."""
    from kiln.precision import tolerance

    tolerance("fp32", args.atol, args.rtol)
    return args.atol, args.rtol


def _profile_shapes(engine, index: int, specs, shapes, console) -> dict[str, tuple[int, ...]]:
    """The opt shapes of profile ``index`` for the inputs with dynamic dims that --shapes leaves out,
    said in one line (a profile that does not exist is refused by the context, not here)."""
    if not 0 <= index < len(engine.profiles):
        return {}
    opt = {name: tuple(s[1]) for name, s in engine.profiles[index].shapes.items()}
    chosen = {v.name: opt[v.name] for v in specs if v.name not in shapes and v.name in opt
              and (v.shape is None or any(not isinstance(d, int) for d in v.shape))}
    if chosen:
        _say(console, f"inputs at profile {index}'s opt shapes: "
                      + ", ".join(f"{name}:{'x'.join(map(str, shape))}" for name, shape in chosen.items())
                      + " (--shapes to run others)")
    return chosen


def _run_other_contexts(contexts, feeds, expected, console) -> list[int]:
    """Run ``feeds`` in every context at once (a thread each, so each on its own stream), twice (the
    second run replays a captured graph), and return the numbers of those whose outputs differ from
    ``expected`` (context 0's)."""
    import contextvars
    import threading

    import numpy as np
    import torch

    results: dict[int, list[dict]] = {}
    errors: list[BaseException] = []

    def work(index: int, context) -> None:
        try:
            results[index] = [context.run(feeds) for _ in range(2)]
        except BaseException as error:  # noqa: BLE001 - re-raised on the main thread
            errors.append(error)

    # each thread runs under the command's time limit (a thread starts without the caller's context)
    threads = [threading.Thread(target=contextvars.copy_context().run, args=(work, i, c))
               for i, c in enumerate(contexts, start=1)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    elapsed_ms = (time.perf_counter() - start) * 1e3
    console.print(f"contexts 1-{len(contexts)}: two runs each, concurrently, in {elapsed_ms:.1f} ms",
                  markup=False, highlight=False)

    def same(a, b) -> bool:
        return torch.equal(a, b) if isinstance(a, torch.Tensor) else bool(np.array_equal(a, b))

    return [i for i, runs in sorted(results.items())
            if not all(same(run[name], value) for run in runs for name, value in expected.items())]


def _parse_profiles(args: argparse.Namespace):
    """Profiles from repeated --min-shapes/--opt-shapes/--max-shapes: the i-th of each forms profile i."""
    from kiln.builder import Profile
    from kiln.inputs import parse_shapes

    mins, opts, maxs = args.min_shapes or [], args.opt_shapes or [], args.max_shapes or []
    count = max(len(mins), len(opts), len(maxs))
    profiles = []
    for i in range(count):
        profiles.append(Profile.from_lists(
            parse_shapes(mins[i]) if i < len(mins) else None,
            parse_shapes(opts[i]) if i < len(opts) else None,
            parse_shapes(maxs[i]) if i < len(maxs) else None,
        ))
    return profiles


def _parse_layer_precisions(text: str | None) -> dict[str, str]:
    """``NAME:fp32,Softmax:fp32`` (trtexec's --layerPrecisions syntax)."""
    result: dict[str, str] = {}
    for item in (text or "").split(","):
        if not item.strip():
            continue
        name, sep, precision = item.strip().rpartition(":")
        if not sep or not name:
            raise KilnError(f"--layer-precision: {item!r} is not NAME:PRECISION (for example /encoder/Softmax:fp32)")
        result[name] = precision.strip()
    return result


def _parse_tactics(text: str | None) -> tuple[list[str], list[str]]:
    """``-triton,+gemm.cublaslt`` (trtexec's --tacticSources syntax): + allows, - denies."""
    allow: list[str] = []
    deny: list[str] = []
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        if item[0] not in "+-":
            raise KilnError(f"--tactics: {item!r} must start with + (allow) or - (deny), for example -triton")
        (allow if item[0] == "+" else deny).append(item[1:])
    return allow, deny


def _cmd_build(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

    from kiln import BuildConfig, build
    from kiln.device import resolve_device
    from kiln.engine import configured_key, read_key
    from kiln.inputs import read_npz
    from kiln.tables import Column, build_summary, make_console, print_table

    key = read_key(args.sign_key) if args.sign_key else configured_key()  # a bad key fails before the build
    console = make_console(stderr=True)
    atol, rtol = _tolerance_flags(args)
    allow, deny = _parse_tactics(args.tactics)
    config = BuildConfig(
        fp16=args.fp16, bf16=args.bf16, tf32=args.tf32, strongly_typed=args.strongly_typed, opt_level=args.opt_level,
        timing_cache=args.timing_cache, profiles=_parse_profiles(args),
        layer_precisions=_parse_layer_precisions(args.layer_precision),
        allow_tactics=allow, deny_tactics=deny, memory_limit=args.memory_limit, device=resolve_device(args.device),
        precision_check=not args.no_precision_check, passes=_names(args.passes),
        skip_passes=_names(args.skip_passes) or [],
        max_aux_streams=args.aux_streams, atol=atol, rtol=rtol, timeout_s=args.timeout_s,
    )
    calibration = read_npz(args.inputs) if args.inputs else None
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} layers"),
                  TimeElapsedColumn(), console=console, transient=True, disable=args.quiet) as progress:
        tasks: dict[str, TaskID] = {}

        def report(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = progress.add_task(phase, total=total)
            progress.update(tasks[phase], completed=done, total=total)

        engine = build(args.model, config, calibration=calibration, progress=report)
    engine.save(args.output, key=key)
    out = make_console()
    assert engine.report is not None  # a built engine carries its build's report
    for line in engine.report.lines:
        out.print(line, markup=False, highlight=False, soft_wrap=True)
    print_table(out, [Column(""), Column("")], build_summary(engine), title=f"{args.model} -> {args.output}",
                header=False)
    return 0


def _names(text: str | None) -> list[str] | None:
    """``a,b`` -> ["a", "b"]; None stays None."""
    return None if text is None else [n.strip() for n in text.split(",") if n.strip()]


def _cmd_optimize(args: argparse.Namespace) -> int:
    from kiln.inputs import parse_shapes
    from kiln.onnx_io import load_model
    from kiln.optimize import optimize_model, save_onnx
    from kiln.tables import Column, make_console, print_table

    model = load_model(args.model)
    dims = {}
    for name, sizes in parse_shapes(args.dims).items():
        if len(sizes) != 1:
            raise KilnError(f"--dims: {name}:{'x'.join(map(str, sizes))} is not NAME:SIZE (one size per name)")
        dims[name] = sizes[0]
    report = optimize_model(model, passes=_names(args.passes), skip=_names(args.skip) or [], precision=args.precision,
                            kiln_ops=args.kiln_ops, dims=dims,
                            target_opset=args.target_opset, name=str(args.model))
    save_onnx(model, args.output, name=str(args.model))
    console = make_console()
    _say(console, f"{args.model} -> {args.output}")
    ops = sorted(set(report.ops_before) | set(report.ops_after))
    rows = [[op, str(report.ops_before.get(op, 0)), str(report.ops_after.get(op, 0))] for op in ops]
    rows.append(["total", str(sum(report.ops_before.values())), str(sum(report.ops_after.values()))])
    styles = [None if before == after else "bold" for _, before, after in rows[:-1]] + ["bold"]
    print_table(console, [Column("op"), Column("before", numeric=True), Column("after", numeric=True)], rows,
                title="nodes per op", styles=styles)
    for name, count in report.rewrites.items():
        _say(console, f"{name}: {count} rewrite(s)")
    for name, why in report.skipped.items():
        _say(console, f"{name}: not run: {why}")
    for line in report.log:
        _say(console, f"  {line}")
    return 0


def _cmd_doctor(args: argparse.Namespace) -> int:
    import json

    from kiln.doctor import diagnose, render_text
    from kiln.inputs import parse_shapes
    from kiln.onnx_io import load_model

    model = load_model(args.model)
    report = diagnose(model, precision=args.precision, profiles=_parse_profiles(args), shapes=parse_shapes(args.shapes),
                      name=str(args.model), run_reference=not args.no_run)
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
    else:
        sys.stdout.write(render_text(report))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    import json

    from kiln.engine import load_engine
    from kiln.tables import Column, make_console, print_table

    engine = load_engine(args.engine)
    rows = engine.describe()
    if args.json:
        print(json.dumps({"summary": engine.summary(), "profiles": engine.plan["profiles"], "layers": rows}, indent=1))
        return 0
    streams = engine.aux_streams > 0
    summary = engine.summary()
    columns = [Column("#", numeric=True), Column("layer"), Column("nodes", optional=True), Column("tactic"),
               Column("precision"), Column("layout", optional=True), Column("shapes", optional=True),
               Column("ms", numeric=True), Column("share", numeric=True)]
    columns += [Column("stream", numeric=True)] if streams else []
    cells = []
    for row in rows:
        shapes = " ".join("x".join(map(str, s)) for s in row["inputs"].values() if s) + " -> " + \
            " ".join("x".join(map(str, s)) for s in row["outputs"].values() if s)
        config = row["config"]
        tactic = row["tactic"] + (" " + ",".join(f"{k}={v}" for k, v in config.items()) if config else "")
        cells.append([str(row["index"]), row["name"], "+".join(row["op_types"]), tactic, row["precision"],
                      row["layout"], shapes, "-" if row["time_ms"] is None else f"{row['time_ms']:.4f}",
                      "-" if row["share"] is None else f"{100 * row['share']:.1f}%",
                      *([str(row["stream"])] if streams else [])])
    console = make_console()
    left_out = print_table(console, columns, cells, title=f"{args.engine}: {len(rows)} layers")
    if left_out:
        _say(console, f"narrow terminal: {', '.join(left_out)} left out (kiln inspect --json has every field)")
    _say(console, f"weights: {summary['weights_bytes'] / 1e6:.1f} MB, held once and shared by every execution context; "
                  f"{engine.aux_streams} auxiliary stream(s)")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from kiln.bench.options import BenchOptions, parse_batch_axes, parse_batches
    from kiln.bench.report import plot, render, write_json
    from kiln.bench.run import run_bench
    from kiln.builder import BuildConfig
    from kiln.device import resolve_device
    from kiln.inputs import parse_shapes, read_npz
    from kiln.tables import make_console

    engine_file = _is_engine(args.model)
    build_flags = [f"--{flag.replace('_', '-')}" for flag in ("fp16", "bf16", "tf32", "strongly_typed")
                   if getattr(args, flag)]
    if engine_file and (build_flags or args.timing_cache or args.opt_level is not None):
        raise KilnError(f"{args.model}: an engine is already built; "
                        f"{', '.join(build_flags) or 'build flags'} apply to .onnx models")
    if args.onnx is not None and not engine_file:
        raise KilnError("--onnx names the ONNX file a .kiln engine was built from; the model here is ONNX already")
    atol, rtol = _tolerance_flags(args)
    model = args.model
    if engine_file and args.device is not None:  # an engine runs where it was built: refuse another device
        from kiln.engine import load_engine

        model = load_engine(args.model, device=resolve_device(args.device))
    build = None if engine_file else BuildConfig(
        fp16=args.fp16, bf16=args.bf16, tf32=args.tf32, strongly_typed=args.strongly_typed,
        opt_level=3 if args.opt_level is None else args.opt_level, timing_cache=args.timing_cache,
        device=resolve_device(args.device), max_aux_streams=args.aux_streams or 0)
    options = BenchOptions(
        batches=parse_batches(args.batch), shapes=parse_shapes(args.shapes),
        batch_axes=parse_batch_axes(args.batch_axes),
        build=build, warmup_ms=args.warmup_ms,
        duration_s=None if args.iterations else args.duration_s, iterations=args.iterations, repeats=args.repeats,
        peers=_names(args.peers) or [], profile_layers=args.profile_layers, cuda_graph=args.cuda_graph,
        contexts=args.contexts, aux_streams=args.aux_streams, profile=args.profile, onnx=args.onnx,
        reference=not args.no_reference, inputs=read_npz(args.inputs) if args.inputs else {}, atol=atol, rtol=rtol,
        timeout_s=args.timeout_s)
    console = make_console()
    status = make_console(stderr=True)
    with status.status("benchmarking", spinner="dots") as spinner:
        result = run_bench(model, options, progress=lambda message: spinner.update(message), command=args.command_line)
    render(result, console)
    if args.json:
        write_json(result, args.json)
        console.print(f"JSON written to {args.json}", markup=False, highlight=False, soft_wrap=True)
    if args.plot:
        plot(result, args.plot)
        console.print(f"plot written to {args.plot}", markup=False, highlight=False, soft_wrap=True)
    wrong = [f"{r.target} at batch {r.batch}" for r in result.rows if r.diff_ok is False]
    off = [f"{r.target} at batch {r.batch}" for r in result.rows if r.ref_ok is False]
    if wrong:
        console.print(f"[bold red]outputs differ from kiln's beyond tolerance:[/] {', '.join(wrong)}", highlight=False)
    if off:
        console.print(f"[bold red]outputs differ from the reference beyond tolerance:[/] {', '.join(off)}",
                      highlight=False)
    if wrong or off:
        return EXIT_MISMATCH
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from kiln.demo import run_demo

    return 0 if run_demo(Path(args.out)) else EXIT_MISMATCH


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln",
                                     description="kiln: build and run fast inference engines from ONNX models")
    parser.add_argument("--version", action="version", version=f"kiln {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="build an engine from an ONNX model", description=(
        "Build an engine: fuse layers, time every candidate tactic per layer, keep the fastest correct one."))
    build.add_argument("model", type=Path, help="the .onnx file")
    build.add_argument("-o", "--output", type=Path, required=True, help="the engine file to write (.kiln)")
    build.add_argument("--fp16", action="store_true", help="allow fp16 tactics (layers that overflow fall back)")
    build.add_argument("--bf16", action="store_true", help="allow bf16 tactics")
    build.add_argument("--tf32", action="store_true", help="allow TF32 tensor cores for fp32 layers")
    build.add_argument("--strongly-typed", action="store_true",
                       help="precisions come from the model's own tensor types")
    build.add_argument("--opt-level", "--builderOptimizationLevel", dest="opt_level", type=int, default=3,
                       choices=range(6),
                       help="0: heuristics only, no timing; 1-2: short list; 3: every candidate (default); "
                            "4-5: wider search")
    build.add_argument("--timing-cache", "--timingCacheFile", dest="timing_cache", type=Path,
                       help="timing cache file (read and updated)")
    for which in ("min", "opt", "max"):
        build.add_argument(f"--{which}-shapes", f"--{which}Shapes", dest=f"{which}_shapes", action="append",
                           help=f"{which} shapes of a profile, NAME:1x3x224x224,...; repeat for more profiles")
    build.add_argument("--layer-precision", "--layerPrecisions", dest="layer_precision",
                       help="per-layer precision: NODE_NAME_OR_OP_TYPE:fp32,...")
    build.add_argument("--tactics", "--tacticSources", dest="tactics",
                       help="allow/deny tactics: -triton,+gemm.cublaslt,...")
    build.add_argument("--memory-limit", "--memPoolSize", dest="memory_limit", type=int,
                       help="most scratch bytes one tactic may use")
    build.add_argument("--inputs", type=Path, help=".npz of representative inputs, named after the model's inputs: "
                       "the build runs the model on them to record shapes, check precision per layer and check the "
                       "engine's outputs against fp32 (else seeded random values; integer inputs such as a sample "
                       "rate need real ones)")
    build.add_argument("--no-precision-check", action="store_true",
                       help="skip the per-layer and end-to-end checks against fp32")
    _tolerance_arguments(build)
    build.add_argument("--device", choices=["cpu", "cuda"],
                       help="what to build for (default: cuda if torch sees a GPU, else cpu)")
    build.add_argument("--passes", help="run only these graph passes, a,b,... (default: all)")
    build.add_argument("--skip-passes", help="graph passes not to run, a,b,...")
    build.add_argument("--aux-streams", "--maxAuxStreams", dest="aux_streams", type=int, default=0,
                       help="let independent branches run on up to N auxiliary streams per context (default 0)")
    build.add_argument("--sign-key", type=Path,
                       help="sign the engine with this key file (HMAC-SHA256; default: $KILN_ENGINE_KEY)")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    _max_tensor_bytes_argument(build)
    _timeout_argument(build, "the build, the model's runs inside it included")
    build.set_defaults(func=_cmd_build)

    optimize = sub.add_parser("optimize", help="apply kiln's graph passes and write the result as ONNX", description=(
        "Apply the graph passes and write a valid ONNX file (standard ops only unless --kiln-ops); prints node "
        "counts per op before and after."))
    optimize.add_argument("model", type=Path, help="the .onnx file")
    optimize.add_argument("-o", "--output", type=Path, required=True, help="the optimized .onnx file to write")
    optimize.add_argument("--passes", help="run only these passes, a,b,... (default: all)")
    optimize.add_argument("--skip", help="passes not to run, a,b,...")
    optimize.add_argument("--precision", default="fp32", choices=ALL_PRECISIONS,
                          help="the precision the model will run at (alignment and layout passes follow it)")
    optimize.add_argument("--kiln-ops", action="store_true", help="allow ai.kiln fused ops (a kiln-only file)")
    optimize.add_argument("--dims", help="sizes of symbolic dimensions for passes that need them, NAME:SIZE,...")
    optimize.add_argument("--target-opset", type=int, metavar="N",
                          help="convert the model to opset N first (onnx's version converter), e.g. 17 so that "
                               "LayerNorm fuses into LayerNormalization")
    optimize.set_defaults(func=_cmd_optimize)

    doctor = sub.add_parser("doctor", help="list every place a performance rule applies, ranked by impact",
                            description="Report, node by node, where the performance rules apply (with the pass "
                                        "that fixes each, or what to change), sorted by the estimated share of the "
                                        "model's FLOPs or bytes.")
    doctor.add_argument("model", type=Path, help="the .onnx file")
    doctor.add_argument("--precision", default="fp32", choices=ALL_PRECISIONS,
                        help="the precision the model will run at (alignment and layout rules follow it)")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.add_argument("--shapes", help="input shapes for the estimates and the reference run, NAME:1x3x224x224,... "
                        "(they size named and unnamed dims alike)")
    for which in ("min", "opt", "max"):
        doctor.add_argument(f"--{which}-shapes", f"--{which}Shapes", dest=f"{which}_shapes", action="append",
                            help=f"{which} shapes of the profile you will build with, as for kiln build")
    doctor.add_argument("--no-run", action="store_true",
                        help="estimate from inferred shapes only (no reference run on the CPU to record the shapes "
                             "inference leaves unknown)")
    doctor.set_defaults(func=_cmd_doctor)

    inspect = sub.add_parser("inspect", help="print an engine's layers", description="Print every layer of an engine.")
    inspect.add_argument("engine", type=Path, help="the .kiln file")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.set_defaults(func=_cmd_inspect)

    run = sub.add_parser("run", help="run an ONNX model or a .kiln engine and print its outputs",
                         description="Run an ONNX model (reference executor) or a built engine once.")
    run.add_argument("model", type=Path, help="the .onnx or .kiln file")
    run.add_argument("--onnx", type=Path, help="with a .kiln engine and --compare: the ONNX model it was built from")
    run.add_argument("--inputs", type=Path, help=".npz with arrays named after the graph inputs (others are random)")
    run.add_argument("--save-outputs", type=Path, help="write the outputs to this .npz")
    run.add_argument("--shapes", help="input shapes, NAME:1x3x224x224,... (needed for dynamic dimensions)")
    run.add_argument("--device", choices=["cpu", "cuda"], help="ONNX models: where to run (default: cuda if torch sees "
                     "a GPU, else cpu); engines run where they were built")
    run.add_argument("--compare", choices=["onnxruntime"], help="also run onnxruntime and report the differences")
    _tolerance_arguments(run)
    run.add_argument("--max-model-bytes", type=int, help="refuse models (with external data) larger than this")
    run.add_argument("--cuda-graph", "--useCudaGraph", dest="cuda_graph", action="store_true",
                     help="engines: capture a CUDA graph per input shape and replay it")
    run.add_argument("--contexts", "--infStreams", dest="contexts", type=int,
                     help="engines: run in N execution contexts at once, each on its own stream, and check they agree")
    run.add_argument("--aux-streams", "--maxAuxStreams", dest="aux_streams", type=int,
                     help="engines: use at most N of the auxiliary streams the engine was built with (0: one stream)")
    run.add_argument("--profile", "--useProfile", dest="profile", type=int,
                     help="engines: run with optimization profile K")
    _max_tensor_bytes_argument(run)
    _timeout_argument(run, "the run, other contexts' runs and --compare's")
    run.set_defaults(func=_cmd_run)

    bench = sub.add_parser("bench", help="time a model or engine: latency percentiles, throughput, batch sweep, peers",
                           description="Time a model (built here) or an engine the way trtexec does, beside its peers.")
    bench.add_argument("model", type=Path, help="the .onnx file (built for each --batch size) or a .kiln engine")
    bench.add_argument("--batch", help="batch sizes, 1,8,32,256: a sweep with a saturation verdict (along each input's "
                       "batch axis, see --batch-axes)")
    bench.add_argument("--batch-axes", help="the inputs that batch and their batch axes, NAME:AXIS,... (state:1); "
                       "the others keep their shapes. Default: the symbolic dim the inputs share, else axis 0 where "
                       "it is dynamic")
    bench.add_argument("--shapes", help="input shapes NAME:AxB,... (the batch axis is replaced by each --batch size)")
    bench.add_argument("--fp16", action="store_true", help="build with fp16 tactics (.onnx models)")
    bench.add_argument("--bf16", action="store_true", help="build with bf16 tactics")
    bench.add_argument("--tf32", action="store_true", help="build with TF32 for fp32 layers")
    bench.add_argument("--strongly-typed", action="store_true", help="precisions from the model's own types")
    bench.add_argument("--opt-level", "--builderOptimizationLevel", dest="opt_level", type=int, choices=range(6),
                       help="builder optimization level (default 3)")
    bench.add_argument("--timing-cache", "--timingCacheFile", dest="timing_cache", type=Path, help="timing cache file")
    bench.add_argument("--device", choices=["cpu", "cuda"], help="where to build and run (default: cuda if torch sees "
                       "a GPU, else cpu)")
    bench.add_argument("--warmup-ms", "--warmUp", dest="warmup_ms", type=float, default=200.0,
                       help="warm-up before each measurement (default 200 ms)")
    timed = bench.add_mutually_exclusive_group()
    timed.add_argument("--duration-s", "--duration", dest="duration_s", type=float, default=3.0,
                       help="time each measurement for this long (default 3 s)")
    timed.add_argument("--iterations", type=int, help="time exactly this many iterations instead")
    bench.add_argument("--repeats", type=int, default=2, help="measure each configuration this many times (default 2)")
    bench.add_argument("--peers", help="also time eager,compile,compile-reduce-overhead,onnxruntime,onnxruntime-cuda")
    bench.add_argument("--profile-layers", "--dumpProfile", dest="profile_layers", action="store_true",
                       help="per-layer times at the largest batch, top 10 first")
    bench.add_argument("--json", type=Path, help="write every number to this JSON file")
    bench.add_argument("--plot", type=Path, help="write latency and throughput against batch to this PNG")
    bench.add_argument("--onnx", type=Path, help="with a .kiln engine: the ONNX model it was built from (for the peers "
                       "and the reference)")
    bench.add_argument("--inputs", type=Path,
                       help=".npz of real data named after the inputs; repeated or cut to each batch size along "
                       "the input's batch axis, as given where it does not batch (other inputs random)")
    bench.add_argument("--no-reference", action="store_true",
                       help="skip comparing every target with the ONNX model on kiln's reference executor")
    _tolerance_arguments(bench)
    bench.add_argument("--cuda-graph", "--useCudaGraph", dest="cuda_graph", action="store_true",
                       help="replay a CUDA graph per input shape")
    bench.add_argument("--contexts", "--infStreams", dest="contexts", type=int, default=1,
                       help="N execution contexts at once, each on its own stream (throughput adds up)")
    bench.add_argument("--aux-streams", "--maxAuxStreams", dest="aux_streams", type=int,
                       help="auxiliary streams per context (built with them for .onnx models)")
    bench.add_argument("--profile", "--useProfile", dest="profile", type=int, help="run with optimization profile K")
    _max_tensor_bytes_argument(bench)
    _timeout_argument(bench, "the benchmark: the build, the reference, every measurement and peer")
    bench.set_defaults(func=_cmd_bench)

    demo = sub.add_parser("demo", help="generate a small model, run it, check it against onnxruntime")
    demo.add_argument("--out", default="out/demo", help="folder for the generated model (default: out/demo)")
    demo.set_defaults(func=_cmd_demo)
    return parser


def _max_tensor_bytes_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-tensor-bytes", type=int, help="refuse any one input or tensor larger than this, before "
                        "allocating it (default: $KILN_MAX_TENSOR_BYTES, else half the machine's memory)")


def _timeout_argument(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--timeout-s", dest="timeout_s", type=float, metavar="S",
                        help=f"stop after S seconds ({what}), checked between nodes, layers and loop iterations; "
                        "exit code 2 with where it stopped (default: no limit)")


def _tolerance_arguments(parser: argparse.ArgumentParser) -> None:
    fp32 = TOLERANCES["fp32"]
    parser.add_argument("--atol", type=float, help="absolute tolerance per element (default: kiln.precision's table "
                        f"for each output's precision, fp32 {fp32.atol:g})")
    parser.add_argument("--rtol", type=float, help="relative tolerance per element: an element passes when "
                        f"|out - ref| <= atol + rtol * |ref| (default: the table's, fp32 {fp32.rtol:g})")


def _version() -> str:
    from kiln.versions import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    # "--tactics -triton" reads to argparse as two options; glue the value on, as "--tactics=-triton".
    for i in range(len(argv) - 1):
        if argv[i] in ("--tactics", "--tacticSources") and argv[i + 1][:1] in "+-" and argv[i + 1][1:2] != "-":
            argv[i:i + 2] = [f"{argv[i]}={argv[i + 1]}", ""]
    args = parser.parse_args([a for a in argv if a != ""])
    args.command_line = "kiln " + shlex.join(a for a in argv if a != "")
    with _notes_on_stderr():
        try:
            with limits.max_tensor_bytes_set(getattr(args, "max_tensor_bytes", None)):
                code = args.func(args)
            sys.stdout.flush()  # a reader gone (| head) shows here, not in Python's flush at exit
            return code
        except KilnError as error:
            message = " ".join(str(error).split())
            print(f"kiln: error: {message}", file=sys.stderr)
            # a build whose outputs stay over tolerance of fp32 is a verdict on the outputs, not bad input
            return EXIT_MISMATCH if isinstance(error, PrecisionError) else EXIT_BAD_INPUT
        except KeyboardInterrupt:
            return EXIT_INTERRUPTED
        except BrokenPipeError as error:
            if _stdout_closed():
                return EXIT_PIPE_CLOSED
            return _internal_error(error, args.command_line)
        except Exception as error:  # noqa: BLE001 - a bug in kiln: one line here, the traceback in a file
            return _internal_error(error, args.command_line)


@contextlib.contextmanager
def _time_limit(timeout_s: float | None) -> Iterator[None]:
    """--timeout-s of kiln run: its runs under one time limit (``kiln.deadline``); nothing without it."""
    if timeout_s is None:
        yield
        return
    from kiln.deadline import time_limit

    with time_limit(timeout_s):
        yield


class _OneLine(logging.Handler):
    """A kiln note as ``kiln: note: ...`` on stderr (looked up per record: tests swap sys.stderr)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"kiln: note: {' '.join(record.getMessage().split())}", file=sys.stderr)


@contextlib.contextmanager
def _notes_on_stderr() -> Iterator[None]:
    """kiln's notes and Python's warnings as one line each on stderr, for one command."""
    logger = logging.getLogger("kiln")
    handler, propagate = _OneLine(), logger.propagate
    logger.addHandler(handler)
    logger.propagate = False
    with warnings.catch_warnings():
        warnings.showwarning = lambda message, category, *rest, **kw: print(
            f"kiln: warning: {' '.join(first_line(message).split())}", file=sys.stderr)
        try:
            yield
        finally:
            logger.removeHandler(handler)
            logger.propagate = propagate


def _stdout_closed() -> bool:
    """True when stdout's reader has gone (the BrokenPipeError came from stdout, not from a pipe kiln
    opened); stdout is then pointed at /dev/null so that Python's flush at exit stays quiet."""
    import select

    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a file (a test's capture): not a pipe either
        return False
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    if not any(events & select.POLLERR for _, events in poller.poll(0)):  # a pipe without readers polls POLLERR
        return False
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)
    return True


def crash_folder() -> Path:
    """Where tracebacks of internal errors go: $XDG_CACHE_HOME/kiln/crashes (~/.cache by default)."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "kiln" / "crashes"


def _internal_error(error: BaseException, command: str) -> int:
    """One line on stderr; the full traceback (with the command and versions) in a file of its own."""
    import datetime
    import platform
    import tempfile
    import traceback

    from kiln.atomic_file import write_atomically

    text = (f"{command}\nkiln {_version()}, python {platform.python_version()}, {platform.platform()}\n\n"
            + "".join(traceback.format_exception(error)))
    name = f"crash-{datetime.datetime.now():%Y%m%d-%H%M%S}-{os.getpid()}.txt"
    where = None
    for folder in (crash_folder(), Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            write_atomically(folder / name, lambda handle: handle.write(text.encode()))
            where = folder / name
            break
        except (OSError, KilnError):
            continue
    if where is None:
        sys.stderr.write(text)
    place = f"traceback written to {where}" if where else "traceback above: no folder to write it to"
    print(f"kiln: internal error: {type(error).__name__}: {' '.join(first_line(error).split())} ({place})",
          file=sys.stderr)
    return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
