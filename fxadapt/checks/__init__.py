"""Verification: the checks every adapted model passes (``verify``: runs, shapes, MACs by an independent
count, budgets, function preservation). Below ``writeback`` and ``pipeline``, which both run them; imports
only the core, ``analysis`` and ``planning``."""
