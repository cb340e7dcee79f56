"""node_cloud_info from sysfs alone: the provider as the node agent recognises it, from fake
sysfs trees in tmp dirs, and on this machine from the files read directly."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from agent.metrics import Families
from agent.node.cloud import LABELS, cloud_info, provider
from agent.node.node import NodeCollector


def sysfs(tmp_path: Path, files: dict[str, str]) -> str:
    for rel, text in files.items():
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
    return str(tmp_path)


DMI = "class/dmi/id"


@pytest.mark.parametrize(("files", "want"), [
    ({"hypervisor/uuid": "ec2e1916-9099-7caf-fd21-012345abcdef\n"}, "AWS"),
    ({"hypervisor/uuid": "EC2E1916-9099-7CAF-FD21-012345ABCDEF\n"}, "AWS"),
    ({"hypervisor/uuid": "4a3f0e1c-9099-7caf-fd21-012345abcdef\n", f"{DMI}/sys_vendor": "Xen\n"}, ""),
    ({f"{DMI}/board_vendor": "Amazon EC2\n", f"{DMI}/sys_vendor": "Amazon EC2\n"}, "AWS"),
    ({f"{DMI}/board_vendor": "Google\n", f"{DMI}/sys_vendor": "Google\n"}, "GCP"),
    ({f"{DMI}/board_vendor": "Microsoft Corporation\n"}, "Azure"),
    ({f"{DMI}/board_vendor": "DigitalOcean\n"}, "DigitalOcean"),
    ({f"{DMI}/board_vendor": "\n", f"{DMI}/sys_vendor": "Hetzner\n"}, "Hetzner"),
    ({f"{DMI}/sys_vendor": "Alibaba Cloud\n"}, "Alibaba"),
    ({f"{DMI}/sys_vendor": "Scaleway\n"}, "Scaleway"),
    ({f"{DMI}/sys_vendor": "QEMU\n", f"{DMI}/chassis_vendor": "IBM:Cloud Compute Server 1.0:Nitro\n"}, "IBM"),
    ({f"{DMI}/sys_vendor": "QEMU\n", f"{DMI}/chassis_asset_tag": "OracleCloud.com\n"}, "Oracle"),
    # the board vendor is looked at before the system vendor, as the node agent does
    ({f"{DMI}/board_vendor": "Google\n", f"{DMI}/sys_vendor": "Hetzner\n"}, "GCP"),
    ({f"{DMI}/board_vendor": "Intel Corporation\n", f"{DMI}/sys_vendor": "Dell Inc.\n"}, ""),
    ({f"{DMI}/sys_vendor": "QEMU\n", f"{DMI}/product_name": "Standard PC (Q35 + ICH9, 2009)\n"}, ""),
    ({}, ""),
], ids=lambda v: str(v) if isinstance(v, str) else "")
def test_provider_from_dmi_and_the_xen_uuid(tmp_path: Path, files: dict[str, str], want: str) -> None:
    assert provider(sysfs(tmp_path, files)) == want


def test_every_label_but_the_provider_is_empty_without_a_metadata_service(tmp_path: Path) -> None:
    info = cloud_info(sysfs(tmp_path, {f"{DMI}/board_vendor": "Amazon EC2\n", f"{DMI}/board_asset_tag": "i-0abc\n"}))
    assert tuple(info) == LABELS
    assert info == dict.fromkeys(LABELS, "") | {"provider": "AWS"}


def test_the_node_collector_exports_one_series_with_every_label(tmp_path: Path) -> None:
    node = NodeCollector(sysfs=sysfs(tmp_path, {f"{DMI}/sys_vendor": "Hetzner\n"}))
    f = Families({"machine_id": "m", "system_uuid": "u"})
    node.collect(f)
    [fam] = [m for m in f if m.name == "node_cloud_info"]
    assert fam.type == "gauge"
    [s] = fam.samples
    assert s.value == 1
    assert s.labels == {"machine_id": "m", "system_uuid": "u", **dict.fromkeys(LABELS, ""), "provider": "Hetzner"}


def test_on_this_machine_the_provider_is_what_its_files_say() -> None:
    """This VM's own sysfs, the files read here directly (this machine has no DMI at all: then
    no provider and every label empty)."""
    def read(rel: str) -> str | None:
        try:
            with open(os.path.join("/sys", rel)) as f:
                return f.read()
        except OSError:
            return None

    seen = {rel: read(rel) for rel in ("hypervisor/uuid", f"{DMI}/board_vendor", f"{DMI}/sys_vendor",
                                        f"{DMI}/chassis_vendor", f"{DMI}/chassis_asset_tag")}
    info = cloud_info("/sys")
    if all(v is None for v in seen.values()):
        assert info == dict.fromkeys(LABELS, "")
    else:  # a machine with DMI: the provider is one of the node agent's names or none
        assert info["provider"] in ("", "AWS", "GCP", "Azure", "DigitalOcean", "Hetzner", "Alibaba", "Scaleway",
                                    "IBM", "Oracle"), seen
        assert {k: v for k, v in info.items() if k != "provider"} == dict.fromkeys(LABELS[1:], "")
