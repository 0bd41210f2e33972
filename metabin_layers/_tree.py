"""Rewrite a module tree in place: the recursion shared by the converters."""

from __future__ import annotations

from typing import Callable, Optional

from torch import nn

__all__ = ["replace_modules"]


def replace_modules(module: nn.Module, visit: Callable[[str, nn.Module], Optional[nn.Module]]) -> nn.Module:
    """Depth-first over ``module``: ``visit(qualified_name, m)`` returns the module to put in ``m``'s
    place (``m`` itself to keep it), or None to descend into ``m``'s children.

    Parents are rewritten with ``setattr`` (as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``
    does); the return value is the new root (``module`` unless the root itself was replaced).
    """

    def walk(mod: nn.Module, name: str) -> nn.Module:
        replacement = visit(name, mod)
        if replacement is not None:
            return replacement
        for child_name, child in mod.named_children():
            new_child = walk(child, f"{name}.{child_name}" if name else child_name)
            if new_child is not child:
                setattr(mod, child_name, new_child)
        return mod

    return walk(module, "")
