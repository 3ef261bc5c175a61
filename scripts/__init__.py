"""Brain-age prediction with a semi-supervised diffusion autoencoder (Ijishakin et al.).

The package the bundle's configs import: one module per concern (see ``docs/model_zoo.md``). Submodules
load on first use, so a config needs only ``$import scripts`` to refer to ``scripts.losses.X``.
"""

import importlib


def __getattr__(name: str):
    if name.startswith("_"):
        raise AttributeError(name)
    try:
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name == f"{__name__}.{name}":
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
        raise
