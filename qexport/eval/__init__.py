"""Evaluation: simulated quantization in torch, activation error along trajectories, fidelity metrics."""
