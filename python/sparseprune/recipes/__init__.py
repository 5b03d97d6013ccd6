"""End-to-end recipes: prune a real model with :func:`sparseprune.distill`, evaluate, convert, time.

``python -m sparseprune.recipes.minilm --help``: all-MiniLM-L6-v2 on Wikipedia summaries.
``python -m sparseprune.recipes.digits --help``: a small CNN on scikit-learn's digits.
"""

import os as _os

_TITLE = "# Accuracy recovery with `sp.distill`\n\nTables written by the recipes in `sparseprune.recipes` (not typed by hand).\n"


def write_section(path: str, name: str, text: str) -> None:
    """Replace the ``name`` section of the markdown file ``path`` (between ``<!-- name -->`` and
    ``<!-- /name -->``), or append it; other sections are kept."""
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    body = open(path, encoding="utf-8").read() if _os.path.exists(path) else _TITLE
    block = f"{start}\n{text.rstrip()}\n{end}"
    if start in body and end in body:
        body = body[:body.index(start)] + block + body[body.index(end) + len(end):]
    else:
        body = body.rstrip() + "\n\n" + block + "\n"
    _os.makedirs(_os.path.dirname(_os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(body)


def read_section(path: str, name: str) -> str:
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    if not _os.path.exists(path):
        return ""
    body = open(path, encoding="utf-8").read()
    if start not in body or end not in body:
        return ""
    return body[body.index(start) + len(start):body.index(end)].strip()
