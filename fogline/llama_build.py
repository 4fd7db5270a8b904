"""Build and install the pinned llama-cpp-python for this host (`make setup` runs this).

Why a script and not a bare `pip install`:

* **AMX.** A native x86 build on a host whose CPU has AMX compiles llama.cpp's
  AMX extra buffer type, which crashes on the first decode on virtualised
  Sapphire/Granite Rapids (see fogline/host.py). On such hosts the build stays
  native (`-march=native`: every other extension and the tuning of the CPU)
  with AMX removed (`-mno-amx-*`; GCC lets an explicit -mno-X win over -march
  whatever the order: tests/test_host.py checks). ggml only compiles its AMX code under
  `__AMX_INT8__`, so the build then reports no AMX_INT8 and CPU_REPACK stays
  on. Every other host (ARM included, where repacking matters) builds natively.
* **pip's wheel cache** keys a built wheel by the sdist, not by CMAKE_ARGS: a
  wheel built once with other flags would be reused silently. The wheel is
  built here with pip's cache off into a directory named after the flags
  (`$FOGLINE_CACHE_DIR/llama-cpp-python/<version>-<hash>/`, with a build.json
  saying how), and the installed build is checked against the plan afterwards.
* **Build time.** fogline never loads libmtmd (multimodal), so `LLAVA_BUILD=OFF`
  skips it; nor does llama-cpp-python load llama.cpp's `common` library (only
  libmtmd links it), which its CMakeLists forces on: `llama_no_common.cmake`,
  included at llama.cpp's `project()` after that, turns it off again. Together
  they leave ggml and libllama, under half the CPU time of a default build.
  (The build already runs nproc + 2 jobs: scikit-build-core uses Ninja.)

A CMAKE_ARGS in the environment (BLAS, CUDA, a cross build: docs/boards.md) is
used as given, plus the two skips unless it sets them itself; the load-time guard
still covers AMX then.

    python -m fogline.llama_build            # build if needed, install, check
    python -m fogline.llama_build --plan     # print the decision only
    python -m fogline.llama_build --wheel-only   # build (or find) the wheel, install nothing
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from fogline.host import build_has_amx

PACKAGE = "llama-cpp-python"
VERSION = "0.3.36"  # the pin in pyproject.toml (tests/test_hidden_contract.py checks they agree)
NO_MTMD = "-DLLAVA_BUILD=OFF"
NO_COMMON_FILE = Path(__file__).with_name("llama_no_common.cmake")
_NO_COMMON_VAR = "-DCMAKE_PROJECT_llama.cpp_INCLUDE_BEFORE"
NO_COMMON = f"{_NO_COMMON_VAR}={NO_COMMON_FILE}"
# The wheel cache key names the file by its content, not by where this checkout happens to be.
_NO_COMMON_KEY = f"{_NO_COMMON_VAR}=no-common:{hashlib.sha256(NO_COMMON_FILE.read_bytes()).hexdigest()[:12]}"
_NO_AMX_FLAGS = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
_X86 = ("x86_64", "amd64", "i386", "i686")


@dataclass(frozen=True)
class BuildPlan:
    """How llama-cpp-python is compiled here, and what the result must report."""

    cmake_args: tuple[str, ...]  # one CMake argument each (CMAKE_ARGS is their shlex.join)
    reason: str
    # False: the installed build must not report AMX_INT8 = 1 (None: not ours to check).
    amx_allowed: bool | None

    @property
    def cmake_args_env(self) -> str:
        return shlex.join(self.cmake_args)

    @property
    def key(self) -> str:
        """Names the wheel directory: a wheel is reused only for the same version and flags."""
        flags = shlex.join(_NO_COMMON_KEY if a == NO_COMMON else a for a in self.cmake_args)
        return f"{VERSION}-{hashlib.sha256(flags.encode()).hexdigest()[:12]}"

    def accepts(self, system_info: str) -> bool:
        return self.amx_allowed is not False or not build_has_amx(system_info)


def cpu_flags(cpuinfo: str) -> set[str]:
    """The CPU feature words of /proc/cpuinfo ("flags" on x86, "Features" on ARM)."""
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return flags


def plan_build(cpuinfo: str, machine: str, user_cmake_args: str | None) -> BuildPlan:
    """The build for a host with this /proc/cpuinfo and `platform.machine()`."""
    if user_cmake_args and user_cmake_args.strip():
        args = tuple(shlex.split(user_cmake_args))
        skips = ((NO_MTMD, "-DLLAVA_BUILD", "libmtmd"), (NO_COMMON, _NO_COMMON_VAR, "common"))
        added = [(arg, what) for arg, var, what in skips if not any(a.startswith(var) for a in args)]
        reason = "CMAKE_ARGS from the environment"
        if added:
            reason += f", plus the skips of {' and '.join(what for _, what in added)}"
        return BuildPlan(args + tuple(arg for arg, _ in added), reason, None)
    amx = sorted(f for f in cpu_flags(cpuinfo) if f.startswith("amx"))
    if machine.lower() in _X86 and amx:
        return BuildPlan((NO_MTMD, NO_COMMON, "-DGGML_NATIVE=ON", f"-DCMAKE_C_FLAGS={_NO_AMX_FLAGS}",
                          f"-DCMAKE_CXX_FLAGS={_NO_AMX_FLAGS}"),
                         f"x86 with {' '.join(amx)}: native minus AMX (llama.cpp's AMX path crashes on "
                         "virtualised Sapphire/Granite Rapids)", False)
    return BuildPlan((NO_MTMD, NO_COMMON, "-DGGML_NATIVE=ON"), f"{machine or 'unknown machine'} without AMX: native", True)


def host_plan() -> BuildPlan:
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        cpuinfo = ""
    return plan_build(cpuinfo, platform.machine(), os.environ.get("CMAKE_ARGS"))


# --------------------------------------------------------------------------- doing it


def installed_build(python: str) -> tuple[str, str] | None:
    """(version, system info) of the llama-cpp-python `python` imports, or None if none."""
    probe = "import json, llama_cpp; print(json.dumps([llama_cpp.__version__, llama_cpp.llama_print_system_info().decode()]))"
    r = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        return None
    version, info = json.loads(r.stdout.strip().splitlines()[-1])
    return version, info.strip()


def _cache_dir() -> Path:
    return Path(os.environ.get("FOGLINE_CACHE_DIR") or Path.home() / ".cache" / "fogline") / "llama-cpp-python"


def build_wheel(plan: BuildPlan, python: str) -> Path:
    """The wheel for `plan`, built now unless a build with the same flags is cached."""
    target = _cache_dir() / plan.key
    wheels = sorted(target.glob("*.whl"))
    if wheels:
        print(f"llama_build: reusing {wheels[0]} (built with these flags)", flush=True)
        return wheels[0]
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{plan.key}.", dir=target.parent))
    try:
        env = {**os.environ, "CMAKE_ARGS": plan.cmake_args_env}
        start = time.monotonic()
        print(f"llama_build: building {PACKAGE}=={VERSION} (a few minutes) ...", flush=True)
        subprocess.run([python, "-m", "pip", "wheel", "--no-deps", "--no-cache-dir", "--no-binary", PACKAGE,
                        "--wheel-dir", str(tmp), f"{PACKAGE}=={VERSION}"], env=env, check=True)
        seconds = time.monotonic() - start
        (tmp / "build.json").write_text(json.dumps({"version": VERSION, "cmake_args": list(plan.cmake_args),
                                                    "reason": plan.reason, "build_s": round(seconds, 1),
                                                    "machine": platform.machine()}, indent=2) + "\n")
        os.replace(tmp, target)  # fails if another build got there first; then that one is used
        print(f"llama_build: built in {seconds:.0f} s", flush=True)
    except OSError:
        if not any(target.glob("*.whl")):
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return sorted(target.glob("*.whl"))[0]


def install(plan: BuildPlan, python: str) -> int:
    current = installed_build(python)
    if current is not None and current[0] == VERSION and plan.accepts(current[1]):
        print(f"llama_build: installed build fits this host: {current[1]}", flush=True)
        return 0
    if current is not None:
        print(f"llama_build: replacing the installed {PACKAGE} {current[0]} ({current[1]})", flush=True)
    wheel = build_wheel(plan, python)
    subprocess.run([python, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", str(wheel)], check=True)
    subprocess.run([python, "-m", "pip", "install", "-q", str(wheel)], check=True)  # its dependencies
    after = installed_build(python)
    if after is None or after[0] != VERSION or not plan.accepts(after[1]):
        print(f"llama_build: error: the installed build does not fit the plan: {after}", file=sys.stderr)
        return 1
    print(f"llama_build: installed; llama.cpp reports: {after[1]}", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fogline.llama_build", description=__doc__.split("\n")[0])
    p.add_argument("--plan", action="store_true", help="print the build decision and exit")
    p.add_argument("--wheel-only", action="store_true",
                   help="build the wheel into the cache (or find it there) without installing it: `make` runs this "
                        "while pip installs the other dependencies")
    args = p.parse_args(argv)
    plan = host_plan()
    if args.plan:
        print(f"CMAKE_ARGS={plan.cmake_args_env}\n# {plan.reason}")
        return 0
    print(f"llama_build: {PACKAGE}=={VERSION} CMAKE_ARGS={plan.cmake_args_env!r} ({plan.reason})", flush=True)
    try:
        if args.wheel_only:
            build_wheel(plan, sys.executable)
            return 0
        return install(plan, sys.executable)
    except subprocess.CalledProcessError as e:
        print(f"llama_build: error: {shlex.join(map(str, e.cmd))} exited with {e.returncode}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
