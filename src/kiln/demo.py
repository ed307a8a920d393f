"""``kiln demo`` / ``make demo``: the main job end to end on a model the repo generates.

The model is a small image network written with ``onnx.helper`` (conv + BatchNorm + ReLU stem, a
residual block, max pooling, then a LayerNorm + single-head self-attention block over the pixels,
a pooled Gemm classifier): the layer kinds of ResNet and ViT in 26 nodes, with seeded random
weights, so nothing is downloaded. The demo loads it, plans it, runs it, checks the outputs against
onnxruntime and prints a short report.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def make_demo_model(batch: int = 2, seed: int = 0) -> onnx.ModelProto:
    rng = np.random.default_rng(seed)
    inits: list[TensorProto] = []
    nodes: list[onnx.NodeProto] = []

    def weight(name: str, *shape: int, scale: float = 0.2) -> str:
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def const(name: str, values: list[int] | np.ndarray, dtype=np.int64) -> str:
        inits.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def conv_bn(x: str, cin: int, cout: int, tag: str, relu: bool) -> str:
        nodes.append(helper.make_node("Conv", [x, weight(f"{tag}.w", cout, cin, 3, 3), weight(f"{tag}.b", cout)],
                                      [f"{tag}.conv"], pads=[1, 1, 1, 1], name=f"{tag}/Conv"))
        bn = [weight(f"{tag}.gamma", cout, scale=0.1), weight(f"{tag}.beta", cout, scale=0.1),
              weight(f"{tag}.mean", cout, scale=0.1)]
        inits.append(numpy_helper.from_array((rng.random(cout) + 0.5).astype(np.float32), f"{tag}.var"))
        nodes.append(helper.make_node("BatchNormalization", [f"{tag}.conv", *bn, f"{tag}.var"], [f"{tag}.bn"],
                                      name=f"{tag}/BatchNormalization"))
        if not relu:
            return f"{tag}.bn"
        nodes.append(helper.make_node("Relu", [f"{tag}.bn"], [f"{tag}.relu"], name=f"{tag}/Relu"))
        return f"{tag}.relu"

    c = 16
    x = conv_bn("image", 3, c, "stem", relu=True)
    y = conv_bn(x, c, c, "block.0", relu=True)
    y = conv_bn(y, c, c, "block.1", relu=False)
    nodes.append(helper.make_node("Add", [y, x], ["block.add"], name="block/Add"))
    nodes.append(helper.make_node("Relu", ["block.add"], ["block.out"], name="block/Relu"))
    nodes.append(helper.make_node("MaxPool", ["block.out"], ["pool"], kernel_shape=[2, 2], strides=[2, 2], name="pool/MaxPool"))
    # Pixels become tokens: [N, C, 16, 16] -> [N, 256, C].
    nodes.append(helper.make_node("Reshape", ["pool", const("tokens.shape", [batch, c, -1])], ["tokens.nchw"], name="tokens/Reshape"))
    nodes.append(helper.make_node("Transpose", ["tokens.nchw"], ["tokens"], perm=[0, 2, 1], name="tokens/Transpose"))
    nodes.append(helper.make_node("LayerNormalization", ["tokens", weight("ln.gamma", c), weight("ln.beta", c)], ["ln"],
                                  axis=-1, epsilon=1e-5, name="attn/LayerNormalization"))
    for proj in "qkv":
        nodes.append(helper.make_node("MatMul", ["ln", weight(f"attn.w{proj}", c, c, scale=c**-0.5)], [proj], name=f"attn/MatMul_{proj}"))
    nodes.append(helper.make_node("Transpose", ["k"], ["kT"], perm=[0, 2, 1], name="attn/Transpose_k"))
    nodes.append(helper.make_node("MatMul", ["q", "kT"], ["scores.raw"], name="attn/MatMul_qk"))
    inits.append(numpy_helper.from_array(np.array(c**-0.5, dtype=np.float32), "attn.scale"))
    nodes.append(helper.make_node("Mul", ["scores.raw", "attn.scale"], ["scores"], name="attn/Mul_scale"))
    nodes.append(helper.make_node("Softmax", ["scores"], ["probs"], axis=-1, name="attn/Softmax"))
    nodes.append(helper.make_node("MatMul", ["probs", "v"], ["attn.out"], name="attn/MatMul_pv"))
    nodes.append(helper.make_node("Add", ["attn.out", "tokens"], ["attn.res"], name="attn/Add"))
    nodes.append(helper.make_node("ReduceMean", ["attn.res"], ["pooled"], axes=[1], keepdims=0, name="head/ReduceMean"))
    nodes.append(helper.make_node("Gemm", ["pooled", weight("head.w", 10, c), weight("head.b", 10)], ["logits"],
                                  transB=1, name="head/Gemm"))
    nodes.append(helper.make_node("Softmax", ["logits"], ["probabilities"], axis=-1, name="head/Softmax"))
    graph = helper.make_graph(
        nodes, "kiln-demo",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, 32, 32])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 10]),
         helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [batch, 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="kiln-demo",
                             ir_version=10)  # onnxruntime >= 1.18 reads IR 10; onnx 1.23 would stamp 14
    onnx.checker.check_model(model, full_check=True)
    return model


def run_demo(out_dir: Path) -> bool:
    """Generate, load, plan, run and check the demo model; print the report; True if it matches."""
    from rich.console import Console
    from rich.table import Table

    from kiln import compare
    from kiln.atomic_file import write_atomically
    from kiln.dtypes import tensor_to_numpy
    from kiln.executor import Executor
    from kiln.inputs import random_inputs
    from kiln.onnx_io import load_model

    console = Console()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "kiln-demo.onnx"
    model_bytes = make_demo_model().SerializeToString()
    write_atomically(path, lambda handle: handle.write(model_bytes))

    t0 = time.perf_counter()
    model = load_model(path)
    t1 = time.perf_counter()
    executor = Executor(model, device="cpu", name=str(path))
    t2 = time.perf_counter()
    feeds = random_inputs(executor.inputs, seed=1)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        outputs = executor.run(feeds)
        times.append(time.perf_counter() - start)
    reference = compare.run_onnxruntime(path, feeds)
    diffs = compare.compare_outputs({k: tensor_to_numpy(v) for k, v in outputs.items()}, reference)

    ops: dict[str, int] = {}
    for node in model.graph:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    console.print(f"[bold]kiln demo[/] - {path}")
    console.print(f"  model : {len(model.graph)} nodes, opset {OPSET}: " + ", ".join(f"{op} x{n}" for op, n in sorted(ops.items())))
    console.print(f"  load  : {(t1 - t0) * 1e3:.1f} ms (checker, shape inference, op coverage)")
    console.print(f"  build : {(t2 - t1) * 1e3:.1f} ms (reference plan: one torch op per node, CPU)")
    console.print(f"  run   : median {statistics.median(times) * 1e3:.2f} ms over {len(times)} runs, batch {feeds['image'].shape[0]}")
    table = Table(title="outputs against onnxruntime (CPU)")
    for column in ["output", "shape", "max abs diff", "max rel diff", "tolerance", "verdict"]:
        table.add_column(column)
    for d in diffs:
        table.add_row(d.name, "x".join(map(str, d.shape)), f"{d.max_abs:.2e}", f"{d.max_rel:.2e}", f"{d.tolerance:g}",
                      "[green]ok[/]" if d.ok else "[red]MISMATCH[/]")
    console.print(table)
    ok = all(d.ok for d in diffs)
    console.print("[bold green]demo passed[/]" if ok else "[bold red]demo failed: kiln differs from onnxruntime[/]")
    return ok
