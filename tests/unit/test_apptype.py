"""Application type rules (the node agent's apptype/apptype.go, commit 89a16af8) on real process
titles, binary inspection on ELF files built here, and the collector on a procfs laid out in a
temporary directory."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from agent.containers.apptype import (
    AppTypeCollector,
    command,
    guess_by_cmdline,
    guess_by_exe,
    inspect_binary,
    is_dotnet_command,
)
from agent.containers.registry import Registry
from agent.metrics import Families


def argv(*args: str) -> bytes:
    """A /proc/PID/cmdline: NUL-separated arguments ending with a NUL."""
    return b"".join(a.encode() + b"\0" for a in args)


@pytest.mark.parametrize(("cmdline", "expected"), [
    # titles as the servers set them (ps shows argv[0] with spaces, no NULs)
    (argv("postgres: checkpointer "), "postgres"),
    (argv("/usr/lib/postgresql/15/bin/postgres", "-D", "/var/lib/postgresql"), "postgres"),
    (argv("postgres: postgres postgres 127.0.0.1(5432) idle"), "postgres"),
    (argv("nginx: master process nginx -c /etc/nginx/nginx.conf"), "nginx"),
    (argv("nginx: worker process"), "nginx"),
    (argv("/usr/bin/redis-server 127.0.0.1:6379"), "redis"),
    (argv("redis-sentinel *:26379 [sentinel]"), "redis-sentinel"),
    (argv("/usr/sbin/pgbouncer", "/etc/pgbouncer.ini"), "pgbouncer"),
    (argv("/usr/sbin/mysqld"), "mysql"),
    (argv("/usr/sbin/mariadbd", "--user=mysql"), "mysql"),
    (argv("/usr/bin/mongod", "--config", "/etc/mongod.conf"), "mongodb"),
    (argv("/usr/bin/memcached", "-m", "64"), "memcached"),
    (argv("/usr/bin/coroot"), "coroot-community-edition"),
    (argv("/usr/bin/coroot-ee"), "coroot-enterprise-edition"),
    (argv("/usr/bin/coroot-node-agent"), "coroot-node-agent"),
    (argv("/usr/bin/prometheus", "--config.file=p.yml"), "prometheus"),
    (argv("/usr/bin/vmstorage-prod"), "victoria-metrics"),
    (argv("/bin/victoria-logs-prod"), "victoria-logs"),
    (argv("/usr/sbin/httpd", "-DFOREGROUND"), "httpd"),
    (argv("/usr/sbin/apache"), "httpd"),
    # the command line's content, wherever it is; a rule before "java" wins over it
    (argv("/usr/bin/java", "-Xmx1g", "-cp", "/opt/kafka/libs/*", "kafka.Kafka", "server.properties"), "kafka"),
    (argv("java", "org.elasticsearch.bootstrap.Elasticsearch"), "elasticsearch"),
    (argv("java", "org.apache.zookeeper.server.quorum.QuorumPeerMain"), "zookeeper"),
    (argv("java", "org.apache.catalina.startup.Bootstrap", "start"), "tomcat"),
    (argv("/usr/lib/jvm/bin/java", "-jar", "app.jar"), "java"),
    (argv("/usr/lib/erlang/erts/bin/beam.smp", "--", "-root", "/usr/lib/rabbitmq"), "rabbitmq"),
    (argv("/opt/couchbase/bin/beam.smp", "-couch_ini"), "couchbase"),
    (argv("/usr/lib/erlang/erts/bin/beam.smp", "--", "-root", "/x"), ""),
    # interpreters: the command's name
    (argv("/usr/bin/python3.11", "app.py"), "python"),
    (argv("python", "-m", "http.server"), "python"),
    (argv("php-fpm: master process (/etc/php/8.2/fpm/php-fpm.conf)"), "php"),
    (argv("/usr/sbin/php-fpm8.2"), "php"),
    (argv("node", "server.js"), "nodejs"),
    (argv("/usr/bin/nodejs18"), "nodejs"),
    (argv("ruby3.1", "app.rb"), "ruby"),
    # nothing
    (argv("/usr/bin/sleep", "60"), ""),
    (argv("sh", "-c", "exec postgres"), ""),
    (argv("/usr/bin/python3-config"), ""),
    (b"", ""),
    (b"\0", ""),
    (argv("   "), ""),
])
def test_cmdline_rules(cmdline: bytes, expected: str) -> None:
    assert guess_by_cmdline(cmdline) == expected


def test_command_is_the_first_word_of_argv0_without_one_trailing_colon() -> None:
    assert command(b"postgres: walwriter \0") == b"postgres"
    assert command(b"/usr/bin/redis-server 127.0.0.1:6379\0") == b"/usr/bin/redis-server"
    assert command(b"a::\0b") == b"a:"
    assert command(b"\0postgres") == b""


def test_exe_rules_cover_interpreters_only() -> None:
    assert guess_by_exe("/usr/bin/python3.11") == "python"
    assert guess_by_exe("/usr/local/bin/node") == "nodejs"
    assert guess_by_exe("/usr/bin/ruby3.1") == "ruby"
    assert guess_by_exe("/usr/sbin/php-fpm8.2") == "php"
    assert guess_by_exe("/usr/bin/python3.11 (deleted)") == ""
    assert guess_by_exe("/usr/lib/postgresql/15/bin/postgres") == ""


def test_dotnet_command_is_dotnet_with_a_dll() -> None:
    assert is_dotnet_command(b"/usr/share/dotnet/dotnet\0Accounting.dll")
    assert not is_dotnet_command(b"/usr/share/dotnet/dotnet\0--info")
    assert not is_dotnet_command(b"dotnet")


# ------------------------------------------------------------ binaries ---


def _cc(tmp: Path, name: str, *flags: str) -> Path:
    src = tmp / "main.c"
    src.write_text("int main(void) { return 0; }\n")
    out = tmp / name
    subprocess.run(["gcc", "-o", str(out), str(src), *flags], check=True, capture_output=True)
    return out


def _with_section(binary: Path, section: str, content: bytes) -> Path:
    data = binary.parent / f"{section.strip('.')}.bin"
    data.write_bytes(content)
    out = binary.parent / f"{binary.name}-{section.strip('.')}"
    subprocess.run(["objcopy", "--remove-section", section, "--add-section", f"{section}={data}", str(binary), str(out)],
                   check=True, capture_output=True)
    return out


def test_binary_kinds_from_elf_sections(tmp_path: Path) -> None:
    plain = _cc(tmp_path, "plain")
    kinds = inspect_binary(str(plain))
    assert not kinds.golang and not kinds.rust and not kinds.dotnet_apphost

    go = _with_section(plain, ".go.buildinfo", b"\xff Go buildinf:" + b"\x08\x02" + b"\0" * 14)
    assert inspect_binary(str(go)).golang
    not_go = _with_section(plain, ".go.buildinfo", b"\0" * 32)
    assert not inspect_binary(str(not_go)).golang

    rust = _with_section(plain, ".comment", b"GCC: (Debian 12.2.0-14) 12.2.0\0rustc version 1.80.0\0")
    assert inspect_binary(str(rust)).rust
    assert not inspect_binary(str(plain)).rust  # gcc's own .comment

    apphost = _cc(tmp_path, "apphost", "-Wl,-rpath,$ORIGIN/netcoredeps")
    assert inspect_binary(str(apphost)).dotnet_apphost
    old_tags = _cc(tmp_path, "apphost-rpath", "-Wl,--disable-new-dtags,-rpath,$ORIGIN/netcoredeps")
    assert inspect_binary(str(old_tags)).dotnet_apphost
    other = _cc(tmp_path, "other-rpath", "-Wl,-rpath,$ORIGIN/lib")
    assert not inspect_binary(str(other)).dotnet_apphost


def test_binary_that_is_not_elf_or_missing_has_no_kinds(tmp_path: Path) -> None:
    script = tmp_path / "script.sh"
    script.write_text("#!/bin/sh\n")
    assert inspect_binary(str(script)) == inspect_binary(str(tmp_path / "missing"))
    assert not inspect_binary(str(script)).golang


# ------------------------------------------------------------ collector ---


class Procfs:
    """A procfs and cgroupfs in a directory: processes with a cmdline and an exe link."""

    def __init__(self, root: Path) -> None:
        self.root = root
        (root / "cgroup" / "unified").mkdir(parents=True)
        (root / "cgroup" / "unified" / "cgroup.controllers").write_text("")
        (root / "proc").mkdir()

    def add(self, pid: int, unit: str | None, cmdline: bytes, exe: str) -> None:
        d = self.root / "proc" / str(pid)
        d.mkdir()
        fields = ["S"] + ["0"] * 18 + [str(100 + pid)] + ["0"] * 20
        (d / "stat").write_text(f"{pid} (x) " + " ".join(fields) + "\n")
        path = f"/system.slice/{unit}" if unit else "/user.slice/session-1.scope"
        (d / "cgroup").write_text(f"0::{path}\n")
        (d / "environ").write_bytes(b"")
        (d / "cmdline").write_bytes(cmdline)
        os.symlink(exe, d / "exe")
        (self.root / "cgroup" / "unified" / path.lstrip("/")).mkdir(parents=True, exist_ok=True)

    def remove(self, pid: int) -> None:
        shutil.rmtree(self.root / "proc" / str(pid))

    def registry(self) -> Registry:
        return Registry(procfs=str(self.root / "proc"), cgroupfs=str(self.root / "cgroup"), min_container_age=0)


def types(c: AppTypeCollector) -> dict[str, set[str]]:
    f = Families({"machine_id": "m"})
    c.collect(f)
    out: dict[str, set[str]] = {}
    for fam in f:
        assert fam.name == "container_application_type" and fam.type == "gauge"
        for s in fam.samples:
            assert set(s.labels) == {"machine_id", "container_id", "app_id", "application_type"} and s.value == 1
            out.setdefault(s.labels["container_id"], set()).add(s.labels["application_type"])
    return out


def test_collector_follows_processes_and_retitles(tmp_path: Path) -> None:
    fs = Procfs(tmp_path)
    fs.add(10, "db.service", argv("/usr/lib/postgresql/15/bin/postgres", "-D", "/d"), "/usr/lib/postgresql/15/bin/postgres")
    fs.add(11, "db.service", argv("postgres: checkpointer "), "/usr/lib/postgresql/15/bin/postgres")
    fs.add(20, "web.service", argv("/usr/bin/python3", "app.py"), "/usr/bin/python3.11")
    fs.add(21, "web.service", argv("gunicorn: worker [app]"), "/usr/bin/python3.11")  # by its binary
    fs.add(30, None, argv("/usr/bin/redis-server"), "/usr/bin/redis-server")  # in no container
    reg = fs.registry()
    reg.scan()  # before the collector listens: its first tick catches up
    c = AppTypeCollector(reg, procfs=str(tmp_path / "proc"), refresh=60)
    reg.subscribe(c.on_process)
    assert types(c) == {}
    c.tick(0.0, [])
    assert types(c) == {"/system.slice/db.service": {"postgres"}, "/system.slice/web.service": {"python"}}

    fs.add(40, "cache.service", argv("/usr/bin/redis-server", "--port", "1"), "/usr/bin/redis-server")
    reg.add(40)
    assert "/system.slice/cache.service" not in types(c)  # read on the next tick, not in the event
    c.tick(1.0, [])
    assert types(c)["/system.slice/cache.service"] == {"redis"}

    # A process that sets its title after exec is seen as such at the next refresh.
    fs.add(50, "job.service", argv("/opt/bin/runner"), "/opt/bin/runner")
    reg.add(50)
    c.tick(2.0, [])
    assert "/system.slice/job.service" not in types(c)
    (tmp_path / "proc" / "50" / "cmdline").write_bytes(argv("nginx: worker process"))
    c.tick(30.0, [])
    assert "/system.slice/job.service" not in types(c)
    c.tick(60.0, [])
    assert types(c)["/system.slice/job.service"] == {"nginx"}

    fs.remove(40)
    reg.remove(40)
    c.tick(61.0, [])
    assert "/system.slice/cache.service" not in types(c)
    fs.remove(20)
    reg.remove(20)
    c.tick(62.0, [])
    assert types(c)["/system.slice/web.service"] == {"python"}  # pid 21, by its binary


def test_kernel_threads_and_zombies_have_no_type(tmp_path: Path) -> None:
    fs = Procfs(tmp_path)
    fs.add(10, "a.service", b"", "/usr/bin/python3")
    reg = fs.registry()
    reg.scan()
    c = AppTypeCollector(reg, procfs=str(tmp_path / "proc"))
    c.tick(0.0, [])
    assert types(c) == {}
