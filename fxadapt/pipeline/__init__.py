"""The pipeline: the pass runner and ``transform`` (capture -> analyze -> plan -> materialize -> verify)."""
