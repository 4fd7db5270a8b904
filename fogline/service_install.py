"""`fogline install-service`: write a systemd unit and a commented default config.

Upgrade rules, which are the point of this module:

* the **unit** belongs to fogline and is replaced on every install (an upgrade
  brings new hardening or options); local changes belong in drop-ins
  (`fogline-edge.service.d/*.conf`), which this never touches. A unit at that
  path that fogline did not write (no marker on its first line) is only
  replaced with `force=True`;
* the **config** (`edge.toml`) and the **secrets file** (`edge.env`, mode 0600)
  belong to the operator: written when absent, never overwritten, not even
  with `force`.

Every file is written to a temporary name in the same directory, fsynced and
renamed (or hard-linked, for create-if-absent) into place, so a crash leaves
either the old file or the new one, never half of one.

Nothing here talks to systemd; the caller prints the `systemctl` commands.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from fogline import __version__
from fogline import service_templates as T
from fogline.errors import ConfigError

Role = Literal["edge", "cloud"]
ROLES: tuple[Role, ...] = ("edge", "cloud")
DEFAULT_UNIT_DIR = Path("/etc/systemd/system")
DEFAULT_CONFIG_DIR = Path("/etc/fogline")
# ProtectHome=yes hides these from the service: an interpreter there cannot start.
_HIDDEN_BY_PROTECT_HOME = (Path("/home"), Path("/root"), Path("/run/user"))
_STANDARD_BIN = {Path(p) for p in ("/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin")}


def unit_name(role: Role) -> str:
    return f"fogline-{role}.service"


def render_unit(role: Role, config_dir: Path = DEFAULT_CONFIG_DIR, bin_dir: Path | None = None) -> str:
    """The unit text for `role`; `bin_dir` (where the `fogline` script lives) goes first on PATH."""
    _check_role(role)
    path = T.DEFAULT_PATH
    if bin_dir is not None and Path(bin_dir) not in _STANDARD_BIN and str(bin_dir) not in path.split(":"):
        path = f"{bin_dir}:{path}"
    text = T.EDGE_UNIT if role == "edge" else T.CLOUD_UNIT
    return _fill(text, config_dir).replace("@PATH@", path)


def render_config(role: Role, config_dir: Path = DEFAULT_CONFIG_DIR) -> str:
    _check_role(role)
    return _fill(T.EDGE_CONFIG if role == "edge" else T.CLOUD_CONFIG, config_dir)


def render_env(role: Role, config_dir: Path = DEFAULT_CONFIG_DIR) -> str:
    _check_role(role)
    return _fill(T.EDGE_ENV if role == "edge" else T.CLOUD_ENV, config_dir)


def install_service(role: Role, unit_dir: str | os.PathLike[str] = DEFAULT_UNIT_DIR,
                    config_dir: str | os.PathLike[str] = DEFAULT_CONFIG_DIR, force: bool = False,
                    *, bin_dir: str | os.PathLike[str] | None = None,
                    log: Callable[[str], None] = lambda _msg: None) -> list[Path]:
    """Write `fogline-<role>.service` and, if absent, `<role>.toml` and `<role>.env`.

    Returns the paths written (the unit always; the config files only when they
    were created). `log` hears one line per file, kept files included.
    Raises ConfigError for a unit fogline did not write (unless `force`) and for
    a `bin_dir` that the unit's ProtectHome=yes would hide (unless `force`).
    """
    _check_role(role)
    unit_dir, config_dir = Path(unit_dir), Path(config_dir)
    if not config_dir.is_absolute():
        raise ConfigError(f"config_dir must be an absolute path (the unit names it), got {config_dir}")
    bin_path = Path(bin_dir) if bin_dir is not None else None
    if bin_path is not None and not force:
        for hidden in _HIDDEN_BY_PROTECT_HOME:
            if bin_path == hidden or hidden in bin_path.parents:
                raise ConfigError(
                    f"fogline is installed under {bin_path}, which the unit's ProtectHome=yes hides from the "
                    f"service; install it in a virtualenv under /opt (python3 -m venv /opt/fogline) or "
                    f"/usr/local, or pass force and add a drop-in with ProtectHome=read-only")
    unit_dir.mkdir(parents=True, exist_ok=True)
    config_dir.mkdir(parents=True, exist_ok=True)

    written: list[Path] = []
    unit = unit_dir / unit_name(role)
    if unit.exists() and not force and not _written_by_fogline(unit):
        raise ConfigError(f"{unit} exists and was not written by fogline; move it away, put your changes "
                          f"in {unit.name}.d/*.conf drop-ins, or pass force to replace it")
    _write_atomic(unit, render_unit(role, config_dir, bin_path), 0o644, replace=True)
    written.append(unit)
    log(f"wrote {unit}")

    for path, text, mode in ((config_dir / f"{role}.toml", render_config(role, config_dir), 0o644),
                             (config_dir / f"{role}.env", render_env(role, config_dir), 0o600)):
        if _write_atomic(path, text, mode, replace=False):
            written.append(path)
            log(f"wrote {path}")
        else:
            log(f"kept {path} (configuration is never overwritten)")
    return written


def next_steps(role: Role, config_dir: Path = DEFAULT_CONFIG_DIR) -> str:
    """What the operator runs after an install (printed by the CLI)."""
    return (f"edit {config_dir}/{role}.toml (and secrets in {config_dir}/{role}.env), then:\n"
            f"  systemctl daemon-reload\n  systemctl enable --now {unit_name(role)}\n"
            f"  journalctl -u {unit_name(role)} -f")


def _check_role(role: str) -> None:
    if role not in ROLES:
        raise ConfigError(f"role must be one of {', '.join(ROLES)}, got {role!r}")


def _fill(text: str, config_dir: Path) -> str:
    return text.replace("@CONFIG_DIR@", str(config_dir)).replace("@VERSION@", __version__)


def _written_by_fogline(path: Path) -> bool:
    try:
        with path.open("r", encoding="utf-8", errors="replace") as f:
            return f.readline().startswith(T.MARKER)
    except OSError:
        return False


def _write_atomic(path: Path, text: str, mode: int, *, replace: bool) -> bool:
    """Write `text` to `path` via a temporary file in the same directory.

    replace=True: rename over whatever is there. replace=False: create only if
    absent (hard link, which fails atomically when the name exists); returns
    False and leaves the existing file untouched otherwise.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)  # not subject to the umask, unlike open()'s mode
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
            except OSError:  # a filesystem without hard links: check, then rename
                if path.exists():
                    return False
                os.rename(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    _fsync_dir(path.parent)
    return True


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- command line


def default_bin_dir() -> Path | None:
    """The directory of the running `fogline` script (a virtualenv's bin/), if it is one."""
    script = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    if script is not None and script.name == "fogline" and script.parent != Path(""):
        return script.resolve().parent
    exe_dir = Path(sys.executable).parent
    return exe_dir if (exe_dir / "fogline").exists() else None


def add_arguments(p: argparse.ArgumentParser, role: Role | None = None) -> None:
    """Flags of `fogline install-service` (role=None: with --role) or `fogline <role> install-service`."""
    if role is None:
        p.add_argument("--role", choices=ROLES, required=True, help="which daemon's unit to install")
    p.add_argument("--unit-dir", default=str(DEFAULT_UNIT_DIR), help="where the unit goes (default %(default)s)")
    p.add_argument("--config-dir", default=str(DEFAULT_CONFIG_DIR),
                   help="where the config goes; existing files are kept (default %(default)s)")
    p.add_argument("--bin-dir", default=None,
                   help="directory holding the fogline script, put first on the unit's PATH "
                        "(default: where this fogline runs from)")
    p.add_argument("--force", action="store_true",
                   help="replace a unit fogline did not write; accept a bin dir under /home or /root")
    if role is not None:
        p.set_defaults(role=role)


def main(args: argparse.Namespace) -> int:
    bin_dir = Path(args.bin_dir) if args.bin_dir else default_bin_dir()
    config_dir = Path(args.config_dir)
    install_service(args.role, Path(args.unit_dir), config_dir, args.force, bin_dir=bin_dir, log=print)
    print(next_steps(args.role, config_dir))
    return 0


def sync_repo(repo: Path) -> list[Path]:
    """Rewrite the repository's systemd/ files from the templates (defaults rendered)."""
    out = repo / "systemd"
    out.mkdir(exist_ok=True)
    files = {
        "fogline-edge.service": render_unit("edge"), "fogline-cloud.service": render_unit("cloud"),
        "edge.toml.example": render_config("edge"), "cloud.toml.example": render_config("cloud"),
        "edge.env.example": render_env("edge"), "cloud.env.example": render_env("cloud"),
    }
    for name, text in files.items():
        _write_atomic(out / name, text, 0o644, replace=True)
    return [out / n for n in files]


if __name__ == "__main__":  # pragma: no cover - maintenance entry point
    if sys.argv[1:] == ["--sync-repo"]:
        for p in sync_repo(Path(__file__).resolve().parent.parent):
            print(p)
    else:
        print("usage: python -m fogline.service_install --sync-repo", file=sys.stderr)
        sys.exit(2)
