"""Reference implementations of ONNX ops, one registered function per op and opset range.

Importing this package registers every op module below.
"""

from kiln.ops import (  # noqa: F401 - importing registers the ops
    attention,
    cast,
    control_flow,
    image,
    kiln_domain,
    math,
    misc,
    nn,
    quantize,
    reduce,
    rnn,
    strings,
    tensor,
)
from kiln.ops.registry import OpContext, OpFacts, lookup, op_facts, register, registered_ops

__all__ = ["OpContext", "OpFacts", "lookup", "op_facts", "register", "registered_ops"]
