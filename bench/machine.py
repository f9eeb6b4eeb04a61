"""Which machine a benchmark ran on, written into every bench/results file and its printout.

Two hosts of one kind (both "Intel Xeon with AMX, 2 cores") ran the same training steps at rates
up to 2.3x apart; a CPU's family, model and stepping tell them apart where its model name
("Intel(R) Xeon(R) Processor" in a KVM guest) does not.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch

# The features a figure here depends on: bf16 and int8 matrix units, and the crop kernel's fast path.
FEATURES = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512vbmi", "avx512f", "avx2")


def cpu_info(text: str) -> dict:
    """The first processor's entry of a /proc/cpuinfo text: vendor, family, model, stepping, name and
    which of FEATURES it has; {} where the text holds none of them (not Linux on x86)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    info: dict = {}
    for key, name in (("vendor_id", "vendor"), ("model name", "name")):
        if key in fields:
            info[name] = fields[key]
    for key, name in (("cpu family", "family"), ("model", "model"), ("stepping", "stepping")):
        if fields.get(key, "").isdigit():
            info[name] = int(fields[key])
    if "flags" in fields:
        flags = set(fields["flags"].split())
        info["features"] = [f for f in FEATURES if f in flags]
    return info


def describe(device: torch.device | None = None) -> dict:
    """This machine: architecture, CPU count, the CPU's identity where /proc/cpuinfo gives it, and
    the GPU's name where `device` is one."""
    out: dict = {"arch": platform.machine(), "cpus": os.cpu_count()}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # Linux; elsewhere the architecture and CPU count are what there is
        out.update(cpu_info(cpuinfo.read_text()))
    if device is not None and device.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(device)
    return out


def line(info: dict) -> str:
    """One line for a benchmark's header: 'x86_64, 2 CPUs, Intel(R) Xeon(R) Processor family 6
    model 207 stepping 2, amx_bf16 amx_int8 ...' (and the GPU, where there is one)."""
    parts = [info["arch"], f"{info['cpus']} CPUs"]
    if "family" in info:
        parts.append(f"{info.get('name', 'CPU')} family {info['family']} model {info.get('model', '?')}"
                     f" stepping {info.get('stepping', '?')}")
    if info.get("features"):
        parts.append(" ".join(info["features"]))
    if info.get("gpu"):
        parts.append(info["gpu"])
    return ", ".join(parts)
