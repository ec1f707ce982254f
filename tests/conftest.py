import os

import numpy
import pytest
import torch

# Triton kernels run in the interpreter when there is no GPU. This must be set before
# flash_depth's kernel modules are imported (triton.jit reads it at decoration time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")
    if os.environ.get("TRITON_INTERPRET") == "1":
        import triton

        old_triton = tuple(int(x) for x in triton.__version__.split(".")[:2]) < (3, 7)
        if old_triton and tuple(int(x) for x in numpy.__version__.split(".")[:2]) >= (2, 4):
            raise pytest.UsageError(
                f"triton {triton.__version__}'s interpreter fails on numpy {numpy.__version__} (loops with "
                "run-time bounds): install numpy<2.4 or triton>=3.7"
            )


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture()
def corpus(tmp_path):
    """A small text folder for the training and analysis tests."""
    docs = tmp_path / "docs"
    docs.mkdir()
    rng = numpy.random.default_rng(0)
    words = ["depth", "attention", "layer", "token", "residual", "stream", "softmax", "query", "key", "value"]
    for i in range(6):
        (docs / f"d{i}.txt").write_text(" ".join(rng.choice(words, 800)) + "\n")
    return docs
