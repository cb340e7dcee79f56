/* L7 requests: the first bytes of each request and of its response on a tracked connection,
 * paired in the kernel, one event per pair with its duration measured here.
 *
 * Compiled after bpf/tcp.c (it uses the `conns` map and is called from tcp.c's read/write
 * hooks): a connection's role decides which direction is the request — outbound (connect()ed,
 * the process is the client): writes are requests, reads responses; inbound (accept()ed):
 * reads are requests, writes responses. UDP sockets connected to port 53 carry DNS.
 *
 * A request is recognised from its first bytes (HTTP/1.x method, Redis RESP array, Postgres
 * Query or Parse/Bind...Sync, DNS query); it waits in `l7_pending` with its payload, keyed by
 * (tgid, fd, connection start, stream) — the stream is the DNS query id, 0 otherwise — until
 * the first bytes of the response arrive. An HTTP request that will not be a span (inbound, or
 * not drawn by the sampling rate) keeps only its start time, in the connection's own `conns`
 * entry (no map update per request), and is counted here (see l7_http below).
 *
 * A request recognised while an earlier one on the connection is unanswered replaces it (its
 * response was not seen, or it is pipelined): a lost response never blocks the connection.
 * A body or a continuation is not recognised as a request, and user space counts every
 * request of a pipeline written at once from that write's payload. A read of a reply's header
 * alone (l7_response_partial in protocols.h: Mongo's 16 bytes, ZooKeeper's length) leaves the
 * request waiting: the body read next answers it.
 *
 * Protocols whose requests are in flight together on one connection and answered out of
 * order, or each by a response that names it (HTTP/2 streams, Kafka correlation ids, CQL stream
 * ids: l7_streamed in protocols.h), are not paired here: their first recognised request makes
 * the connection a stream connection, and from then on every read and write on it is an event
 * (contract.h) that user space pairs by the protocol's own ids.
 *
 * TLS: uprobes on OpenSSL's SSL_write/SSL_read(_ex) see the plaintext; the socket fd is learnt
 * from the syscall the library makes inside the call (or remembered per SSL object), and that
 * nested ciphertext syscall is not parsed. The agent's own process is never traced. */
#include "common.h"
#include "l7/protocols.h" /* the contract (ids, flags, event layout) and one detector per protocol */

#ifndef CA_L7_MAX_PENDING
#define CA_L7_MAX_PENDING 8192
#endif
#ifndef CA_SELF_TGID
#define CA_SELF_TGID 0
#endif
#include "gotls.h" /* Go crypto/tls uprobes (they hand their plaintext to l7_run below) */
#include "rustls.h" /* rustls uprobes: bpf/rustls.c, compiled after this file */

struct l7_key {
    u32 tgid;
    u32 fd;
    u64 conn_start;
    u32 stream;
    u32 _pad;
};

struct l7_request {
    u64 start_ns;
    u32 protocol;
    u32 flags;
    u32 len;  /* bytes in payload */
    u32 size; /* bytes the call carried */
    u8 payload[CA_L7_PAYLOAD];
};

struct ssl_call {
    u64 ssl;
    u64 buf;
    u64 out_len; /* SSL_*_ex: where the library stores the byte count */
    u32 fd;
    u32 has_fd;
};

struct ssl_key {
    u64 ssl;
    u32 tgid;
    u32 _pad;
};

/* LRU (a request may never be answered), with per-CPU lists: no lock shared by all CPUs. */
BPF_F_TABLE("lru_hash", struct l7_key, struct l7_request, l7_pending, CA_L7_MAX_PENDING, BPF_F_NO_COMMON_LRU);
BPF_TABLE("lru_hash", u64, struct ssl_call, ssl_calls, 16384); /* pid_tgid inside SSL_read/write */
BPF_TABLE("lru_hash", struct ssl_key, u32, ssl_fds, 16384);     /* SSL object -> its socket fd */
/* Memory BIOs (Node.js: the SSL object never touches the socket, libuv does): processes with
 * an SSL object whose fd no call revealed, and for their threads the fd of their last socket
 * I/O outside an SSL call (see ssl_guess_fd). */
BPF_TABLE("lru_hash", u32, u8, ssl_membio_tgids, 1024);
BPF_TABLE("lru_hash", u64, u32, ssl_last_fd, 16384);
/* HTTP is counted here, by status class with a duration histogram: inbound per process,
 * outbound per connection (user space labels it with the connection's destination). So HTTP
 * metrics stay exact when the event buffer overflows, and an HTTP event goes to user space
 * only for a span: outbound, and drawn by the sampling rate (CA_L7_SAMPLE of 2^32). If the
 * map is full the request travels as an event marked not counted, and user space counts it. */
#ifndef CA_L7_SAMPLE
#define CA_L7_SAMPLE 4294967296ULL /* sampling 1.0 */
#endif
#ifndef CA_L7_MAX_HTTP_STATS
#define CA_L7_MAX_HTTP_STATS 16384
#endif
BPF_HASH(l7_http, struct l7_http_key, struct l7_hist, CA_L7_MAX_HTTP_STATS);

/* A process's latest accepted connection, until it closes it: a forking server (Postgres's
 * postmaster) accepts, forks, closes its copy, and the child serves the socket under its own
 * tgid. Every child forked in between gets the connection. */
BPF_TABLE("lru_hash", u32, struct conn, last_accept, 4096);
#define L7_WAKE_EVERY 64
BPF_PERCPU_ARRAY(l7_wake, u64, 1); /* events since the last wake-up, per CPU */
BPF_PERCPU_ARRAY(l7_req_scratch, struct l7_request, 1);
BPF_PERCPU_ARRAY(l7_event_scratch, struct l7_event, 1);
/* A stream event's bytes gathered across iovecs: twice the payload, so that a copy at any
 * offset below CA_L7_PAYLOAD of at most CA_L7_PAYLOAD bytes is provably in bounds. */
struct l7_gather {
    u8 buf[2 * CA_L7_PAYLOAD + CA_L7_RESP]; /* and a copy from CA_L7_RESP on stays in bounds */
};
BPF_PERCPU_ARRAY(l7_gather_scratch, struct l7_gather, 1);
#define L7_STREAM_IOVS 32 /* iovecs looked at per call (gRPC writes a request in ~20) */
BPF_PERCPU_ARRAY(l7_stats, u64, L7_STATS); /* indexes: L7_STAT_* in l7/contract.h */
/* 4 MB: a burst of pairs must fit while user space is busy with the previous ones (~600 bytes
 * each for a short HTTP request; 64 pages lost ~1.5% of the events at 8,000 requests/s). */
#ifndef CA_L7_EVENTS_PAGES
#define CA_L7_EVENTS_PAGES 1024
#endif
CA_EVENTS_SIZED(l7_events, CA_L7_EVENTS_PAGES);

static __always_inline void l7_submit(void *ctx, struct l7_event *e, u64 size) {
    /* opaque to the compiler, so the bound below is checked on the register the helper gets */
    asm volatile("" : "+r"(size));
    if (size > sizeof(*e))
        size = sizeof(*e);
#ifdef CA_RINGBUF
    /* Wake user space for one event in L7_WAKE_EVERY (per CPU), not each: a wake-up costs more
     * than the event, and user space also drains this ring on every other wake-up and at least
     * every POLL_MS. The other buffers wake it per event, which keeps their order. */
    u64 flags = BPF_RB_NO_WAKEUP;
    int zero = 0;
    u64 *n = l7_wake.lookup(&zero);
    if (n && (((*n)++) % L7_WAKE_EVERY) == 0)
        flags = 0;
    if (l7_events.ringbuf_output(e, size, flags) < 0)
#else
    if (l7_events.perf_submit(ctx, e, size) < 0)
#endif
        l7_events_lost.increment(0);
}

static __always_inline void l7_count(int i) {
    u64 *v = l7_stats.lookup(&i);
    if (v)
        __sync_fetch_and_add(v, 1);
}

/* The user buffer behind a syscall's arguments: (ptr, size) of its segment `index` (a
 * constant; for a vectored call the caller knows the iovec exists or checks what it finds). */
static __always_inline int l7_segment(u64 buf, u32 kind, u64 size, u32 index, u64 *ptr, u64 *len) {
    if (kind == IO_BUF) {
        *ptr = buf;
        *len = size;
        return 1;
    }
    u64 iov = buf;
    if (kind == IO_MSG) { /* struct user_msghdr: msg_iov at offset 16 */
        if (bpf_probe_read_user(&iov, sizeof(iov), (void *)(buf + 16)) < 0)
            return 0;
    }
    u64 seg[2]; /* struct iovec: base, len */
    if (bpf_probe_read_user(seg, sizeof(seg), (void *)(iov + index * 16)) < 0)
        return 0;
    *ptr = seg[0];
    *len = seg[1];
    return 1;
}

/* min(v, max) in a form the verifier can follow: the barrier keeps the compiler from folding
 * the bound into an earlier copy of v. */
static __always_inline u64 l7_clamp(u64 v, u64 max) {
    asm volatile("" : "+r"(v));
    return v > max ? max : v;
}

/* The histogram bucket of a duration: the first bound it does not exceed (Prometheus' `le`).
 * Straight-line code: kernels before 6.x reject some loops LLVM leaves in place. */
static __always_inline u32 l7_bucket(u64 ns) {
    if (ns <= 5000000ULL)
        return 0;
    if (ns <= 10000000ULL)
        return 1;
    if (ns <= 25000000ULL)
        return 2;
    if (ns <= 50000000ULL)
        return 3;
    if (ns <= 100000000ULL)
        return 4;
    if (ns <= 250000000ULL)
        return 5;
    if (ns <= 500000000ULL)
        return 6;
    if (ns <= 1000000000ULL)
        return 7;
    if (ns <= 2500000000ULL)
        return 8;
    if (ns <= 5000000000ULL)
        return 9;
    if (ns <= 10000000000ULL)
        return 10;
    return L7_BUCKETS;
}

static __always_inline int l7_count_http(struct l7_http_key *k, u64 ns) {
    struct l7_hist zero = {};
    struct l7_hist *h = l7_http.lookup_or_try_init(k, &zero);
    if (!h) {
        l7_count(L7_STAT_HTTP_FULL);
        return 0;
    }
    __sync_fetch_and_add(&h->count, 1);
    __sync_fetch_and_add(&h->sum_ns, ns);
    u32 i = l7_bucket(ns);
    if (i < L7_BUCKETS)
        __sync_fetch_and_add(&h->buckets[i], 1);
    return 1;
}

/* The first CA_L7_PAYLOAD - 1 of a call's `total` bytes, across its iovecs; returns the count.
 * Written for the verifier: no branch on a helper's result (a failed read leaves zeros), and
 * `off` kept in the same range at the top of every iteration, so that the paths through one
 * iteration meet again and the unrolled loop costs it linear, not exponential, work. */
static __always_inline u64 l7_gather(struct l7_gather *g, u64 buf, u32 kind, u64 total) {
    if (kind == IO_BUF) {
        u64 n = l7_clamp(total, CA_L7_PAYLOAD - 1);
        bpf_probe_read_user(g->buf, n, (void *)buf);
        return n;
    }
    u64 iov = buf;
    if (kind == IO_MSG) /* struct user_msghdr: msg_iov at offset 16 */
        bpf_probe_read_user(&iov, sizeof(iov), (void *)(buf + 16));
    u64 off = 0;
#pragma unroll
    for (int i = 0; i < L7_STREAM_IOVS; i++) {
        u64 seg[2] = {}; /* struct iovec: base, len */
        bpf_probe_read_user(seg, sizeof(seg), (void *)(iov + i * 16));
        /* never past the call's bytes: memory beyond them may not be paged in */
        u64 n = seg[1] < total - off ? seg[1] : total - off;
        n = l7_clamp(n, CA_L7_PAYLOAD - 1);
        u64 at = off & (CA_L7_PAYLOAD - 1);
        bpf_probe_read_user(g->buf + at, n, (void *)seg[0]);
        off = at + n;
        if (off >= CA_L7_PAYLOAD - 1 || off >= total)
            break;
    }
    return l7_clamp(off, CA_L7_PAYLOAD - 1);
}

/* A reply spread over a sendmsg's iovecs (a Memcached server writes a reply's parts, and a
 * pipeline's replies, with one sendmsg; at its entry, so its byte count is not known): its first
 * CA_L7_RESP bytes into e->resp, from at most L7_RESP_IOVS iovecs and never past the message's
 * msg_iovlen. A copy may run on into e->req, which its caller writes afterwards.
 * Straight-line per iovec, like l7_gather; the iovec count joins the bound arithmetically
 * (past the last iovec `off` compares as past the end) rather than as a branch of its own. */
#define L7_RESP_IOVS 8
static __always_inline u64 l7_gather_resp(struct l7_event *e, u64 msghdr) {
    u64 msg[2] = {}; /* struct user_msghdr: msg_iov at offset 16, msg_iovlen at 24 */
    bpf_probe_read_user(msg, sizeof(msg), (void *)(msghdr + 16));
    u64 iov = msg[0], niov = msg[1], total = CA_L7_RESP;
    u64 off = 0;
#pragma unroll
    for (int i = 0; i < L7_RESP_IOVS; i++) {
        u64 seg[2] = {}; /* struct iovec: base, len */
        bpf_probe_read_user(seg, sizeof(seg), (void *)(iov + i * 16));
        u64 n = seg[1] < total - off ? seg[1] : total - off;
        n = l7_clamp(n, CA_L7_RESP);
        asm volatile("" : "+r"(off)); /* the mask stays: the compiler would drop it, knowing off < total */
        u64 at = off & (CA_L7_RESP - 1);
        bpf_probe_read_user(e->resp + at, n, (void *)seg[0]);
        off = at + n;
        u64 last = ((niov - i - 1) >> 63) << 40; /* 2^40 once iovec i is the message's last */
        if (off + last >= total)
            break;
    }
    return l7_clamp(off, CA_L7_RESP);
}

/* One read or write of a stream connection, or one one-way message (contract.h): an event
 * with its first bytes. */
static __always_inline void l7_stream(void *ctx, struct conn_key *ckey, struct conn *c, u64 buf, u32 kind,
                                      u64 size, int sent, u32 tls, u32 proto) {
    int zero = 0;
    struct l7_gather *g = l7_gather_scratch.lookup(&zero);
    struct l7_event *e = l7_event_scratch.lookup(&zero);
    if (!g || !e || size == 0)
        return;
    u64 n = l7_gather(g, buf, kind, size);
    n = l7_clamp(n, CA_L7_PAYLOAD);
    if (n == 0)
        return;
    /* the bytes fill resp[] first, then req[]: a short call is sent without the unused rest */
    u64 rn = l7_clamp(n, CA_L7_RESP);
    if (bpf_probe_read_kernel(e->resp, rn, g->buf) < 0)
        return;
    u64 qn = 0;
    if (n > CA_L7_RESP) {
        /* masked, not only clamped: older verifiers (5.10) take the difference as possibly negative */
        qn = (n - CA_L7_RESP) & (CA_L7_PAYLOAD - 1);
        if (bpf_probe_read_kernel(e->req, qn, g->buf + CA_L7_RESP) < 0)
            return;
    }
    e->start_ns = bpf_ktime_get_ns();
    e->duration_ns = 0;
    e->conn_start = c->start_ns;
    e->tgid = ckey->tgid;
    e->fd = ckey->fd;
    e->protocol = proto;
    e->flags = ((c->flags & CONN_OUTBOUND) ? L7_OUTBOUND : L7_INBOUND) | tls | (sent ? L7_WRITE : 0);
    e->req_len = qn;
    e->req_size = size > 0xffffffff ? 0xffffffff : (u32)size;
    e->resp_len = rn;
    e->payload_max = CA_L7_PAYLOAD;
    l7_submit(ctx, e, qn ? sizeof(*e) - CA_L7_PAYLOAD + qn : sizeof(*e) - CA_L7_PAYLOAD - CA_L7_RESP + rn);
}

/* A stream connection's protocol: kept in the connection's http_flags once it is one (no HTTP/1
 * request waits on a stream connection); HTTP/2 for one marked before that. */
static __always_inline u32 l7_stream_protocol(struct conn *c) {
    u32 proto = c->http_flags;
    return l7_streamed(proto) ? proto : L7_HTTP2;
}

/* A request waits in l7_pending for its response, with its first bytes. */
static __always_inline void l7_pend(struct l7_key *key, u64 ptr, u64 size, u32 proto, u32 rflags, u64 now) {
    int zero = 0;
    struct l7_request *r = l7_req_scratch.lookup(&zero);
    if (!r)
        return;
    u32 n = size < CA_L7_PAYLOAD ? size : CA_L7_PAYLOAD;
    if (bpf_probe_read_user(r->payload, n, (void *)ptr) < 0)
        return;
    r->start_ns = now;
    r->protocol = proto;
    r->flags = rflags;
    r->len = n;
    r->size = size > 0xffffffff ? 0xffffffff : (u32)size;
    l7_pending.update(key, r);
    l7_count(L7_STAT_REQUESTS);
}

/* The second query of a DNS-over-TCP writev (iovecs 2 and 3), if there is one: the length in
 * iovec 2 must be iovec 3's, which also tells a real pair from memory past a 2-iovec array. */
static __always_inline void l7_dns_tcp_second(struct l7_key *key, u64 buf, u32 kind, u32 rflags, u64 now) {
    u64 lp = 0, ln = 0, qp = 0, qn = 0;
    if (!l7_segment(buf, kind, 0, 2, &lp, &ln) || ln != 2 || !lp || !l7_segment(buf, kind, 0, 3, &qp, &qn) ||
        qn < 12 || !qp)
        return;
    u8 len[2] = {};
    u8 head[12] = {};
    if (bpf_probe_read_user(len, sizeof(len), (void *)lp) < 0 || (((u64)len[0] << 8) | len[1]) != qn ||
        bpf_probe_read_user(head, sizeof(head), (void *)qp) < 0 || !l7_dns_query(head, sizeof(head)))
        return;
    struct l7_key k2 = *key;
    k2.stream = l7_dns_id(head);
    l7_pend(&k2, qp, qn, L7_DNS, rflags, now);
}

/* One read or write on a tracked connection: `size` is the byte count for (buf, len) calls and
 * reads; 0 for a vectored write (the first segment's length is used). */
static __always_inline u32 l7_io(void *ctx, struct conn_key *ckey, struct conn *c, u64 buf, u32 kind, u64 size,
                                 int sent, u32 tls, u64 *ssize) {
    if (ckey->tgid == CA_SELF_TGID)
        return 0;
    u32 flags = c->flags;
    /* Reads come here at their exit, TLS calls at theirs; plain writes at their entry, where
     * a stream's are left to l7_on_sent (their byte count is known at the exit). */
    int at_exit = !sent || tls;
    if (flags & CONN_L7_STREAM) {
        *ssize = size;
        return at_exit ? l7_stream_protocol(c) : 0;
    }
    u64 total = size;
    /* a DNS server's socket (CONN_DNS | CONN_INBOUND, l7_on_bind) reads queries, writes answers */
    int client = (flags & CONN_OUTBOUND) || (flags & (CONN_DNS | CONN_INBOUND)) == CONN_DNS;
    int request = client ? sent : !sent;
    u64 ptr = 0, seg = 0;
    if (!l7_segment(buf, kind, size, 0, &ptr, &seg))
        return 0;
    if (kind != IO_BUF && (size == 0 || seg < size))
        size = seg;
    if (size == 0 || !ptr)
        return 0;
    int dns_tcp_iov = 0;
    if (flags & CONN_DNS_TCP) {
        /* DNS over TCP: each message follows its 2-byte length, written with it, in the first
         * iovec before it (glibc's writev), or read on its own before it */
        if (size == 2) {
            if (kind == IO_BUF || !l7_segment(buf, kind, 0, 1, &ptr, &size) || size < 12 || !ptr)
                return 0;
            dns_tcp_iov = 1;
        } else {
            u8 len[2] = {};
            if (bpf_probe_read_user(len, sizeof(len), (void *)ptr) < 0)
                return 0;
            if ((((u64)len[0] << 8) | len[1]) + 2 == size) {
                ptr += 2;
                size -= 2;
            }
        }
        flags |= CONN_DNS;
    }
    struct l7_key key = {.tgid = ckey->tgid, .fd = ckey->fd, .conn_start = c->start_ns};
    u8 head[16] = {};
    u32 hn = size < sizeof(head) ? size : sizeof(head);
    if (bpf_probe_read_user(head, hn, (void *)ptr) < 0)
        return 0;
    if (!(flags & CONN_DNS)) {
        u32 m = l7_message(head, hn, size, ptr);
        if (m) { /* one-way: an event now, in either direction (a vectored write's first segment) */
            *ssize = (kind == IO_BUF || at_exit) ? total : size;
            return m;
        }
    }
    int zero = 0;
    u64 now = bpf_ktime_get_ns();
    if (request) {
        u32 proto;
        if (flags & CONN_DNS) {
            if (!l7_dns_query(head, hn))
                return 0;
            proto = L7_DNS;
            key.stream = l7_dns_id(head);
        } else {
            proto = l7_detect(head, hn, size, ptr);
            if (!proto)
                return 0;
            if (l7_streamed(proto)) { /* a stream connection from now on, this call included */
                c->flags |= CONN_L7_STREAM;
                c->http_flags = proto; /* its protocol, where an HTTP/1 request's flags wait otherwise */
                c->http_start_ns = 0;
                *ssize = total;
                return at_exit ? proto : 0;
            }
        }
        u32 rflags = (client ? L7_OUTBOUND : L7_INBOUND) | tls;
        if (proto == L7_HTTP && (!client || (u64)bpf_get_prandom_u32() >= CA_L7_SAMPLE)) {
            /* counted here, no span: only the time is kept, in the connection itself */
            if (c->http_start_ns) /* unanswered (or its response was not seen): replaced */
                l7_count(L7_STAT_REPLACED);
            c->http_flags = rflags;
            c->http_start_ns = now;
            l7_count(L7_STAT_REQUESTS);
            return 0;
        }
        if (proto != L7_DNS && l7_pending.lookup(&key))
            l7_count(L7_STAT_REPLACED);
        l7_pend(&key, ptr, size, proto, rflags, now);
        if (dns_tcp_iov) /* glibc writes the A and AAAA queries with one writev: len, query, len, query */
            l7_dns_tcp_second(&key, buf, kind, rflags, now);
        return 0;
    }
    if (flags & CONN_DNS) {
        if (!l7_dns_answer(head, hn))
            return 0;
        key.stream = l7_dns_id(head);
    }
    u64 start = 0;
    u32 rflags = 0, proto = 0, rsize = 0;
    u64 rn = 0; /* 64-bit: a 32-bit copy would be what the bound check sees, not what the helper gets */
    struct l7_request *r = 0;
    int t = !(flags & CONN_DNS) && c->http_start_ns;
    if (t) {
        start = c->http_start_ns;
        rflags = c->http_flags;
        proto = L7_HTTP;
        c->http_start_ns = 0;
    } else {
        r = l7_pending.lookup(&key);
        if (!r)
            return 0;
        start = r->start_ns;
        rflags = r->flags;
        proto = r->protocol;
        rn = r->len;
        rsize = r->size;
        if (l7_response_partial(proto, head, hn, total))
            return 0; /* a reply's header read on its own (protocols.h): its body answers */
    }
    u64 duration = now - start;
    u32 counted = 0;
    if (proto == L7_HTTP) {
        int out = rflags & L7_OUTBOUND;
        struct l7_http_key hk = {.tgid = ckey->tgid, .status = l7_http_status(head, hn), .outbound = !!out};
        if (out) {
            hk.fd = ckey->fd;
            hk.conn_start = c->start_ns;
        }
        counted = l7_count_http(&hk, duration) ? L7_COUNTED : 0;
        if (t && counted) {
            l7_count(L7_STAT_PAIRED);
            return 0; /* counted, and no span wanted */
        }
    }
    /* An event: a span, or a request user space counts (not HTTP, or the HTTP map is full). */
    struct l7_event *e = l7_event_scratch.lookup(&zero);
    if (!e)
        return 0;
    u32 n;
    /* A Memcached server's sendmsg: a reply's parts, and a pipeline's replies, an iovec each.
     * Writes only (sent is a constant in each program: the read hooks do not carry this). */
    if (sent && kind == IO_MSG && proto == L7_MEMCACHED) {
        n = l7_gather_resp(e, buf);
    } else {
        n = size < CA_L7_RESP ? size : CA_L7_RESP;
        if (bpf_probe_read_user(e->resp, n, (void *)ptr) < 0)
            return 0;
    }
    e->start_ns = start;
    e->duration_ns = duration;
    e->conn_start = c->start_ns;
    e->tgid = ckey->tgid;
    e->fd = ckey->fd;
    e->protocol = proto;
    e->flags = rflags | tls | counted;
    e->req_size = rsize;
    e->resp_len = n;
    e->payload_max = CA_L7_PAYLOAD;
    rn = l7_clamp(rn, CA_L7_PAYLOAD);
    e->req_len = rn;
    if (r)
        bpf_probe_read_kernel(e->req, rn, r->payload);
    if (!t)
        l7_pending.delete(&key);
    l7_count(L7_STAT_PAIRED);
    l7_submit(ctx, e, sizeof(*e) - CA_L7_PAYLOAD + rn);
    return 0;
}

/* One read or write on a tracked connection: pairs and counts requests (l7_io), and makes the
 * one event of a stream's call or of a one-way message here, in one place: the gathering code
 * is inlined once per program, which keeps the verifier's work small. */
static __always_inline void l7_work(void *ctx, struct conn_key *ckey, struct conn *c, u64 buf, u32 kind,
                                    u64 size, int sent, u32 tls) {
    u64 ssize = 0;
    u32 proto = l7_io(ctx, ckey, c, buf, kind, size, sent, tls, &ssize);
    if (proto)
        l7_stream(ctx, ckey, c, buf, kind, ssize, sent, tls, proto);
}

/* ------------------------------------------------------------ the hand-off to l7_run --- */
/* The L7 work of a read or write (detect, pair, count, gather, submit) is one program for each
 * kind of hook (tracepoint: the syscalls; kprobe: the TLS uprobes), entered by a tail call,
 * not inlined into every hook: LLVM compiles it twice instead of once per hook (17 copies took
 * ~15 s, most of the agent's start-up) and the verifier walks it once per kind. A hook leaves
 * its arguments in a per-CPU slot marked with its thread, and the tail call never returns: the
 * hand-off is a hook's last act. If another thread's program used the slot in between (a
 * preempted uprobe), l7_run drops the call rather than take the other's, counted like a failed
 * tail call (L7_STAT_HANDOFF_LOST). */
#define L7_RUN_IO 0
#define L7_RUN_SENT 1 /* a plain write on a stream connection, at its exit: `size` was written */
struct l7_call {
    u64 id; /* pid_tgid of the hook that filled the slot */
    u64 buf;
    u64 size;
    struct conn_key key;
    u32 kind;
    u32 sent;
    u32 tls;
    u32 op;
    u32 more; /* sendmmsg: further messages, each sizeof(struct mmsghdr) = 64 bytes on */
    u32 _pad;
};
BPF_PERCPU_ARRAY(l7_calls, struct l7_call, 1);
BPF_PROG_ARRAY(l7_run_tp, 1);     /* [0] = l7_run_tracepoint, set by the loader (agent/ebpf/loader.py) */
BPF_PROG_ARRAY(l7_run_uprobe, 1); /* [0] = l7_run_kprobe */

static __always_inline int l7_call_set(struct conn_key *ckey, u64 buf, u32 kind, u64 size, int sent, u32 tls,
                                       u32 op, u32 more) {
    int zero = 0;
    struct l7_call *a = l7_calls.lookup(&zero);
    if (!a)
        return 0;
    a->id = bpf_get_current_pid_tgid();
    a->buf = buf;
    a->size = size;
    a->key = *ckey;
    a->kind = kind;
    a->sent = sent;
    a->tls = tls;
    a->op = op;
    a->more = more;
    return 1;
}

static __always_inline int l7_run(void *ctx, int tracepoint) {
    int zero = 0;
    struct l7_call *a = l7_calls.lookup(&zero);
    if (!a)
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    if (a->id != id) {
        l7_count(L7_STAT_HANDOFF_LOST);
        return 0;
    }
    struct l7_call call = *a;
    a->id = 0;
    struct conn *c = conns.lookup(&call.key);
    if (!c)
        return 0;
    if (call.op == L7_RUN_SENT)
        l7_stream(ctx, &call.key, c, call.buf, call.kind, call.size, 1, 0, l7_stream_protocol(c));
    else
        l7_work(ctx, &call.key, c, call.buf, call.kind, call.size, call.sent, call.tls);
    if (tracepoint && call.more) { /* the next message of a sendmmsg: this program again */
        a->id = id;
        a->buf = call.buf + 64;
        a->more = call.more - 1;
        l7_run_tp.call(ctx, 0);
    }
    return 0;
}

int l7_run_tracepoint(void *ctx) { return l7_run(ctx, 1); }
int l7_run_kprobe(struct pt_regs *ctx) { return l7_run(ctx, 0); }

/* The hooks' hand-offs: each is the last thing its hook does. */
static __always_inline void l7_on_io_more(void *ctx, struct conn_key *ckey, struct conn *c, u64 buf, u32 kind,
                                          u64 size, int sent, u32 more) {
    u32 tls = 0;
    if (rustls_on_io(ckey, c, sent, &buf, &kind, &size)) /* rustls.h: its plaintext for its ciphertext */
        tls = L7_TLS;
    else if (c->flags & CONN_GO_TLS) /* Go TLS: ciphertext, its plaintext comes from gotls.h */
        return;
    if (l7_call_set(ckey, buf, kind, size, sent, tls, L7_RUN_IO, more))
        l7_run_tp.call(ctx, 0);
    l7_count(L7_STAT_HANDOFF_LOST); /* reached only when the tail call failed */
}

static __always_inline void l7_on_io(void *ctx, struct conn_key *ckey, struct conn *c, u64 buf, u32 kind,
                                     u64 size, int sent) {
    l7_on_io_more(ctx, ckey, c, buf, kind, size, sent, 0);
}

/* A plain write on a stream connection, at its exit (bpf/tcp.c): `size` is what was written. */
static __always_inline void l7_on_sent(void *ctx, struct conn_key *ckey, struct conn *c, u64 buf, u32 kind,
                                       u64 size) {
    if (ckey->tgid == CA_SELF_TGID || (c->flags & CONN_GO_TLS)) /* Go TLS: ciphertext (gotls.h) */
        return;
    if (l7_call_set(ckey, buf, kind, size, 1, 0, L7_RUN_SENT, 0))
        l7_run_tp.call(ctx, 0);
    l7_count(L7_STAT_HANDOFF_LOST);
}

/* TLS plaintext, from the uprobes (OpenSSL, Go crypto/tls). */
static __always_inline void l7_on_io_tls(struct pt_regs *ctx, struct conn_key *ckey, u64 buf, u64 size, int sent) {
    if (l7_call_set(ckey, buf, IO_BUF, size, sent, L7_TLS, L7_RUN_IO, 0))
        l7_run_uprobe.call(ctx, 0);
    l7_count(L7_STAT_HANDOFF_LOST);
}

static __always_inline void l7_forget(struct conn_key *ckey, struct conn *c) {
    struct l7_key key = {.tgid = ckey->tgid, .fd = ckey->fd, .conn_start = c->start_ns};
    l7_pending.delete(&key);
    struct conn *a = last_accept.lookup(&ckey->tgid);
    if (a && a->sk == ckey->fd && a->start_ns == c->start_ns)
        last_accept.delete(&ckey->tgid); /* the accepting process closed it: its later forks do not serve it */
}

static __always_inline void l7_on_accept(struct conn_key *key, struct conn *c) {
    struct conn copy = *c;
    copy.sk = key->fd; /* the fd, kept in the otherwise unused socket field */
    last_accept.update(&key->tgid, &copy);
}

static __always_inline void l7_on_fork(u32 child) {
    u32 parent = ca_tgid();
    struct conn *a = last_accept.lookup(&parent);
    if (!a)
        return;
    struct conn_key key = {.tgid = child, .fd = (u32)a->sk};
    struct conn c = {.start_ns = a->start_ns, .flags = CONN_INBOUND};
    conns.update(&key, &c);
    /* Kept until the parent closes the socket (l7_forget), not dropped at this fork: Postgres's
     * postmaster forks other children (an autovacuum worker, from a signal handler) between an
     * accept and the backend's fork, and the backend must still get the connection. */
}

/* connect() on any socket to port 53: a DNS client (UDP; a TCP connect replaces the entry
 * when it is established). */
static __always_inline void l7_on_connect(struct conn_key *key, u64 sockaddr) {
    u16 sa[2] = {}; /* sa_family, port (network order) */
    if (bpf_probe_read_user(sa, sizeof(sa), (void *)sockaddr) < 0)
        return;
    if ((sa[0] != CA_AF_INET && sa[0] != CA_AF_INET6) || sa[1] != __builtin_bswap16(CA_DNS_PORT))
        return;
    struct conn c = {.start_ns = bpf_ktime_get_ns(), .flags = CONN_DNS};
    conns.update(key, &c);
}

/* bind() of any socket to port 53: a DNS server (UDP: every query it reads is answered on the
 * same fd, paired by the message id like a client's; a TCP listener's entry is never read).
 * The node agent recognises a server by the bytes of any socket read instead; servers bound
 * before the agent started are not seen here. */
TRACEPOINT_PROBE(syscalls, sys_enter_bind) {
    u16 sa[2] = {}; /* sa_family, port (network order) */
    if (bpf_probe_read_user(sa, sizeof(sa), (void *)args->umyaddr) < 0)
        return 0;
    if ((sa[0] != CA_AF_INET && sa[0] != CA_AF_INET6) || sa[1] != __builtin_bswap16(CA_DNS_PORT))
        return 0;
    struct conn_key key = {.tgid = ca_tgid(), .fd = args->fd};
    if (key.tgid == CA_SELF_TGID)
        return 0;
    struct conn c = {.start_ns = bpf_ktime_get_ns(), .flags = CONN_DNS | CONN_INBOUND};
    conns.update(&key, &c);
    return 0;
}

/* glibc's resolver sends the A and AAAA queries of one lookup with one sendmmsg(). */
TRACEPOINT_PROBE(syscalls, sys_enter_sendmmsg) {
    struct conn_key key = {.tgid = ca_tgid(), .fd = args->fd};
    struct conn *c = conns.lookup(&key);
    if (!c || !(c->flags & CONN_DNS))
        return 0;
    u64 base = (u64)args->mmsg;
    u32 vlen = args->vlen;
    /* the first two messages (A and AAAA): l7_run takes the second after the first */
    if (vlen > 0)
        l7_on_io_more(args, &key, c, base, IO_MSG, 0, 1, vlen > 1 ? 1 : 0);
    return 0;
}

/* ------------------------------------------------------------------------------- TLS --- */

static __always_inline int l7_in_ssl_call(u64 id, u32 fd) {
    struct ssl_call *call = ssl_calls.lookup(&id);
    if (!call) {
        u32 tgid = id >> 32;
        if (ssl_membio_tgids.lookup(&tgid)) /* a memory-BIO process: remember the thread's socket */
            ssl_last_fd.update(&id, &fd);
        return 0;
    }
    call->fd = fd;
    call->has_fd = 1;
    return 1;
}

static __always_inline int ssl_enter(struct pt_regs *ctx, int ex) {
    u64 id = bpf_get_current_pid_tgid();
    if ((id >> 32) == CA_SELF_TGID)
        return 0;
    struct ssl_call call = {.ssl = PT_REGS_PARM1(ctx), .buf = PT_REGS_PARM2(ctx)};
    if (ex)
        call.out_len = PT_REGS_PARM4(ctx);
    ssl_calls.update(&id, &call);
    return 0;
}

/* SSL_read of an SSL object whose fd no call of it revealed (a memory BIO: Node.js reads the
 * ciphertext itself, then hands it to SSL_read on the same thread): its fd is taken to be the
 * socket the thread used last outside an SSL call, consumed, and kept as a guess (SSL_FD_GUESS)
 * that the next guess may correct (every SSL_read after a socket read refreshes it) but that
 * never replaces an fd a call revealed. A process gets this only after one of its SSL objects
 * went unplaced (ssl_membio_tgids): its first requests' handshake makes the guesses. */
#define SSL_FD_GUESS 0x80000000u
static __always_inline void ssl_guess_fd(u64 id, struct ssl_key *sk) {
    u32 *known = ssl_fds.lookup(sk);
    if (known && !(*known & SSL_FD_GUESS))
        return;
    u32 *last = ssl_last_fd.lookup(&id);
    if (last) {
        u32 fd = *last | SSL_FD_GUESS;
        ssl_last_fd.delete(&id);
        ssl_fds.update(sk, &fd);
    } else if (!known) {
        u8 one = 1;
        ssl_membio_tgids.update(&sk->tgid, &one);
    }
}

static __always_inline int ssl_exit(struct pt_regs *ctx, int ex, int sent) {
    u64 id = bpf_get_current_pid_tgid();
    struct ssl_call *call = ssl_calls.lookup(&id);
    if (!call)
        return 0;
    struct ssl_call cc = *call;
    ssl_calls.delete(&id);
    if (!cc.has_fd && !sent) {
        struct ssl_key gk = {.ssl = cc.ssl, .tgid = id >> 32};
        ssl_guess_fd(id, &gk);
    }
    /* SSL_read/SSL_write(_ex) return an int: -1 (a memory BIO's WANT_READ, Node's every
     * SSL_read after the last record) is 0xffffffff in the 64-bit register, not negative */
    int ret = (int)PT_REGS_RC(ctx);
    u64 n = 0;
    if (ex) {
        if (ret != 1 || bpf_probe_read_user(&n, sizeof(n), (void *)cc.out_len) < 0)
            return 0;
    } else {
        if (ret <= 0)
            return 0;
        n = ret;
    }
    struct ssl_key sk = {.ssl = cc.ssl, .tgid = id >> 32};
    u32 fd;
    if (cc.has_fd) {
        fd = cc.fd;
        ssl_fds.update(&sk, &fd);
    } else {
        u32 *known = ssl_fds.lookup(&sk);
        if (!known)
            return 0;
        fd = *known & ~SSL_FD_GUESS;
        if (*known & SSL_FD_GUESS) {
            struct conn_key gkey = {.tgid = id >> 32, .fd = fd};
            struct conn *gc = conns.lookup(&gkey);
            if (gc && !(gc->flags & CONN_GO_TLS)) /* its syscalls carry ciphertext (as Go's do) */
                gc->flags |= CONN_GO_TLS;
        }
    }
    struct conn_key key = {.tgid = id >> 32, .fd = fd};
    struct conn *c = conns.lookup(&key);
    if (!c)
        return 0;
    l7_on_io_tls(ctx, &key, cc.buf, n, sent);
    return 0;
}

int ssl_write_enter(struct pt_regs *ctx) { return ssl_enter(ctx, 0); }
int ssl_write_exit(struct pt_regs *ctx) { return ssl_exit(ctx, 0, 1); }
int ssl_write_ex_enter(struct pt_regs *ctx) { return ssl_enter(ctx, 1); }
int ssl_write_ex_exit(struct pt_regs *ctx) { return ssl_exit(ctx, 1, 1); }
int ssl_read_enter(struct pt_regs *ctx) { return ssl_enter(ctx, 0); }
int ssl_read_exit(struct pt_regs *ctx) { return ssl_exit(ctx, 0, 0); }
int ssl_read_ex_enter(struct pt_regs *ctx) { return ssl_enter(ctx, 1); }
int ssl_read_ex_exit(struct pt_regs *ctx) { return ssl_exit(ctx, 1, 0); }

/* ----------------------------------------------------------------------- Go crypto/tls --- */
/* Uprobes on crypto/tls.(*Conn).Write, .Read and Read's RETs: see gotls.h. */

#ifndef CA_GO_TLS_MAX_READS
#define CA_GO_TLS_MAX_READS 16384 /* goroutines inside tls.Conn.Read (LRU: one may never return) */
#endif
BPF_TABLE("lru_hash", struct go_tls_read_key, struct go_tls_read, go_tls_reads, CA_GO_TLS_MAX_READS);
BPF_TABLE("lru_hash", struct conn_key, struct go_tls_held, go_tls_held, 4096); /* a 1-byte Read's byte */

/* The tracked connection under a *tls.Conn, marked as carrying ciphertext in its syscalls. */
static __always_inline struct conn *go_tls_conn(u64 tls_conn, struct conn_key *key) {
    key->tgid = ca_tgid();
    if (key->tgid == CA_SELF_TGID || !go_tls_fd(tls_conn, &key->fd))
        return 0;
    struct conn *c = conns.lookup(key);
    if (c && !(c->flags & CONN_GO_TLS))
        c->flags |= CONN_GO_TLS;
    return c;
}

/* Write(b []byte), at its entry: it writes all of b or fails; the request's time starts here. */
static __always_inline int go_tls_write(struct pt_regs *ctx, u64 tls_conn, u64 buf, u64 len) {
    struct conn_key key = {};
    struct conn *c = go_tls_conn(tls_conn, &key);
    if (c && len)
        l7_on_io_tls(ctx, &key, buf, len, 1);
    return 0;
}

int go_tls_write_enter(struct pt_regs *ctx) { return go_tls_write(ctx, GO_REG1(ctx), GO_REG2(ctx), GO_REG3(ctx)); }

/* Read(b []byte): the buffer at its entry, kept per goroutine until a RET gives the count. */
static __always_inline int go_tls_read(u64 g, u64 tls_conn, u64 buf) {
    struct conn_key key = {};
    if (!g || !go_tls_conn(tls_conn, &key))
        return 0;
    struct go_tls_read_key rk = {.g = g, .tgid = key.tgid};
    struct go_tls_read r = {.buf = buf, .fd = key.fd};
    go_tls_reads.update(&rk, &r);
    return 0;
}

int go_tls_read_enter(struct pt_regs *ctx) { return go_tls_read(GO_G(ctx), GO_REG1(ctx), GO_REG2(ctx)); }

/* Read's results at one of its RETs: n (the count, <= 0: nothing read) of goroutine g. */
static __always_inline int go_tls_read_done(struct pt_regs *ctx, u64 g, s64 n) {
    struct go_tls_read_key rk = {.g = g, .tgid = ca_tgid()};
    struct go_tls_read *r = go_tls_reads.lookup(&rk);
    if (!r)
        return 0;
    struct conn_key key = {.tgid = rk.tgid, .fd = r->fd};
    u64 buf = r->buf;
    go_tls_reads.delete(&rk);
    if (n <= 0)
        return 0;
    struct conn *c = conns.lookup(&key);
    if (!c)
        return 0;
    /* net/http's server reads one byte in the background while a handler runs (to notice a
     * client going away): the next request's first byte, whose rest the next Read brings into
     * bufio's buffer right after it. That byte is held here and joined to the next Read. */
    struct go_tls_held held = {.conn_start = c->start_ns};
    if (n == 1) {
        if (bpf_probe_read_user(&held.byte, 1, (void *)buf) == 0)
            go_tls_held.update(&key, &held);
        return 0;
    }
    struct go_tls_held *h = go_tls_held.lookup(&key);
    if (h) {
        if (h->conn_start == c->start_ns && bpf_probe_read_user(&held.byte, 1, (void *)(buf - 1)) == 0 &&
            held.byte == h->byte) {
            buf -= 1;
            n += 1;
        }
        go_tls_held.delete(&key);
    }
    l7_on_io_tls(ctx, &key, buf, (u64)n, 0);
    return 0;
}

/* (n int, err error): n in the first result register */
int go_tls_read_return(struct pt_regs *ctx) { return go_tls_read_done(ctx, GO_G(ctx), (s64)GO_REG1(ctx)); }

/* The stack ABI (ABI0, Go before 1.17 on amd64): arguments and results on the goroutine's
 * stack above the return address; a Read is keyed by its *tls.Conn (gotls.h). */
int go_tls_write_enter_stack(struct pt_regs *ctx) {
    return go_tls_write(ctx, go_stack_word(ctx, GO_STACK_RECV), go_stack_word(ctx, GO_STACK_BUF),
                        go_stack_word(ctx, GO_STACK_LEN));
}

int go_tls_read_enter_stack(struct pt_regs *ctx) {
    u64 tls_conn = go_stack_word(ctx, GO_STACK_RECV);
    return go_tls_read(tls_conn, tls_conn, go_stack_word(ctx, GO_STACK_BUF));
}

int go_tls_read_return_stack(struct pt_regs *ctx) {
    return go_tls_read_done(ctx, go_stack_word(ctx, GO_STACK_RECV), (s64)go_stack_word(ctx, GO_STACK_N));
}
