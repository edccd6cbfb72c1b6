"""nanoqwen's Triton kernels, one file per family, each beside its torch reference."""
import os

import torch


def use_triton(device: torch.device) -> bool:
    """CUDA runs the Triton kernels, other devices the torch references; NANOQWEN_KERNELS=torch|triton forces either
    (triton on the CPU needs TRITON_INTERPRET=1)."""
    mode = os.environ.get("NANOQWEN_KERNELS", "auto").lower()
    if mode not in ("auto", "torch", "triton"):
        raise ValueError(f"NANOQWEN_KERNELS={mode!r}: use 'torch', 'triton' or leave it unset")
    return device.type == "cuda" if mode == "auto" else mode == "triton"
