"""`fogline edge install-service` / `fogline cloud install-service`: the role is implied by the group."""

from __future__ import annotations

from pathlib import Path

import pytest

from fogline.cli import main


@pytest.mark.parametrize("role", ["edge", "cloud"])
def test_group_install_service_writes_that_roles_unit_and_config(tmp_path: Path, role: str, capsys) -> None:
    units, etc = tmp_path / "units", tmp_path / "etc"
    assert main([role, "install-service", "--unit-dir", str(units), "--config-dir", str(etc)]) == 0
    other = "cloud" if role == "edge" else "edge"
    assert sorted(p.name for p in units.iterdir()) == [f"fogline-{role}.service"]
    assert sorted(p.name for p in etc.iterdir()) == [f"{role}.env", f"{role}.toml"]
    unit = (units / f"fogline-{role}.service").read_text()
    assert f"{role} serve" in unit and f"{other} serve" not in unit
    assert f"/{role}.toml" in unit
    assert f"systemctl enable --now fogline-{role}.service" in capsys.readouterr().out
    # the operator's config survives a reinstall
    (etc / f"{role}.toml").write_text("# mine\n")
    assert main([role, "install-service", "--unit-dir", str(units), "--config-dir", str(etc)]) == 0
    assert (etc / f"{role}.toml").read_text() == "# mine\n"


def test_group_install_service_takes_no_role_flag(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["edge", "install-service", "--role", "cloud", "--unit-dir", str(tmp_path)])
