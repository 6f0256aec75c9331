"""The Python snippets of the README and the docs run as written."""

import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(__file__))
# The runnable snippets; docs/streaming.md's later blocks write files or need exports, and the
# same calls are covered by tests/test_streaming.py.
SOURCES = {"README.md": None, "docs/index.md": None, "docs/streaming.md": 1}
BLOCKS = [
    (name, i, block)
    for name, limit in SOURCES.items()
    for i, block in enumerate(
        re.findall(
            r"```python\n(.*?)```", open(os.path.join(ROOT, name), encoding="utf-8").read(), re.S
        )[:limit]
    )
]


@pytest.mark.parametrize("name, index, block", BLOCKS, ids=[f"{n}-{i}" for n, i, _ in BLOCKS])
def test_doc_block_runs(name, index, block):
    exec(compile(block, f"{name}[block {index}]", "exec"), {})
