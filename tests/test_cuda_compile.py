"""Every .cu file under mpisign/cuda compiles for sm_70, sm_80 and sm_90, with no GPU.

Two compilers: nvcc (one call per file for every target it offers, with ptxas statistics) and
NVRTC, which is what CuPy's RawModule uses at run time (no system headers, the options of
mpisign.cuda.kernels). CUDA 13 dropped sm_70: that target is compiled by an NVRTC 12 library
(pip package nvidia-cuda-nvrtc-cu12) where one is installed, and is skipped, saying so, where not.
"""

import ctypes
import functools
import glob
import os
import re
import shutil
import site
import subprocess
import sys
from pathlib import Path

import pytest

from mpisign.cuda import kernels

CUDA_DIR = Path(kernels.__file__).resolve().parent
SOURCES = sorted(CUDA_DIR.glob("*.cu"))
ARCHS = (70, 80, 90)
KERNELS = ("pack_f32", "pack_f16", "pack_bf16", "tally_majority", "apply_f32", "apply_f16",
           "apply_bf16", "disagreement", "apply_decayed_f32", "apply_decayed_f16",
           "apply_decayed_bf16", "lion_update_pack_f32")


def _nvcc():
    return shutil.which("nvcc") or next(iter(glob.glob("/usr/local/cuda*/bin/nvcc")), None)


@functools.lru_cache(maxsize=None)
def _nvcc_archs() -> frozenset:
    out = subprocess.run([_nvcc(), "--list-gpu-code"], capture_output=True, text=True).stdout
    return frozenset(int(a) for a in re.findall(r"sm_(\d+)\b", out))


@functools.lru_cache(maxsize=None)
def _nvcc_build(source: Path, tmp: str) -> dict:
    """One nvcc call for every target it offers; returns {arch: ptxas -v text for that arch}."""
    archs = [a for a in ARCHS if a in _nvcc_archs()]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    cmd = [_nvcc(), "-std=c++17", "-fmad=false", "-ftz=false", *gencode, "--fatbin", "-Xptxas", "-v",
           "-o", os.path.join(tmp, source.stem + ".fatbin"), str(source)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{' '.join(cmd)}\n{done.stderr}"
    assert "warning" not in done.stderr.lower(), done.stderr
    per_arch, current = {}, None
    for line in done.stderr.splitlines():  # each "Compiling ... for 'sm_XX'" starts that arch's lines
        m = re.search(r"for 'sm_(\d+)'", line)
        current = int(m.group(1)) if m else current
        if current is not None:
            per_arch.setdefault(current, []).append(line)
    return {a: "\n".join(lines) for a, lines in per_arch.items()}


@pytest.fixture(scope="module")
def tmpdir_str(tmp_path_factory):
    return str(tmp_path_factory.mktemp("nvcc"))


def test_there_are_cuda_sources():
    assert SOURCES, f"no .cu files in {CUDA_DIR}"


@pytest.mark.skipif(_nvcc() is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_nvcc_compiles(source, arch, tmpdir_str):
    if arch not in _nvcc_archs():
        pytest.skip(f"this nvcc does not offer sm_{arch} (CUDA 13 dropped it); see test_nvrtc_compiles")
    stats = _nvcc_build(source, tmpdir_str)[arch]
    if source.name == "signs.cu":
        for name in KERNELS:
            assert f"'{name}' for 'sm_{arch}'" in stats, name
    # Nothing in local memory: the bit-sliced counters and all temporaries stay in registers.
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores", stats)
    assert frames and all(f == ("0", "0") for f in frames), stats


# ---- NVRTC ------------------------------------------------------------------------------------

def _nvrtc_libraries() -> list:
    roots = site.getsitepackages() + [site.getusersitepackages(), sys.prefix]
    found = []
    for root in roots:
        found += glob.glob(os.path.join(root, "nvidia", "*", "lib", "libnvrtc.so.*[0-9]"))
    found += glob.glob("/usr/local/cuda*/lib64/libnvrtc.so.*[0-9]")
    return sorted({p for p in found if ".alt." not in p})


def _nvrtc_archs(lib) -> list:
    num = ctypes.c_int()
    lib.nvrtcGetNumSupportedArchs(ctypes.byref(num))
    archs = (ctypes.c_int * num.value)()
    lib.nvrtcGetSupportedArchs(archs)
    return list(archs)


def _nvrtc_for(arch: int):
    for path in _nvrtc_libraries():
        try:
            lib = ctypes.CDLL(path)
            if arch in _nvrtc_archs(lib):
                return path, lib
        except (OSError, AttributeError):
            continue
    return None, None


def _nvrtc_compile(lib, source: Path, arch: int) -> tuple[int, str, bytes]:
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.read_bytes(), source.name.encode(),
                                  0, None, None) == 0
    try:
        opts = [o.encode() for o in kernels.NVRTC_OPTIONS] + [f"--gpu-architecture=sm_{arch}".encode(),
                                                              b"--ptxas-options=-v"]
        rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
        size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
        log = ctypes.create_string_buffer(size.value)
        lib.nvrtcGetProgramLog(prog, log)
        cubin = b""
        if rc == 0:
            lib.nvrtcGetCUBINSize(prog, ctypes.byref(size))
            buf = ctypes.create_string_buffer(size.value)
            lib.nvrtcGetCUBIN(prog, buf)
            cubin = buf.raw
        return rc, log.value.decode(errors="replace"), cubin
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.name)
def test_nvrtc_compiles(source, arch):
    path, lib = _nvrtc_for(arch)
    if lib is None:
        pytest.skip(f"no NVRTC library offering sm_{arch} (for sm_70: pip install nvidia-cuda-nvrtc-cu12)")
    rc, log, cubin = _nvrtc_compile(lib, source, arch)
    assert rc == 0, f"{path}: {log}"
    problems = [line for line in log.splitlines()
                if "warning" in line.lower() and "are deprecated" not in line]  # sm_70 is deprecated
    assert not problems, log
    frames = re.findall(r"(\d+) bytes stack frame, (\d+) bytes spill stores", log)
    assert frames and all(f == ("0", "0") for f in frames), log  # counters stay in registers
    if source.name == "signs.cu":
        for name in KERNELS:
            assert name.encode() in cubin and f"'{name}' for 'sm_{arch}'" in log, name
