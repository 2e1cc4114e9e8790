import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

# Test tensors are tiny: one intra-op thread is ~100x faster than two on a shared 2-core machine.
torch.set_num_threads(1)
