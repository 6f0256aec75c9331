// MathJax reads the \( \) and \[ \] delimiters that pymdownx.arithmatex (generic mode) emits for
// the $...$ and $$...$$ in the pages and in the docstrings.
window.MathJax = {
  tex: {
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true,
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex",
  },
};

// MathJax typesets the page it is loaded with by itself. Material's document$ replays that page
// to each subscriber, then emits each page that instant navigation swaps in: only those need a
// fresh typeset. Clearing the output cache after MathJax's own typeset would drop the glyphs' CSS
// and find no TeX left to typeset again, leaving every formula blank.
let loadedPage = true;
document$.subscribe(() => {
  if (loadedPage) {
    loadedPage = false;
    return;
  }
  MathJax.startup.output.clearCache();
  MathJax.typesetClear();
  MathJax.texReset();
  MathJax.typesetPromise();
});
