"""Whether a device computes bfloat16 natively: the one probe behind every ``auto`` precision of the bundle."""

from __future__ import annotations

import torch


def native_bf16(device: torch.device | str) -> bool:
    """CUDA GPUs with bf16, CPUs with AVX512-BF16 or AMX; elsewhere bf16 is emulated and slower than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        # private but long-standing helpers (torch >= 2.1); absent -> assume no native bf16
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False
