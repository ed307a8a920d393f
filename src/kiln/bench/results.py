"""What ``kiln bench`` measured, as plain dataclasses: the terminal table, the JSON file and the plot
are all drawn from one ``BenchResult`` (``to_json`` gives every number)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass
class Stats:
    """Milliseconds over the timed iterations of one run."""

    count: int
    min: float
    mean: float
    median: float
    p90: float
    p95: float
    p99: float

    @staticmethod
    def of(samples: list[float]) -> Stats:
        """Percentiles by linear interpolation between the closest ranks (numpy's default)."""
        if not samples:
            raise ValueError("no samples")
        ordered = sorted(samples)

        def pct(q: float) -> float:
            pos = (len(ordered) - 1) * q / 100
            lo, hi = math.floor(pos), math.ceil(pos)
            return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)

        return Stats(len(ordered), ordered[0], sum(ordered) / len(ordered), pct(50), pct(90), pct(95), pct(99))


@dataclass
class Run:
    """One timed run of one target at one batch size.

    ``latency_ms`` is end to end per iteration: on a GPU, host-to-device copies of the inputs +
    compute + device-to-host copies of the outputs (CUDA events), with each part also given alone
    (``h2d_ms``, ``compute_ms``, ``d2h_ms``), as trtexec reports them; on the CPU (or a peer with no
    GPU timing, such as onnxruntime's CPU provider) it is the host wall time of one call and the GPU
    parts are None. ``enqueue_ms`` is the host time to issue one iteration (GPU targets).
    Throughput comes from the wall time of all iterations."""

    latency_ms: Stats
    compute_ms: Stats | None
    h2d_ms: Stats | None
    d2h_ms: Stats | None
    enqueue_ms: Stats | None
    iterations: int
    wall_s: float
    inferences_per_s: float
    samples_per_s: float
    peak_memory_bytes: int | None = None


@dataclass
class Row:
    """One target (kiln, or a peer) at one batch size: the measurement repeated (``runs``, two by
    default) and how far the repeats disagree (``spread``: |median a - median b| / mean of them, of
    the compute latency where there is one, else of the end-to-end latency). ``max_rel_diff``: the
    largest max|out - kiln| / max|kiln| over the outputs (None for kiln itself). ``ref_rel_diff``:
    the largest max|out - ref| / max|ref|, ref being the ONNX model on kiln's reference executor in
    the model's own precision (kiln included; None where there is no reference): with both, a
    difference shows who is wrong, kiln or the peer. ``diff_ok`` / ``ref_ok``: the verdicts of those
    two comparisons, per element within ``atol + rtol * |other|`` (``kiln.precision``; None where
    there was no comparison). ``error``: why the target could not run here (then ``runs`` is empty)."""

    target: str
    batch: int
    runs: list[Run] = field(default_factory=list)
    spread: float | None = None
    max_rel_diff: float | None = None
    error: str | None = None
    ref_rel_diff: float | None = None
    diff_ok: bool | None = None
    ref_ok: bool | None = None

    @property
    def best(self) -> Run | None:
        """The run with the lower median latency (what tables and plots show)."""
        if not self.runs:
            return None
        return min(self.runs, key=lambda r: (r.compute_ms or r.latency_ms).median)


@dataclass
class Saturation:
    """Where throughput stops growing in proportion to the batch. Each step compares two
    consecutive batch sizes: ``efficiency`` = log(throughput ratio) / log(batch ratio), 1 when
    throughput grows as fast as the batch, 0 when it does not grow. ``saturated_at``: the first
    batch after which a step's efficiency falls below the threshold (None: never). ``knee_batch``:
    the smallest batch reaching 90% of the best throughput."""

    verdict: str
    saturated_at: int | None
    knee_batch: int | None
    threshold: float
    steps: list[dict[str, float]] = field(default_factory=list)


@dataclass
class LayerTime:
    """One engine layer in the per-layer profile: mean time per run and its share of the total."""

    index: int
    name: str
    kind: str
    nodes: list[str]
    tactic: str
    precision: str
    ms: float
    share: float


@dataclass
class BenchResult:
    model: str
    device: str
    gpu: str | None
    date: str
    command: str
    versions: dict[str, str]
    config: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    saturation: Saturation | None = None
    layers: list[LayerTime] | None = None
    layer_batch: int | None = None
    notes: list[str] = field(default_factory=list)

    def row(self, target: str, batch: int) -> Row | None:
        return next((r for r in self.rows if r.target == target and r.batch == batch), None)

    @property
    def targets(self) -> list[str]:
        """kiln first, then the peers in the order they were measured."""
        seen: list[str] = []
        for row in self.rows:
            if row.target not in seen:
                seen.append(row.target)
        return seen

    @property
    def batches(self) -> list[int]:
        return sorted({row.batch for row in self.rows})

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        for row, out in zip(self.rows, data["rows"]):
            best = row.best
            out["best_run"] = row.runs.index(best) if best is not None else None
        return _finite(data)

    @staticmethod
    def from_json(data: dict[str, Any]) -> BenchResult:
        """The result ``to_json`` gave ``data`` (to merge or redraw results saved by earlier runs)."""
        data = {k: v if k in ("notes", "command", "model") else _floats(v) for k, v in data.items()}

        def run(d: dict[str, Any]) -> Run:
            return _make(Run, {k: _make(Stats, v) if k.endswith("_ms") and v is not None else v for k, v in d.items()})

        rows = [_make(Row, {k: v for k, v in r.items() if k != "runs"}, runs=[run(x) for x in r["runs"]])
                for r in data.get("rows", [])]
        saturation = _make(Saturation, data["saturation"]) if data.get("saturation") else None
        layers = [_make(LayerTime, x) for x in data["layers"]] if data.get("layers") is not None else None
        rest = {k: v for k, v in data.items() if k not in ("rows", "saturation", "layers")}
        return _make(BenchResult, rest, rows=rows, saturation=saturation, layers=layers)


def _make(cls, data: dict[str, Any], **overrides):
    """``cls(**data)`` with only the fields ``cls`` has (``to_json`` adds ``best_run`` to rows)."""
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names}, **overrides)


def _leaves(value: Any, leaf: Callable[[Any], Any]) -> Any:
    """``value`` with ``leaf`` applied to everything inside its dicts and lists."""
    if isinstance(value, dict):
        return {k: _leaves(v, leaf) for k, v in value.items()}
    if isinstance(value, list):
        return [_leaves(v, leaf) for v in value]
    return leaf(value)


def _floats(value: Any) -> Any:
    """The inverse of ``_finite``: "inf", "-inf" and "nan" are floats again."""
    return _leaves(value, lambda v: float(v) if isinstance(v, str) and v in ("inf", "-inf", "nan") else v)


def _finite(value: Any) -> Any:
    """JSON has no inf/nan: they become strings."""
    return _leaves(value, lambda v: str(v) if isinstance(v, float) and not math.isfinite(v) else v)
