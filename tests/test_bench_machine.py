"""bench.machine: the host a benchmark ran on, read from /proc/cpuinfo."""

import os
import platform

from bench import machine

CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 207
model name\t: Intel(R) Xeon(R) Processor
stepping\t: 2
flags\t\t: fpu avx2 avx512f avx512vbmi avx512_vbmi2 avx512_vnni avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
flags\t\t: fpu avx2
"""


def test_cpu_info_reads_the_first_processor_and_the_features_figures_depend_on():
    info = machine.cpu_info(CPUINFO)
    assert info == {"vendor": "GenuineIntel", "name": "Intel(R) Xeon(R) Processor", "family": 6, "model": 207,
                    "stepping": 2,
                    "features": ["amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx512vbmi", "avx512f", "avx2"]}


def test_cpu_info_without_x86_fields_is_empty():
    assert machine.cpu_info("") == {}
    # an Arm cpuinfo: no family, model or flags line in x86's spelling
    assert machine.cpu_info("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd\nCPU part\t: 0xd0c\n") == {}


def test_the_line_names_the_cpu_and_its_features():
    info = {"arch": "x86_64", "cpus": 2, **machine.cpu_info(CPUINFO)}
    assert machine.line(info) == ("x86_64, 2 CPUs, Intel(R) Xeon(R) Processor family 6 model 207 stepping 2, "
                                  "amx_bf16 amx_int8 avx512_bf16 avx512_vnni avx512vbmi avx512f avx2")
    assert machine.line({"arch": "aarch64", "cpus": 4, "gpu": "NVIDIA H200"}) == "aarch64, 4 CPUs, NVIDIA H200"


def test_describe_reads_this_machine():
    info = machine.describe()
    assert info["arch"] == platform.machine() and info["cpus"] == os.cpu_count()
    if os.path.isfile("/proc/cpuinfo") and platform.machine() == "x86_64":
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":")[1].split()
        assert info["family"] > 0 and info["features"] == [f for f in machine.FEATURES if f in flags]
