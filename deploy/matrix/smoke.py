"""The kernel-matrix smoke suite, run inside a guest by deploy/matrix/run.py (it also runs on
any host as root): start the agent with every probe family, then prove each works once —

- every family compiled and attached (else each family alone, to say which fails);
- one TCP connect from a test cgroup counted;
- one HTTP request through nginx on loopback, as a span in the store;
- CPU samples stored for a busy loop.

Writes {"kernel": ..., "families": {name: "ok"|error}, "checks": {name: "ok"|error},
"seconds": {...}} to --out. Exit status 0 when everything is ok.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from agent.ebpf import loader  # noqa: E402
from tests.system.helpers import AgentProcess, TestCgroups, wait_for  # noqa: E402
from tests.system.servers import Nginx  # noqa: E402
from tests.system.test_logs import rows  # noqa: E402

FAMILIES = list(loader.FAMILIES)
BUSY = "import time\nend = time.time() + 8\nwhile time.time() < end:\n    pass\n"


def per_family(result: dict) -> None:
    """Each family alone (with what it requires), as `check` loads them: which one fails, and why."""
    r = subprocess.run([sys.executable, "-m", "agent", "check"], capture_output=True, text=True, timeout=3600)
    for fam in FAMILIES:
        for line in r.stdout.splitlines():
            if line.startswith(f"probes: {fam} "):
                result["families"][fam] = "ok" if " ok " in line else line.split(None, 3)[-1][:200]


def check(result: dict, name: str, fn) -> None:  # noqa: ANN001
    t0 = time.monotonic()
    try:
        fn()
        result["checks"][name] = "ok"
    except Exception as e:  # noqa: BLE001 - the table says what failed
        result["checks"][name] = f"{type(e).__name__}: {e}"[:300]
        traceback.print_exc()
    result["seconds"][name] = round(time.monotonic() - t0, 1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    result: dict = {"kernel": os.uname().release, "families": {}, "checks": {}, "seconds": {}}
    cg = TestCgroups()
    agent = AgentProcess(["--min-container-age", "0s", "--store-batch-age", "1s", "--profiling-interval", "5s"])
    nginx = Nginx()
    t0 = time.monotonic()
    try:
        try:
            agent.start(timeout=1800)
        except RuntimeError as e:
            result["checks"]["agent start"] = str(e).splitlines()[0][:300]
            shutil.copy(agent.log_path, Path(args.out).with_name("agent.log"))  # the verifier's whole say
            per_family(result)
            return 1
        result["seconds"]["agent start"] = round(time.monotonic() - t0, 1)
        log = agent.log()
        if "BPF compiled and attached" in log and ", ".join(FAMILIES) in log:
            result["families"] = {f: "ok" for f in FAMILIES}
        else:
            per_family(result)

        def tcp() -> None:
            srv = socket.socket()
            srv.bind(("127.0.0.1", 0))
            srv.listen(8)
            threading.Thread(target=lambda: srv.accept()[0].close(), daemon=True).start()
            cid = cg.create("matrix-tcp")
            code = f"import socket; socket.create_connection(('127.0.0.1', {srv.getsockname()[1]})).close()"
            p = cg.spawn(cid, [sys.executable, "-c", code])
            assert p.wait(60) == 0
            wait_for(lambda: agent.value("container_net_tcp_successful_connects_total", container_id=cid) == 1, 120)

        def http_span() -> None:
            nginx.start(cg, cg.create("matrix-nginx"))
            cid = cg.create("matrix-http")
            code = (f"import http.client; c = http.client.HTTPConnection('127.0.0.1', {nginx.port}); "
                    "c.request('GET', '/matrix'); r = c.getresponse(); r.read(); assert r.status == 200")
            p = cg.spawn(cid, [sys.executable, "-c", code + "; import time; time.sleep(5)"])
            wait_for(lambda: agent.value("container_http_requests_total", container_id=cid, status="2xx") == 1, 120)
            sql = f"SELECT SpanAttributes['http.url'] AS url FROM otel_traces WHERE ServiceName = '{cid}'"
            wait_for(lambda: len(rows(agent, sql)) == 1, 180, interval=2)
            assert rows(agent, sql)[0]["url"].endswith("/matrix")
            p.wait(60)

        def profile() -> None:
            cid = cg.create("matrix-busy")
            p = cg.spawn(cid, [sys.executable, "-c", BUSY])
            p.wait(120)
            sql = f"SELECT sum(Value) AS v FROM profiling_samples WHERE ServiceName = '{cid}'"
            wait_for(lambda: (rows(agent, sql) or [{"v": 0}])[0]["v"] > 0, 300, interval=2)

        check(result, "tcp connect counted", tcp)
        check(result, "http span stored", http_span)
        check(result, "cpu samples stored", profile)
    finally:
        nginx.stop()
        agent.stop()
        cg.cleanup()
        shutil.rmtree(agent.storage, ignore_errors=True)
        result["seconds"]["total"] = round(time.monotonic() - t0, 1)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(json.dumps(result), flush=True)
    ok = all(v == "ok" for v in [*result["families"].values(), *result["checks"].values()])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
