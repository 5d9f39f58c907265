"""Partitioning: meshes, Pope et al. layouts, hardware profiles, the analytical cost model, the planner."""
