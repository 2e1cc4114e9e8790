"""IR: a model exported to an ATen-level FX graph (``capture``: export and tidying; the lifting to ``nn``
modules is ``fxadapt.passes.capture``), example inputs, channel-label bookkeeping, the plan data the passes
read (``plan_types``)."""
