"""Experiments over a job spec: the Ray Tune sweep (trials, locks, results) and the stochastic-depth study over a finished sweep."""
