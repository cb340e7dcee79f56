/* The L7 kernel/user contract: protocol ids, event flags, the event layout, the duration
 * buckets and the kernel's counters. Its one Python mirror is agent/l7/contract.py, and
 * tests/unit/test_l7_contract.py reads this file and fails on any difference.
 *
 * Pure declarations: no maps, no helpers, so a unit test can compile it natively. */
#ifndef COROOT_AGENT_L7_CONTRACT_H
#define COROOT_AGENT_L7_CONTRACT_H

/* Protocol ids (event.protocol). One detector header per protocol in this directory. */
#define L7_HTTP 1
#define L7_POSTGRES 2
#define L7_REDIS 3
#define L7_DNS 4
#define L7_HTTP2 7
#define L7_NATS 8
#define L7_RABBITMQ 9
#define L7_ZOOKEEPER 10
#define L7_MYSQL 5
#define L7_MEMCACHED 6
#define L7_MONGO 11
#define L7_KAFKA 12
#define L7_CASSANDRA 13
#define L7_CLICKHOUSE 14
#define L7_DUBBO2 15
#define L7_FOUNDATIONDB 16

/* Event flags (event.flags). */
#define L7_OUTBOUND 1 /* the process made the connection: it is the client */
#define L7_INBOUND 2  /* the process accepted it: it is the server */
#define L7_TLS 4      /* plaintext seen by a TLS library uprobe */
#define L7_COUNTED 8  /* the kernel counted this request (l7_http): the event is for a span */
#define L7_WRITE 16   /* a stream event (below): the process wrote these bytes; else it read them */

/* Stream protocols (HTTP/2: many requests in flight on one connection) are not paired here:
 * once a connection is recognised, every read and write on it is one event carrying its first
 * bytes (gathered across iovecs: resp[] first, resp_len of them, then req_len more in req[]),
 * the call's byte count (req_size), the time (start_ns) and L7_WRITE for writes; duration_ns
 * is 0. User space pairs streams. One-way
 * messages (l7_message in protocols.h: a publish, a delivery) travel the same way, one event
 * per call that carries one. */

#ifndef CA_L7_PAYLOAD
#define CA_L7_PAYLOAD 1024 /* request bytes kept (power of two) */
#endif
#define CA_L7_RESP 512 /* response bytes kept: status lines, error frames, DNS answers */

/* One request/response pair, sent without the unused tail of req[]. */
struct l7_event {
    u64 start_ns; /* bpf_ktime_get_ns() when the request was seen */
    u64 duration_ns;
    u64 conn_start; /* the connection's start, part of its identity with (tgid, fd) */
    u32 tgid;
    u32 fd;
    u32 protocol;
    u32 flags;
    u32 req_len;  /* bytes of the request in the event */
    u32 req_size; /* size of the write that carried it */
    u32 resp_len;
    u32 payload_max; /* CA_L7_PAYLOAD: where req[] starts is fixed, its length is req_len */
    u8 resp[CA_L7_RESP];
    u8 req[CA_L7_PAYLOAD];
};

/* HTTP counted in the kernel (map l7_http): by status class, with a duration histogram. */
#define L7_HTTP_STATUS_CLASSES 6 /* 0: unknown, 1..5: 1xx..5xx */
#define L7_BUCKETS 11            /* bounds in l7_bucket() (bpf/l7.c), seconds in contract.py */

struct l7_http_key {
    u32 tgid;
    u32 fd; /* outbound: the connection; inbound: 0 */
    u64 conn_start;
    u32 status; /* 0 unknown, 1..5: 1xx..5xx */
    u32 outbound;
};

struct l7_hist {
    u64 count;
    u64 sum_ns;
    u64 buckets[L7_BUCKETS]; /* not cumulative; above the last bound only in count */
};

/* The per-CPU counters of map l7_stats, by index. */
#define L7_STAT_REQUESTS 0    /* requests recognised */
#define L7_STAT_REPLACED 1    /* a request replaced its connection's unanswered one */
#define L7_STAT_PAIRED 2      /* pairs made */
#define L7_STAT_HTTP_FULL 3   /* HTTP requests sent to user space to count (l7_http full) */
#define L7_STAT_HANDOFF_LOST 4 /* reads/writes whose hand-off to the L7 program failed (l7_run) */
#define L7_STATS 5

#endif
