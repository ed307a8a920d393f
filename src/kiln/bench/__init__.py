"""``kiln bench``: trtexec-grade measurement of a kiln engine, with its peers side by side.

``kiln.bench.run`` runs the benchmark (``run_bench``; its docstring says what is measured and how);
``options`` says what to measure, ``batching`` which inputs batch and the inputs at each batch size,
``measure`` times, ``targets`` and ``peers`` are what is timed, ``results`` and ``report`` hold and
show the numbers.
"""
