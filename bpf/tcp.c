/* TCP connections: connects (successful and failed, with their duration), listens, closes,
 * retransmits, and bytes sent/received per connection, counted in the kernel.
 *
 * Tracepoints only: sock:inet_sock_set_state, tcp:tcp_retransmit_skb (raw), syscalls connect,
 * accept/accept4, close and the read/write family (for byte counts). Reads tracepoint arguments
 * and helper results only, never kernel struct fields.
 *
 * A connection is keyed by (tgid, fd); its value remembers the socket pointer and start time,
 * so a reused fd number starts a new connection (the old one is closed first) and the two can
 * never mix. Maps are LRU with the sizes below: a full map evicts the least recently used
 * entry, never blocks.
 *
 * Connect counts stay exact when the event buffer overflows (see tcp_connects below): a failed
 * connect is counted here, per (tgid, destination), and sends no event; a successful one sends
 * its event (user space needs each connection: its NAT target, bytes, requests) and is counted
 * here only when that event could not be handed over. */
#include "common.h"

#ifndef CA_MAX_CONNS
#define CA_MAX_CONNS 65536 /* tracked connections (tgid, fd) */
#endif
#ifndef CA_MAX_CONNECTING
#define CA_MAX_CONNECTING 16384 /* sockets between SYN_SENT and ESTABLISHED/CLOSE */
#endif
#ifndef CA_MAX_CONNECT_STATS
#define CA_MAX_CONNECT_STATS 16384 /* (tgid, destination) pairs with kernel-side connect counts */
#endif
#ifndef CA_TCP_EVENTS_PAGES
#define CA_TCP_EVENTS_PAGES CA_EVENTS_PAGES /* the agent's --tcp-events-pages */
#endif

#define TCP_EVENT_CONNECT 1
#define TCP_EVENT_CONNECT_FAILED 2
#define TCP_EVENT_LISTEN_OPEN 3
#define TCP_EVENT_LISTEN_CLOSE 4
#define TCP_EVENT_CLOSE 5
#define TCP_EVENT_LATE_RETRANSMITS 6 /* retransmits between close() and the socket's end */

#define CA_TCP_ESTABLISHED 1
#define CA_TCP_SYN_SENT 2
#define CA_TCP_CLOSE 7
#define CA_TCP_LISTEN 10
#define CA_AF_INET 2
#define CA_AF_INET6 10
#define CA_IPPROTO_TCP 6

#define CONN_OUTBOUND 1
#define CONN_INBOUND 2
#define CONN_DNS 4 /* a UDP socket connected to port 53 (bpf/l7.c) */
#define CONN_L7_STREAM 8 /* bpf/l7.c: a stream protocol (HTTP/2) was recognised on it */
#define CONN_DNS_TCP 16 /* an outbound connection to port 53: DNS over TCP (bpf/l7.c) */
#define CA_DNS_TCP_PORT 53

struct conn_key {
    u32 tgid;
    u32 fd;
};

struct conn {
    u64 sk;
    u64 start_ns;
    u64 bytes_sent;
    u64 bytes_received;
    u32 retransmits;
    u32 flags;
    u64 http_start_ns; /* bpf/l7.c: an HTTP request without a span waits here, not in a map */
    u32 http_flags;
    u32 _pad;
};

struct connecting {
    u32 tgid;
    u32 fd;
    u64 start_ns;
    u32 retransmits;
    u32 _pad;
};

/* Mirror: agent/net/tcp.py TCP_EVENT ("<QQQQIIIIHHHH16s16s"), no implicit padding. */
struct tcp_event {
    u64 start_ns;
    u64 duration_ns;
    u64 bytes_sent;
    u64 bytes_received;
    u32 type;
    u32 tgid;
    u32 fd;
    u32 retransmits;
    u16 family;
    u16 sport;
    u16 dport;
    u16 _pad;
    u8 saddr[16];
    u8 daddr[16];
};

BPF_TABLE("lru_hash", struct conn_key, struct conn, conns, CA_MAX_CONNS);
BPF_TABLE("lru_hash", u64, struct conn_key, sk_conns, CA_MAX_CONNS);
BPF_TABLE("lru_hash", u64, struct connecting, connecting, CA_MAX_CONNECTING);
/* Sockets closed by the application whose FIN (or unacked data) may still be retransmitted. */
BPF_TABLE("lru_hash", u64, struct connecting, closing, CA_MAX_CONNECTING);
BPF_TABLE("lru_hash", u64, u32, connect_fds, 16384); /* pid_tgid -> fd inside connect() */
BPF_PERCPU_ARRAY(tcp_scratch, struct tcp_event, 1);
CA_EVENTS_SIZED(tcp_events, CA_TCP_EVENTS_PAGES);

/* Connect counts the events cannot lose, per (process, destination): failed connects, and the
 * successful connects (with their time) whose event did not fit in the buffer. User space
 * (agent/net/tcp.py) folds the growth of each entry into its totals per (container,
 * destination) and deletes an entry once its process is gone. A plain hash, not LRU: an
 * evicted entry would lose counts; when it is full a failed connect goes as an event (user
 * space counts it) and a lost successful one is counted in tcp_uncounted. */
struct tcp_dest_key {
    u32 tgid;
    u16 family;
    u16 dport;
    u8 daddr[16]; /* IPv4: the first 4 bytes, the rest zero */
};

/* Mirror: agent/net/tcp.py (read as the map's ctypes leaf). */
struct tcp_connect_counts {
    u64 failed;
    u64 lost;    /* successful connects whose event was not handed over */
    u64 lost_ns; /* their time from connect() to ESTABLISHED */
};

BPF_HASH(tcp_connects, struct tcp_dest_key, struct tcp_connect_counts, CA_MAX_CONNECT_STATS);
BPF_PERCPU_ARRAY(tcp_uncounted, u64, 1); /* connects neither counted here nor sent: map and buffer full */

#ifdef CA_L7 /* bpf/l7.c, compiled after this file */
static __always_inline void l7_forget(struct conn_key *key, struct conn *c);
static __always_inline void l7_on_connect(struct conn_key *key, u64 sockaddr);
static __always_inline void l7_on_accept(struct conn_key *key, struct conn *c);
#endif

/* 0 when the event was handed over; otherwise it is counted as lost. */
static __always_inline int tcp_submit(void *ctx, struct tcp_event *e) {
#ifdef CA_RINGBUF
    if (tcp_events.ringbuf_output(e, sizeof(*e), 0) < 0) {
#else
    if (tcp_events.perf_submit(ctx, e, sizeof(*e)) < 0) {
#endif
        tcp_events_lost.increment(0);
        return -1;
    }
    return 0;
}

static __always_inline struct tcp_event *tcp_event_new(u32 type) {
    int zero = 0;
    struct tcp_event *e = tcp_scratch.lookup(&zero);
    if (!e)
        return 0;
    __builtin_memset(e, 0, sizeof(*e));
    e->type = type;
    return e;
}

/* A macro, not a function: BCC defines the tracepoint's argument struct at the probe itself. */
#define FILL_ADDRS(e, args)                                                                   \
    do {                                                                                       \
        (e)->family = (args)->family;                                                          \
        (e)->sport = (args)->sport;                                                            \
        (e)->dport = (args)->dport;                                                            \
        if ((args)->family == CA_AF_INET) {                                                    \
            __builtin_memcpy((e)->saddr, (args)->saddr, 4);                                    \
            __builtin_memcpy((e)->daddr, (args)->daddr, 4);                                    \
        } else {                                                                               \
            __builtin_memcpy((e)->saddr, (args)->saddr_v6, 16);                                \
            __builtin_memcpy((e)->daddr, (args)->daddr_v6, 16);                                \
        }                                                                                      \
    } while (0)

/* `by_app`: the application called close(); the socket lives on (FIN_WAIT...) and may still
 * retransmit, so it is remembered in `closing` until its state becomes CLOSE. */
static __always_inline void emit_close(void *ctx, struct conn_key *key, struct conn *c, int by_app) {
    if (c->flags & CONN_OUTBOUND) {
        struct tcp_event *e = tcp_event_new(TCP_EVENT_CLOSE);
        if (e) {
            e->tgid = key->tgid;
            e->fd = key->fd;
            e->start_ns = c->start_ns;
            e->bytes_sent = c->bytes_sent;
            e->bytes_received = c->bytes_received;
            e->retransmits = c->retransmits;
            tcp_submit(ctx, e);
        }
    }
#ifdef CA_L7
    l7_forget(key, c);
#endif
    u64 sk = c->sk;
    if (sk) {
        sk_conns.delete(&sk);
        if (by_app && (c->flags & CONN_OUTBOUND)) {
            struct connecting late = {.tgid = key->tgid, .fd = key->fd, .start_ns = c->start_ns};
            closing.update(&sk, &late);
        }
    }
    conns.delete(key);
}

TRACEPOINT_PROBE(syscalls, sys_enter_connect) {
    u64 id = bpf_get_current_pid_tgid();
    u32 fd = args->fd;
    connect_fds.update(&id, &fd);
#ifdef CA_L7
    struct conn_key key = {.tgid = id >> 32, .fd = fd};
    l7_on_connect(&key, (u64)args->uservaddr);
#endif
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_connect) {
    u64 id = bpf_get_current_pid_tgid();
    connect_fds.delete(&id);
    return 0;
}

TRACEPOINT_PROBE(sock, inet_sock_set_state) {
    if (args->protocol != CA_IPPROTO_TCP)
        return 0;
    u64 sk = (u64)args->skaddr;
    int from = args->oldstate, to = args->newstate;

    if (from == CA_TCP_CLOSE && to == CA_TCP_SYN_SENT) { /* inside connect(): process context */
        u64 id = bpf_get_current_pid_tgid();
        u32 *fd = connect_fds.lookup(&id);
        if (!fd)
            return 0;
        struct connecting p = {.tgid = id >> 32, .fd = *fd, .start_ns = bpf_ktime_get_ns()};
        connecting.update(&sk, &p);
        return 0;
    }
    if (from == CA_TCP_SYN_SENT) {
        struct connecting *p = connecting.lookup(&sk);
        if (!p)
            return 0;
        u64 duration = bpf_ktime_get_ns() - p->start_ns;
        int ok = to == CA_TCP_ESTABLISHED;
        struct tcp_dest_key dk = {.tgid = p->tgid, .family = args->family, .dport = args->dport};
        if (args->family == CA_AF_INET)
            __builtin_memcpy(dk.daddr, args->daddr, 4);
        else
            __builtin_memcpy(dk.daddr, args->daddr_v6, 16);
        struct tcp_connect_counts zero = {};
        struct tcp_connect_counts *n = 0;
        if (!ok) { /* counted here; an event only when the map has no room */
            n = tcp_connects.lookup_or_try_init(&dk, &zero);
            if (n)
                __sync_fetch_and_add(&n->failed, 1);
        }
        struct tcp_event *e = 0;
        if (ok || !n)
            e = tcp_event_new(ok ? TCP_EVENT_CONNECT : TCP_EVENT_CONNECT_FAILED);
        if (e) {
            FILL_ADDRS(e, args);
            e->tgid = p->tgid;
            e->fd = p->fd;
            e->start_ns = p->start_ns;
            e->duration_ns = duration;
            e->retransmits = p->retransmits;
        }
        if ((ok || !n) && (!e || tcp_submit(args, e) < 0)) { /* nobody else counts this connect */
            n = ok ? tcp_connects.lookup_or_try_init(&dk, &zero) : 0;
            if (n) {
                __sync_fetch_and_add(&n->lost, 1);
                __sync_fetch_and_add(&n->lost_ns, duration);
            } else {
                tcp_uncounted.increment(0);
            }
        }
        if (to == CA_TCP_ESTABLISHED) {
            struct conn_key key = {.tgid = p->tgid, .fd = p->fd};
            struct conn *old = conns.lookup(&key);
            if (old) /* the fd was reused without a close we saw */
                emit_close(args, &key, old, 0);
            struct conn c = {.sk = sk, .start_ns = p->start_ns, .retransmits = p->retransmits, .flags = CONN_OUTBOUND};
            if (args->dport == CA_DNS_TCP_PORT)
                c.flags |= CONN_DNS_TCP;
            conns.update(&key, &c);
            sk_conns.update(&sk, &key);
        }
        connecting.delete(&sk);
        return 0;
    }
    if (from == CA_TCP_CLOSE && to == CA_TCP_LISTEN) {
        struct tcp_event *e = tcp_event_new(TCP_EVENT_LISTEN_OPEN);
        if (e) {
            FILL_ADDRS(e, args);
            e->tgid = ca_tgid();
            tcp_submit(args, e);
        }
        return 0;
    }
    if (from == CA_TCP_LISTEN && to == CA_TCP_CLOSE) {
        struct tcp_event *e = tcp_event_new(TCP_EVENT_LISTEN_CLOSE);
        if (e) {
            FILL_ADDRS(e, args);
            e->tgid = ca_tgid();
            tcp_submit(args, e);
        }
        return 0;
    }
    if (to == CA_TCP_CLOSE) { /* an established connection ends without close(): RST, exit */
        struct conn_key *k = sk_conns.lookup(&sk);
        if (!k) {
            struct connecting *late = closing.lookup(&sk);
            if (!late)
                return 0;
            if (late->retransmits) {
                struct tcp_event *e = tcp_event_new(TCP_EVENT_LATE_RETRANSMITS);
                if (e) {
                    e->tgid = late->tgid;
                    e->fd = late->fd;
                    e->start_ns = late->start_ns;
                    e->retransmits = late->retransmits;
                    tcp_submit(args, e);
                }
            }
            closing.delete(&sk);
            return 0;
        }
        struct conn_key key = *k;
        struct conn *c = conns.lookup(&key);
        if (c && c->sk == sk)
            emit_close(args, &key, c, 0);
        else
            sk_conns.delete(&sk);
    }
    return 0;
}

/* A raw tracepoint, whose arguments are the tracepoint's own (sk, skb[, err]): the kernel skips
 * a classic tracepoint program that fires (here, in softirq) while another of our programs runs
 * on the same CPU, which lost ~1% of retransmits under load; raw tracepoints only guard against
 * recursion of the same program. Only the argument values are used, no struct fields. */
RAW_TRACEPOINT_PROBE(tcp_retransmit_skb) {
#ifdef CA_TCP_RETRANSMIT_HAS_ERR
    /* Newer kernels also report attempts that sent nothing (e.g. -EBUSY while the original is
     * still queued below TCP); the kernel's RetransSegs counts only those that went out. */
    if ((int)ctx->args[2])
        return 0;
#endif
    u64 sk = ctx->args[0];
    struct conn_key *k = sk_conns.lookup(&sk);
    if (k) {
        struct conn_key key = *k;
        struct conn *c = conns.lookup(&key);
        if (c)
            __sync_fetch_and_add(&c->retransmits, 1);
        return 0;
    }
    struct connecting *p = connecting.lookup(&sk);
    if (!p)
        p = closing.lookup(&sk);
    if (p)
        __sync_fetch_and_add(&p->retransmits, 1);
    return 0;
}

static __always_inline int accepted(long ret) {
    if (ret < 0)
        return 0;
    struct conn_key key = {.tgid = ca_tgid(), .fd = (u32)ret};
    struct conn c = {.start_ns = bpf_ktime_get_ns(), .flags = CONN_INBOUND};
    conns.update(&key, &c);
#ifdef CA_L7
    l7_on_accept(&key, &c);
#endif
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_exit_accept) { return accepted(args->ret); }
TRACEPOINT_PROBE(syscalls, sys_exit_accept4) { return accepted(args->ret); }

TRACEPOINT_PROBE(syscalls, sys_enter_close) {
    struct conn_key key = {.tgid = ca_tgid(), .fd = args->fd};
    struct conn *c = conns.lookup(&key);
    if (c)
        emit_close(args, &key, c, 1);
    return 0;
}

/* Bytes: remember the fd at syscall entry when it is a tracked connection, count the result at
 * exit. Entry does one map lookup for every read/write on the host and stops there for files.
 * With the L7 family compiled in (CA_L7), the same hooks hand the syscall's buffer to
 * bpf/l7.c: written data at entry (it is in user memory then), read data at exit. */
#define IO_BUF 0 /* (buf, len) */
#define IO_IOV 1 /* (struct iovec *, count) */
#define IO_MSG 2 /* (struct user_msghdr *, -) */

struct io_call {
    u64 buf;
    u32 fd;
    u32 kind;
};

/* pid_tgid -> read/write in progress. A plain hash, not LRU: the LRU's common list lock, taken
 * on every update, cost ~20% of a loopback HTTP server's throughput (bench/l7.py; per-CPU LRU
 * lists cost a third more in-kernel time than this). An entry lives from a syscall's entry to
 * its exit, which the kernel reports even for a killed task; a thread has at most one. */
BPF_HASH(io_calls, u64, struct io_call, 16384);

#ifdef CA_L7
static __always_inline void l7_on_io(void *ctx, struct conn_key *key, struct conn *c, u64 buf, u32 kind,
                                     u64 size, int sent);
static __always_inline void l7_on_sent(void *ctx, struct conn_key *key, struct conn *c, u64 buf, u32 kind,
                                       u64 size);
static __always_inline int l7_in_ssl_call(u64 id, u32 fd);
#endif

static __always_inline int io_enter(void *ctx, u32 fd, u64 buf, u64 len, u32 kind, int sent) {
    struct conn_key key = {.tgid = ca_tgid(), .fd = fd};
    struct conn *c = conns.lookup(&key);
    if (!c)
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    struct io_call call = {.buf = buf, .fd = fd, .kind = kind};
    io_calls.update(&id, &call);
#ifdef CA_L7
    if (sent && !l7_in_ssl_call(id, fd))
        l7_on_io(ctx, &key, c, buf, kind, len, 1);
#endif
    return 0;
}

static __always_inline int io_exit(void *ctx, long ret, int sent) {
    u64 id = bpf_get_current_pid_tgid();
    struct io_call *call = io_calls.lookup(&id);
    if (!call)
        return 0;
    struct conn_key key = {.tgid = id >> 32, .fd = call->fd};
#ifdef CA_L7
    u64 buf = call->buf;
    u32 kind = call->kind;
#endif
    io_calls.delete(&id);
    if (ret <= 0)
        return 0;
    struct conn *c = conns.lookup(&key);
    if (!c)
        return 0;
    if (sent) {
        __sync_fetch_and_add(&c->bytes_sent, ret);
#ifdef CA_L7
        if ((c->flags & CONN_L7_STREAM) && !l7_in_ssl_call(id, key.fd))
            l7_on_sent(ctx, &key, c, buf, kind, ret); /* a stream's writes: their byte count is known now */
#endif
    } else {
        __sync_fetch_and_add(&c->bytes_received, ret);
#ifdef CA_L7
        if (!l7_in_ssl_call(id, key.fd))
            l7_on_io(ctx, &key, c, buf, kind, ret, 0);
#endif
    }
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_write) { return io_enter(args, args->fd, (u64)args->buf, args->count, IO_BUF, 1); }
TRACEPOINT_PROBE(syscalls, sys_exit_write) { return io_exit(args, args->ret, 1); }
TRACEPOINT_PROBE(syscalls, sys_enter_writev) { return io_enter(args, args->fd, (u64)args->vec, 0, IO_IOV, 1); }
TRACEPOINT_PROBE(syscalls, sys_exit_writev) { return io_exit(args, args->ret, 1); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendto) { return io_enter(args, args->fd, (u64)args->buff, args->len, IO_BUF, 1); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendto) { return io_exit(args, args->ret, 1); }
TRACEPOINT_PROBE(syscalls, sys_enter_sendmsg) { return io_enter(args, args->fd, (u64)args->msg, 0, IO_MSG, 1); }
TRACEPOINT_PROBE(syscalls, sys_exit_sendmsg) { return io_exit(args, args->ret, 1); }
TRACEPOINT_PROBE(syscalls, sys_enter_read) { return io_enter(args, args->fd, (u64)args->buf, args->count, IO_BUF, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_read) { return io_exit(args, args->ret, 0); }
TRACEPOINT_PROBE(syscalls, sys_enter_readv) { return io_enter(args, args->fd, (u64)args->vec, 0, IO_IOV, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_readv) { return io_exit(args, args->ret, 0); }
TRACEPOINT_PROBE(syscalls, sys_enter_recvfrom) { return io_enter(args, args->fd, (u64)args->ubuf, args->size, IO_BUF, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvfrom) { return io_exit(args, args->ret, 0); }
TRACEPOINT_PROBE(syscalls, sys_enter_recvmsg) { return io_enter(args, args->fd, (u64)args->msg, 0, IO_MSG, 0); }
TRACEPOINT_PROBE(syscalls, sys_exit_recvmsg) { return io_exit(args, args->ret, 0); }
