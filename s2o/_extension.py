"""Loads s2o._C, the compiled extension (it registers the ops and their kernels); when it does not
load, the error says which torch it was built against and how to rebuild it against the installed
one."""

import torch


def load() -> None:
    try:
        from . import _C  # noqa: F401
    except (ImportError, OSError) as error:
        try:
            from ._build_torch import TORCH_VERSION as built
        except ImportError:
            built = "unknown"
        raise ImportError(
            f"s2o's extension does not load with the installed torch {torch.__version__} (it was "
            f"built against torch {built}): {error}\nRebuild it against this torch: "
            "pip install --no-build-isolation -e .  (without --no-build-isolation pip compiles "
            "against a torch it downloads for the build)"
        ) from error


load()
