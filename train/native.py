"""C kernels compiled on the machine that trains: gcc, -O3 -march=native, against the OpenMP
runtime torch already loaded (so the kernels and torch share one pool of threads), cached by the
source, the flags, the compiler, the runtime and the CPU's flags. A kernel file's Python module
holds one `Kernels`; where it cannot be built, `why_not_built` says why and the caller keeps
torch's own path."""

from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

CFLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-std=c11", "-Wall")

# GNU's runtime, Intel's and LLVM's: the latter two also answer the GOMP_* calls gcc emits.
OPENMP_RUNTIME = re.compile(r"^lib(gomp|iomp5|omp)\b[-.\w]*\.so")


def openmp_runtime() -> Path | None:
    """The OpenMP library this process loaded with torch (a pip wheel bundles libgomp)."""
    torch.get_num_threads()  # loads libtorch_cpu, and with it the runtime
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return None
    for line in maps.splitlines():
        fields = line.split()
        if len(fields) >= 6 and OPENMP_RUNTIME.match(Path(fields[-1]).name) and Path(fields[-1]).is_file():
            return Path(fields[-1])
    return None


def _cpu_flags() -> str:
    """The CPU's flags line (part of the cache key: an image built on one CPU may run on another)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return ""
    return next((line for line in lines if line.startswith("flags")), "")


def cache_dir() -> Path:
    root = os.environ.get("IMGCLS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "imgcls")
    return Path(root)


def _compile(compiler: str, source: Path, cflags: tuple, runtime: Path | None, target: Path) -> None:
    """Compile into a temporary file and rename it into place: processes of one job may build at once."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        obj, lib = Path(tmp) / f"{source.stem}.o", Path(tmp) / target.name
        subprocess.run([compiler, *cflags, "-c", str(source), "-o", str(obj)], check=True, capture_output=True, text=True)
        # Linked to torch's own runtime, not with -fopenmp (which links the system's libgomp): two
        # runtimes would keep two pools of spinning threads on the same cores.
        link = ([str(runtime), f"-Wl,-rpath,{runtime.parent}"] if runtime else ["-lgomp"])
        subprocess.run([compiler, "-shared", str(obj), "-o", str(lib), *link], check=True, capture_output=True, text=True)
        os.replace(lib, target)


class Kernels:
    """The functions of one C file, built on first use. signatures: name -> (argtypes, restype);
    cflags: CFLAGS, or another target's (tests build each vector path of a file on one machine)."""

    def __init__(self, source: Path, signatures: dict, cflags: tuple = CFLAGS):
        self.source, self.signatures, self.cflags = source, signatures, tuple(cflags)
        self.reset()

    def reset(self) -> None:
        """Forget the build (tests: another compiler, another cache directory)."""
        self._library: ctypes.CDLL | None = None
        self._why_not: str | None = None

    def library(self) -> ctypes.CDLL | None:
        """The loaded library; None where it cannot be built (why_not_built() says why)."""
        if self._library is not None or self._why_not is not None:
            return self._library
        compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
        if compiler is None:
            self._why_not = "no C compiler (gcc) on this machine"
            return None
        runtime = openmp_runtime()
        key = hashlib.sha256(b"\0".join([self.source.read_bytes(), " ".join(self.cflags).encode(), compiler.encode(),
                                         str(runtime).encode(), _cpu_flags().encode()])).hexdigest()[:16]
        # A home that cannot be written (a read-only file system, another user's) falls back to a
        # directory of this user's under the temporary one.
        roots = [cache_dir(), Path(tempfile.gettempdir()) / f"imgcls-{os.getuid()}"]
        problems = []
        for root in roots:
            target = root / f"{self.source.stem}-{key}.so"
            try:
                if not target.exists():
                    _compile(compiler, self.source, self.cflags, runtime, target)
                lib = ctypes.CDLL(str(target))
                break
            except subprocess.CalledProcessError as e:
                self._why_not = f"{compiler} failed: {(e.stderr or '').strip()[-400:]}"
                return None
            except OSError as e:
                problems.append(f"{target}: {e}")
        else:
            self._why_not = "could not build or load the kernels: " + "; ".join(problems)
            return None
        for name, (args, result) in self.signatures.items():
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, result
        self._library = lib
        return lib

    def why_not_built(self) -> str | None:
        self.library()
        return self._why_not
