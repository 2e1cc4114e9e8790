"""Graph passes of fxadapt, one module each; every pass is ``GraphModule -> PassResult``. ``capture`` (export,
then the ``lift_modules`` pass) lives here too: it is the lowest layer that can lift."""
