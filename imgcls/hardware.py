"""What the hardware runs fast: the one answer training and serving both use to pick a precision."""

from __future__ import annotations

import torch


def fast_bf16(device: torch.device) -> bool:
    """bf16 matmuls in hardware: a GPU that supports bf16, or a CPU with AMX or AVX512-BF16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return any(getattr(torch.cpu, f, lambda: False)() for f in ("_is_amx_tile_supported", "_is_avx512_bf16_supported"))


def fast_int8_dot(device: torch.device) -> bool:
    """int8 dot products in one instruction (AVX512-VNNI) on a CPU: where torch's `x86` quantized
    engine runs oneDNN's convolutions (imgcls.quantize)."""
    return device.type == "cpu" and getattr(torch.cpu, "_is_vnni_supported", lambda: False)()
