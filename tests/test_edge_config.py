"""Edge configuration: TOML < FOGLINE_EDGE_* < flags, rejection with key and reason,
and the CLI refusing bad values and bad bundles before it listens."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from edge_runtime.config import EdgeConfig, load_config, physical_cores
from edge_runtime.serve import add_arguments, config_from_args
from fogline.errors import ConfigError


@pytest.fixture()
def bundle_dir(tmp_path):
    d = tmp_path / "edge"
    d.mkdir()
    return d


def test_defaults(bundle_dir):
    cfg = load_config(env={}, overrides={"bundle": str(bundle_dir)})
    assert cfg == EdgeConfig(bundle=str(bundle_dir))
    assert cfg.effective_threads() == physical_cores() >= 1
    assert cfg.served_model_name(20) == "fogline-edge-k20"


def test_precedence_toml_env_flags(bundle_dir, tmp_path):
    toml = tmp_path / "edge.toml"
    toml.write_text(f'bundle = "{bundle_dir}"\nport = 9000\nparallel = 2\nqueue_size = 5\ncapture_hidden = true\n')
    env = {"FOGLINE_EDGE_PARALLEL": "3", "FOGLINE_EDGE_QUEUE_SIZE": "7", "FOGLINE_EDGE_CAPTURE_HIDDEN": "off",
           "UNRELATED": "x"}
    cfg = load_config(toml, env=env, overrides={"queue_size": 9, "port": None})
    assert (cfg.port, cfg.parallel, cfg.queue_size, cfg.capture_hidden) == (9000, 3, 9, False)


def test_edge_table_and_relative_bundle(tmp_path):
    (tmp_path / "b").mkdir()
    toml = tmp_path / "edge.toml"
    toml.write_text('[edge]\nbundle = "b"\napi_key = "k"\n')
    cfg = load_config(toml, env={})
    assert cfg.bundle == str((tmp_path / "b").resolve()) and cfg.api_key == "k"
    assert cfg.redacted()["api_key"] == "***"


@pytest.mark.parametrize("overrides, env, key", [
    ({"port": 70000}, {}, "port"),
    ({"parallel": 0}, {}, "parallel"),
    ({"parallel": 8, "batch_size": 4}, {}, "batch_size"),
    ({"default_mode": "warp"}, {}, "default_mode"),
    ({"log_level": "loud"}, {}, "log_level"),
    ({"ctx_size": 3}, {}, "ctx_size"),
    ({}, {"FOGLINE_EDGE_PORT": "eighty"}, "port"),
    ({}, {"FOGLINE_EDGE_CAPTURE_HIDDEN": "maybe"}, "capture_hidden"),
    ({}, {"FOGLINE_EDGE_PORTT": "1"}, "FOGLINE_EDGE_PORTT"),
    ({"bundle": "/nonexistent/dir"}, {}, "bundle"),
])
def test_bad_values_name_key_and_reason(bundle_dir, overrides, env, key):
    with pytest.raises(ConfigError) as e:
        load_config(env=env, overrides={"bundle": str(bundle_dir), **overrides})
    assert str(e.value).startswith(key + ":")


def test_bad_toml(bundle_dir, tmp_path):
    t = tmp_path / "edge.toml"
    t.write_text(f'bundle = "{bundle_dir}"\nthreds = 2\n')
    with pytest.raises(ConfigError, match="threds: unknown key"):
        load_config(t, env={})
    t.write_text('port = "8080"\n')
    with pytest.raises(ConfigError, match="port: expected an integer"):
        load_config(t, env={})
    t.write_text("port = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(t, env={})


def test_flags_map_onto_fields(bundle_dir, monkeypatch):
    import argparse

    monkeypatch.setenv("FOGLINE_EDGE_THREADS", "3")
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--bundle", str(bundle_dir), "--parallel", "2", "--mode", "collab", "--no-verify-bundle",
                         "--ctx-size", "512"])
    cfg = config_from_args(args)
    assert (cfg.parallel, cfg.default_mode, cfg.verify_bundle, cfg.ctx_size, cfg.threads) == (2, "collab", False, 512, 3)


def test_cloud_flags_win_over_env_and_toml(bundle_dir, tmp_path, monkeypatch):
    import argparse

    toml = tmp_path / "edge.toml"
    toml.write_text('cloud_url = "ws://toml:1/ws"\ntau = 0.5\nspec_gamma = 2\ncloud_codec = "int8"\n')
    monkeypatch.setenv("FOGLINE_EDGE_CLOUD_URL", "ws://env:2/ws")
    monkeypatch.setenv("FOGLINE_EDGE_CLOUD_DEADLINE_MS", "777")
    monkeypatch.setenv("FOGLINE_EDGE_SPEC_GAMMA", "3")
    p = argparse.ArgumentParser()
    add_arguments(p)
    cfg = config_from_args(p.parse_args(["--bundle", str(bundle_dir), "--config", str(toml)]))
    assert (cfg.cloud_url, cfg.cloud_deadline_ms, cfg.spec_gamma, cfg.tau, cfg.cloud_codec) == \
        ("ws://env:2/ws", 777, 3, 0.5, "int8")
    cfg = config_from_args(p.parse_args([
        "--bundle", str(bundle_dir), "--config", str(toml), "--cloud-url", "wss://flag:3/ws", "--cloud-token", "t0k",
        "--cloud-codec", "fp32", "--cloud-deadline-ms", "0", "--tau", "0.25", "--spec-gamma", "6"]))
    assert (cfg.cloud_url, cfg.cloud_token, cfg.cloud_codec, cfg.cloud_deadline_ms, cfg.tau, cfg.spec_gamma) == \
        ("wss://flag:3/ws", "t0k", "fp32", 0, 0.25, 6)
    assert cfg.redacted()["cloud_token"] != "t0k"
    with pytest.raises(ConfigError, match="^tau:"):
        config_from_args(p.parse_args(["--bundle", str(bundle_dir), "--tau", "1.5"]))
    with pytest.raises(ConfigError, match="^spec_gamma:"):
        config_from_args(p.parse_args(["--bundle", str(bundle_dir), "--spec-gamma", "0"]))
    assert config_from_args(p.parse_args(["--bundle", str(bundle_dir), "--spec-stop", "0.5"])).spec_stop == 0.5
    with pytest.raises(ConfigError, match="^spec_stop:"):
        config_from_args(p.parse_args(["--bundle", str(bundle_dir), "--spec-stop", "1.5"]))


def _serve(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fogline.cli", "edge", "serve", "--port", "0", *args],
                          capture_output=True, text=True, env=env, timeout=120)


def test_cli_rejects_a_bad_value_before_listening(demo_bundle, subprocess_env):
    r = _serve(["--bundle", str(demo_bundle / "edge"), "--parallel", "0"], subprocess_env)
    assert r.returncode == 2 and "parallel:" in r.stderr and "listening" not in r.stderr


def test_cli_refuses_a_tampered_bundle(demo_bundle, subprocess_env, tmp_path):
    edge = tmp_path / "edge"
    shutil.copytree(demo_bundle / "edge", edge)
    manifest = json.loads((edge / "manifest.json").read_text())
    manifest["files"]["edge.gguf"] = "0" * 64
    (edge / "manifest.json").write_text(json.dumps(manifest))
    r = _serve(["--bundle", str(edge)], subprocess_env)
    assert r.returncode == 2 and "does not match its manifest" in r.stderr and "listening" not in r.stderr
    r = _serve(["--bundle", str(demo_bundle / "cloud")], subprocess_env)
    assert r.returncode == 2 and "is a cloud bundle" in r.stderr


@pytest.mark.parametrize("given,used", [
    ("ws://cloud:8700", "ws://cloud:8700/ws"),  # what the example config used to show
    ("ws://cloud:8700/", "ws://cloud:8700/ws"),
    ("wss://cloud.example?region=eu", "wss://cloud.example/ws?region=eu"),
    ("ws://cloud:8700/ws", "ws://cloud:8700/ws"),
    ("ws://proxy.example/fogline/ws", "ws://proxy.example/fogline/ws"),  # a path is the user's
    ("", ""),
])
def test_a_cloud_url_without_a_path_means_ws(bundle_dir, given, used, caplog):
    with caplog.at_level("INFO", logger="fogline.edge.config"):
        cfg = load_config(env={}, overrides={"bundle": str(bundle_dir), "cloud_url": given})
    assert cfg.cloud_url == used
    assert (f"cloud_url {given} has no path: using {used}" in caplog.text) is (given != used)


def test_the_daemon_logs_the_path_it_adds(bundle_dir, subprocess_env):
    """The INFO line reaches the daemon's log (the config is read before the log level is known)."""
    r = _serve(["--bundle", str(bundle_dir), "--cloud-url", "ws://127.0.0.1:9"], subprocess_env)
    assert r.returncode == 2 and "manifest" in r.stderr  # an empty bundle dir: stops before loading
    assert "INFO fogline.edge.config: cloud_url ws://127.0.0.1:9 has no path: using ws://127.0.0.1:9/ws" in r.stderr
