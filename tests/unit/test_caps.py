"""Capability bookkeeping: what each probe family needs, what is lost without each capability,
and reading the sets from /proc/self/status. (Dropping for real, and the agent under setpriv,
are in tests/system/test_least_privilege.py.)"""

from __future__ import annotations

from pathlib import Path

from agent import caps


def test_families_need_bpf_and_perfmon_or_sys_admin() -> None:
    assert caps.can_load({"CAP_BPF", "CAP_PERFMON"}, "tcp") == (True, [])
    assert caps.can_load({"CAP_BPF"}, "tcp") == (False, ["CAP_PERFMON"])
    assert caps.can_load(set(), "profiler") == (False, ["CAP_BPF", "CAP_PERFMON"])
    assert caps.can_load({"CAP_SYS_ADMIN"}, "l7") == (True, [])


def test_lost_features_name_each_missing_capability() -> None:
    have = set(caps.REQUIRED_NAMES) - {"CAP_SYS_PTRACE"}
    lost = caps.lost_features(have, (6, 1))
    assert [c for c, _ in lost] == ["CAP_SYS_PTRACE"] and "TLS uprobes" in lost[0][1]
    assert caps.lost_features(set(caps.REQUIRED_NAMES), (6, 1)) == []
    # CAP_SYS_RESOURCE matters only where maps are charged to RLIMIT_MEMLOCK (before 5.11)
    without = set(caps.REQUIRED_NAMES) - {"CAP_SYS_RESOURCE"}
    assert caps.lost_features(without, (6, 1)) == [] and caps.lost_features(without, (5, 10))[0][0] == "CAP_SYS_RESOURCE"


def test_keep_after_start_drops_sys_resource_and_keeps_sys_admin_before_5_8() -> None:
    keep = caps.keep_after_start((6, 1))
    assert "CAP_SYS_RESOURCE" not in keep and {"CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE"} <= keep
    assert "CAP_SYS_ADMIN" not in keep and "CAP_SYS_ADMIN" in caps.keep_after_start((5, 4))


def test_held_reads_a_status_file(tmp_path: Path) -> None:
    status = tmp_path / "status"
    mask = (1 << 39) | (1 << 38) | (1 << 19)
    status.write_text(f"Name:\tx\nCapEff:\t{mask:016x}\nCapBnd:\t000001ffffffffff\nNoNewPrivs:\t1\n")
    assert caps.held("CapEff", str(status)) == {"CAP_BPF", "CAP_PERFMON", "CAP_SYS_PTRACE"}
    assert caps.held("CapBnd", str(status)) >= set(caps.REQUIRED_NAMES)
    assert caps.no_new_privs(str(status))


def test_net_admin_is_optional_kept_when_held_and_never_reported_lost() -> None:
    assert "CAP_NET_ADMIN" not in caps.REQUIRED_NAMES
    assert [n.cap for n in caps.OPTIONAL] == ["CAP_NET_ADMIN"]
    assert "CAP_NET_ADMIN" in caps.keep_after_start((6, 1))
    assert caps.lost_features(set(caps.REQUIRED_NAMES), (6, 1)) == []
