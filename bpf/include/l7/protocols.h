/* Every protocol detector, and the order they are tried in on a connection's first bytes.
 * Adding a protocol: its header here, one line in l7_detect, its id in contract.h, its module
 * under agent/l7/ (see agent/l7/protocols.py). DNS is recognised by its socket, not here. */
#ifndef COROOT_AGENT_L7_PROTOCOLS_H
#define COROOT_AGENT_L7_PROTOCOLS_H

#include "l7/contract.h"

/* A copy of v the verifier does not link to the caller's: what a detector's checks learn of a
 * call's size or captured length (size >= 24, n < 8, ...) would otherwise narrow the caller's
 * registers, and every differently narrowed state walks the rest of the program again. An ALU
 * instruction, not an empty asm: a register copy stays linked to its source. */
static __always_inline u64 l7_unlinked(u64 v) {
#if defined(__BPF_TRACING__) || defined(__BPF__) || defined(__bpf__)
    asm volatile("%0 |= 0" : "+r"(v));
#endif
    return v;
}
#include "l7/dns.h"
#include "l7/http.h"
#include "l7/http2.h"
#include "l7/memcached.h"
#include "l7/kafka.h"
#include "l7/mongo.h"
#include "l7/mysql.h"
#include "l7/nats.h"
#include "l7/postgres.h"
#include "l7/rabbitmq.h"
#include "l7/redis.h"
#include "l7/zookeeper.h"
#include "l7/cassandra.h"
#include "l7/clickhouse.h"
#include "l7/dubbo2.h"
#include "l7/foundationdb.h"

/* The protocol of a request whose first n bytes (n <= 16) are in b, or 0. */
static __always_inline u32 l7_detect(u8 *b, u32 n, u64 size, u64 ptr) {
    size = l7_unlinked(size);
    n = (u32)l7_unlinked(n);
    if (l7_http_request(b, n))
        return L7_HTTP;
    if (l7_http2_preface(b, n))
        return L7_HTTP2;
    if (l7_redis_request(b, n))
        return L7_REDIS;
    if (l7_postgres_request(b, n, size, ptr))
        return L7_POSTGRES;
    if (l7_zookeeper_request(b, n, size, ptr))
        return L7_ZOOKEEPER;
    if (l7_mysql_request(b, n, size, ptr))
        return L7_MYSQL;
    if (l7_memcached_request(b, n, size, ptr))
        return L7_MEMCACHED;
    if (l7_mongo_request(b, n, size, ptr))
        return L7_MONGO;
    if (l7_kafka_request(b, n, size, ptr))
        return L7_KAFKA;
    if (l7_cassandra_request(b, n, size, ptr))
        return L7_CASSANDRA;
    if (l7_clickhouse_request(b, n, size, ptr))
        return L7_CLICKHOUSE;
    if (l7_dubbo2_request(b, n, size, ptr))
        return L7_DUBBO2;
    if (l7_foundationdb_request(b, n, size, ptr))
        return L7_FOUNDATIONDB;
    return 0;
}

/* Protocols paired in user space by their own ids (contract.h's stream protocols): the first
 * request l7_detect recognises makes its connection a stream connection. HTTP/2 multiplexes
 * streams; Kafka pipelines requests answered by correlation id; CQL multiplexes stream ids;
 * Dubbo2 answers requests by their request ids; FoundationDB sends each reply to its request's
 * reply token. */
static __always_inline int l7_streamed(u32 proto) {
    return proto == L7_HTTP2 || proto == L7_KAFKA || proto == L7_CASSANDRA || proto == L7_DUBBO2 ||
           proto == L7_FOUNDATIONDB;
}

/* A read on a client's connection (or a server's, for its request) that is only the header of
 * the reply to a waiting `proto` request (b: its first n bytes, size: the read's): the request
 * keeps waiting, and the read of the body that follows answers it with what says its status. */
static __always_inline int l7_response_partial(u32 proto, u8 *b, u32 n, u64 size) {
    if (proto == L7_ZOOKEEPER)
        return size == 4; /* ZooKeeper's clients read a reply's length on its own */
    if (proto == L7_MONGO)
        return l7_mongo_response_header(b, n, size); /* pymongo reads the 16-byte header first */
    return 0;
}

/* One-way messages (a publish, a delivery: nothing answers them): the protocol of a message
 * whose first n bytes are in b, read or written, or 0. Each is an event at once, as a stream
 * protocol's calls are (contract.h); tried before l7_detect on every call. */
static __always_inline u32 l7_message(u8 *b, u32 n, u64 size, u64 ptr) {
    size = l7_unlinked(size);
    n = (u32)l7_unlinked(n);
    if (l7_nats_message(b, n, size, ptr))
        return L7_NATS;
    if (l7_rabbitmq_message(b, n, size, ptr))
        return L7_RABBITMQ;
    if (l7_memcached_noreply(b, n, size, ptr)) /* commands that are never answered */
        return L7_MEMCACHED;
    return 0;
}

#endif
