"""The ``kiln`` command line: thin wrappers over the Python API, one subcommand each.

Exit codes: 0 success; 1 outputs differ from the reference beyond tolerance; 2 bad input (a
``KilnError``: one line on stderr, no traceback, nothing written).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from kiln.errors import KilnError

EXIT_MISMATCH = 1
EXIT_BAD_INPUT = 2


def _is_engine(path: Path) -> bool:
    return path.suffix == ".kiln"


def _cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from kiln import compare, inputs
    from kiln.dtypes import tensor_to_numpy

    console = Console()
    shapes = inputs.parse_shapes(args.shapes)
    onnx_path = args.model
    runtime = {"--cuda-graph": args.cuda_graph, "--contexts": args.contexts is not None,
               "--aux-streams": args.aux_streams is not None, "--profile": args.profile is not None}
    contexts = []
    if _is_engine(args.model):
        from kiln.engine import load_engine

        engine = load_engine(args.model)
        device = engine.device.type
        specs = inputs.engine_input_values(engine)
        count = 1 if args.contexts is None else args.contexts
        if count < 1:
            raise KilnError(f"--contexts must be 1 or more, got {count}")
        contexts = [engine.create_context(profile=args.profile, cuda_graph=args.cuda_graph, aux_streams=args.aux_streams)
                    for _ in range(count)]
        run = contexts[0].run
        onnx_path = args.onnx
        tolerance = _engine_tolerance(engine)
        if args.compare and onnx_path is None:
            raise KilnError(f"{args.model}: an engine does not carry its ONNX weights; give --onnx MODEL.onnx to compare it")
    else:
        given = [flag for flag, on in runtime.items() if on]
        if given:
            raise KilnError(f"{args.model}: {', '.join(given)} run a built engine; build one with kiln build and run the .kiln file")
        from kiln.executor import Executor
        from kiln.onnx_io import load_model

        model = load_model(args.model, max_bytes=args.max_model_bytes) if args.max_model_bytes else load_model(args.model)
        executor = Executor(model, device=args.device, name=str(args.model))
        device, specs, run, tolerance = args.device, executor.inputs, executor.run, None
    if args.inputs:
        feeds = inputs.read_npz(args.inputs)
        missing = [v for v in specs if v.name not in feeds]
        feeds.update(inputs.random_inputs(missing, shapes, model=str(args.model)))
    else:
        feeds = inputs.random_inputs(specs, shapes, model=str(args.model))
    start = time.perf_counter()
    outputs = run(feeds)
    elapsed = time.perf_counter() - start
    arrays = {name: tensor_to_numpy(value) for name, value in outputs.items()}
    disagree = _run_other_contexts(contexts[1:], feeds, outputs, console) if len(contexts) > 1 else []

    diffs = {}
    if args.compare:
        reference = compare.run_onnxruntime(onnx_path, feeds)
        diffs = {d.name: d for d in compare.compare_outputs(arrays, reference, tolerance)}

    table = Table(title=f"{args.model} on {device} ({elapsed * 1e3:.1f} ms)")
    for column in ["output", "shape", "dtype"] + (["max abs diff", "max rel diff", "verdict"] if diffs else []):
        table.add_column(column)
    for name, array in arrays.items():
        row = [name, "x".join(map(str, array.shape)) or "scalar", str(array.dtype)]
        if diffs:
            d = diffs[name]
            row += [f"{d.max_abs:.3g}", f"{d.max_rel:.3g}", "ok" if d.ok else f"OVER {d.tolerance:g}"]
        table.add_row(*row)
    console.print(table)
    if args.save_outputs:
        inputs.write_npz(args.save_outputs, arrays)
        console.print(f"outputs written to {args.save_outputs}")
    if contexts and (args.cuda_graph or args.contexts):
        first = contexts[0]
        console.print(f"{len(contexts)} context(s) on their own streams; aux streams {first.aux_streams}; "
                      f"CUDA graph: {'captured' if first.stats.captures else 'off' if not args.cuda_graph else 'not captured'}"
                      + (f" ({'; '.join(first.graph_errors)})" if first.graph_errors else ""), markup=False, highlight=False)
    if diffs and not all(d.ok for d in diffs.values()):
        console.print("[bold red]kiln differs from onnxruntime beyond tolerance[/]")
        return EXIT_MISMATCH
    if disagree:
        console.print(f"[bold red]contexts {', '.join(map(str, disagree))} gave other outputs than context 0[/]")
        return EXIT_MISMATCH
    return 0


def _run_other_contexts(contexts, feeds, expected, console) -> list[int]:
    """Run ``feeds`` in every context at once (a thread each, so each on its own stream), twice (the
    second run replays a captured graph), and return the numbers of those whose outputs differ from
    ``expected`` (context 0's)."""
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

    threads = [threading.Thread(target=work, args=(i, c)) for i, c in enumerate(contexts, start=1)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    console.print(f"contexts 1-{len(contexts)}: two runs each, concurrently, in {(time.perf_counter() - start) * 1e3:.1f} ms",
                  markup=False, highlight=False)

    def same(a, b) -> bool:
        return torch.equal(a, b) if isinstance(a, torch.Tensor) else bool(np.array_equal(a, b))

    return [i for i, runs in sorted(results.items())
            if not all(same(run[name], value) for run in runs for name, value in expected.items())]


def _engine_tolerance(engine) -> float:
    """Engines built in reduced precision are compared at that precision's tolerance."""
    precisions = {layer["precision"] for layer in engine.plan["layers"]}
    if precisions & {"fp16", "bf16", "native"}:
        return 1e-2
    return 1e-3 if "tf32" in precisions else 1e-4


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
    allow, deny = [], []
    for item in (text or "").split(","):
        item = item.strip()
        if not item:
            continue
        if item[0] not in "+-":
            raise KilnError(f"--tactics: {item!r} must start with + (allow) or - (deny), for example -triton")
        (allow if item[0] == "+" else deny).append(item[1:])
    return allow, deny


def _cmd_build(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    from kiln.builder import BuildConfig, build
    from kiln.inputs import read_npz

    console = Console(stderr=True)
    allow, deny = _parse_tactics(args.tactics)
    config = BuildConfig(
        fp16=args.fp16, bf16=args.bf16, tf32=args.tf32, strongly_typed=args.strongly_typed, opt_level=args.opt_level,
        timing_cache=args.timing_cache, profiles=_parse_profiles(args), layer_precisions=_parse_layer_precisions(args.layer_precision),
        allow_tactics=allow, deny_tactics=deny, memory_limit=args.memory_limit, device=args.device,
        precision_check=not args.no_precision_check, passes=_names(args.passes), skip_passes=_names(args.skip_passes) or [],
        max_aux_streams=args.aux_streams,
    )
    calibration = read_npz(args.inputs) if args.inputs else None
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} layers"),
                  TimeElapsedColumn(), console=console, transient=True, disable=args.quiet) as progress:
        tasks: dict[str, int] = {}

        def report(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = progress.add_task(phase, total=total)
            progress.update(tasks[phase], completed=done, total=total)

        engine = build(args.model, config, calibration=calibration, progress=report)
    engine.save(args.output)
    out = Console()
    for line in engine.report.lines:
        out.print(line, markup=False, highlight=False, soft_wrap=True)
    summary = engine.summary()
    table = Table(title=f"{args.model} -> {args.output}")
    table.add_column("")
    table.add_column("")
    table.add_row("layers", f"{summary['layers']} ({summary['fused_layers']} fused, from {summary['nodes']} nodes)")
    table.add_row("tactics", ", ".join(f"{k} x{v}" for k, v in summary["tactics"].items()))
    table.add_row("precisions", ", ".join(f"{k} x{v}" for k, v in summary["precisions"].items()))
    table.add_row("profiles", str(summary["profiles"]))
    table.add_row("build time", f"{engine.report.seconds:.1f} s at optimization level {args.opt_level}")
    table.add_row("timing cache", f"{engine.report.cache_hits} hits, {engine.report.cache_misses} misses")
    table.add_row("weights", f"{summary['weights_bytes'] / 1e6:.1f} MB")
    table.add_row("aux streams", str(engine.aux_streams))
    out.print(table)
    return 0


def _names(text: str | None) -> list[str] | None:
    """``a,b`` -> ["a", "b"]; None stays None."""
    return None if text is None else [n.strip() for n in text.split(",") if n.strip()]


def _cmd_optimize(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from kiln.inputs import parse_shapes
    from kiln.onnx_io import load_model
    from kiln.optimize import optimize_model, save_onnx

    model = load_model(args.model)
    dims = {name: int(size) for name, size in parse_shapes(args.dims).items()} if args.dims else {}
    report = optimize_model(model, passes=_names(args.passes), skip=_names(args.skip) or [], precision=args.precision,
                            kiln_ops=args.kiln_ops, dims={k: v[0] for k, v in dims.items()},
                            target_opset=args.target_opset, name=str(args.model))
    save_onnx(model, args.output, name=str(args.model))
    console = Console()
    console.print(f"{args.model} -> {args.output}", markup=False, highlight=False, soft_wrap=True)
    table = Table(title="nodes per op")
    for column in ("op", "before", "after"):
        table.add_column(column, justify="left" if column == "op" else "right")
    for op in sorted(set(report.ops_before) | set(report.ops_after)):
        before, after = report.ops_before.get(op, 0), report.ops_after.get(op, 0)
        table.add_row(op, str(before), str(after), style=None if before == after else "bold")
    table.add_row("total", str(sum(report.ops_before.values())), str(sum(report.ops_after.values())), style="bold")
    console.print(table)
    for name, count in report.rewrites.items():
        console.print(f"{name}: {count} rewrite(s)", markup=False, highlight=False)
    for name, why in report.skipped.items():
        console.print(f"{name}: not run: {why}", markup=False, highlight=False)
    for line in report.log:
        console.print(f"  {line}", markup=False, highlight=False)
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

    from rich.console import Console
    from rich.table import Table

    from kiln.engine import load_engine

    engine = load_engine(args.engine)
    rows = engine.describe()
    if args.json:
        print(json.dumps({"summary": engine.summary(), "profiles": engine.plan["profiles"], "layers": rows}, indent=1))
        return 0
    streams = engine.aux_streams > 0
    summary = engine.summary()
    table = Table(title=f"{args.engine}: {len(rows)} layers")
    for column in ["#", "layer", "nodes", "tactic", "precision", "layout", "shapes", "ms", "share"] + (["stream"] if streams else []):
        table.add_column(column, overflow="fold")
    for row in rows:
        shapes = " ".join("x".join(map(str, s)) for s in row["inputs"].values() if s) + " -> " + \
            " ".join("x".join(map(str, s)) for s in row["outputs"].values() if s)
        config = row["config"]
        tactic = row["tactic"] + (" " + ",".join(f"{k}={v}" for k, v in config.items()) if config else "")
        table.add_row(str(row["index"]), row["name"], "+".join(row["op_types"]), tactic, row["precision"], row["layout"],
                      shapes, "-" if row["time_ms"] is None else f"{row['time_ms']:.4f}",
                      "-" if row["share"] is None else f"{100 * row['share']:.1f}%", *([str(row["stream"])] if streams else []))
    console = Console()
    console.print(table)
    console.print(f"weights: {summary['weights_bytes'] / 1e6:.1f} MB, held once and shared by every execution context; "
                  f"{engine.aux_streams} auxiliary stream(s)", markup=False, highlight=False, soft_wrap=True)
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from rich.console import Console

    from kiln.bench import BenchOptions, parse_batches, run_bench
    from kiln.bench.report import plot, render, write_json
    from kiln.builder import BuildConfig
    from kiln.inputs import parse_shapes, read_npz

    engine_file = _is_engine(args.model)
    build_flags = [f"--{flag.replace('_', '-')}" for flag in ("fp16", "bf16", "tf32", "strongly_typed") if getattr(args, flag)]
    if engine_file and (build_flags or args.timing_cache or args.opt_level is not None):
        raise KilnError(f"{args.model}: an engine is already built; {', '.join(build_flags) or 'build flags'} apply to .onnx models")
    if args.onnx is not None and not engine_file:
        raise KilnError("--onnx names the ONNX file a .kiln engine was built from; the model here is ONNX already")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    build = None if engine_file else BuildConfig(
        fp16=args.fp16, bf16=args.bf16, tf32=args.tf32, strongly_typed=args.strongly_typed,
        opt_level=3 if args.opt_level is None else args.opt_level, timing_cache=args.timing_cache, device=device,
        max_aux_streams=args.aux_streams or 0)
    options = BenchOptions(
        batches=parse_batches(args.batch), shapes=parse_shapes(args.shapes), build=build, warmup_ms=args.warmup_ms,
        duration_s=None if args.iterations else args.duration_s, iterations=args.iterations, repeats=args.repeats,
        peers=_names(args.peers) or [], profile_layers=args.profile_layers, cuda_graph=args.cuda_graph,
        contexts=args.contexts, aux_streams=args.aux_streams, profile=args.profile, onnx=args.onnx,
        reference=not args.no_reference, inputs=read_npz(args.inputs) if args.inputs else {})
    console = Console()
    status = Console(stderr=True)
    with status.status("benchmarking", spinner="dots") as spinner:
        result = run_bench(args.model, options, progress=lambda message: spinner.update(message), command=args.command_line)
    render(result, console)
    if args.json:
        write_json(result, args.json)
        console.print(f"JSON written to {args.json}", markup=False, highlight=False, soft_wrap=True)
    if args.plot:
        plot(result, args.plot)
        console.print(f"plot written to {args.plot}", markup=False, highlight=False, soft_wrap=True)
    tolerance = 1e-2 if build is None or build.low_precisions or build.strongly_typed else (1e-3 if build.tf32 else 1e-4)
    wrong = [f"{r.target} at batch {r.batch}" for r in result.rows if r.max_rel_diff is not None and r.max_rel_diff > tolerance]
    off = [f"{r.target} at batch {r.batch}" for r in result.rows if r.ref_rel_diff is not None and r.ref_rel_diff > tolerance]
    if wrong:
        console.print(f"[bold red]outputs differ from kiln's beyond {tolerance:g}: {', '.join(wrong)}[/]")
    if off:
        console.print(f"[bold red]outputs differ from the reference beyond {tolerance:g}: {', '.join(off)}[/]")
    if wrong or off:
        return EXIT_MISMATCH
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from kiln.demo import run_demo

    return 0 if run_demo(Path(args.out)) else EXIT_MISMATCH


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description="kiln: build and run fast inference engines from ONNX models")
    parser.add_argument("--version", action="version", version=f"kiln {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    build = sub.add_parser("build", help="build an engine from an ONNX model", description=(
        "Build an engine: fuse layers, time every candidate tactic per layer, keep the fastest correct one."))
    build.add_argument("model", type=Path, help="the .onnx file")
    build.add_argument("-o", "--output", type=Path, required=True, help="the engine file to write (.kiln)")
    build.add_argument("--fp16", action="store_true", help="allow fp16 tactics (layers that overflow fall back)")
    build.add_argument("--bf16", action="store_true", help="allow bf16 tactics")
    build.add_argument("--tf32", action="store_true", help="allow TF32 tensor cores for fp32 layers")
    build.add_argument("--strongly-typed", action="store_true", help="precisions come from the model's own tensor types")
    build.add_argument("--opt-level", "--builderOptimizationLevel", dest="opt_level", type=int, default=3, choices=range(6),
                       help="0: heuristics only, no timing; 1-2: short list; 3: every candidate (default); 4-5: wider search")
    build.add_argument("--timing-cache", "--timingCacheFile", dest="timing_cache", type=Path, help="timing cache file (read and updated)")
    for which in ("min", "opt", "max"):
        build.add_argument(f"--{which}-shapes", f"--{which}Shapes", dest=f"{which}_shapes", action="append",
                           help=f"{which} shapes of a profile, NAME:1x3x224x224,...; repeat for more profiles")
    build.add_argument("--layer-precision", "--layerPrecisions", dest="layer_precision",
                       help="per-layer precision: NODE_NAME_OR_OP_TYPE:fp32,...")
    build.add_argument("--tactics", "--tacticSources", dest="tactics", help="allow/deny tactics: -triton,+gemm.cublaslt,...")
    build.add_argument("--memory-limit", "--memPoolSize", dest="memory_limit", type=int, help="most scratch bytes one tactic may use")
    build.add_argument("--inputs", type=Path, help=".npz of representative inputs for the precision check (else random)")
    build.add_argument("--no-precision-check", action="store_true", help="skip the fp16/bf16 per-layer check against fp32")
    build.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    build.add_argument("--passes", help="run only these graph passes, a,b,... (default: all)")
    build.add_argument("--skip-passes", help="graph passes not to run, a,b,...")
    build.add_argument("--aux-streams", "--maxAuxStreams", dest="aux_streams", type=int, default=0,
                       help="let independent branches run on up to N auxiliary streams per context (default 0)")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.set_defaults(func=_cmd_build)

    optimize = sub.add_parser("optimize", help="apply kiln's graph passes and write the result as ONNX", description=(
        "Apply the graph passes and write a valid ONNX file (standard ops only unless --kiln-ops); prints node "
        "counts per op before and after."))
    optimize.add_argument("model", type=Path, help="the .onnx file")
    optimize.add_argument("-o", "--output", type=Path, required=True, help="the optimized .onnx file to write")
    optimize.add_argument("--passes", help="run only these passes, a,b,... (default: all)")
    optimize.add_argument("--skip", help="passes not to run, a,b,...")
    optimize.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "fp16", "bf16", "int8", "fp8"],
                          help="the precision the model will run at (alignment and layout passes follow it)")
    optimize.add_argument("--kiln-ops", action="store_true", help="allow ai.kiln fused ops (a kiln-only file)")
    optimize.add_argument("--dims", help="sizes of symbolic dimensions for passes that need them, NAME:SIZE,...")
    optimize.add_argument("--target-opset", type=int, metavar="N",
                          help="convert the model to opset N first (onnx's version converter), e.g. 17 so that "
                               "LayerNorm fuses into LayerNormalization")
    optimize.set_defaults(func=_cmd_optimize)

    doctor = sub.add_parser("doctor", help="list every place a performance rule applies, ranked by impact", description=(
        "Report, node by node, where the performance rules apply (with the pass that fixes each, or what to change), "
        "sorted by the estimated share of the model's FLOPs or bytes."))
    doctor.add_argument("model", type=Path, help="the .onnx file")
    doctor.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "fp16", "bf16", "int8", "fp8"],
                        help="the precision the model will run at (alignment and layout rules follow it)")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.add_argument("--shapes", help="input shapes that size symbolic dims in the estimates, NAME:1x3x224x224,...")
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
    run.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    run.add_argument("--compare", choices=["onnxruntime"], help="also run onnxruntime and report the differences")
    run.add_argument("--max-model-bytes", type=int, help="refuse models (with external data) larger than this")
    run.add_argument("--cuda-graph", "--useCudaGraph", dest="cuda_graph", action="store_true",
                     help="engines: capture a CUDA graph per input shape and replay it")
    run.add_argument("--contexts", "--infStreams", dest="contexts", type=int,
                     help="engines: run in N execution contexts at once, each on its own stream, and check they agree")
    run.add_argument("--aux-streams", "--maxAuxStreams", dest="aux_streams", type=int,
                     help="engines: use at most N of the auxiliary streams the engine was built with (0: one stream)")
    run.add_argument("--profile", "--useProfile", dest="profile", type=int, help="engines: run with optimization profile K")
    run.set_defaults(func=_cmd_run)

    bench = sub.add_parser("bench", help="time a model or engine: latency percentiles, throughput, batch sweep, peers",
                           description="Time a model (built here) or an engine the way trtexec does, beside its peers.")
    bench.add_argument("model", type=Path, help="the .onnx file (built for each --batch size) or a .kiln engine")
    bench.add_argument("--batch", help="batch sizes (axis 0 of every input), 1,8,32,256: a sweep with a saturation verdict")
    bench.add_argument("--shapes", help="input shapes NAME:AxB,... (axis 0 is replaced by each --batch size)")
    bench.add_argument("--fp16", action="store_true", help="build with fp16 tactics (.onnx models)")
    bench.add_argument("--bf16", action="store_true", help="build with bf16 tactics")
    bench.add_argument("--tf32", action="store_true", help="build with TF32 for fp32 layers")
    bench.add_argument("--strongly-typed", action="store_true", help="precisions from the model's own types")
    bench.add_argument("--opt-level", "--builderOptimizationLevel", dest="opt_level", type=int, choices=range(6),
                       help="builder optimization level (default 3)")
    bench.add_argument("--timing-cache", "--timingCacheFile", dest="timing_cache", type=Path, help="timing cache file")
    bench.add_argument("--device", choices=["cpu", "cuda"], help="where to build and run (default: cuda if present)")
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
                       help=".npz of real data named after the inputs; rows are repeated or cut to each batch size "
                       "(other inputs random)")
    bench.add_argument("--no-reference", action="store_true",
                       help="skip comparing every target with the ONNX model on kiln's reference executor")
    bench.add_argument("--cuda-graph", "--useCudaGraph", dest="cuda_graph", action="store_true",
                       help="replay a CUDA graph per input shape")
    bench.add_argument("--contexts", "--infStreams", dest="contexts", type=int, default=1,
                       help="N execution contexts at once, each on its own stream (throughput adds up)")
    bench.add_argument("--aux-streams", "--maxAuxStreams", dest="aux_streams", type=int,
                       help="auxiliary streams per context (built with them for .onnx models)")
    bench.add_argument("--profile", "--useProfile", dest="profile", type=int, help="run with optimization profile K")
    bench.set_defaults(func=_cmd_bench)

    demo = sub.add_parser("demo", help="generate a small model, run it, check it against onnxruntime")
    demo.add_argument("--out", default="out/demo", help="folder for the generated model (default: out/demo)")
    demo.set_defaults(func=_cmd_demo)
    return parser


def _version() -> str:
    from kiln import __version__

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
    try:
        return args.func(args)
    except KilnError as error:
        message = " ".join(str(error).split())
        print(f"kiln: error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
