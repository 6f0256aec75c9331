"""Griffe extension: a class docstring's `Call arguments:` section, listed like its `Args:`.

Keras documents what a layer's `call` takes under `Call arguments:`, a title that griffe's Google
parser does not know: it keeps the section as an admonition, and the argument lines run together
into one paragraph. This extension reads that section the way griffe reads `Args:`, one item per
argument (name, then description), so the API reference lists both sections alike.
"""

import griffe

TITLE = "Call arguments"


class CallArguments(griffe.Extension):
    def on_class(self, *, cls, **kwargs):
        if cls.docstring is None:
            return
        sections = cls.docstring.parsed
        for index, section in enumerate(sections):
            if not (
                isinstance(section, griffe.DocstringSectionAdmonition) and section.title == TITLE
            ):
                continue
            body = "\n".join(
                f"    {line}" if line else "" for line in section.value.contents.splitlines()
            )
            # A docstring of its own, with no parent: the call's arguments are not the class's, so
            # griffe must not match them against the constructor's signature.
            # (The empty first line keeps the body indented under its title: griffe dedents the
            # lines after a docstring's first by their common indentation.)
            (args,) = griffe.Docstring(f"\nArgs:\n{body}").parse(
                griffe.Parser.google, warnings=False
            )
            sections[index] = griffe.DocstringSectionParameters(args.value, title=f"{TITLE}:")
