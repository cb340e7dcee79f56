"""remote_write cost: encoding + snappy compression per 10,000 series, and bytes on the wire
per sample, for series shaped like the agent's (container and destination labels). Prints
figures; asserts nothing. `python bench/remote_write.py`."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import cramjam

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agent.sinks.remote_write import LabelCache, encode_write_request  # noqa: E402


def series(n: int) -> list:
    ts = int(time.time() * 1000)
    out = []
    for i in range(n):
        labels = sorted({
            "__name__": "container_net_tcp_bytes_sent_total",
            "container_id": f"/k8s/default/app-{i % 50}/app",
            "app_id": f"/k8s/default/app-{i % 50}",
            "destination": f"10.0.{i // 250 % 250}.{i % 250}:5432",
            "actual_destination": f"10.0.{i // 250 % 250}.{i % 250}:5432",
            "machine_id": "3d1219c7c4c5404aaa1f6d2a48adfda4", "system_uuid": "",
            "instance": "node-1", "job": "coroot-node-agent",
        }.items())
        out.append((labels, ((float(i * 1000 + 17), ts),)))
    return out


def main() -> None:
    s = series(10_000)
    runs = 5
    t0 = time.process_time()
    for _ in range(runs):
        raw = encode_write_request(s)
    enc = (time.process_time() - t0) / runs
    t0 = time.process_time()
    for _ in range(runs):
        packed = bytes(cramjam.snappy.compress_raw(raw))
    comp = (time.process_time() - t0) / runs
    print(f"10,000 series: encode {enc * 1000:.1f} ms + snappy {comp * 1000:.1f} ms of CPU "
          f"({(enc + comp) / 10_000 * 1e6:.2f} µs per series)")
    cache = LabelCache()
    encode_write_request(s, cache)  # the first scrape fills the cache
    t0 = time.process_time()
    for _ in range(runs):
        assert encode_write_request(s, cache) == raw
    cached = (time.process_time() - t0) / runs
    print(f"10,000 series, label sets cached from the previous scrape: encode {cached * 1000:.1f} ms "
          f"({(cached + comp) / 10_000 * 1e6:.2f} µs per series with snappy)")
    print(f"bytes on the wire: {len(packed):,} ({len(packed) / 10_000:.1f} bytes per sample; "
          f"{len(raw) / 10_000:.1f} before compression, ratio {len(packed) / len(raw):.2f})")


if __name__ == "__main__":
    main()
