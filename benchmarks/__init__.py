"""kiln's measuring scripts, each run as a module from the repository root so they share
``benchmarks.models`` (the models, feeds and export), ``benchmarks.timing`` and ``benchmarks.run_info``:

    PYTHONPATH=src python3 -m benchmarks.builder --out $OUT      # build times, accuracy, kiln vs eager vs compile
    PYTHONPATH=src python3 -m benchmarks.passes --out $OUT       # engines with each pass left out
    PYTHONPATH=src python3 -m benchmarks.runtime --out $OUT      # contexts, CUDA graphs, streams, profiles
    PYTHONPATH=src python3 -m benchmarks.zoo --out $OUT          # the model-zoo section of BENCHMARKS.md
    PYTHONPATH=src python3 -m benchmarks.third_party run ...     # third-party ONNX files, kiln vs onnxruntime
"""
