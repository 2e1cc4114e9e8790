"""Planning: budgets, the data-free width solver, width/depth plans, and the latency solve and predictor
(measured on ``fxadapt.hw`` targets)."""
