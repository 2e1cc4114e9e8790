import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

# Test tensors are tiny: one intra-op thread is ~100x faster than two on a shared 2-core machine.
torch.set_num_threads(1)

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _cache_dir(tmp_path_factory):
    """Latency tables the tests measure go to a temporary folder, never the user's ~/.cache/fxadapt."""
    mp = pytest.MonkeyPatch()
    mp.setenv("FXADAPT_CACHE_DIR", str(tmp_path_factory.mktemp("fxadapt-cache")))
    yield
    mp.undo()
