"""nanoqwen's Triton kernels, one file per family, each beside its torch reference.

Triton is optional on the CPU (CPU builds of PyTorch do not bring it; CUDA builds do): without it the kernel files
still import, with `triton` and `tl` standing in, so their torch references work, and `use_triton` picks those.
"""
import os
import warnings

import torch

try:
    import triton
    import triton.language as tl
    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

    class _MissingKernel:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            raise RuntimeError(f"Triton kernel {self.name} needs Triton, which is not installed: `pip install "
                               "triton` (CUDA builds of PyTorch bring it), or set NANOQWEN_KERNELS=torch")

    class _NoTriton:
        """Stands in for `triton` and `triton.language` at import time (decorators, annotations)."""

        def jit(self, fn):
            return _MissingKernel(fn.__name__)

        def __getattr__(self, name):
            return self

    triton = tl = _NoTriton()


def use_triton(device: torch.device) -> bool:
    """CUDA runs the Triton kernels, other devices the torch references; NANOQWEN_KERNELS=torch|triton forces either
    (triton on the CPU needs TRITON_INTERPRET=1)."""
    mode = os.environ.get("NANOQWEN_KERNELS", "auto").lower()
    if mode not in ("auto", "torch", "triton"):
        raise ValueError(f"NANOQWEN_KERNELS={mode!r}: use 'torch', 'triton' or leave it unset")
    if not HAVE_TRITON:
        if mode == "triton":
            raise RuntimeError("NANOQWEN_KERNELS=triton, but Triton is not installed: `pip install triton`")
        if device.type == "cuda":
            warnings.warn("Triton is not installed: running the (slow) torch reference kernels on CUDA; "
                          "`pip install triton` for speed", stacklevel=2)
        return False
    return device.type == "cuda" if mode == "auto" else mode == "triton"
