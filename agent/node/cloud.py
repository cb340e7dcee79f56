"""The labels of `node_cloud_info`, from what the machine says of itself in sysfs (DMI and the
Xen hypervisor's uuid) and nothing else: no metadata service is called.

The provider is recognised the way the node agent recognises it (node/metadata/detect*.go):
/sys/hypervisor/uuid starting with "ec2" (older AWS Xen instances), then the DMI board vendor
(Amazon EC2, Google, Microsoft Corporation, DigitalOcean), the system vendor (Hetzner, Alibaba
Cloud, Scaleway), the chassis vendor (IBM:Cloud Compute Server...) and the chassis asset tag
(OracleCloud.com). Every other label (account, instance, type, region, zone, addresses) the node
agent takes from the provider's metadata service; here they stay empty, as the node agent
leaves them when it knows no provider.
"""

from __future__ import annotations

import os

LABELS = ("provider", "account_id", "instance_id", "instance_type", "instance_life_cycle", "region",
          "availability_zone", "availability_zone_id", "local_ipv4", "public_ipv4")

_BY_BOARD_VENDOR = {"Amazon EC2": "AWS", "Google": "GCP", "Microsoft Corporation": "Azure",
                    "DigitalOcean": "DigitalOcean"}
_BY_SYS_VENDOR = {"Hetzner": "Hetzner", "Alibaba Cloud": "Alibaba", "Scaleway": "Scaleway"}


def _read(sysfs: str, path: str) -> str | None:
    try:
        with open(os.path.join(sysfs, path), errors="replace") as f:
            return f.read(4096)
    except OSError:
        return None


def provider(sysfs: str = "/sys") -> str:
    """The cloud provider's name as the node agent spells it, or "" when none is recognised."""
    hv = _read(sysfs, "hypervisor/uuid")
    if hv is not None and hv.lower().startswith("ec2"):
        return "AWS"
    board = (_read(sysfs, "class/dmi/id/board_vendor") or "").strip()
    if board in _BY_BOARD_VENDOR:
        return _BY_BOARD_VENDOR[board]
    system = (_read(sysfs, "class/dmi/id/sys_vendor") or "").strip()
    if system in _BY_SYS_VENDOR:
        return _BY_SYS_VENDOR[system]
    if (_read(sysfs, "class/dmi/id/chassis_vendor") or "").startswith("IBM:Cloud Compute Server"):
        return "IBM"
    if (_read(sysfs, "class/dmi/id/chassis_asset_tag") or "").strip() == "OracleCloud.com":
        return "Oracle"
    return ""


def cloud_info(sysfs: str = "/sys") -> dict[str, str]:
    """Every label of node_cloud_info: the provider, the rest empty (they need a network call)."""
    return dict.fromkeys(LABELS, "") | {"provider": provider(sysfs)}
