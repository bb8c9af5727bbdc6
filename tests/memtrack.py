"""Measure tensor memory on CPU, where there is no ``torch.cuda.max_memory_allocated``.

``saved_bytes``: bytes of the distinct storages autograd saves for backward (via
``torch.autograd.graph.saved_tensors_hooks``). ``LiveBytes``: a dispatch mode that follows every
storage created inside it until it is freed, and records the peak. Both leave out the storages
of ``external`` tensors (parameters, gradients, the trajectory), which the plan counts separately.
"""

from __future__ import annotations

import weakref
from typing import Callable, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


def _ptrs(tensors: Iterable[torch.Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


def saved_bytes(fn: Callable[[], object], external: Iterable[torch.Tensor] = ()) -> tuple[int, object]:
    """(bytes of the storages saved for backward while ``fn()`` runs, its result)."""
    skip = _ptrs(external)
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        st = t.untyped_storage()
        if st.data_ptr() not in skip:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


class LiveBytes(TorchDispatchMode):
    """Live bytes of the storages created inside the mode (``current``) and their ``peak``."""

    def __init__(self, external: Iterable[torch.Tensor] = ()):
        super().__init__()
        self._skip = _ptrs(external)
        self._live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _free(self, key: int, n: int) -> None:
        if self._live.pop(key, None) is not None:
            self.current -= n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                st = t.untyped_storage()
                key = st.data_ptr()
                if key and key not in self._live and key not in self._skip:
                    self._live[key] = st.nbytes()
                    self.current += st.nbytes()
                    weakref.finalize(st, self._free, key, st.nbytes())
        self.peak = max(self.peak, self.current)
        return out
