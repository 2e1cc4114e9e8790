"""Graph passes of fxadapt, one module each; every pass is ``GraphModule -> PassResult``."""
