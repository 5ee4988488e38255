"""Compile ddpm/kernels' C++ operators on first use into a per-user cache, against MindSpore's oneDNN.

The shared library is keyed by a hash of everything that goes into it (the source, MindSpore's
version and its libdnnl path, the headers' version, the compiler flags), written atomically under
a file lock so concurrent processes build it once. When it cannot be built, `build` and
`find_toolchain` raise KernelUnavailable naming the fix. This module decides nothing and imports
nothing of ddpm's but files.py: `ddpm.runtime.native_library` calls it (on the CPU only, unless
DDPM_NATIVE_KERNELS=0), warns once on failure and falls back to MindSpore's own operators.
"""

from __future__ import annotations

import ctypes
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from ddpm.files import atomic_path

log = logging.getLogger(__name__)

HERE = Path(__file__).parent
# compiled into one library
SOURCES = (HERE / "dnnl_conv.cc", HERE / "pointwise.cc", HERE / "attention.cc", HERE / "pool.cc", HERE / "optim.cc")
HEADERS = (HERE / "runtime.h", HERE / "vector_math.h")
LIBRARY_STEM = "ddpm_kernels"
HEADERS_PACKAGE = "onednn-devel"
LIBDNNL = "libdnnl.so.3"  # the oneDNN MindSpore's CPU wheel ships in mindspore/lib
# -fno-trapping-math: without it GCC keeps a float compare (FastExp's clamp) as a branch, for the FP
# exception flags a vector compare might raise, and no loop over FastExp vectorises; we never read them.
# -fno-math-errno: sqrt compiles to the instruction, and vectorises (optim.cc's Adam); the same correctly
# rounded result, without setting errno for negative inputs, which nothing reads.
CXX_FLAGS = (
    "-O3",
    "-std=c++17",
    "-fno-trapping-math",
    "-fno-math-errno",
    "-shared",
    "-fPIC",
    "-pthread",
    "-Wl,-z,defs",
)
# MindSpore's libdnnl is built for the threadpool runtime, the headers' config for SYCL; the config
# must say threadpool so that the C++ API exposes the threadpool stream we run on.
RUNTIME_CONFIG = {
    "DNNL_CPU_THREADING_RUNTIME": "DNNL_RUNTIME_THREADPOOL",
    "DNNL_CPU_RUNTIME": "DNNL_RUNTIME_THREADPOOL",
    "DNNL_GPU_RUNTIME": "DNNL_RUNTIME_NONE",
}


class KernelUnavailable(RuntimeError):
    """The native kernels cannot be built here; the message names the fix."""


@dataclass(frozen=True)
class Toolchain:
    compiler: str
    include_dir: Path  # holds oneapi/dnnl/dnnl.hpp
    libdnnl: Path
    mindspore_version: str


def find_toolchain() -> Toolchain:
    compiler = shutil.which(os.environ.get("CXX") or "g++")
    if compiler is None:
        raise KernelUnavailable("no C++ compiler: install g++ (apt-get install g++) or set CXX")
    try:
        files = importlib.metadata.distribution(HEADERS_PACKAGE).files or []
    except importlib.metadata.PackageNotFoundError:
        files = []
    headers = [f.locate() for f in files if str(f).endswith("oneapi/dnnl/dnnl.hpp")]
    if not headers:
        raise KernelUnavailable(
            f"oneDNN headers missing: install the project's dependencies (uv sync; the {HEADERS_PACKAGE} package)"
        )
    libdnnl = libdnnl_path()
    if libdnnl is None:
        raise KernelUnavailable(
            f"MindSpore's {LIBDNNL} not found: install the mindspore CPU wheel pinned in pyproject.toml"
        )
    toolchain = Toolchain(
        compiler, Path(headers[0]).resolve().parents[2], libdnnl, importlib.metadata.version("mindspore")
    )
    check_versions(toolchain)
    return toolchain


def libdnnl_path() -> Path | None:
    """MindSpore's own oneDNN (mindspore/lib/libdnnl.so.3), or None where it is missing."""
    spec = importlib.util.find_spec("mindspore")
    if spec is None or not spec.submodule_search_locations:
        return None
    libdnnl = Path(spec.submodule_search_locations[0]) / "lib" / LIBDNNL
    return libdnnl if libdnnl.is_file() else None


def header_version(include_dir: Path) -> tuple[int, int]:
    text = (include_dir / "oneapi/dnnl/dnnl_version.h").read_text()
    major, minor = (re.search(rf"#define DNNL_VERSION_{part} (\d+)", text) for part in ("MAJOR", "MINOR"))
    if major is None or minor is None:
        raise KernelUnavailable(f"unexpected dnnl_version.h in {include_dir}: no DNNL_VERSION_MAJOR/MINOR")
    return int(major.group(1)), int(minor.group(1))


class _DnnlVersion(ctypes.Structure):
    _fields_ = [("major", ctypes.c_int), ("minor", ctypes.c_int), ("patch", ctypes.c_int)]  # leading fields only


def library_version(libdnnl: Path) -> tuple[int, int]:
    lib = ctypes.CDLL(str(libdnnl))
    lib.dnnl_version.restype = ctypes.POINTER(_DnnlVersion)
    version = lib.dnnl_version().contents
    return version.major, version.minor


def check_versions(toolchain: Toolchain) -> None:
    """oneDNN keeps its ABI backward compatible within a major version: the library may be newer."""
    headers, library = header_version(toolchain.include_dir), library_version(toolchain.libdnnl)
    if headers[0] != library[0] or headers[1] > library[1]:
        raise KernelUnavailable(
            f"oneDNN headers {headers} do not fit MindSpore's libdnnl {library}: pin a "
            f"{HEADERS_PACKAGE} release with headers 3.x, x <= {library[1]}"
        )


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ddpm" / "kernels"


def build(toolchain: Toolchain) -> Path:
    """Compile the source unless the cache already holds this exact build; return the library's path."""
    source = b"".join(path.read_bytes() for path in (*SOURCES, *HEADERS))
    recipe = "\n".join(
        [
            toolchain.mindspore_version,
            str(toolchain.libdnnl),
            str(header_version(toolchain.include_dir)),
            toolchain.compiler,
            *CXX_FLAGS,
        ]
    )
    digest = hashlib.sha256(source + recipe.encode()).hexdigest()[:16]
    directory = cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    target = directory / f"{LIBRARY_STEM}-{digest}.so"
    with open(directory / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another process may be compiling the same file
        if not target.exists():
            compile_library(toolchain, directory, target)
    return target


def compile_library(toolchain: Toolchain, directory: Path, target: Path) -> None:
    # atomic: readers see no file or a whole one; build()'s lock keeps other processes off the temporary
    with tempfile.TemporaryDirectory(dir=directory) as scratch, atomic_path(target) as output:
        config_dir = Path(scratch) / "include"
        write_runtime_config(toolchain.include_dir, config_dir)
        lib_dir = toolchain.libdnnl.parent
        command = [
            toolchain.compiler,
            *CXX_FLAGS,
            f"-I{config_dir}",
            f"-I{toolchain.include_dir}",
            *map(str, SOURCES),
            "-o",
            str(output),
            f"-L{lib_dir}",
            f"-l:{LIBDNNL}",
            f"-Wl,-rpath,{lib_dir}",
        ]
        log.info("compiling %s (once per source and MindSpore version)", ", ".join(p.name for p in SOURCES))
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            raise KernelUnavailable(f"compiling {LIBRARY_STEM} failed:\n{result.stderr[-2000:]}")


def write_runtime_config(include_dir: Path, config_dir: Path) -> None:
    """A copy of dnnl_config.h that says threadpool, found before the package's own by -I order."""
    text = (include_dir / "oneapi/dnnl/dnnl_config.h").read_text()
    for macro, value in RUNTIME_CONFIG.items():
        text, count = re.subn(rf"^#define {macro} \w+$", f"#define {macro} {value}", text, flags=re.MULTILINE)
        if count != 1:
            raise KernelUnavailable(f"unexpected dnnl_config.h in {include_dir}: no single {macro}")
    text = re.sub(
        r"^#define DNNL_WITH_SYCL$", "/* DNNL_WITH_SYCL: not with MindSpore's oneDNN */", text, flags=re.MULTILINE
    )
    path = config_dir / "oneapi/dnnl/dnnl_config.h"
    path.parent.mkdir(parents=True)
    path.write_text(text)
