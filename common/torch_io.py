"""Reading PyTorch checkpoints into numpy, shared by the CLIP and dVAE weight loaders."""

from __future__ import annotations

from typing import Any

import numpy as np


def is_tensor(value: Any) -> bool:
    """A torch.Tensor, recognised without importing torch."""
    return hasattr(value, "detach") and hasattr(value, "numpy")


def tensor_to_numpy(value: Any) -> np.ndarray:
    """A torch tensor (or array-like) as a numpy array; bfloat16, which numpy lacks, becomes float32."""
    if is_tensor(value):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    return np.asarray(value)
