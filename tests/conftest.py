import os

import pytest
import torch

# Without a GPU, Triton kernels run under Triton's interpreter (on CPU tensors), so the CUDA kernels are
# tested in CI too. It must be set before any kernel module is imported (triton.jit reads it then).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Tests are small; two threads match CI's two cores and avoid oversubscription.
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
