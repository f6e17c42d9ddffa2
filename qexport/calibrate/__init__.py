"""Calibration: FP32 sampling trajectories → per-time-step activation statistics per site."""
