"""Partitioning: meshes, Pope et al. layouts, hardware profiles, the analytical cost model, the planner.

This package is built on jaxinfer's vocabulary (`jaxinfer.axes`, `jaxinfer.config`,
`jaxinfer.sharding`), and jaxinfer's API runs the plans made here (`partitioning.execution`): the
two packages import each other. `jaxinfer` is initialized first, whichever of their modules a
program imports first, so that neither package ever meets a half-initialized module of the other
(`tests/test_imports.py`).
"""

import jaxinfer  # noqa: F401  (initialization order: see the module docstring)
