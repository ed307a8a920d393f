"""The ``kiln`` command line: thin wrappers over the Python API, one subcommand each.

Exit codes: 0 success; 1 outputs differ from the reference beyond tolerance; 2 bad input (a
``KilnError``: one line on stderr, no traceback, nothing written).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from kiln.errors import KilnError

EXIT_MISMATCH = 1
EXIT_BAD_INPUT = 2


def _cmd_run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from kiln import compare, inputs
    from kiln.dtypes import tensor_to_numpy
    from kiln.executor import Executor
    from kiln.onnx_io import load_model

    console = Console()
    model = load_model(args.model, max_bytes=args.max_model_bytes) if args.max_model_bytes else load_model(args.model)
    executor = Executor(model, device=args.device, name=str(args.model))
    shapes = inputs.parse_shapes(args.shapes)
    if args.inputs:
        feeds = inputs.read_npz(args.inputs)
        missing = [v for v in executor.inputs if v.name not in feeds]
        feeds.update(inputs.random_inputs(missing, shapes, model=str(args.model)))
    else:
        feeds = inputs.random_inputs(executor.inputs, shapes, model=str(args.model))
    start = time.perf_counter()
    outputs = executor.run(feeds)
    elapsed = time.perf_counter() - start
    arrays = {name: tensor_to_numpy(value) for name, value in outputs.items()}

    diffs = {}
    if args.compare:
        reference = compare.run_onnxruntime(args.model, feeds)
        diffs = {d.name: d for d in compare.compare_outputs(arrays, reference)}

    table = Table(title=f"{args.model} on {args.device} ({elapsed * 1e3:.1f} ms)")
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
    if diffs and not all(d.ok for d in diffs.values()):
        console.print("[bold red]kiln differs from onnxruntime beyond tolerance[/]")
        return EXIT_MISMATCH
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from kiln.demo import run_demo

    return 0 if run_demo(Path(args.out)) else EXIT_MISMATCH


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kiln", description="kiln: build and run fast inference engines from ONNX models")
    parser.add_argument("--version", action="version", version=f"kiln {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run an ONNX model and print its outputs", description="Run an ONNX model once.")
    run.add_argument("model", type=Path, help="the .onnx file")
    run.add_argument("--inputs", type=Path, help=".npz with arrays named after the graph inputs (others are random)")
    run.add_argument("--save-outputs", type=Path, help="write the outputs to this .npz")
    run.add_argument("--shapes", help="input shapes, NAME:1x3x224x224,... (needed for dynamic dimensions)")
    run.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    run.add_argument("--compare", choices=["onnxruntime"], help="also run onnxruntime and report the differences")
    run.add_argument("--max-model-bytes", type=int, help="refuse models (with external data) larger than this")
    run.set_defaults(func=_cmd_run)

    demo = sub.add_parser("demo", help="generate a small model, run it, check it against onnxruntime")
    demo.add_argument("--out", default="out/demo", help="folder for the generated model (default: out/demo)")
    demo.set_defaults(func=_cmd_demo)
    return parser


def _version() -> str:
    from kiln import __version__

    return __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
