"""dam-mergekit: Defense-Aware Merging (DAM, Yang et al., ICLR 2025) as a mergekit merge method.

Importing this package is cheap on purpose (the ``.pth`` start-up hook imports it in every Python
process): torch and mergekit are imported only when a public name that needs them is used.
"""

from __future__ import annotations

__version__ = "0.1.0"

# public name -> module that defines it (imported on first use)
_LAZY = {
    "register_methods": "dam_mergekit.method",
    "DamMerge": "dam_mergekit.method",
    "merge_tensor": "dam_mergekit.merge",
    "run_merge": "dam_mergekit.recipe.run",
    "load_recipe": "dam_mergekit.recipe.load",
    "MaskFile": "dam_mergekit.masks",
    "MaskSet": "dam_mergekit.masks",
    "write_mask_file": "dam_mergekit.masks",
    "DamError": "dam_mergekit.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):  # PEP 562: import the defining module on first use
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'dam_mergekit' has no attribute {name!r}")
