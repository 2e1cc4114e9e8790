"""Write-back: the adapted architecture in the user's own module tree (their class, methods, config).

``build.write_back`` applies the verified graph's plan to a deep copy of the user's model as a ``Recipe``
(``recipe.py``: resize tensors, set size attributes, delete/insert/zero residual units, HF config fields),
and checks the result against the graph: a ``WriteBack`` holding the module, or a typed failure
(``NotExpressed``, ``Mismatch``, ``SizeConflict`` with the ``Divergence`` where the model's code reads a
size). ``apply(recipe, fresh_model)`` replays a recipe on a fresh
instance (``fxadapt.load``/``fxadapt.from_pretrained`` use it).
"""

from fxadapt.writeback.build import (
    Failure,
    Mismatch,
    NotExpressed,
    SizeConflict,
    WriteBack,
    WriteBackError,
    WriteBackWarning,
    write_back,
)
from fxadapt.writeback.recipe import Recipe, RecipeError, ZeroBranch, apply

__all__ = ["write_back", "WriteBack", "Failure", "NotExpressed", "Mismatch", "SizeConflict", "WriteBackError",
           "WriteBackWarning", "Recipe", "RecipeError", "ZeroBranch", "apply"]
