"""The guides' code blocks run as written."""

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"


@pytest.mark.parametrize("page", ["depth_retrieval_in_your_model.md"])
def test_python_blocks_run_in_order(page, tmp_path, monkeypatch):
    """Each page's python blocks run top to bottom in one namespace, as a reader pastes them, in a
    scratch folder (they may write checkpoints)."""
    blocks = re.findall(r"^```python\n(.*?)^```", (DOCS / page).read_text(), flags=re.M | re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for i, block in enumerate(blocks):
        exec(compile(block, f"{page} block {i + 1}", "exec"), namespace)
