"""Tables: activation ranges → per-time-step-group scales and zero points, weight scales, and their file format."""
