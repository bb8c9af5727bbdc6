"""Dynamical interpretability of teachers and students (depth as time) and the run report."""
