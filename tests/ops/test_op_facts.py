"""Op facts are declared at registration (kiln.ops.registry) with the values the builder, engine and
doctor tabled before (builder/build.py SHAPE_INPUTS, METADATA_OPS, _NOT_FOLDABLE; engine.py _FLAG_OPS;
tactics/node.py HOST_INPUTS, ACCUMULATE_FP32, PARAMETER_INPUTS; doctor.py HOST_READS, CONTROL_FLOW,
SEQUENCE_OPS, DATA_DEPENDENT; passes/fold_constants.py's sequence ops)."""

import pytest

from kiln.ops import OpFacts, op_facts, registered_ops, registry


@pytest.mark.parametrize("op, expected", [
    ("Reshape", OpFacts(shape_inputs=(1,), host_inputs=(1,), host_reads=(1,))),
    ("Slice", OpFacts(shape_inputs=(1, 2, 3, 4), host_inputs=(1, 2, 3, 4), host_reads=(1, 2, 3, 4))),
    ("Resize", OpFacts(shape_inputs=(1, 2, 3), host_inputs=(2, 3), host_reads=(1, 2, 3), parameter_inputs=(1, 2))),
    ("Range", OpFacts(shape_inputs=(0, 1, 2), host_reads=(0, 1, 2), parameter_inputs=(0, 1, 2))),
    ("Gather", OpFacts(shape_inputs=(1,))),
    ("ReduceSum", OpFacts(shape_inputs=(1,), host_inputs=(1,), host_reads=(1,))),
    ("ReduceL2", OpFacts(host_inputs=(1,), host_reads=(1,), accumulate_fp32=True)),
    ("ReduceProd", OpFacts(shape_inputs=(1,), host_inputs=(1,), host_reads=(1,), accumulate_fp32=True)),
    ("Softmax", OpFacts(accumulate_fp32=True)),
    ("Einsum", OpFacts(reads_torch_flags=True, accumulate_fp32=True)),
    ("Trilu", OpFacts(host_inputs=(1,), host_reads=(1,))),
    ("Shape", OpFacts(metadata=True)),
    ("Size", OpFacts(metadata=True)),
    ("RandomNormal", OpFacts(random=True)),
    ("Dropout", OpFacts(random=True)),
    ("MatMul", OpFacts(reads_torch_flags=True)),
    ("Conv", OpFacts(reads_torch_flags=True)),
    ("Loop", OpFacts(reads_torch_flags=True, control_flow=True)),
    ("SequenceMap", OpFacts(reads_torch_flags=True, control_flow=True, sequence=True)),
    ("SplitToSequence", OpFacts(sequence=True)),
    ("OptionalGetElement", OpFacts(optional=True)),
    ("NonZero", OpFacts(data_dependent=True)),
    ("Relu", OpFacts()),
    ("Add", OpFacts()),
])
def test_facts_equal_the_former_tables(op, expected):
    assert op_facts(op) == expected
    assert op_facts(op, "ai.onnx") == expected


def test_unknown_op_has_no_facts():
    assert op_facts("NoSuchOp") == OpFacts()
    assert op_facts("NoSuchOp", None) == OpFacts()


def test_domain_none_finds_the_op_in_any_domain():
    assert op_facts("Reshape", None) == op_facts("Reshape")
    assert op_facts("FusedConv", None) == op_facts("FusedConv", "ai.kiln") == OpFacts(reads_torch_flags=True)
    assert op_facts("FusedAttention", None).reads_torch_flags
    assert op_facts("FusedConv") == OpFacts()  # not an ai.onnx op


def test_reads_torch_flags_equals_the_engines_former_table():
    former = {"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "Attention", "RNN", "GRU", "LSTM", "MatMulInteger",
              "ConvInteger", "QLinearMatMul", "QLinearConv", "If", "Loop", "Scan", "SequenceMap", "DFT", "STFT",
              "FusedConv", "FusedAttention"}
    # FusedGemm came with the fusion passes: its reference op multiplies matrices, as Gemm does
    assert {name for _, name in registered_ops() if op_facts(name, None).reads_torch_flags} == former | {"FusedGemm"}


def test_facts_declared_twice_differently_are_refused(monkeypatch):
    monkeypatch.setattr(registry, "_TABLE", {})  # a scratch op table: the real one stays as it is
    monkeypatch.setattr(registry, "_FACTS", {})
    register = registry.register
    register("TestFactsOp", since=1, domain="test.facts", metadata=True)(lambda op, x: x)
    register("TestFactsOp", since=2, domain="test.facts")(lambda op, x: x)  # no facts: keeps the first
    assert op_facts("TestFactsOp", "test.facts") == OpFacts(metadata=True)
    with pytest.raises(ValueError, match="facts declared twice"):
        register("TestFactsOp", since=3, domain="test.facts", random=True)(lambda op, x: x)
