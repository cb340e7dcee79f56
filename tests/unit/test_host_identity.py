"""host_labels: each step of the machine_id / system_uuid chain, on a fake root."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from agent.metrics import host_labels

ETC_ID = "0123456789abcdef0123456789abcdef"
DBUS_ID = "fedcba9876543210fedcba9876543210"
DMI = "4C4C4544-0042-3510-8051-B2C04F4E3432"


def _put(root: Path, rel: str, text: str) -> None:
    p = root / rel.lstrip("/")
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def test_etc_machine_id_first(tmp_path: Path) -> None:
    _put(tmp_path, "/etc/machine-id", ETC_ID + "\n")
    _put(tmp_path, "/var/lib/dbus/machine-id", DBUS_ID + "\n")
    _put(tmp_path, "/sys/class/dmi/id/product_uuid", DMI + "\n")
    state = tmp_path / "state"
    assert host_labels(root=str(tmp_path), state_dir=str(state)) == {
        "machine_id": ETC_ID, "system_uuid": DMI.lower()}
    assert not state.exists()  # nothing kept when the host has both ids


def test_dbus_when_etc_empty_or_uninitialized(tmp_path: Path) -> None:
    _put(tmp_path, "/var/lib/dbus/machine-id", DBUS_ID + "\n")
    _put(tmp_path, "/sys/class/dmi/id/product_uuid", DMI + "\n")
    _put(tmp_path, "/etc/machine-id", "")
    assert host_labels(root=str(tmp_path))["machine_id"] == DBUS_ID
    _put(tmp_path, "/etc/machine-id", "uninitialized\n")
    assert host_labels(root=str(tmp_path))["machine_id"] == DBUS_ID


def test_dmi_normalised_when_no_machine_id(tmp_path: Path) -> None:
    _put(tmp_path, "/sys/class/dmi/id/product_uuid", DMI + "\n")
    labels = host_labels(root=str(tmp_path), state_dir=str(tmp_path / "state"))
    assert labels == {"machine_id": "4c4c4544004235108051b2c04f4e3432",
                      "system_uuid": "4c4c4544-0042-3510-8051-b2c04f4e3432"}
    assert not (tmp_path / "state").exists()


def test_stored_id_created_once_and_reused(tmp_path: Path) -> None:
    state = tmp_path / "state"
    first = host_labels(root=str(tmp_path), state_dir=str(state))
    kept = (state / "machine-id").read_text().strip()
    assert len(kept) == 32 and int(kept, 16) >= 0
    assert first == {"machine_id": kept, "system_uuid": kept}
    assert stat.S_IMODE(os.stat(state / "machine-id").st_mode) == 0o644
    assert host_labels(root=str(tmp_path), state_dir=str(state)) == first
    assert (state / "machine-id").read_text().strip() == kept


def test_stored_id_fills_only_the_missing_label(tmp_path: Path) -> None:
    _put(tmp_path, "/etc/machine-id", ETC_ID + "\n")  # a VM without DMI
    state = tmp_path / "state"
    labels = host_labels(root=str(tmp_path), state_dir=str(state))
    kept = (state / "machine-id").read_text().strip()
    assert labels == {"machine_id": ETC_ID, "system_uuid": kept}


def test_placeholder_dmi_uuid_ignored(tmp_path: Path) -> None:
    _put(tmp_path, "/sys/class/dmi/id/product_uuid", "00000000-0000-0000-0000-000000000000\n")
    state = tmp_path / "state"
    labels = host_labels(root=str(tmp_path), state_dir=str(state))
    kept = (state / "machine-id").read_text().strip()
    assert labels == {"machine_id": kept, "system_uuid": kept}


def test_garbage_stored_id_replaced(tmp_path: Path) -> None:
    state = tmp_path / "state"
    _put(state, "/machine-id", "not an id\n")
    labels = host_labels(root=str(tmp_path), state_dir=str(state))
    kept = (state / "machine-id").read_text().strip()
    assert kept != "not an id" and len(kept) == 32
    assert labels["machine_id"] == kept


def test_never_empty_when_state_dir_unwritable(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the state directory should be
    labels = host_labels(root=str(tmp_path), state_dir=str(blocker / "state"))
    assert len(labels["machine_id"]) == 32 and labels["system_uuid"] == labels["machine_id"]
    labels = host_labels(root=str(tmp_path), state_dir=None)
    assert len(labels["machine_id"]) == 32
