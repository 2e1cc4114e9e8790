"""Hardware measurement: targets (``fxadapt.hw.target``), per-layer latency lookup tables (``lut``), a
simulated target (``sim``), latency prediction (``predictor``) and benchmarking (``bench``).

The latency keys live with the ops (``fxadapt.ops.latency_keys``) and the latency solve with planning
(``fxadapt.planning.latency``); ``hw`` sits beside ``planning`` and imports nothing above it."""
