"""The device monitor on fake sysfs/procfs trees (real files in tmp_path) and on this machine."""

from __future__ import annotations

import json
from pathlib import Path

import psutil
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from edge_runtime.device_monitor import (DeviceMonitor, DeviceSnapshot, device_state, parse_throttled,
                                         register_device_metrics)

MEMINFO = """MemTotal:        3884512 kB
MemFree:          812344 kB
MemAvailable:    2105688 kB
Buffers:           61220 kB
SwapTotal:        102396 kB
SwapFree:          92156 kB
"""


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    return root


def common(cpus: str = "0-3") -> dict[str, str]:
    return {
        "proc/meminfo": MEMINFO,
        "proc/loadavg": "1.52 0.98 0.61 2/211 4242",
        "proc/pressure/memory": "some avg10=3.25 avg60=1.10 avg300=0.20 total=123456\n"
                                "full avg10=0.50 avg60=0.10 avg300=0.00 total=2345",
        "sys/devices/system/cpu/online": cpus,
    }


@pytest.fixture()
def raspberry_pi(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "pi", {
        **common(),
        "sys/class/thermal/thermal_zone0/type": "cpu-thermal",
        "sys/class/thermal/thermal_zone0/temp": "61234",
        "sys/class/thermal/thermal_zone0/trip_point_0_type": "critical",
        "sys/class/thermal/thermal_zone0/trip_point_0_temp": "110000",
        # under-voltage now + throttled now + both "occurred" bits
        "sys/devices/platform/soc/soc:firmware/get_throttled": "50005",
        "proc/self/cgroup": "0::/system.slice/fogline-edge.service",
        "sys/fs/cgroup/system.slice/fogline-edge.service/memory.current": "367001600",
        "sys/fs/cgroup/system.slice/fogline-edge.service/memory.max": "734003200",
    })


@pytest.fixture()
def jetson(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "jetson", {
        **common("0-5"),
        "sys/class/thermal/thermal_zone0/type": "CPU-therm",
        "sys/class/thermal/thermal_zone0/temp": "48500",
        "sys/class/thermal/thermal_zone0/trip_point_0_type": "passive",
        "sys/class/thermal/thermal_zone0/trip_point_0_temp": "97000",
        "sys/class/thermal/thermal_zone1/type": "GPU-therm",
        "sys/class/thermal/thermal_zone1/temp": "52000",
        "sys/class/thermal/thermal_zone1/trip_point_0_type": "critical",
        "sys/class/thermal/thermal_zone1/trip_point_0_temp": "105000",
        "sys/class/thermal/thermal_zone1/trip_point_1_type": "passive",
        "sys/class/thermal/thermal_zone1/trip_point_1_temp": "50000",  # GPU past its passive trip: throttling
        "sys/class/thermal/thermal_zone2/type": "PMIC-Die",
        "sys/class/thermal/thermal_zone2/temp": "-274000",  # a sensor that is off
        "sys/class/thermal/thermal_zone10/type": "Tboard_tegra",
        "sys/class/thermal/thermal_zone10/temp": "39000",
        "proc/self/cgroup": "12:memory:/system.slice/fogline-edge.service\n0::/system.slice/fogline-edge.service",
        "sys/fs/cgroup/memory/system.slice/fogline-edge.service/memory.usage_in_bytes": "1048576",
        "sys/fs/cgroup/memory/system.slice/fogline-edge.service/memory.limit_in_bytes": "9223372036854771712",
    })


@pytest.fixture()
def laptop(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "laptop", {
        **common("0-7"),
        "sys/class/power_supply/AC/type": "Mains",
        "sys/class/power_supply/AC/online": "0",
        "sys/class/power_supply/BAT0/type": "Battery",
        "sys/class/power_supply/BAT0/present": "1",
        "sys/class/power_supply/BAT0/status": "Discharging",
        "sys/class/power_supply/BAT0/capacity": "42",
        "sys/class/power_supply/hid-mouse-battery/type": "Battery",
        "sys/class/power_supply/hid-mouse-battery/scope": "Device",
        "sys/class/power_supply/hid-mouse-battery/capacity": "5",
    })


def test_raspberry_pi(raspberry_pi: Path) -> None:
    s = DeviceMonitor(raspberry_pi).sample()
    assert s.cpu_temp_c == pytest.approx(61.234) and s.max_temp_c == pytest.approx(61.234)
    assert s.thermal_throttling is None  # only a critical trip: the kernel does not say
    assert s.pi_throttle_flags == 0x50005
    assert s.throttled is True and s.undervoltage is True
    assert s.pi_flag_names() == ["under-voltage", "throttled", "under-voltage occurred", "throttling occurred"]
    assert s.is_hot() is True  # throttled, although only 61 °C
    assert (s.mem_total_bytes, s.mem_available_bytes) == (3884512 * 1024, 2105688 * 1024)
    assert (s.swap_total_bytes, s.swap_free_bytes) == (102396 * 1024, 92156 * 1024)
    assert (s.psi_memory_some_avg10, s.psi_memory_full_avg10) == (3.25, 0.5)
    assert (s.load_1m, s.load_5m, s.load_15m, s.cpus_online) == (1.52, 0.98, 0.61, 4)
    assert (s.cgroup_memory_bytes, s.cgroup_memory_max_bytes) == (367001600, 734003200)
    # a Pi has no power-supply class at all: unknown, not "not on battery"
    assert (s.ac_online, s.on_battery, s.battery_percent) == (None, None, None)


def test_jetson(jetson: Path) -> None:
    s = DeviceMonitor(jetson).sample()
    assert [z.kind for z in s.zones] == ["CPU-therm", "GPU-therm", "Tboard_tegra"]  # the dead sensor is skipped
    assert s.zones[2].name == "thermal_zone10"  # natural order, not thermal_zone1, thermal_zone10, thermal_zone2
    assert s.cpu_temp_c == 48.5 and s.max_temp_c == 52.0
    assert s.zones[1].passive_trip_c == 50.0 and s.zones[1].throttling is True
    assert s.thermal_throttling is True and s.throttled is True and s.is_hot() is True
    assert s.pi_throttle_flags is None and s.undervoltage is None
    assert s.cgroup_memory_bytes == 1048576 and s.cgroup_memory_max_bytes is None  # v1 "unlimited"
    assert s.cpus_online == 6


def test_cool_board_is_not_hot(jetson: Path) -> None:
    (jetson / "sys/class/thermal/thermal_zone1/temp").write_text("45000\n")
    s = DeviceMonitor(jetson).sample()
    assert s.thermal_throttling is False and s.throttled is False
    assert s.is_hot() is False and s.is_hot(hot_c=45.0) is True


def test_laptop_on_battery(laptop: Path) -> None:
    s = DeviceMonitor(laptop).sample()
    assert (s.ac_online, s.on_battery, s.battery_percent) == (False, True, 42.0)  # the mouse's 5% is not ours
    assert s.cpu_temp_c is None and s.is_hot() is None
    (laptop / "sys/class/power_supply/AC/online").write_text("1\n")
    (laptop / "sys/class/power_supply/BAT0/status").write_text("Charging\n")
    s = DeviceMonitor(laptop).sample()
    assert (s.ac_online, s.on_battery) == (True, False)


def test_mains_only_board(tmp_path: Path) -> None:
    root = write_tree(tmp_path / "mains", {"sys/class/power_supply/usb/type": "USB",
                                           "sys/class/power_supply/usb/online": "1"})
    s = DeviceMonitor(root).sample()
    assert (s.ac_online, s.on_battery, s.battery_percent) == (True, False, None)


def _leaves(obj: object) -> list[object]:
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _leaves(v)]
    return [obj]


def test_a_board_without_sensors_reports_absent_never_zero(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    mon = DeviceMonitor(tmp_path / "empty")
    s = mon.sample()
    for name in DeviceSnapshot.__dataclass_fields__:
        if name not in ("taken_at", "zones"):
            assert getattr(s, name) is None, name
    assert s.zones == () and s.throttled is None and s.is_hot() is None
    health = s.to_health()
    json.dumps(health)
    assert all(v is None for v in _leaves(health) if v != s.taken_at and v != {})
    registry = CollectorRegistry(auto_describe=True)
    register_device_metrics(registry, mon)
    samples = [line for line in generate_latest(registry).decode().splitlines()
               if line.startswith("fogline_device_") and "snapshot_timestamp" not in line]
    assert samples == []  # no sample at all, rather than zeros


def test_metrics_have_samples_only_for_present_sensors(raspberry_pi: Path) -> None:
    mon = DeviceMonitor(raspberry_pi)
    registry = CollectorRegistry(auto_describe=True)
    register_device_metrics(registry, mon)
    assert generate_latest(registry).decode().strip() == ""  # before the first sample: nothing
    mon.sample()
    text = generate_latest(registry).decode()
    assert 'fogline_device_temperature_celsius{type="cpu-thermal",zone="thermal_zone0"} 61.234' in text
    assert "fogline_device_cpu_temperature_celsius 61.234" in text
    assert 'fogline_device_throttle_flag{flag="under-voltage"} 1.0' in text
    assert 'fogline_device_throttle_flag{flag="soft temperature limit"} 0.0' in text  # readable and clear: 0
    assert "fogline_device_hot 1.0" in text and "fogline_device_undervoltage 1.0" in text
    assert 'fogline_device_memory_pressure_ratio{kind="some"} 0.0325' in text
    assert 'fogline_device_load_average{period="1m"} 1.52' in text
    assert "fogline_device_cgroup_memory_max_bytes 7.340032e+08" in text
    for absent in ("on_battery", "ac_online", "battery_ratio"):
        assert f"fogline_device_{absent}" not in text


def test_health_rendering(laptop: Path) -> None:
    h = DeviceMonitor(laptop).sample().to_health()
    assert h["power"] == {"ac_online": False, "on_battery": True, "battery_percent": 42.0}
    assert h["temperature_c"] == {"cpu": None, "max": None, "zones": {}}
    assert h["memory"]["available_ratio"] == round(2105688 / 3884512, 3)
    assert h["load"] == {"1m": 1.52, "5m": 0.98, "15m": 0.61, "cpus": 8}


def test_policy_view(raspberry_pi: Path, laptop: Path, tmp_path: Path) -> None:
    from edge_runtime.policy import DeviceState

    assert device_state(DeviceMonitor(raspberry_pi).sample()) == DeviceState(hot=True, on_battery=False)
    assert device_state(DeviceMonitor(laptop).sample()) == DeviceState(hot=False, on_battery=True)
    (tmp_path / "empty").mkdir()
    assert device_state(DeviceMonitor(tmp_path / "empty").sample()) == DeviceState()
    assert device_state(None) == DeviceState()


def test_parse_throttled() -> None:
    assert parse_throttled("throttled=0x50005") == 0x50005
    assert parse_throttled("0") == 0
    assert parse_throttled("80008") == 0x80008
    assert parse_throttled("garbage!") is None


async def test_run_samples_in_the_background(raspberry_pi: Path) -> None:
    import asyncio

    mon = DeviceMonitor(raspberry_pi)
    seen: list[DeviceSnapshot] = []
    got = asyncio.Event()

    def on_sample(s: DeviceSnapshot) -> None:
        seen.append(s)
        got.set()

    task = asyncio.create_task(mon.run(interval_s=0.01, on_sample=on_sample))
    await got.wait()
    task.cancel()
    assert seen[0].cpu_temp_c == pytest.approx(61.234) and mon.latest is seen[-1]


# --------------------------------------------------------------------------- the real machine


def _valid_zone_temps(root: Path) -> list[float]:
    temps = []
    for zone in root.glob("sys/class/thermal/thermal_zone*"):
        try:
            t = int((zone / "temp").read_text()) / 1000
        except (OSError, ValueError):
            continue
        if -50 < t < 150:
            temps.append(t)
    return temps


def test_this_machine() -> None:
    """Whatever this machine has is reported; whatever it lacks is None (checked independently)."""
    s = DeviceMonitor().sample()
    json.dumps(s.to_health())
    vm = psutil.virtual_memory()
    assert s.mem_total_bytes == vm.total
    assert s.mem_available_bytes is not None and 0 < s.mem_available_bytes <= vm.total
    assert s.load_1m is not None and s.load_1m >= 0
    assert s.cpus_online == psutil.cpu_count(logical=True)
    has_zone = bool(_valid_zone_temps(Path("/")))
    has_hwmon = any(e.current is not None for es in psutil.sensors_temperatures().values() for e in es)
    if has_zone or has_hwmon:
        assert s.max_temp_c is not None and -50 < s.max_temp_c < 150
    else:
        assert s.cpu_temp_c is None and s.max_temp_c is None and s.zones == ()
    supplies = list(Path("/sys/class/power_supply").glob("*"))
    if not supplies and psutil.sensors_battery() is None:
        assert (s.ac_online, s.on_battery, s.battery_percent) == (None, None, None)
    if Path("/proc/pressure/memory").exists():
        assert s.psi_memory_some_avg10 is not None and s.psi_memory_some_avg10 >= 0
    else:
        assert s.psi_memory_some_avg10 is None
    if not list(Path("/sys/devices/platform").glob("soc*/*firmware/get_throttled")) and not _has("vcgencmd"):
        assert s.pi_throttle_flags is None and s.undervoltage is None


def _has(exe: str) -> bool:
    import shutil

    return shutil.which(exe) is not None
