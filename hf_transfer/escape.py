"""Untrusted text (class names, dataset and model ids, image paths) made to read as itself wherever it is shown.

Class names come from folder names and downloaded datasets, ids and paths from recipes and from model folders made
elsewhere. Shown raw, `<img src=...>` is live HTML in a model card or the demo page, a newline starts a Markdown heading,
a backtick closes a code span and `$...$` is parsed by matplotlib's mathtext (an unbalanced `$\\alpha^$` stops the
figure). Each function makes a string safe for one place; what is stored (config.json's id2label) stays as it is.
YAML front matter needs none of them: it is written by huggingface_hub's ModelCardData (yaml.dump quotes every value);
nor does HTML: the demo writes none itself (Gradio shows labels as text and autoescapes the page title).

This module imports nothing from hf_transfer: `hf-transfer push --space` ships it next to app.py as hf_transfer_escape.py.
"""

from __future__ import annotations

import re

# Shown as escapes: control characters (a newline starts a new Markdown block or terminal line, ESC starts a terminal
# sequence), Unicode's line and paragraph separators, and the bidirectional marks that reorder what is displayed.
_INVISIBLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# CommonMark lets any ASCII punctuation be backslash-escaped; these start inline syntax: escapes, code spans, emphasis,
# GFM strikethrough and tables, links and images, a heading's closing `#`, the Hub's `$math$` and GFM's e-mail
# autolinks (`@`). `<`, `>`, `&` and `"` become entities (HTML, autolinks).
_MARKDOWN_SYNTAX = re.compile(r"([\\`*_~\[\]|#$@])")
_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}
# GFM also links bare `http://...` and `www.example.com`: a backslash before the `:` or `.` stops it.
_URL_AUTOLINK = re.compile(r"(?i):(?=//)|(?<=\bwww)\.")


def one_line(text: object) -> str:
    """text on one line: control characters as their escapes (`\\n`, `\\x1b`, `\\u202e`). For terminals and logs."""
    return _INVISIBLE.sub(lambda found: found.group().encode("unicode_escape").decode("ascii"), str(text))


def markdown(text: object) -> str:
    """text as Markdown inside a line or a table cell, shown as itself: no HTML, link, emphasis, heading or cell break."""
    escaped = _MARKDOWN_SYNTAX.sub(r"\\\1", one_line(text))
    escaped = re.sub('[&<>"]', lambda found: _ENTITIES[found.group()], escaped)
    return _URL_AUTOLINK.sub(lambda found: "\\" + found.group(), escaped)


def markdown_code(text: object) -> str:
    """text as a Markdown code span (monospace, verbatim), fenced by more backticks than any run inside it; CommonMark
    drops the padding space on each side. Not for table cells, where GFM splits a code span at `|`: use `markdown`."""
    text = one_line(text)
    fence = "`" * (max((len(run) for run in re.findall("`+", text)), default=0) + 1)
    pad = " " if not text or text[0] in "` " or text[-1] in "` " else ""
    return f"{fence}{pad}{text}{pad}{fence}"


def plot_text(text: object) -> str:
    """text for a matplotlib title, label or tick label: on one line, every `$` escaped so mathtext never parses it."""
    return one_line(text).replace("$", r"\$")
