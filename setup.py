"""Build eft_fast: setup.py drives CMakeLists.txt, which builds the extension eft_fast._C.

Environment variables:
  EFT_FAST_CUDA=0/1        force the CUDA sources off/on (default: on when torch is a CUDA
                           build and nvcc is found, GPU or not)
  TORCH_CUDA_ARCH_LIST     CUDA architectures, default "8.0;9.0"
  MAX_JOBS                 parallel compile jobs
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _torch():
    try:
        import torch
    except ImportError as e:  # pragma: no cover - build environment error
        raise RuntimeError(
            "eft_fast needs torch at build time. Install torch first and build with "
            "`pip install --no-build-isolation .`, or let pip's build isolation provide it."
        ) from e
    return torch


def _find_nvcc():
    # Prefer the toolkit's own nvcc over wrappers on PATH: CMake derives the toolkit
    # root (headers, cudart) from the compiler's location.
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    candidates = [os.environ.get("CUDACXX"), os.path.join(cuda_home, "bin", "nvcc"), shutil.which("nvcc")]
    for candidate in candidates:
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return os.path.realpath(candidate)
    return None


def _cuda_archs():
    """TORCH_CUDA_ARCH_LIST (torch's CMake config turns it into -gencode flags)."""
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    archs = [a.strip() for a in arch_list.replace(" ", ";").split(";") if a.strip()]
    return ";".join(archs), arch_list


def _use_cuda(torch):
    forced = os.environ.get("EFT_FAST_CUDA")
    nvcc = _find_nvcc()
    if forced is not None:
        if forced not in ("0", "1"):
            raise RuntimeError(f"EFT_FAST_CUDA must be 0 or 1, got {forced!r}")
        if forced == "1" and (torch.version.cuda is None or nvcc is None):
            raise RuntimeError("EFT_FAST_CUDA=1 needs a CUDA build of torch and nvcc")
        return forced == "1", nvcc
    return torch.version.cuda is not None and nvcc is not None, nvcc


def _find_nvrtc(cuda_root, torch):
    """libnvrtc for torch's CMake config: the toolkit's, else the one torch's wheels ship
    (next to torch, which under build isolation is not in this interpreter's site-packages)."""
    import glob
    import site

    patterns = [os.path.join(cuda_root, "lib64", "libnvrtc.so*")]
    torch_site = str(Path(torch.__file__).resolve().parent.parent)
    for prefix in [torch_site] + site.getsitepackages() + [site.getusersitepackages()]:
        patterns.append(os.path.join(prefix, "nvidia", "*", "lib", "libnvrtc.so*"))
        patterns.append(os.path.join(prefix, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so*"))
    for pattern in patterns:
        found = sorted(p for p in glob.glob(pattern) if "builtins" not in p and ".alt." not in p)
        if found:
            return found[0]
    return None


def _forget_other_environment(build_temp: Path, environment: str) -> None:
    """Drop the CMake cache when the build environment changed since the last configure.

    The cache records absolute paths of the environment that configured it (ninja, torch);
    under pip's build isolation those live in a temporary directory that is gone by the next
    install, and a stale cache then fails to configure. Compiled objects are kept: ninja
    rebuilds only what the new configuration changes.
    """
    stamp = build_temp / "eft_fast_build_environment.txt"
    if not stamp.exists() or stamp.read_text() != environment:
        (build_temp / "CMakeCache.txt").unlink(missing_ok=True)
        shutil.rmtree(build_temp / "CMakeFiles", ignore_errors=True)
    stamp.write_text(environment)


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """One CMake build produces every extension module; the first call builds them all."""

    def build_extension(self, ext):
        if getattr(self, "_cmake_done", False):
            return
        self._cmake_done = True
        torch = _torch()
        extdir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        # A persistent build tree makes rebuilds (including editable ones) incremental.
        build_temp = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}"
        build_temp.mkdir(parents=True, exist_ok=True)
        ninja = shutil.which("ninja")
        torch_dir = Path(torch.__file__).resolve().parent
        _forget_other_environment(build_temp, f"{sys.executable}\n{torch_dir}\n{ninja}\n")
        use_cuda, nvcc = _use_cuda(torch)
        cmake_archs, arch_list = _cuda_archs()
        args = [
            f"-S{ROOT}",
            f"-B{build_temp}",
            "-GNinja",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DEFT_FAST_TORCH_DIR={torch_dir}",
            f"-DEFT_FAST_TORCH_VERSION={torch.__version__.split('+')[0]}",
            f"-DEFT_FAST_OUTPUT_DIR={extdir}",
            f"-DEFT_FAST_CUDA={'ON' if use_cuda else 'OFF'}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        if ninja:
            args.append(f"-DCMAKE_MAKE_PROGRAM={ninja}")
        env = dict(os.environ)
        if use_cuda:
            cuda_root = str(Path(nvcc).parent.parent)
            args += [
                f"-DCMAKE_CUDA_COMPILER={nvcc}",
                f"-DCUDAToolkit_ROOT={cuda_root}",
                f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_root}",  # torch's bundled FindCUDA
                f"-DEFT_FAST_CUDA_ARCHS={cmake_archs}",
            ]
            nvrtc = _find_nvrtc(cuda_root, torch)
            if nvrtc:
                args.append(f"-DCUDA_nvrtc_LIBRARY={nvrtc}")
            env["TORCH_CUDA_ARCH_LIST"] = arch_list
            env.setdefault("CUDA_HOME", cuda_root)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        print(f"eft_fast: building CUDA sources: {use_cuda} (nvcc: {nvcc}, archs: {arch_list})")
        subprocess.run(["cmake", *args], check=True, env=env)
        subprocess.run(["cmake", "--build", str(build_temp), "-j", jobs], check=True, env=env)


def _install_requires():
    # The extension is ABI-bound to the torch it was compiled against.
    torch = _torch()
    # transformers: the engine's paged attention relies on AttentionInterface, kwargs passed
    # down to attention layers and tensor logits_to_keep as in the 5.x series (tested: 5.23).
    return [f"torch=={torch.__version__.split('+')[0]}", "transformers>=5.20,<6", "tqdm"]


setup(
    packages=["eft_fast", "eft_fast.bench", "eft_fast.engine", "eft_fast.engine.parallel", "eft_fast.kernels",
              "eft_fast.serve"],
    package_dir={"eft_fast": "eft_fast", "eft_fast.kernels": "kernels"},
    ext_modules=[CMakeExtension("eft_fast._C"), CMakeExtension("eft_fast._build_info")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=_install_requires(),
    zip_safe=False,
)
