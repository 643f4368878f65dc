"""Real text for the trained-model workloads, deterministic and nothing downloaded.

Each kind is read from the standard library of the running Python (CPython, PSF License 2.0), so
it is there wherever s2o runs and the same for a given Python version (reports name the version):

- ``prose``: the English text of the Python Language Reference and library topics that
  ``help()`` shows (``pydoc_data.topics``), topics in sorted order;
- ``code``: the source of a fixed list of standard-library modules, one after the other;
- ``document``: a long structured document: pydoc's plain-text reference pages (NAME,
  DESCRIPTION, CLASSES, FUNCTIONS, DATA sections) of a fixed list of modules, with memory
  addresses and file paths taken out.

``--text-file`` in the benchmarks takes the user's own text instead.
"""

from __future__ import annotations

import importlib
import inspect
import platform
import re
from pathlib import Path

import torch

TEXT_KINDS = ("prose", "code", "document")

# Standard-library modules whose source forms the "code" text (each ~10-100 KB).
_CODE_MODULES = (
    "argparse", "ast", "calendar", "dataclasses", "difflib", "enum", "fractions",
    "functools", "inspect", "pathlib", "shutil", "statistics", "tarfile", "textwrap",
)  # fmt: skip
# Modules whose pydoc pages form the "document" text: no data that depends on the machine.
_DOCUMENT_MODULES = (
    "collections", "itertools", "functools", "re", "json", "datetime", "string", "textwrap",
    "argparse", "typing", "enum", "statistics", "heapq", "bisect", "pathlib", "dataclasses",
)  # fmt: skip

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_FILE_SECTION = re.compile(r"\nFILE\n    [^\n]*\n")


def text_source(kind: str) -> str:
    """One line naming where the text of ``kind`` comes from."""
    python = f"CPython {platform.python_version()} standard library (PSF License 2.0)"
    return {
        "prose": f"Python Language Reference topics (pydoc_data.topics), {python}",
        "code": f"source of {', '.join(_CODE_MODULES)}, {python}",
        "document": f"pydoc reference pages of {', '.join(_DOCUMENT_MODULES)}, {python}",
    }[_check_kind(kind)]


def _check_kind(kind: str) -> str:
    if kind not in TEXT_KINDS:
        raise ValueError(f"text kind must be one of {TEXT_KINDS}, got {kind!r}")
    return kind


def load_text(kind: str) -> str:
    """The text of ``kind`` (see the module docstring)."""
    _check_kind(kind)
    if kind == "prose":
        from pydoc_data.topics import topics

        return "\n\n".join(topics[name] for name in sorted(topics))
    if kind == "code":
        parts = []
        for name in _CODE_MODULES:
            module = importlib.import_module(name)
            parts.append(f"# Lib/{Path(module.__file__).name}\n{inspect.getsource(module)}")
        return "\n\n".join(parts)
    import pydoc

    pages = []
    for name in _DOCUMENT_MODULES:
        page = pydoc.plaintext.document(importlib.import_module(name))
        pages.append(_FILE_SECTION.sub("\n", _ADDRESS.sub("", page)))
    return "\n\n".join(pages)


def text_input_ids(tokenizer, text: str, num_tokens: int, *, name: str = "text") -> torch.Tensor:
    """input_ids [1, num_tokens]: the first tokens of ``text`` as the tokenizer encodes it (with
    the special tokens it adds itself). Raises when the text is shorter: repeating it would plant
    copies that induction heads find trivially."""
    ids = tokenizer(text)["input_ids"]
    if len(ids) < num_tokens:
        raise ValueError(
            f"{name} has {len(ids)} tokens, fewer than the {num_tokens} asked for; "
            "pass a longer text or a shorter length"
        )
    return torch.tensor([ids[:num_tokens]])
