"""``kiln demo`` / ``make demo``: the main job end to end on a model the repo generates.

The model is a small image network written with ``onnx.helper`` (conv + BatchNorm + ReLU stem, a
residual block, max pooling, then a LayerNorm + single-head self-attention block over the pixels,
a pooled Gemm classifier): the layer kinds of ResNet and ViT in 26 nodes, with seeded random
weights, so nothing is downloaded. The demo builds an engine of it (on the GPU where there is one,
else the CPU), saves it, runs it, checks its outputs against onnxruntime at the tolerance table's
precision, and prints what the build did (passes and fusions, layers, tactics, precisions) and the
commands to try next.
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
    nodes.append(helper.make_node("MaxPool", ["block.out"], ["pool"], kernel_shape=[2, 2], strides=[2, 2],
                                  name="pool/MaxPool"))
    # Pixels become tokens: [N, C, 16, 16] -> [N, 256, C].
    nodes.append(helper.make_node("Reshape", ["pool", const("tokens.shape", [batch, c, -1])], ["tokens.nchw"],
                                  name="tokens/Reshape"))
    nodes.append(helper.make_node("Transpose", ["tokens.nchw"], ["tokens"], perm=[0, 2, 1], name="tokens/Transpose"))
    nodes.append(helper.make_node("LayerNormalization", ["tokens", weight("ln.gamma", c), weight("ln.beta", c)], ["ln"],
                                  axis=-1, epsilon=1e-5, name="attn/LayerNormalization"))
    for proj in "qkv":
        nodes.append(helper.make_node("MatMul", ["ln", weight(f"attn.w{proj}", c, c, scale=c**-0.5)], [proj],
                                      name=f"attn/MatMul_{proj}"))
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
    """Generate the demo model, build and save its engine, run it, check it against onnxruntime and
    print the report; True if every output is within tolerance."""
    from kiln import BuildConfig, build, compare
    from kiln.atomic_file import write_atomically
    from kiln.device import default_device
    from kiln.inputs import engine_input_values, random_inputs
    from kiln.precision import engine_precision
    from kiln.tables import Column, build_summary, make_console, print_table

    console = make_console()

    def say(text: str = "") -> None:
        console.print(text, markup=False, highlight=False, soft_wrap=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    path, engine_path = out_dir / "demo.onnx", out_dir / "demo.kiln"
    model = make_demo_model()
    model_bytes = model.SerializeToString()
    write_atomically(path, lambda handle: handle.write(model_bytes))
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    console.print(f"[bold]kiln demo[/]: {path}", highlight=False)
    say(f"  {len(model.graph.node)} nodes, opset {OPSET}: " + ", ".join(f"{op} x{n}" for op, n in sorted(ops.items())))

    engine = build(path, BuildConfig(device=default_device()))
    engine.save(engine_path)
    say("")
    say(f"built {engine_path} for {engine.device.type}:")
    assert engine.report is not None  # a built engine carries its build's report
    for line in engine.report.lines:
        say(f"  {line}")
    print_table(console, [Column(""), Column("")], build_summary(engine), header=False)

    feeds = random_inputs(engine_input_values(engine), seed=1)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        outputs = engine.run(feeds)
        times.append(time.perf_counter() - start)
    reference = compare.run_onnxruntime(path, feeds)
    diffs = compare.compare_outputs(outputs, reference, computed_in=engine_precision(engine))
    say("")
    say(f"ran the engine: median {statistics.median(times) * 1e3:.2f} ms over {len(times)} runs at batch "
        f"{feeds['image'].shape[0]}")
    print_table(console, [Column("output"), Column("shape"), Column("max abs diff", numeric=True),
                          Column("max rel diff", numeric=True), Column("atol", numeric=True),
                          Column("rtol", numeric=True), Column("verdict")],
                [[d.name, "x".join(map(str, d.shape)), f"{d.max_abs:.2e}", f"{d.max_rel:.2e}", f"{d.tolerance.atol:g}",
                  f"{d.tolerance.rtol:g}", d.verdict] for d in diffs],
                title="outputs against onnxruntime (CPU), per element |kiln - ort| <= atol + rtol * |ort|")
    ok = all(d.ok for d in diffs)
    console.print("[bold green]demo passed[/]" if ok else "[bold red]demo failed: kiln differs from onnxruntime[/]")
    say("")
    say("next:")
    for command, what in ((f"kiln inspect {engine_path}", "every layer: its nodes, tactic, precision and time"),
                          (f"kiln run {engine_path} --compare onnxruntime --onnx {path}", "run the engine again"),
                          (f"kiln bench {engine_path} --onnx {path} --peers eager,onnxruntime",
                           "latency and throughput beside PyTorch and onnxruntime"),
                          (f"kiln doctor {path}", "every performance rule that applies to the model")):
        say(f"  {command}")
        say(f"      {what}")
    return ok
