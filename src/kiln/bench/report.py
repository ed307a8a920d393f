"""Three views of one ``BenchResult``: the terminal report (``render``), the JSON file
(``write_json``, every number) and the PNG plot (``plot``, latency and throughput against batch).

All three read the same result and compute nothing new beyond ratios, so they never disagree. The
terminal report puts anything a reader must not miss (errors, noisy repeats, the saturation verdict)
on plain lines rather than in table cells or titles, and draws its tables with ``kiln.tables``
(plain lines in a pipe or a narrow terminal, so a number is never wrapped).
"""

from __future__ import annotations

import io
import json
import os

from rich.console import Console

from kiln.atomic_file import write_atomically
from kiln.bench.results import BenchResult, Run, Stats
from kiln.errors import KilnError
from kiln.tables import Column, print_table

KILN = "kiln"
NOISY_SPREAD = 0.05  # repeats further apart than this make smaller differences meaningless
TOP_LAYERS = 10
LOG_SPAN = 30  # a plot whose values span more than this factor gets a log y axis
SECONDARY = ("p90", "h2d", "d2h", "inf/s", "peak MB")  # left out of the main table where the terminal is too narrow
LEFT = frozenset({"target", "layer", "nodes", "tactic", "precision"})  # text columns; the others are numbers


def render(result: BenchResult, console: Console) -> None:
    """Print the report: header and notes, the main table, noise warnings, saturation, per-layer profile."""

    def line(text: str) -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    line(f"{result.model} on {_where(result)}, {result.date}")
    for note in result.notes:
        line(note)

    targets = _ordered_targets(result)
    ok = [(row.target, row.best) for row in result.rows if row.error is None and row.best is not None]
    measured = [t for t in targets if any(target == t for target, _ in ok)]
    with_compute = [t for t in measured if all(run.compute_ms for target, run in ok if target == t)]
    latency = "e2e p50" if not with_compute else "compute p50" if with_compute == measured else "p50"
    columns = ["target", "batch", latency, "p90", "p99", "h2d", "d2h", "e2e", "inf/s", "samples/s", "peak MB",
               "spread", "vs kiln", "rel diff", "vs ref"]
    rows, errors = [], []
    for batch in result.batches:
        kiln_row = result.row(KILN, batch)
        kiln_run = kiln_row.best if kiln_row is not None and kiln_row.error is None else None
        for target in targets:
            row = result.row(target, batch)
            if row is None:
                continue
            if row.error is not None or row.best is None:
                errors.append(row)
                rows.append([target, str(batch), "error"] + ["-"] * 12)
                continue
            run, shown = row.best, _latency(row.best)
            rows.append([target, str(batch), _ms(shown.median), _ms(shown.p90), _ms(shown.p99),
                         _ms(run.h2d_ms.median if run.h2d_ms else None),
                         _ms(run.d2h_ms.median if run.d2h_ms else None),
                         _ms(run.latency_ms.median), _rate(run.inferences_per_s), _rate(run.samples_per_s),
                         "-" if run.peak_memory_bytes is None else f"{run.peak_memory_bytes / 1e6:,.0f}",
                         "-" if row.spread is None else f"{100 * row.spread:.1f}%",
                         _x(run.samples_per_s / kiln_run.samples_per_s) if kiln_run and kiln_run.samples_per_s else "-",
                         _diff(row.max_rel_diff, row.diff_ok), _diff(row.ref_rel_diff, row.ref_ok)])
    left_out = _print(console, columns, rows, optional=SECONDARY)
    if latency == "p50":
        plain = [t for t in measured if t not in with_compute]
        line(f"p50, p90, p99: compute time (GPU events) for {', '.join(with_compute)}; "
             f"end to end for {', '.join(plain)}")
    line("times in ms (h2d, d2h, e2e: medians); inf/s and samples/s from the wall time of all iterations; "
         "vs kiln: samples/s relative to kiln's at the same batch; rel diff: max |out - kiln| / max |kiln|; "
         "vs ref: max |out - ref| / max |ref| (ref: see the notes); !: some element beyond the tolerance")
    if left_out:
        line(f"narrow terminal: {', '.join(left_out)} left out here (the JSON has every number)")
    for row in errors:
        line(f"{row.target} at batch {row.batch} failed: {row.error or 'no runs'}")
    for row in result.rows:
        if row.spread is not None and row.spread > NOISY_SPREAD:
            line(f"repeat spread {100 * row.spread:.1f}% for {row.target} at batch {row.batch}: "
                 "differences below that are noise")

    if result.saturation is not None:
        sat = result.saturation
        line("")
        line(f"saturation: {sat.verdict}")
        if sat.steps:
            cells = []
            for step in sat.steps:
                cells.append([f"{step['from']:g} -> {step['to']:g}", _x(step["batch_ratio"]),
                              _x(step["throughput_ratio"]), f"{step['efficiency']:.2f}"])
            _print(console, ["batch", "batch x", "throughput x", "efficiency"], cells)
        line(f"efficiency = log(throughput x) / log(batch x): 1 is linear growth; threshold {sat.threshold:.2f}; "
             + (f"saturated from batch {sat.saturated_at}" if sat.saturated_at is not None
                else "not saturated in this sweep")
             + f"; 90% of the best throughput from batch {_int(sat.knee_batch)}")

    if result.layers:
        layers = sorted(result.layers, key=lambda layer: layer.ms, reverse=True)
        total = sum(layer.ms for layer in layers)
        at = f" at batch {result.layer_batch}" if result.layer_batch is not None else ""
        line("")
        line(f"top {min(TOP_LAYERS, len(layers))} layers{at}, by time:")
        _print(console, ["#", "layer", "nodes", "tactic", "precision", "ms", "share"],
               [[str(layer.index), layer.name, _clip(", ".join(layer.nodes), 40), layer.tactic, layer.precision,
                 f"{layer.ms:.4f}", f"{100 * layer.share:.1f}%"] for layer in layers[:TOP_LAYERS]], optional={"nodes"})
        line(f"total {total:.4f} ms over {len(layers)} layers{at} (layer by layer, no CUDA graph)")


def write_json(result: BenchResult, path: str | os.PathLike[str]) -> None:
    """Every number of the result as JSON (inf and nan as strings), written atomically."""
    data = (json.dumps(result.to_json(), indent=1) + "\n").encode()
    write_atomically(path, lambda handle: handle.write(data))


def plot(result: BenchResult, path: str | os.PathLike[str]) -> None:
    """Latency and throughput against batch size, one line per target, as a PNG written atomically.
    Uses the Agg canvas directly, so pyplot's global state (and any interactive backend) is untouched."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import NullLocator
    except ImportError as error:
        raise KilnError("plotting needs matplotlib: pip install 'matplotlib>=3.8' (or leave out the plot)") from error

    figure = Figure(figsize=(12, 4.8), layout="constrained")
    FigureCanvasAgg(figure)
    latency_ax, throughput_ax = figure.subplots(1, 2)
    for target in _ordered_targets(result):
        points = [(row.batch, row.best) for row in result.rows
                  if row.target == target and row.error is None and row.best is not None]
        if not points:
            continue
        points.sort(key=lambda p: p[0])
        batches = [b for b, _ in points]
        end_to_end = any(run.compute_ms is None for _, run in points)
        label = target + (" (end to end)" if end_to_end else "")
        latency_ax.plot(batches, [_latency(run).median for _, run in points], marker="o", label=label)
        throughput_ax.plot(batches, [run.samples_per_s for _, run in points], marker="o", label=label)
    batches = result.batches
    for ax, ylabel in ((latency_ax, "median latency (ms)"), (throughput_ax, "throughput (samples/s)")):
        ax.set_xscale("log", base=2)
        if batches:
            ax.set_xticks(batches, [str(b) for b in batches])
            ax.xaxis.set_minor_locator(NullLocator())
            if len(batches) == 1:
                ax.set_xlim(batches[0] / 2, batches[0] * 2)
        ax.set_xlabel("batch size")
        values = [y for line in ax.get_lines() for y in line.get_ydata() if y > 0]
        if values and max(values) > LOG_SPAN * min(values):  # a CPU peer beside GPU targets: orders of magnitude apart
            ax.set_yscale("log")
            ylabel += ", log scale"
        else:
            ax.set_ylim(bottom=0)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    latency_ax.set_title("latency (compute where GPU-timed)")
    throughput_ax.set_title("throughput")
    figure.suptitle(f"{os.path.basename(result.model)} on {_where(result)}")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    data = buffer.getvalue()
    write_atomically(path, lambda handle: handle.write(data))


def _print(console: Console, columns: list[str], rows: list[list[str]], optional=()) -> list[str]:
    """``kiln.tables.print_table`` with text columns on the left and numbers on the right."""
    return print_table(console, [Column(c, numeric=c not in LEFT, optional=c in optional) for c in columns], rows)


def _diff(value: float | None, ok: bool | None) -> str:
    """A max rel diff, ``!`` after it when some element is beyond the tolerance."""
    return "-" if value is None else f"{value:.1e}" + ("!" if ok is False else "")


def _ordered_targets(result: BenchResult) -> list[str]:
    targets = result.targets
    return ([KILN] if KILN in targets else []) + [t for t in targets if t != KILN]


def _where(result: BenchResult) -> str:
    return f"{result.device} ({result.gpu})" if result.gpu else result.device


def _latency(run: Run) -> Stats:
    return run.compute_ms or run.latency_ms


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:#.3g}"


def _rate(value: float) -> str:
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _int(value: float | None, none: str = "-") -> str:
    return none if value is None else str(int(value))

