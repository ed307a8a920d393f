"""Tactics: the implementations the builder chooses between, one class per implementation.

:mod:`~kiln.builder.tactics.base` defines a tactic and the decorators that register one; each
family module (``gemm``, ``conv``, ``attention``, ``norm``, ``pointwise``, ``node``) holds one
layer kind's tactics; :mod:`~kiln.builder.tactics.registry` loads the families and answers lookups.
"""
