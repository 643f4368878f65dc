"""Integrations of s2o with model libraries.

``s2o.integrations.transformers`` (needs Hugging Face transformers) registers ``"s2o"`` as an
attention implementation when imported. ``patch_llama`` is re-exported here (and as
``s2o.patch_llama``) without importing transformers until it is called, so ``import s2o`` stays
free of that dependency.
"""

from __future__ import annotations


def patch_llama(model, config=None):
    """Route a loaded Llama-style transformers model's attention through s2o, in place.

    Imports :mod:`s2o.integrations.transformers` (registering ``"s2o"``) and calls its
    ``patch_llama``; see there for the mechanism. Returns a handle whose ``.undo()`` restores the
    model; the handle is also a context manager.
    """
    from .transformers import patch_llama as _patch_llama

    return _patch_llama(model, config)


__all__ = ["patch_llama"]
