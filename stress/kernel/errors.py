"""The kernel engine's errors: each says in one line what is wrong with the tree."""

from __future__ import annotations


class KernelEngineError(Exception):
    """The kernel engine cannot run as asked (the tree, its build, a mutation)."""
