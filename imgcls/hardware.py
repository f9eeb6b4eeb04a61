"""What the hardware runs fast: the one answer training and serving both use to pick a precision."""

from __future__ import annotations

import torch


def fast_bf16(device: torch.device) -> bool:
    """bf16 matmuls in hardware: a GPU that supports bf16, or a CPU with AMX or AVX512-BF16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))
