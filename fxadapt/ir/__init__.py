"""Capture and IR: lift a model to a trainable ATen-level FX graph; channel-label bookkeeping."""
