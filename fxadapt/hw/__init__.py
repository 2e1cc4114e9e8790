"""Hardware-aware adaptation: targets, per-layer latency lookup tables, latency prediction, latency
budgets and benchmarking (``fxadapt.hw.target``, ``lut``, ``latency``, ``predictor``, ``bench``).

Kept import-free so the op registry can import ``fxadapt.hw.keys`` without a cycle."""
