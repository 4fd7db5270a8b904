"""What the board the edge runs on is going through: heat, memory, load, power, throttling.

One `DeviceMonitor.sample()` reads, without torch and without root:

* temperatures — `/sys/class/thermal/thermal_zone*/{type,temp}` (Raspberry Pi
  `cpu-thermal`, Jetson `CPU-therm`/`GPU-therm`/..., x86 `x86_pkg_temp`), plus
  `psutil.sensors_temperatures()` (hwmon: `coretemp`, `k10temp`) on the real
  machine when no thermal zone exists;
* thermal throttling — a zone at or above its lowest `passive` trip point is
  being throttled by the kernel (that is what a passive trip means; works on
  Jetson and most ARM boards), and on a Raspberry Pi the firmware's own flags
  from `/sys/devices/platform/soc/soc:firmware/get_throttled` (or
  `vcgencmd get_throttled`): under-voltage, frequency capped, throttled, soft
  temperature limit;
* memory — `/proc/meminfo`, the pressure stall information
  `/proc/pressure/memory` (PSI; the share of time tasks waited for memory),
  and this process's cgroup usage and limit (the unit's MemoryMax=);
* load — `/proc/loadavg` and the number of online CPUs;
* power — `/sys/class/power_supply/*` (mains/USB online, battery status and
  capacity), or `psutil.sensors_battery()`.

A sensor the board does not have is **None** in the snapshot, absent from
/metrics (no sample at all), and null in /health — never 0, which would read as
"0 °C" or "on battery: no". All paths hang off `root`, so tests point the monitor
at a fake sysfs tree and the daemon at "/".
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("fogline.edge.device")

# A zone whose type matches this is a CPU (or CPU-bearing SoC) sensor.
_CPU_ZONE = re.compile(r"cpu|soc|x86_pkg|coretemp|k10temp|tctl|package|tdie|cluster", re.IGNORECASE)
_PLAUSIBLE_C = (-50.0, 150.0)  # outside: a sensor that is off or broken (e.g. -274 °C)
_UNLIMITED = 1 << 62  # cgroup v1 writes ~2^63 for "no limit"

# Raspberry Pi firmware throttle flags (get_throttled), bit -> meaning.
PI_FLAGS = {
    0: "under-voltage", 1: "arm frequency capped", 2: "throttled", 3: "soft temperature limit",
    16: "under-voltage occurred", 17: "arm frequency capping occurred", 18: "throttling occurred",
    19: "soft temperature limit occurred",
}
_PI_THROTTLED_NOW = (1 << 1) | (1 << 2) | (1 << 3)
_PI_UNDERVOLTAGE_NOW = 1 << 0
_PI_THROTTLED_PATHS = ("sys/devices/platform/soc/soc:firmware/get_throttled",
                       "sys/devices/platform/soc*/*firmware/get_throttled",
                       "sys/devices/platform/axi/*firmware/get_throttled")

DEFAULT_HOT_C = 75.0  # a Pi 4 starts soft-throttling at 80 °C, a Pi 5 at 80-85 °C


@dataclass(frozen=True)
class ThermalZone:
    name: str  # "thermal_zone0", or "hwmon:coretemp" for a psutil reading
    kind: str  # the zone's type: "cpu-thermal", "GPU-therm", "Package id 0", ...
    temp_c: float
    passive_trip_c: float | None = None  # the kernel throttles at/above this; None: no passive trip

    @property
    def throttling(self) -> bool | None:
        return None if self.passive_trip_c is None else self.temp_c >= self.passive_trip_c


@dataclass(frozen=True)
class DeviceSnapshot:
    """One reading of the board. None means "this board has no such sensor" (or it cannot be read)."""

    taken_at: float  # time.time()
    zones: tuple[ThermalZone, ...] = ()
    cpu_temp_c: float | None = None  # hottest CPU/SoC zone
    max_temp_c: float | None = None  # hottest zone of any kind (a Jetson GPU counts)
    thermal_throttling: bool | None = None  # some zone at/above its passive trip point
    pi_throttle_flags: int | None = None  # raw Raspberry Pi get_throttled bits (PI_FLAGS)
    mem_total_bytes: int | None = None
    mem_available_bytes: int | None = None
    swap_total_bytes: int | None = None
    swap_free_bytes: int | None = None
    cgroup_memory_bytes: int | None = None  # this service's usage (cgroup memory.current)
    cgroup_memory_max_bytes: int | None = None  # its limit (MemoryMax=); None when unlimited
    psi_memory_some_avg10: float | None = None  # % of the last 10 s some task stalled on memory
    psi_memory_full_avg10: float | None = None  # % of the last 10 s all tasks stalled on memory
    load_1m: float | None = None
    load_5m: float | None = None
    load_15m: float | None = None
    cpus_online: int | None = None
    ac_online: bool | None = None
    on_battery: bool | None = None
    battery_percent: float | None = None

    @property
    def throttled(self) -> bool | None:
        """Clocks are being held down now (firmware flags or a passive trip); None if unknowable."""
        pi = None if self.pi_throttle_flags is None else bool(self.pi_throttle_flags & _PI_THROTTLED_NOW)
        if pi is None and self.thermal_throttling is None:
            return None
        return bool(pi) or bool(self.thermal_throttling)

    @property
    def undervoltage(self) -> bool | None:
        return None if self.pi_throttle_flags is None else bool(self.pi_throttle_flags & _PI_UNDERVOLTAGE_NOW)

    @property
    def mem_available_ratio(self) -> float | None:
        if not self.mem_total_bytes or self.mem_available_bytes is None:
            return None
        return self.mem_available_bytes / self.mem_total_bytes

    def is_hot(self, hot_c: float = DEFAULT_HOT_C) -> bool | None:
        """Throttled, or a sensor at/above `hot_c`; None when the board shows neither temperature nor flags."""
        if self.throttled:
            return True
        if self.max_temp_c is not None:
            return self.max_temp_c >= hot_c
        return self.throttled  # False (flags readable, none set) or None

    def pi_flag_names(self) -> list[str]:
        flags = self.pi_throttle_flags or 0
        return [name for bit, name in PI_FLAGS.items() if flags & (1 << bit)]

    def to_health(self, hot_c: float = DEFAULT_HOT_C) -> dict[str, Any]:
        """The /health `device` object. Absent sensors are null, never 0."""
        return {
            "hot": self.is_hot(hot_c),
            "temperature_c": {
                "cpu": _round(self.cpu_temp_c), "max": _round(self.max_temp_c),
                "zones": _zone_temps(self.zones),
            },
            "throttled": self.throttled,
            "undervoltage": self.undervoltage,
            "throttle_flags": None if self.pi_throttle_flags is None else {
                "raw": hex(self.pi_throttle_flags), "set": self.pi_flag_names()},
            "memory": {
                "total_bytes": self.mem_total_bytes, "available_bytes": self.mem_available_bytes,
                "available_ratio": _round(self.mem_available_ratio, 3),
                "swap_total_bytes": self.swap_total_bytes, "swap_free_bytes": self.swap_free_bytes,
                "cgroup_bytes": self.cgroup_memory_bytes, "cgroup_max_bytes": self.cgroup_memory_max_bytes,
                "psi_some_avg10": self.psi_memory_some_avg10, "psi_full_avg10": self.psi_memory_full_avg10,
            },
            "load": {"1m": self.load_1m, "5m": self.load_5m, "15m": self.load_15m, "cpus": self.cpus_online},
            "power": {"ac_online": self.ac_online, "on_battery": self.on_battery,
                      "battery_percent": _round(self.battery_percent)},
            "taken_at": self.taken_at,
        }


def _zone_temps(zones: tuple[ThermalZone, ...]) -> dict[str, float | None]:
    kinds = [z.kind for z in zones]
    return {(z.kind if kinds.count(z.kind) == 1 else f"{z.kind} ({z.name})"): _round(z.temp_c) for z in zones}


def _round(v: float | None, nd: int = 1) -> float | None:
    return None if v is None else round(v, nd)


# --------------------------------------------------------------------------- reading


def _read(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip()
    except (OSError, ValueError):  # absent, unreadable, or a sensor that answers EINVAL/ENODATA
        return None


def _read_int(path: Path) -> int | None:
    text = _read(path)
    try:
        return None if text is None else int(text)
    except ValueError:
        return None


def parse_throttled(text: str) -> int | None:
    """`get_throttled` sysfs text ("50005") or vcgencmd output ("throttled=0x50005") -> bits."""
    m = re.search(r"(?:throttled=)?(?:0x)?([0-9a-fA-F]+)\s*$", text.strip())
    return int(m.group(1), 16) if m else None


def _millidegrees(raw: int) -> float:
    # thermal_zone*/temp and hwmon temp*_input are in m°C; a few old drivers report °C.
    return raw / 1000.0 if abs(raw) >= 1000 else float(raw)


def _plausible(t: float) -> bool:
    return _PLAUSIBLE_C[0] < t < _PLAUSIBLE_C[1]


class DeviceMonitor:
    """Reads a `DeviceSnapshot` from `root` ("/" for the real machine, a directory tree in tests)."""

    def __init__(self, root: str | os.PathLike[str] = "/", *, use_psutil: bool | None = None,
                 use_vcgencmd: bool | None = None, hot_c: float = DEFAULT_HOT_C) -> None:
        self.root = Path(root)
        real = self.root.resolve() == Path("/")
        # psutil and vcgencmd only ever describe the real machine: never mix them into a fake tree
        self.use_psutil = real if use_psutil is None else use_psutil
        self.use_vcgencmd = real if use_vcgencmd is None else use_vcgencmd
        self.hot_c = hot_c
        self.latest: DeviceSnapshot | None = None

    def _p(self, rel: str) -> Path:
        return self.root / rel

    def sample(self) -> DeviceSnapshot:
        zones = self._thermal_zones()
        cpu = [z.temp_c for z in zones if _CPU_ZONE.search(z.kind)]
        trips = [z.throttling for z in zones if z.throttling is not None]
        mem = self._meminfo()
        psi = self._psi_memory()
        load = self._loadavg()
        cg_cur, cg_max = self._cgroup_memory()
        ac, on_batt, pct = self._power()
        snap = DeviceSnapshot(
            taken_at=time.time(),
            zones=tuple(zones),
            cpu_temp_c=max(cpu) if cpu else None,
            max_temp_c=max(z.temp_c for z in zones) if zones else None,
            thermal_throttling=any(trips) if trips else None,
            pi_throttle_flags=self._pi_throttled(),
            mem_total_bytes=mem.get("MemTotal"), mem_available_bytes=mem.get("MemAvailable"),
            swap_total_bytes=mem.get("SwapTotal"), swap_free_bytes=mem.get("SwapFree"),
            cgroup_memory_bytes=cg_cur, cgroup_memory_max_bytes=cg_max,
            psi_memory_some_avg10=psi.get("some"), psi_memory_full_avg10=psi.get("full"),
            load_1m=load[0] if load else None, load_5m=load[1] if load else None,
            load_15m=load[2] if load else None,
            cpus_online=self._cpus_online(),
            ac_online=ac, on_battery=on_batt, battery_percent=pct,
        )
        self.latest = snap
        return snap

    async def run(self, interval_s: float = 5.0,
                  on_sample: Callable[[DeviceSnapshot], None] | None = None) -> None:
        """Sample every `interval_s` until cancelled (reads happen in a worker thread)."""
        while True:
            try:
                snap = await asyncio.to_thread(self.sample)
            except Exception:  # a monitor must never take the daemon down
                log.exception("device sample failed")
            else:
                if on_sample is not None:
                    on_sample(snap)
            await asyncio.sleep(interval_s)

    # ----------------------------------------------------------------- sources

    def _thermal_zones(self) -> list[ThermalZone]:
        zones = []
        base = self._p("sys/class/thermal")
        for d in sorted(base.glob("thermal_zone*"), key=lambda p: _natural(p.name)):
            raw = _read_int(d / "temp")
            if raw is None:
                continue
            t = _millidegrees(raw)
            if not _plausible(t):
                continue
            passive = []
            for tt in d.glob("trip_point_*_type"):
                if _read(tt) == "passive":
                    v = _read_int(d / tt.name.replace("_type", "_temp"))
                    if v is not None and _plausible(_millidegrees(v)):
                        passive.append(_millidegrees(v))
            zones.append(ThermalZone(d.name, _read(d / "type") or d.name, t, min(passive) if passive else None))
        if not zones and self.use_psutil:
            zones = list(_psutil_zones())
        return zones

    def _pi_throttled(self) -> int | None:
        for pattern in _PI_THROTTLED_PATHS:
            for path in sorted(self.root.glob(pattern)):
                text = _read(path)
                if text:
                    bits = parse_throttled(text)
                    if bits is not None:
                        return bits
        if self.use_vcgencmd:
            return _vcgencmd_throttled()
        return None

    def _meminfo(self) -> dict[str, int]:
        text = _read(self._p("proc/meminfo"))
        out: dict[str, int] = {}
        if text:
            for line in text.splitlines():
                m = re.match(r"(\w+):\s+(\d+)\s*kB", line)
                if m and m.group(1) in ("MemTotal", "MemAvailable", "SwapTotal", "SwapFree"):
                    out[m.group(1)] = int(m.group(2)) * 1024
        elif self.use_psutil:
            import psutil

            vm, sw = psutil.virtual_memory(), psutil.swap_memory()
            out = {"MemTotal": vm.total, "MemAvailable": vm.available, "SwapTotal": sw.total, "SwapFree": sw.free}
        return out

    def _psi_memory(self) -> dict[str, float]:
        text = _read(self._p("proc/pressure/memory"))
        out: dict[str, float] = {}
        for line in (text or "").splitlines():
            m = re.match(r"(some|full)\s.*?avg10=([0-9.]+)", line)
            if m:
                out[m.group(1)] = float(m.group(2))
        return out

    def _loadavg(self) -> tuple[float, float, float] | None:
        text = _read(self._p("proc/loadavg"))
        if text:
            parts = text.split()
            try:
                return float(parts[0]), float(parts[1]), float(parts[2])
            except (IndexError, ValueError):
                return None
        if self.use_psutil:
            import psutil

            return tuple(psutil.getloadavg())  # type: ignore[return-value]
        return None

    def _cpus_online(self) -> int | None:
        text = _read(self._p("sys/devices/system/cpu/online"))
        if text:
            n = 0
            for part in text.split(","):
                lo, _, hi = part.partition("-")
                try:
                    n += (int(hi) - int(lo) + 1) if hi else 1
                except ValueError:
                    return None
            return n
        if self.use_psutil:
            import psutil

            return psutil.cpu_count(logical=True)
        return None

    def _cgroup_memory(self) -> tuple[int | None, int | None]:
        text = _read(self._p("proc/self/cgroup"))
        if not text:
            return None, None
        for line in text.splitlines():
            _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
            rel = path.lstrip("/")
            if controllers == "":  # cgroup v2 (unified)
                for d in (self._p("sys/fs/cgroup") / rel, self._p("sys/fs/cgroup")):
                    cur = _read_int(d / "memory.current")
                    if cur is not None:
                        mx = _read(d / "memory.max")
                        return cur, (int(mx) if mx and mx.isdigit() else None)
            elif "memory" in controllers.split(","):  # cgroup v1
                for d in (self._p("sys/fs/cgroup/memory") / rel, self._p("sys/fs/cgroup/memory")):
                    cur = _read_int(d / "memory.usage_in_bytes")
                    if cur is not None:
                        mx = _read_int(d / "memory.limit_in_bytes")
                        return cur, (mx if mx is not None and mx < _UNLIMITED else None)
        return None, None

    def _power(self) -> tuple[bool | None, bool | None, float | None]:
        """(AC online, on battery, battery %), each None when the board cannot say."""
        supplies = sorted(self._p("sys/class/power_supply").glob("*"))
        ac: bool | None = None
        battery_status: str | None = None
        pct: float | None = None
        have_battery = False
        for d in supplies:
            kind = _read(d / "type")
            if kind in ("Mains", "USB", "Wireless"):
                online = _read_int(d / "online")
                if online is not None:
                    ac = bool(ac) or online == 1
            elif kind == "Battery":
                if _read(d / "scope") == "Device" or _read_int(d / "present") == 0:
                    continue  # a mouse's battery, or an empty bay
                have_battery = True
                battery_status = battery_status or _read(d / "status")
                cap = _read_int(d / "capacity")
                if cap is not None and pct is None:
                    pct = float(cap)
        if have_battery:
            discharging = battery_status == "Discharging"
            return ac, discharging or ac is False, pct
        if supplies:
            return ac, (False if ac is not None else None), None
        if self.use_psutil:
            import psutil

            b = psutil.sensors_battery() if hasattr(psutil, "sensors_battery") else None
            if b is not None:
                plugged = b.power_plugged
                return plugged, (None if plugged is None else not plugged), float(b.percent)
        return None, None, None


def _natural(name: str) -> tuple[str, int]:
    m = re.match(r"(\D*)(\d*)", name)
    return (m.group(1), int(m.group(2) or 0)) if m else (name, 0)


def _psutil_zones() -> Iterator[ThermalZone]:
    import psutil

    fn = getattr(psutil, "sensors_temperatures", None)
    try:
        temps = fn() if fn else {}
    except Exception:
        return
    for chip, entries in sorted(temps.items()):
        for i, e in enumerate(entries):
            if e.current is not None and _plausible(e.current):
                kind = f"{chip} {e.label}".strip() if e.label else chip
                yield ThermalZone(f"hwmon:{chip}:{i}", kind, float(e.current), None)


_vcgencmd_missing = False


def _vcgencmd_throttled() -> int | None:
    global _vcgencmd_missing
    if _vcgencmd_missing:
        return None
    exe = shutil.which("vcgencmd")
    if exe is None:
        _vcgencmd_missing = True
        return None
    try:
        out = subprocess.run([exe, "get_throttled"], capture_output=True, text=True, timeout=2, check=True).stdout
    except (OSError, subprocess.SubprocessError):  # no /dev/vchiq under PrivateDevices=yes: absent
        _vcgencmd_missing = True
        return None
    return parse_throttled(out)


def device_state(snapshot: DeviceSnapshot | None, hot_c: float = DEFAULT_HOT_C) -> Any:
    """The `auto` policy's view of the board (an edge_runtime.policy.DeviceState).

    Unknown counts as "no": a board without sensors is neither hot nor on battery.
    """
    from edge_runtime.policy import DeviceState

    if snapshot is None:
        return DeviceState()
    return DeviceState(hot=bool(snapshot.is_hot(hot_c)), on_battery=bool(snapshot.on_battery))


# --------------------------------------------------------------------------- prometheus


class DeviceCollector:
    """A prometheus_client collector over the monitor's latest snapshot.

    Families are rendered at scrape time and only with the samples the board has:
    an absent sensor has no sample (not a 0). Register with
    `register_device_metrics(registry, monitor)`.
    """

    def __init__(self, latest: Callable[[], DeviceSnapshot | None], hot_c: float = DEFAULT_HOT_C) -> None:
        self._latest = latest
        self.hot_c = hot_c

    def describe(self) -> Iterator[Any]:
        return iter(self._families(None))

    def collect(self) -> Iterator[Any]:
        snap = self._latest()
        if snap is None:
            return iter(())
        return iter([f for f in self._families(snap) if f.samples])

    def _families(self, s: DeviceSnapshot | None) -> list[Any]:
        from prometheus_client.core import GaugeMetricFamily as G

        def g(name: str, doc: str, value: float | bool | None = None, labels: list[str] | None = None) -> Any:
            fam = G(f"fogline_device_{name}", doc, labels=labels)
            if value is not None and labels is None:
                fam.add_metric([], float(value))
            return fam

        if s is None:
            s = DeviceSnapshot(taken_at=0.0)  # all absent: describe() only needs the names
        temps = g("temperature_celsius", "Thermal zone temperature", labels=["zone", "type"])
        for z in s.zones:
            temps.add_metric([z.name, z.kind], z.temp_c)
        psi = g("memory_pressure_ratio", "Memory pressure stall information, avg10 (0..1)", labels=["kind"])
        for kind, v in (("some", s.psi_memory_some_avg10), ("full", s.psi_memory_full_avg10)):
            if v is not None:
                psi.add_metric([kind], v / 100.0)
        load = g("load_average", "System load average", labels=["period"])
        for period, v in (("1m", s.load_1m), ("5m", s.load_5m), ("15m", s.load_15m)):
            if v is not None:
                load.add_metric([period], v)
        flags = g("throttle_flag", "Raspberry Pi firmware throttle flag (1 set, 0 clear)", labels=["flag"])
        if s.pi_throttle_flags is not None:
            for bit, name in PI_FLAGS.items():
                flags.add_metric([name], float(bool(s.pi_throttle_flags & (1 << bit))))
        pct = s.battery_percent
        return [
            temps,
            g("cpu_temperature_celsius", "Hottest CPU/SoC thermal zone", s.cpu_temp_c),
            g("hot", "1 when throttled or at/above the hot threshold", s.is_hot(self.hot_c)),
            g("throttled", "1 while clocks are held down (firmware flags or passive trip)", s.throttled),
            g("undervoltage", "1 while the supply voltage is too low (Raspberry Pi)", s.undervoltage),
            flags,
            g("memory_total_bytes", "Physical memory", s.mem_total_bytes),
            g("memory_available_bytes", "Memory available without swapping", s.mem_available_bytes),
            g("swap_total_bytes", "Swap space", s.swap_total_bytes),
            g("swap_free_bytes", "Free swap space", s.swap_free_bytes),
            g("cgroup_memory_bytes", "Memory charged to this service's cgroup", s.cgroup_memory_bytes),
            g("cgroup_memory_max_bytes", "This service's cgroup memory limit", s.cgroup_memory_max_bytes),
            psi,
            load,
            g("cpus_online", "Online CPUs", s.cpus_online),
            g("ac_online", "1 when mains/USB power is online", s.ac_online),
            g("on_battery", "1 when running from a battery", s.on_battery),
            g("battery_ratio", "Battery charge (0..1)", None if pct is None else pct / 100.0),
            g("snapshot_timestamp_seconds", "When the device was last sampled", s.taken_at or None),
        ]


def register_device_metrics(registry: Any, monitor: DeviceMonitor) -> DeviceCollector:
    """Export `monitor.latest` in `registry` (a prometheus_client CollectorRegistry)."""
    collector = DeviceCollector(lambda: monitor.latest, monitor.hot_c)
    registry.register(collector)
    return collector
