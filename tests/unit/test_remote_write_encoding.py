"""The hand-written WriteRequest encoder is byte-identical to the protobuf library's encoding
of prometheus/prompb's messages (declared here field by field as in remote.proto/types.proto)."""

from __future__ import annotations

import math

import cramjam
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.sinks.remote_write import encode_write_request

F = descriptor_pb2.FieldDescriptorProto


def _classes():  # noqa: ANN202
    fdp = descriptor_pb2.FileDescriptorProto(name="prompb_test.proto", package="prometheus", syntax="proto3")
    label = fdp.message_type.add(name="Label")
    label.field.add(name="name", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    label.field.add(name="value", number=2, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    sample = fdp.message_type.add(name="Sample")
    sample.field.add(name="value", number=1, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
    sample.field.add(name="timestamp", number=2, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
    ts = fdp.message_type.add(name="TimeSeries")
    ts.field.add(name="labels", number=1, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED, type_name=".prometheus.Label")
    ts.field.add(name="samples", number=2, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED, type_name=".prometheus.Sample")
    wr = fdp.message_type.add(name="WriteRequest")
    wr.field.add(name="timeseries", number=1, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED, type_name=".prometheus.TimeSeries")
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("prometheus.WriteRequest"))


WriteRequest = _classes()


def reference(series) -> bytes:  # noqa: ANN001
    req = WriteRequest()
    for labels, samples in series:
        ts = req.timeseries.add()
        for n, v in labels:
            ts.labels.add(name=n, value=v)
        for v, t in samples:
            ts.samples.add(value=v, timestamp=t)
    return req.SerializeToString()


def test_a_typical_request() -> None:
    series = [
        ([("__name__", "container_net_tcp_successful_connects_total"), ("container_id", "/system.slice/a.service"),
          ("destination", "10.0.0.2:80"), ("instance", "node-1"), ("job", "coroot-node-agent")], [(17.0, 1_795_851_000_123)]),
        ([("__name__", "node_info"), ("hostname", "ünïcode-hôst")], [(1.0, 1_795_851_000_123)]),
        ([("__name__", "zero"), ("empty", "")], [(0.0, 0)]),
        ([("__name__", "neg")], [(-0.0, -5), (-1.5e300, 2**62)]),
        ([("__name__", "stale")], [(math.inf, 1), (-math.inf, 2)]),
    ]
    assert encode_write_request(series) == reference(series)


def test_nan_encodes_as_nan() -> None:
    series = [([("__name__", "x")], [(math.nan, 1)])]
    decoded = WriteRequest.FromString(encode_write_request(series))
    assert math.isnan(decoded.timeseries[0].samples[0].value)
    assert decoded.timeseries[0].samples[0].timestamp == 1


def test_snappy_block_format_round_trips() -> None:
    raw = encode_write_request([([("__name__", "x")], [(1.0, 2)])] * 1000)
    packed = bytes(cramjam.snappy.compress_raw(raw))
    assert len(packed) < len(raw) // 10
    assert bytes(cramjam.snappy.decompress_raw(packed)) == raw


text = st.text(max_size=20)
samples = st.lists(st.tuples(st.floats(allow_nan=False), st.integers(-(2**63), 2**63 - 1)), max_size=3)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.lists(st.tuples(text, text), max_size=4), samples), max_size=5))
def test_random_requests_match_the_protobuf_library(series) -> None:  # noqa: ANN001
    assert encode_write_request(series) == reference(series)


def test_the_label_cache_changes_nothing_on_the_wire() -> None:
    from agent.sinks.remote_write import LabelCache

    cache = LabelCache(max_entries=2)
    series = [([("__name__", f"m{i}"), ("a", "b")], [(float(i), i)]) for i in range(5)]
    for _ in range(3):
        assert encode_write_request(series, cache) == reference(series)
    assert len(cache._d) <= 2
