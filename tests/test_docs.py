"""The documentation site builds without a warning, and every public docstring is complete."""

import inspect
import os
import subprocess
import sys

import pytest

import keras_aaren
from keras_aaren import ops, streaming

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PUBLIC = {
    **{name: getattr(keras_aaren, name) for name in ("Aaren", "AarenCell", "AarenBlock")},
    "AarenBlockCell": keras_aaren.AarenBlockCell,
    **{name: getattr(ops, name) for name in ops.__all__ if name != "METHODS"},
    **{
        name: getattr(streaming, name)
        for name in (
            "to_streaming",
            "reset_states",
            "get_states",
            "set_states",
            "save_states",
            "load_states",
            "make_step_model",
            "initial_states",
            "make_step_function",
            "export_saved_model",
            "export_tflite",
        )
    },
}


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_docstring_has_every_section(name):
    obj = PUBLIC[name]
    doc = inspect.getdoc(obj) or ""
    # A function without parameters has nothing to list under Args (griffe refuses a made-up one).
    takes_arguments = inspect.isclass(obj) or bool(inspect.signature(obj).parameters)
    sections = ["Args:"] * takes_arguments + ["Returns:", "Examples:"]
    if inspect.isclass(obj):
        sections.append("Call arguments:")
    missing = [section for section in sections if section not in doc]
    assert not missing, f"{name} lacks {missing}"
    # The example is a doctest (the test run executes it with --doctest-modules).
    assert ">>> " in doc.split("Examples:", 1)[1]


def test_api_page_lists_every_public_object():
    with open(os.path.join(ROOT, "docs", "api.md")) as f:
        page = f.read()
    for name, obj in PUBLIC.items():
        assert f"::: {obj.__module__.split('.')[0]}" in page
        assert f"{name}" in page, name


def test_mkdocs_build_strict(tmp_path):
    # --strict turns every warning (a broken link, a docstring griffe cannot parse) into a failure.
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    api = (tmp_path / "api" / "index.html").read_text()
    # The docstrings' equations reach the page as math for MathJax, not as raw dollars.
    assert 'class="arithmatex"' in api
    assert "Aaren" in api and "aaren_scan" in api
