"""Graph passes: each performance rule of the playbook as a checked rewrite of the ONNX IR, one module
per pass, named after what it does.

``kiln.passes.framework`` defines what a pass is (``Pass``, ``PassContext``, ``Finding``), registers
the passes and runs them in ``ORDER`` (``run_passes``, ``find_all``); ``kiln.passes.rewriting`` holds
what the passes use to read and edit the graph.
"""
