"""The guides' code blocks run as written."""

import re
from pathlib import Path

import pytest
import torch

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


def test_readme_30_second_example(capsys):
    """The README's 30-second example runs as written and prints MoDA's error against float64 (CPU:
    float32, so below 1e-5)."""
    readme = (DOCS.parent / "README.md").read_text()
    block = re.search(r"^```python\n(.*?)^```", readme.split("## 30-second example", 1)[1], flags=re.M | re.S)
    exec(compile(block.group(1), "README 30-second example", "exec"), {"__name__": "__docs__"})
    printed = re.fullmatch(r"MoDA \(2, 1024, 16, 64\): relative error against float64 (\S+)\n", capsys.readouterr().out)
    assert printed, "the example prints one line naming the output's shape and its error"
    assert float(printed.group(1)) < (1e-2 if torch.cuda.is_available() else 1e-5)
