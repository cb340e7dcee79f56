"""Prometheus metric families exported by the upstream Go Coroot node agent.

Source: https://github.com/coroot/coroot-node-agent
Snapshot: commit 89a16af8031bc238b4ba83dd726ac9f205ee2871 (committed 2026-08-06T15:43:54-03:00).
Linux agent only (windows/ and cmd/coroot-windows-agent are ignored).

Label sets below are the labels on the exposed series, excluding CONST_LABELS
(machine_id, system_uuid: added to every family by prometheus.WrapRegistererWith
in main.go:130-131). Container-level families (container_* and ip_to_fqdn, which is
collected by the containers registry) additionally get container_id and app_id,
added per container by WrapRegistererWith in containers/registry.go:438; these are
listed explicitly in each container-level entry. ip_to_fqdn is emitted by the
registry itself (containers/registry.go:155), so it has no container_id/app_id.

When the instance metadata gives both a region and an availability zone, main.go:147-152 wraps
the registerer the containers registry gets with az and region: every container-level family
and ip_to_fqdn then carry those two labels as well. Without a metadata service (the only case
here: node_cloud_info comes from DMI alone, and has neither) they are absent, as below.
The remote writer's own "up" series (prom/remote_writer.go:58) is not exposed on /metrics.

Types: metrics/metrics.go only declares descriptors; the type is the one used at
emission (metrics.Gauge/metrics.Counter in containers/container.go, containers/jvm.go,
hsperf/hsperf.go, node/*.go, gpu/gpu_linux.go).

L7 families (containers/l7.go): outbound request counters carry "status" (plus
"method" for rabbitmq/nats) and const labels destination, actual_destination;
outbound latency histograms carry only destination, actual_destination; inbound
families carry "status" (counter) or nothing (histogram). RabbitMQ and NATS have
no latency histogram. DNS (containers/container.go:777, 796) has counter labels
request_type, domain, status and a histogram with no labels (no destination).
HTTP2 is folded into the HTTP families. Histograms set no Buckets, so they use
prometheus.DefBuckets.
"""

_CT = frozenset({"container_id", "app_id"})

FAMILIES: dict[str, tuple[str, frozenset[str]]] = {
    # metrics/metrics.go:6
    "container_info": ("gauge", _CT | frozenset({"image", "systemd_triggered_by", "systemd_type"})),
    # metrics/metrics.go:8
    "container_restarts_total": ("counter", _CT),
    # metrics/metrics.go:10
    "container_resources_cpu_limit_cores": ("gauge", _CT),
    # metrics/metrics.go:11
    "container_resources_cpu_usage_seconds_total": ("counter", _CT),
    # metrics/metrics.go:12
    "container_resources_cpu_delay_seconds_total": ("counter", _CT),
    # metrics/metrics.go:13
    "container_resources_cpu_throttled_seconds_total": ("counter", _CT),
    # metrics/metrics.go:15
    "container_resources_memory_limit_bytes": ("gauge", _CT),
    # metrics/metrics.go:16
    "container_resources_memory_rss_bytes": ("gauge", _CT),
    # metrics/metrics.go:17
    "container_resources_memory_cache_bytes": ("gauge", _CT),
    # metrics/metrics.go:18
    "container_oom_kills_total": ("counter", _CT),
    # metrics/metrics.go:20
    "container_resources_cpu_pressure_waiting_seconds_total": ("counter", _CT | frozenset({"kind"})),
    # metrics/metrics.go:21
    "container_resources_memory_pressure_waiting_seconds_total": ("counter", _CT | frozenset({"kind"})),
    # metrics/metrics.go:22
    "container_resources_io_pressure_waiting_seconds_total": ("counter", _CT | frozenset({"kind"})),
    # metrics/metrics.go:24
    "container_resources_disk_delay_seconds_total": ("counter", _CT),
    # metrics/metrics.go:25
    "container_resources_disk_size_bytes": ("gauge", _CT | frozenset({"mount_point", "device", "volume"})),
    # metrics/metrics.go:26
    "container_resources_disk_used_bytes": ("gauge", _CT | frozenset({"mount_point", "device", "volume"})),
    # metrics/metrics.go:27
    "container_resources_disk_reserved_bytes": ("gauge", _CT | frozenset({"mount_point", "device", "volume"})),
    # metrics/metrics.go:28
    "container_resources_disk_reads_total": ("counter", _CT | frozenset({"mount_point", "device", "volume"})),
    # metrics/metrics.go:29
    "container_resources_disk_read_bytes_total": ("counter", _CT | frozenset({"mount_point", "device", "volume"})),
    # metrics/metrics.go:30
    "container_resources_disk_writes_total": ("counter", _CT | frozenset({"mount_point", "device", "volume"})),
    # metrics/metrics.go:31
    "container_resources_disk_written_bytes_total": ("counter", _CT | frozenset({"mount_point", "device", "volume"})),
    # metrics/metrics.go:33
    "container_net_tcp_listen_info": ("gauge", _CT | frozenset({"listen_addr", "proxy"})),
    # metrics/metrics.go:34
    "container_net_tcp_successful_connects_total": ("counter", _CT | frozenset({"destination", "actual_destination"})),
    # metrics/metrics.go:35
    "container_net_tcp_connection_time_seconds_total": ("counter", _CT | frozenset({"destination", "actual_destination"})),
    # metrics/metrics.go:36
    "container_net_tcp_failed_connects_total": ("counter", _CT | frozenset({"destination"})),
    # metrics/metrics.go:37
    "container_net_tcp_active_connections": ("gauge", _CT | frozenset({"destination", "actual_destination"})),
    # metrics/metrics.go:38
    "container_net_tcp_retransmits_total": ("counter", _CT | frozenset({"destination", "actual_destination"})),
    # metrics/metrics.go:39
    "container_net_latency_seconds": ("gauge", _CT | frozenset({"destination_ip"})),
    # metrics/metrics.go:40
    "container_net_tcp_bytes_sent_total": ("counter", _CT | frozenset({"destination", "actual_destination"})),
    # metrics/metrics.go:41
    "container_net_tcp_bytes_received_total": ("counter", _CT | frozenset({"destination", "actual_destination"})),
    # metrics/metrics.go:43
    "container_log_messages_total": ("counter", _CT | frozenset({"source", "level", "pattern_hash", "sample"})),
    # metrics/metrics.go:45
    "container_application_type": ("gauge", _CT | frozenset({"application_type"})),
    # metrics/metrics.go:47
    "container_jvm_info": ("gauge", _CT | frozenset({"jvm", "java_version"})),
    # metrics/metrics.go:48
    "container_jvm_heap_size_bytes": ("gauge", _CT | frozenset({"jvm"})),
    # metrics/metrics.go:49
    "container_jvm_heap_used_bytes": ("gauge", _CT | frozenset({"jvm"})),
    # metrics/metrics.go:50
    "container_jvm_heap_max_size_bytes": ("gauge", _CT | frozenset({"jvm"})),
    # metrics/metrics.go:51
    "container_jvm_gc_time_seconds": ("counter", _CT | frozenset({"jvm", "gc"})),
    # metrics/metrics.go:52
    "container_jvm_safepoint_time_seconds": ("counter", _CT | frozenset({"jvm"})),
    # metrics/metrics.go:53
    "container_jvm_safepoint_sync_time_seconds": ("counter", _CT | frozenset({"jvm"})),
    # metrics/metrics.go:54
    "container_jvm_alloc_bytes_total": ("counter", _CT | frozenset({"jvm"})),
    # metrics/metrics.go:55
    "container_jvm_alloc_objects_total": ("counter", _CT | frozenset({"jvm"})),
    # metrics/metrics.go:56
    "container_jvm_lock_contentions_total": ("counter", _CT | frozenset({"jvm"})),
    # metrics/metrics.go:57
    "container_jvm_lock_time_seconds_total": ("counter", _CT | frozenset({"jvm"})),
    # metrics/metrics.go:58
    "container_jvm_profiling_status": ("gauge", _CT | frozenset({"jvm"})),
    # metrics/metrics.go:60
    "container_go_alloc_bytes_total": ("counter", _CT),
    # metrics/metrics.go:61
    "container_go_alloc_objects_total": ("counter", _CT),
    # metrics/metrics.go:63
    "ip_to_fqdn": ("gauge", frozenset({"ip", "fqdn"})),
    # metrics/metrics.go:65
    "container_python_thread_lock_wait_time_seconds": ("counter", _CT),
    # metrics/metrics.go:66
    "container_nodejs_event_loop_blocked_time_seconds_total": ("counter", _CT),
    # metrics/metrics.go:68
    "container_resources_gpu_usage_percent": ("gauge", _CT | frozenset({"gpu_uuid"})),
    # metrics/metrics.go:69
    "container_resources_gpu_memory_usage_percent": ("gauge", _CT | frozenset({"gpu_uuid"})),
    # metrics/metrics.go:71
    "node_gpu_info": ("gauge", frozenset({"gpu_uuid", "name", "driver_version"})),
    # metrics/metrics.go:72
    "node_resources_gpu_memory_total_bytes": ("gauge", frozenset({"gpu_uuid"})),
    # metrics/metrics.go:73
    "node_resources_gpu_memory_used_bytes": ("gauge", frozenset({"gpu_uuid"})),
    # metrics/metrics.go:74
    "node_resources_gpu_memory_utilization_percent_avg": ("gauge", frozenset({"gpu_uuid"})),
    # metrics/metrics.go:75
    "node_resources_gpu_memory_utilization_percent_peak": ("gauge", frozenset({"gpu_uuid"})),
    # metrics/metrics.go:76
    "node_resources_gpu_utilization_percent_avg": ("gauge", frozenset({"gpu_uuid"})),
    # metrics/metrics.go:77
    "node_resources_gpu_utilization_percent_peak": ("gauge", frozenset({"gpu_uuid"})),
    # metrics/metrics.go:78
    "node_resources_gpu_temperature_celsius": ("gauge", frozenset({"gpu_uuid"})),
    # metrics/metrics.go:79
    "node_resources_gpu_power_usage_watts": ("gauge", frozenset({"gpu_uuid"})),
    # metrics/metrics.go:81
    "node_info": ("gauge", frozenset({"hostname", "kernel_version"})),
    # metrics/metrics.go:82
    "node_cloud_info": ("gauge", frozenset({"provider", "account_id", "instance_id", "instance_type", "instance_life_cycle", "region", "availability_zone", "availability_zone_id", "local_ipv4", "public_ipv4"})),
    # metrics/metrics.go:83
    "node_uptime_seconds": ("gauge", frozenset()),
    # metrics/metrics.go:84
    "node_resources_cpu_usage_seconds_total": ("counter", frozenset({"mode"})),
    # metrics/metrics.go:85
    "node_resources_cpu_logical_cores": ("gauge", frozenset()),
    # metrics/metrics.go:86
    "node_resources_memory_total_bytes": ("gauge", frozenset()),
    # metrics/metrics.go:87
    "node_resources_memory_free_bytes": ("gauge", frozenset()),
    # metrics/metrics.go:88
    "node_resources_memory_available_bytes": ("gauge", frozenset()),
    # metrics/metrics.go:89
    "node_resources_memory_cached_bytes": ("gauge", frozenset()),
    # metrics/metrics.go:91
    "node_resources_disk_reads_total": ("counter", frozenset({"device"})),
    # metrics/metrics.go:92
    "node_resources_disk_writes_total": ("counter", frozenset({"device"})),
    # metrics/metrics.go:93
    "node_resources_disk_read_bytes_total": ("counter", frozenset({"device"})),
    # metrics/metrics.go:94
    "node_resources_disk_written_bytes_total": ("counter", frozenset({"device"})),
    # metrics/metrics.go:95
    "node_resources_disk_read_time_seconds_total": ("counter", frozenset({"device"})),
    # metrics/metrics.go:96
    "node_resources_disk_write_time_seconds_total": ("counter", frozenset({"device"})),
    # metrics/metrics.go:97
    "node_resources_disk_io_time_seconds_total": ("counter", frozenset({"device"})),
    # metrics/metrics.go:99
    "node_net_received_bytes_total": ("counter", frozenset({"interface"})),
    # metrics/metrics.go:100
    "node_net_transmitted_bytes_total": ("counter", frozenset({"interface"})),
    # metrics/metrics.go:101
    "node_net_received_packets_total": ("counter", frozenset({"interface"})),
    # metrics/metrics.go:102
    "node_net_transmitted_packets_total": ("counter", frozenset({"interface"})),
    # metrics/metrics.go:103
    "node_net_interface_up": ("gauge", frozenset({"interface"})),
    # metrics/metrics.go:104
    "node_net_interface_ip": ("gauge", frozenset({"interface", "ip"})),
    # containers/metrics.go:10
    "container_http_requests_total": ("counter", _CT | frozenset({"status", "destination", "actual_destination"})),
    # containers/metrics.go:11
    "container_postgres_queries_total": ("counter", _CT | frozenset({"status", "destination", "actual_destination"})),
    # containers/metrics.go:12
    "container_redis_queries_total": ("counter", _CT | frozenset({"status", "destination", "actual_destination"})),
    # containers/metrics.go:13
    "container_memcached_queries_total": ("counter", _CT | frozenset({"status", "destination", "actual_destination"})),
    # containers/metrics.go:14
    "container_mysql_queries_total": ("counter", _CT | frozenset({"status", "destination", "actual_destination"})),
    # containers/metrics.go:15
    "container_mongo_queries_total": ("counter", _CT | frozenset({"status", "destination", "actual_destination"})),
    # containers/metrics.go:16
    "container_kafka_requests_total": ("counter", _CT | frozenset({"status", "destination", "actual_destination"})),
    # containers/metrics.go:17
    "container_cassandra_queries_total": ("counter", _CT | frozenset({"status", "destination", "actual_destination"})),
    # containers/metrics.go:18
    "container_rabbitmq_messages_total": ("counter", _CT | frozenset({"status", "method", "destination", "actual_destination"})),
    # containers/metrics.go:19
    "container_nats_messages_total": ("counter", _CT | frozenset({"status", "method", "destination", "actual_destination"})),
    # containers/metrics.go:20
    "container_dubbo_requests_total": ("counter", _CT | frozenset({"status", "destination", "actual_destination"})),
    # containers/metrics.go:21
    "container_dns_requests_total": ("counter", _CT | frozenset({"request_type", "domain", "status"})),
    # containers/metrics.go:22
    "container_clickhouse_queries_total": ("counter", _CT | frozenset({"status", "destination", "actual_destination"})),
    # containers/metrics.go:23
    "container_zookeeper_requests_total": ("counter", _CT | frozenset({"status", "destination", "actual_destination"})),
    # containers/metrics.go:24
    "container_foundationdb_requests_total": ("counter", _CT | frozenset({"status", "destination", "actual_destination"})),
    # containers/metrics.go:27
    "container_http_requests_duration_seconds_total": ("histogram", _CT | frozenset({"destination", "actual_destination"})),
    # containers/metrics.go:28
    "container_postgres_queries_duration_seconds_total": ("histogram", _CT | frozenset({"destination", "actual_destination"})),
    # containers/metrics.go:29
    "container_redis_queries_duration_seconds_total": ("histogram", _CT | frozenset({"destination", "actual_destination"})),
    # containers/metrics.go:30
    "container_memcached_queries_duration_seconds_total": ("histogram", _CT | frozenset({"destination", "actual_destination"})),
    # containers/metrics.go:31
    "container_mysql_queries_duration_seconds_total": ("histogram", _CT | frozenset({"destination", "actual_destination"})),
    # containers/metrics.go:32
    "container_mongo_queries_duration_seconds_total": ("histogram", _CT | frozenset({"destination", "actual_destination"})),
    # containers/metrics.go:33
    "container_kafka_requests_duration_seconds_total": ("histogram", _CT | frozenset({"destination", "actual_destination"})),
    # containers/metrics.go:34
    "container_cassandra_queries_duration_seconds_total": ("histogram", _CT | frozenset({"destination", "actual_destination"})),
    # containers/metrics.go:35
    "container_dubbo_requests_duration_seconds_total": ("histogram", _CT | frozenset({"destination", "actual_destination"})),
    # containers/metrics.go:36
    "container_dns_requests_duration_seconds_total": ("histogram", _CT),
    # containers/metrics.go:37
    "container_clickhouse_queries_duration_seconds_total": ("histogram", _CT | frozenset({"destination", "actual_destination"})),
    # containers/metrics.go:38
    "container_zookeeper_requests_duration_seconds_total": ("histogram", _CT | frozenset({"destination", "actual_destination"})),
    # containers/metrics.go:39
    "container_foundationdb_requests_duration_seconds_total": ("histogram", _CT | frozenset({"destination", "actual_destination"})),
    # containers/metrics.go:42
    "container_http_inbound_requests_total": ("counter", _CT | frozenset({"status"})),
    # containers/metrics.go:43
    "container_postgres_inbound_queries_total": ("counter", _CT | frozenset({"status"})),
    # containers/metrics.go:44
    "container_redis_inbound_queries_total": ("counter", _CT | frozenset({"status"})),
    # containers/metrics.go:45
    "container_memcached_inbound_queries_total": ("counter", _CT | frozenset({"status"})),
    # containers/metrics.go:46
    "container_mysql_inbound_queries_total": ("counter", _CT | frozenset({"status"})),
    # containers/metrics.go:47
    "container_mongo_inbound_queries_total": ("counter", _CT | frozenset({"status"})),
    # containers/metrics.go:48
    "container_kafka_inbound_requests_total": ("counter", _CT | frozenset({"status"})),
    # containers/metrics.go:49
    "container_cassandra_inbound_queries_total": ("counter", _CT | frozenset({"status"})),
    # containers/metrics.go:50
    "container_dubbo_inbound_requests_total": ("counter", _CT | frozenset({"status"})),
    # containers/metrics.go:51; labels from L7InboundStats.get (containers/l7.go:96-117): "status"
    # only, unlike the outbound DNS counter. observeInboundL7 (containers/container.go:953-964)
    # gives it Status.String() of the DNS rcode: "unknown" for NOERROR, the rcode's digits else.
    "container_dns_inbound_requests_total": ("counter", _CT | frozenset({"status"})),
    # containers/metrics.go:52
    "container_clickhouse_inbound_queries_total": ("counter", _CT | frozenset({"status"})),
    # containers/metrics.go:53
    "container_zookeeper_inbound_requests_total": ("counter", _CT | frozenset({"status"})),
    # containers/metrics.go:54
    "container_foundationdb_inbound_requests_total": ("counter", _CT | frozenset({"status"})),
    # containers/metrics.go:57
    "container_http_inbound_requests_duration_seconds_total": ("histogram", _CT),
    # containers/metrics.go:58
    "container_postgres_inbound_queries_duration_seconds_total": ("histogram", _CT),
    # containers/metrics.go:59
    "container_redis_inbound_queries_duration_seconds_total": ("histogram", _CT),
    # containers/metrics.go:60
    "container_memcached_inbound_queries_duration_seconds_total": ("histogram", _CT),
    # containers/metrics.go:61
    "container_mysql_inbound_queries_duration_seconds_total": ("histogram", _CT),
    # containers/metrics.go:62
    "container_mongo_inbound_queries_duration_seconds_total": ("histogram", _CT),
    # containers/metrics.go:63
    "container_kafka_inbound_requests_duration_seconds_total": ("histogram", _CT),
    # containers/metrics.go:64
    "container_cassandra_inbound_queries_duration_seconds_total": ("histogram", _CT),
    # containers/metrics.go:65
    "container_dubbo_inbound_requests_duration_seconds_total": ("histogram", _CT),
    # containers/metrics.go:66
    "container_dns_inbound_requests_duration_seconds_total": ("histogram", _CT),
    # containers/metrics.go:67
    "container_clickhouse_inbound_queries_duration_seconds_total": ("histogram", _CT),
    # containers/metrics.go:68
    "container_zookeeper_inbound_requests_duration_seconds_total": ("histogram", _CT),
    # containers/metrics.go:69
    "container_foundationdb_inbound_requests_duration_seconds_total": ("histogram", _CT),
    # containers/dotnet.go:79
    "container_dotnet_info": ("gauge", _CT | frozenset({"runtime_version", "application"})),
    # containers/dotnet.go:80
    "container_dotnet_memory_allocated_bytes_total": ("counter", _CT | frozenset({"application"})),
    # containers/dotnet.go:81
    "container_dotnet_exceptions_total": ("gauge", _CT | frozenset({"application"})),
    # containers/dotnet.go:82
    "container_dotnet_memory_heap_size_bytes": ("gauge", _CT | frozenset({"generation", "application"})),
    # containers/dotnet.go:83
    "container_dotnet_gc_count_total": ("counter", _CT | frozenset({"generation", "application"})),
    # containers/dotnet.go:84
    "container_dotnet_heap_fragmentation_percent": ("gauge", _CT | frozenset({"application"})),
    # containers/dotnet.go:85
    "container_dotnet_monitor_lock_contentions_total": ("counter", _CT | frozenset({"application"})),
    # containers/dotnet.go:86
    "container_dotnet_thread_pool_completed_items_total": ("counter", _CT | frozenset({"application"})),
    # containers/dotnet.go:87
    "container_dotnet_thread_pool_queue_length": ("gauge", _CT | frozenset({"application"})),
    # containers/dotnet.go:88
    "container_dotnet_thread_pool_size": ("gauge", _CT | frozenset({"application"})),
    # main.go:145 (info() at main.go:211)
    "node_agent_info": ("gauge", frozenset({"version"})),
}

CONST_LABELS: frozenset[str] = frozenset({"machine_id", "system_uuid"})

# ebpftracer/l7/l7.go:107-200 (status renderers), chosen per protocol in containers/container.go:840-965.
_GRPC = tuple("grpc:" + s for s in (
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
))
_GENERIC = ("ok", "failed", "unknown")
L7_STATUS: dict[str, tuple[str, ...]] = {
    "http": ("1xx", "2xx", "3xx", "4xx", "5xx", "unknown") + _GRPC,
    "postgres": _GENERIC,
    "mysql": _GENERIC,
    "memcached": _GENERIC,
    "redis": _GENERIC,
    "mongo": _GENERIC,
    "kafka": _GENERIC,
    "cassandra": _GENERIC,
    "rabbitmq": _GENERIC,
    "nats": _GENERIC,
    "dubbo": _GENERIC,
    "clickhouse": _GENERIC,
    "zookeeper": ("ok", "failed"),
    "foundationdb": _GENERIC,
    # outbound container_dns_requests_total: Status.DNS() (l7.go:135-151) of the answer's RCODE
    # (4 bits, ebpf/l7/dns.c:52); its "" for RCODE 6..15 is never a label: onDNSRequest returns
    # before counting (containers/container.go:756-759).
    "dns": ("ok", "format_error", "servfail", "nxdomain", "not_implemented", "refused"),
    # container_dns_inbound_requests_total: Status.String() (l7.go:107-117) of the same RCODE
    # (observeInboundL7, containers/container.go:962-963): 0 is "unknown", 1..15 their digits.
    "dns_inbound": ("unknown",) + tuple(str(rc) for rc in range(1, 16)),
}

# container_dns_requests_total's request_type: the first question's Type.String() in
# golang.org/x/net/dns/dnsmessage v0.46.0 (go.mod:47; message.go:45-69): these names, or the
# type's number in decimal ("65" for HTTPS, "64" for SVCB) for any other type.
DNS_REQUEST_TYPES: dict[int, str] = {
    1: "TypeA", 2: "TypeNS", 5: "TypeCNAME", 6: "TypeSOA", 12: "TypePTR", 15: "TypeMX", 16: "TypeTXT",
    28: "TypeAAAA", 33: "TypeSRV", 41: "TypeOPT", 11: "TypeWKS", 13: "TypeHINFO", 14: "TypeMINFO",
    252: "TypeAXFR", 255: "TypeALL",
}
# container_dns_requests_total's domain for a container's domains past --max-fqdns-per-container
# (default 50, flags/flags.go:26): containers/container.go:753.
DNS_OVERFLOW_DOMAIN = "~other"

# prometheus.DefBuckets (client_golang); no L7 histogram overrides Buckets.
BUCKETS: tuple[float, ...] = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
