"""Search: the elastic supernet, DNA (differentiable) and Network Adjustment (FUR) strategies."""
