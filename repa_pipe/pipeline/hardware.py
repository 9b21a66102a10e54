"""What a benchmark needs to know about the device: its name, its peak dense bf16 rate (for MFU), peak memory,
and a wait for queued GPU work.

Peak rates are the vendors' datasheet figures for dense bf16 tensor-core math (no 2:4 sparsity). A device not in
the table gets no MFU (a note says so) rather than a guessed one.
"""
from __future__ import annotations

import os
import platform
import resource
from typing import Optional

import torch

# dense bf16 TFLOP/s, NVIDIA datasheets: H100 SXM5 and H200 (the same Hopper chip and clocks), A100 (SXM and PCIe)
PEAK_BF16_DENSE_TFLOPS = {"H100 SXM": 989.0, "H200": 989.0, "A100": 312.0}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} " \
           "torch threads)"


def peak_tflops(name: str) -> tuple[Optional[float], str]:
    """(peak dense bf16 TFLOP/s, the table entry used) for a device name; (None, why) when it is not known."""
    n = name.upper()
    if "H200" in n:
        key = "H200"
    elif "H100" in n and not any(v in n for v in ("PCIE", "NVL")):  # PCIe and NVL parts run at other clocks
        key = "H100 SXM"
    elif "A100" in n:
        key = "A100"
    else:
        return None, f"no peak rate known for {name}: MFU omitted (known: {', '.join(PEAK_BF16_DENSE_TFLOPS)})"
    return PEAK_BF16_DENSE_TFLOPS[key], f"{key} {PEAK_BF16_DENSE_TFLOPS[key]:g} TFLOP/s dense bf16 (datasheet)"


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a CPU's work is done when the call returns)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[float, str]:
    """(GiB, what was measured): the CUDA allocator's peak since the last reset, or on a CPU the process's peak
    resident set (since it started: an upper bound)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "CUDA allocator peak"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, "process peak RSS"
