"""The documentation site builds without a warning, renders in a browser, and every public docstring
is complete."""

import html.parser
import http.server
import importlib
import inspect
import os
import re
import shutil
import subprocess
import sys
import threading

import keras
import pytest

import keras_aaren
from keras_aaren import distribution, ops, packing, streaming

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PUBLIC = {
    **{name: getattr(keras_aaren, name) for name in ("Aaren", "AarenCell", "AarenBlock")},
    "AarenBlockCell": keras_aaren.AarenBlockCell,
    **{name: getattr(ops, name) for name in ops.__all__ if name != "METHODS"},
    **{name: getattr(streaming, name) for name in streaming.__all__},
    **{name: getattr(packing, name) for name in packing.__all__},
    **{name: getattr(distribution, name) for name in distribution.__all__},
}

CHROMIUM = shutil.which("chromium")
# CI must not pass by skipping the browser checks: there a missing Chromium is a failure.
IN_CI = os.environ.get("CI", "").lower() not in ("", "0", "false")


def api_identifiers():
    """The `::: identifier` lines of docs/api.md, in order."""
    with open(os.path.join(ROOT, "docs", "api.md")) as f:
        return re.findall(r"^::: (\S+)$", f.read(), flags=re.MULTILINE)


def resolve(identifier):
    """The object a dotted identifier names, imported the way griffe reads it: module, then
    attribute."""
    module, _, name = identifier.rpartition(".")
    return getattr(importlib.import_module(module), name)


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_public_docstring_has_every_section(name):
    obj = PUBLIC[name]
    doc = inspect.getdoc(obj) or ""
    # A function without parameters has nothing to list under Args (griffe refuses a made-up one).
    takes_arguments = inspect.isclass(obj) or bool(inspect.signature(obj).parameters)
    sections = ["Args:"] * takes_arguments + ["Examples:"]
    # A layer documents its call as Keras' layers do; a function what it returns; other classes
    # (the packed data and its PyDataset) their constructor's arguments.
    if inspect.isclass(obj) and issubclass(obj, keras.layers.Layer):
        sections += ["Call arguments:", "Returns:"]
    elif not inspect.isclass(obj):
        sections.append("Returns:")
    missing = [section for section in sections if section not in doc]
    assert not missing, f"{name} lacks {missing}"
    # The example is a doctest (the test run executes it with --doctest-modules).
    assert ">>> " in doc.split("Examples:", 1)[1]


def test_api_page_lists_every_public_object_once():
    # One entry per object, by the public name users import (`keras_aaren.ops.aaren_scan`, not
    # the module that defines it), so that moving code between modules keeps the page.
    identifiers = api_identifiers()
    documented = [resolve(identifier) for identifier in identifiers]
    assert len(identifiers) == len(set(identifiers)) == len(PUBLIC)
    missing = [name for name, obj in PUBLIC.items() if not any(obj is d for d in documented)]
    assert not missing, f"docs/api.md lacks {missing}"


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    site_dir = tmp_path_factory.mktemp("site")
    # --strict turns every warning (a broken link, a docstring griffe cannot parse) into a failure.
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return site_dir


def site_pages(site_dir):
    pages = [site_dir / "index.html", *sorted(site_dir.glob("*/index.html"))]
    return [page for page in pages if page.parent.name not in ("search", "assets")]


def test_mkdocs_build_strict(site):
    api = (site / "api" / "index.html").read_text()
    # The docstrings' equations reach the page as math for MathJax, not as raw dollars.
    assert 'class="arithmatex"' in api
    assert "Aaren" in api and "aaren_scan" in api
    # The pages need no network: every script is one the site serves itself.
    for page in site_pages(site):
        remote = re.findall(r'<script[^>]* src="(https?:[^"]*)"', page.read_text())
        assert not remote, f"{page.relative_to(site)} loads {remote}"


# Added to each page the test serves: once the page's own scripts are done, it writes on <html>
# how many of MathJax's glyphs the browser would draw as nothing (no ::before content).
PROBE = b"""<script>
window.addEventListener("load", () => setTimeout(() => {
  const glyphs = Array.from(document.querySelectorAll("mjx-c"));
  const blank = glyphs.filter((glyph) => getComputedStyle(glyph, "::before").content === "none");
  document.documentElement.dataset.probeGlyphs = glyphs.length;
  document.documentElement.dataset.probeBlankGlyphs = blank.length;
}, 5000));
</script>"""


class RenderedPage(html.parser.HTMLParser):
    """What the checks need from a page's DOM after its scripts ran, gathered in one pass."""

    VOID = {
        "area",
        "base",
        "br",
        "col",
        "embed",
        "hr",
        "img",
        "input",
        "link",
        "meta",
        "source",
        "track",
        "wbr",
    }
    # Text inside these is code, markup or MathJax's output, not prose a reader sees as written.
    NOT_PROSE = {"code", "pre", "script", "style", "mjx-container", "math", "textarea"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.stack = []  # [tag, classes, {"rendered": bool}] of the open elements
        self.headings = []  # ids of the API entries' headings
        self.heading = None  # the last of them
        self.code_blocks = []  # (heading, class of the block's parent, text) for each <pre>
        self.prose = []
        self.blockquote_text = []
        self.arithmatex = []  # one {"rendered": bool} per element MathJax was to typeset
        self.probe = {}  # what the probe script (PROBE) wrote on <html>
        self._pre = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        if "doc-heading" in classes and attrs.get("id"):
            self.heading = attrs["id"]
            self.headings.append(self.heading)
        if tag == "pre":
            parent = self.stack[-1][1] if self.stack else []
            self._pre = [self.heading, " ".join(parent), []]
        if tag == "mjx-container":
            for _, open_classes, state in self.stack:
                if "arithmatex" in open_classes:
                    state["rendered"] = True
        if tag == "html":
            self.probe = {k: v for k, v in attrs.items() if k.startswith("data-probe-")}
        state = {"rendered": False}
        if "arithmatex" in classes:
            self.arithmatex.append(state)
        if tag not in self.VOID:
            self.stack.append([tag, classes, state])

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        while self.stack:
            open_tag = self.stack.pop()[0]
            if open_tag == tag:
                break
        if tag == "pre" and self._pre is not None:
            heading, parent, text = self._pre
            self.code_blocks.append((heading, parent, "".join(text)))
            self._pre = None

    def handle_data(self, data):
        tags = [tag for tag, _, _ in self.stack]
        if self._pre is not None:
            self._pre[2].append(data)
        if "blockquote" in tags:
            self.blockquote_text.append(data)
        if not self.NOT_PROSE.intersection(tags):
            self.prose.append(data)


@pytest.fixture(scope="module")
def render(site, tmp_path_factory):
    """Opens a page of the built site in headless Chromium; returns its DOM after MathJax ran."""
    if CHROMIUM is None:
        message = "the rendering checks need Chromium (apt-get install chromium)"
        if IN_CI:
            pytest.fail(f"{message}, and CI must run them")
        pytest.skip(message)

    # Served over HTTP rather than file://, where the browser would not fetch MathJax's fonts.
    class Site(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(site), **kwargs)

        def do_GET(self):
            path = self.translate_path(self.path)
            if os.path.isdir(path):
                path = os.path.join(path, "index.html")
            if not (path.endswith(".html") and os.path.isfile(path)):
                return super().do_GET()
            with open(path, "rb") as f:
                body = f.read().replace(b"</body>", PROBE + b"</body>")
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Site)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    profile = tmp_path_factory.mktemp("chromium-profile")
    rendered = {}

    def open_page(path):
        if path not in rendered:
            result = subprocess.run(
                [
                    CHROMIUM,
                    "--headless",
                    "--no-sandbox",
                    "--disable-gpu",
                    "--disable-quic",
                    "--no-first-run",
                    "--disable-background-networking",
                    "--disable-component-update",
                    "--disable-sync",
                    f"--user-data-dir={profile}",
                    # Virtual time runs the page's timers and promises (MathJax's typesetting)
                    # to completion before the DOM is dumped.
                    "--virtual-time-budget=15000",
                    "--dump-dom",
                    f"http://127.0.0.1:{server.server_address[1]}/{path}",
                ],
                capture_output=True,
                text=True,
                timeout=180,
            )
            assert result.returncode == 0 and "</html>" in result.stdout, result.stderr[-3000:]
            page = RenderedPage()
            page.feed(result.stdout)
            page.close()
            rendered[path] = page
        return rendered[path]

    yield open_page
    server.shutdown()
    server.server_close()


def check_math_rendered(page):
    # Every $...$ and $$...$$ became MathJax output; none is left as TeX in the text.
    assert page.arithmatex, "no math on the page"
    assert all(state["rendered"] for state in page.arithmatex), (
        f"{sum(not s['rendered'] for s in page.arithmatex)} of {len(page.arithmatex)} formulas "
        "were not typeset"
    )
    prose = "".join(page.prose)
    for delimiter in ("\\(", "\\[", "$$"):
        assert delimiter not in prose, (
            f"raw {delimiter!r} near {prose[prose.find(delimiter) - 80 :][:160]!r}"
        )
    # MathJax draws each glyph as the content of a CSS ::before rule: a formula whose rules are
    # gone (as when its output cache is cleared after the page was typeset) takes space on the
    # page but shows nothing.
    assert int(page.probe["data-probe-glyphs"]) > 0, page.probe
    assert page.probe["data-probe-blank-glyphs"] == "0", page.probe


def test_api_page_renders(render):
    page = render("api/")
    check_math_rendered(page)
    # Each public object's entry shows its example as a highlighted doctest block.
    examples = {
        heading
        for heading, parent, text in page.code_blocks
        if "highlight" in parent.split() and text.lstrip().startswith(">>> ")
    }
    missing = [identifier for identifier in api_identifiers() if identifier not in examples]
    assert len(api_identifiers()) == len(PUBLIC)
    assert not missing, f"no highlighted example for {missing}"
    # A doctest left as text becomes nested blockquotes (Markdown reads `>>>` as quote markers).
    quoted = "".join(page.blockquote_text)
    assert ">>>" not in quoted and "import " not in quoted, quoted[:300]
    # Only the documented objects: a layer's methods and properties are not public API.
    assert page.headings == api_identifiers()


def test_every_page_with_math_renders_it(site, render):
    pages = [page for page in site_pages(site) if 'class="arithmatex"' in page.read_text()]
    assert len(pages) >= 2  # the math page and the API reference at least
    for path in pages:
        relative = path.parent.relative_to(site).as_posix()
        check_math_rendered(render("" if relative == "." else f"{relative}/"))
