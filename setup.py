"""Build of brecq's compiled kernels.

The extension modules do not link libtorch (pybind11 over raw pointers), so one build works with
any installed torch and the build environment needs no torch at all.

Environment switches:
  BRECQ_NATIVE=1     compile for this machine (-march=native) instead of the portable AVX2 baseline
  BRECQ_CUDA=0|1     force the CUDA kernels off / on (default: on when nvcc is found)
  BRECQ_BUILD_JOBS=N parallel compile jobs (default: number of CPUs)
  CUDA_HOME          CUDA toolkit location (default: /usr/local/cuda, then nvcc on PATH)
"""
import concurrent.futures
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

from pybind11.setup_helpers import ParallelCompile, Pybind11Extension, build_ext
from setuptools import setup

log = logging.getLogger("brecq.build")
logging.basicConfig(level=logging.INFO, format="[brecq build] %(message)s")

ROOT = Path(__file__).parent.resolve()
CSRC = "csrc"
IS_X86 = platform.machine().lower() in ("x86_64", "amd64")


def cpu_flags():
    flags = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off", "-g0", "-fvisibility=hidden"]
    if os.environ.get("BRECQ_NATIVE") == "1":
        flags.append("-march=native")
        log.info("BRECQ_NATIVE=1: compiling for this machine only (-march=native)")
    elif IS_X86:
        flags += ["-mavx2", "-mfma", "-mf16c"]
    if IS_X86:
        flags.append("-DBRECQ_HAVE_X86_DISPATCH")
    return flags


def build_jobs() -> int:
    return int(os.environ.get("BRECQ_BUILD_JOBS") or 0) or os.cpu_count() or 1


def find_nvcc():
    choice = os.environ.get("BRECQ_CUDA")
    if choice == "0":
        log.info("BRECQ_CUDA=0: skipping the CUDA kernels")
        return None
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidate = Path(home) / "bin" / "nvcc"
    nvcc = str(candidate) if candidate.exists() else shutil.which("nvcc")
    if nvcc is None:
        if choice == "1":
            raise RuntimeError("BRECQ_CUDA=1 but no nvcc was found (set CUDA_HOME)")
        log.info("nvcc not found (CUDA_HOME=%s): building the CPU kernels only", home)
        return None
    log.info("nvcc found at %s: building the CUDA kernels too", nvcc)
    return nvcc


class BuildExt(build_ext):
    """Compiles .cu sources with nvcc; everything else goes through the normal C++ compiler."""

    def build_extension(self, ext):
        cu_sources = [s for s in ext.sources if s.endswith(".cu")]
        if cu_sources:
            ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
            nvcc = ext.nvcc
            build_dir = Path(self.build_temp) / "cuda"
            build_dir.mkdir(parents=True, exist_ok=True)
            archs = os.environ.get("BRECQ_CUDA_ARCHS", "80;90").split(";")
            commands = []
            for src in cu_sources:
                obj = build_dir / (Path(src).stem + ".o")
                cmd = [nvcc, "-c", src, "-o", str(obj), "-O3", "-std=c++17", "-Xcompiler", "-fPIC",
                       f"-I{ROOT / CSRC / 'include'}", "-lineinfo"]
                for arch in archs:
                    cmd += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
                log.info("nvcc %s (sm_%s)", src, ",".join(archs))
                commands.append(cmd)
                ext.extra_objects.append(str(obj))
            # The .cu files are independent: compile them side by side (nvcc is single-threaded).
            with concurrent.futures.ThreadPoolExecutor(max_workers=build_jobs()) as pool:
                for _ in pool.map(subprocess.check_call, commands):
                    pass
        super().build_extension(ext)


def headers(*folders):
    """Every header (.h, .cuh) under the given csrc/ folders. setuptools relinks an extension only
    when a file in its sources or `depends` is newer than the built module, so an in-tree rebuild
    after editing only a header (or, for _cuda, only a .cu file, which BuildExt compiles itself)
    would otherwise install the old module."""
    return sorted(str(p.relative_to(ROOT)) for folder in folders for p in (ROOT / CSRC / folder).rglob("*")
                  if p.suffix in (".h", ".cuh"))


def extensions():
    include = [str(Path(CSRC) / "include"), str(Path(CSRC) / "cpu")]
    cpu_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / CSRC / "cpu").glob("*.cpp"))
    exts = [
        Pybind11Extension(
            "brecq_ext._C",
            [str(Path(CSRC) / "python" / "bindings.cpp")] + cpu_sources,
            include_dirs=include,
            extra_compile_args=cpu_flags(),
            extra_link_args=["-fopenmp", "-s"],
            depends=headers("include", "cpu"),
            cxx_std=17,
        )
    ]
    nvcc = find_nvcc()
    if nvcc is not None:
        cuda_home = Path(nvcc).resolve().parent.parent
        cu_sources = sorted(str(p.relative_to(ROOT)) for p in (ROOT / CSRC / "cuda").glob("*.cu"))
        cuda_ext = Pybind11Extension(
            "brecq_ext._cuda",
            [str(Path(CSRC) / "cuda" / "bindings.cpp")] + cu_sources,
            include_dirs=include + [str(cuda_home / "include")],
            library_dirs=[str(cuda_home / "lib64")],
            libraries=["cudart_static", "dl", "rt", "pthread"],
            extra_compile_args=["-O3", "-g0", "-fvisibility=hidden"],
            extra_link_args=["-s"],
            depends=cu_sources + headers("include", "cuda"),
            cxx_std=17,
        )
        cuda_ext.nvcc = nvcc
        exts.append(cuda_ext)
    return exts


ParallelCompile("BRECQ_BUILD_JOBS", default=0).install()

setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
