/* rustls uprobes and the per-thread state that joins their plaintext to the program's own
 * socket calls: see bpf/include/rustls.h. Compiled right after bpf/l7.c (its l7_on_io_tls and
 * the `conns` map of bpf/tcp.c). */

#ifndef CA_RUSTLS_MAX_THREADS
#define CA_RUSTLS_MAX_THREADS 16384
#endif
/* [0]: 1 once any rustls probe ran: until then the socket hooks do no lookup for rustls */
BPF_ARRAY(rustls_on, u32, 1);
/* processes using rustls (set by the probes, and by agent/l7/tls.py for each process it finds
 * running a traced rustls executable: a server's first request is read before any probe ran) */
BPF_TABLE("lru_hash", u32, u8, rustls_tgids, 4096);
BPF_TABLE("lru_hash", u64, u32, rustls_last_fd, CA_RUSTLS_MAX_THREADS);
BPF_TABLE("lru_hash", u64, struct rustls_plain, rustls_pending, CA_RUSTLS_MAX_THREADS);
BPF_TABLE("lru_hash", u64, struct rustls_call, rustls_calls, CA_RUSTLS_MAX_THREADS);

static __always_inline int rustls_on_io(struct conn_key *ckey, struct conn *c, int sent, u64 *buf, u32 *kind,
                                        u64 *size) {
    int zero = 0;
    u32 *on = rustls_on.lookup(&zero);
    if (!on || !*on || !rustls_tgids.lookup(&ckey->tgid))
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    if (!sent) {
        u32 fd = ckey->fd;
        rustls_last_fd.update(&id, &fd);
        return 0;
    }
    struct rustls_plain *p = rustls_pending.lookup(&id);
    if (!p)
        return 0;
    struct rustls_plain plain = *p;
    rustls_pending.delete(&id);
    if (bpf_ktime_get_ns() - plain.at_ns > RUSTLS_PENDING_NS)
        return 0; /* its socket write was another thread's, or never came */
    *buf = plain.buf;
    *size = plain.len;
    *kind = IO_BUF;
    if (!(c->flags & CONN_GO_TLS))
        c->flags |= CONN_GO_TLS; /* its reads carry ciphertext from now on */
    return 1;
}

static __always_inline u64 rustls_enter(struct pt_regs *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (tgid == CA_SELF_TGID)
        return 0;
    int zero = 0;
    u32 one = 1;
    u32 *on = rustls_on.lookup(&zero);
    if (on && !*on)
        rustls_on.update(&zero, &one);
    u8 yes = 1;
    if (!rustls_tgids.lookup(&tgid))
        rustls_tgids.update(&tgid, &yes);
    return id;
}

/* The call's (buf, count) at its return, whichever ABI (rustls.h); 0 when it failed or moved nothing. */
static __always_inline int rustls_result(struct pt_regs *ctx, struct rustls_call *call, u64 *buf, u64 *n) {
    u64 rax = PT_REGS_RC(ctx);
    if (rax == call->a0) { /* returned through the slot at rdi: (tag, count) there */
        u64 res[2] = {};
        if (bpf_probe_read_user(res, sizeof(res), (void *)call->a0) < 0 || res[0] != 0)
            return 0;
        *buf = call->a2;
        *n = res[1];
    } else {
        if (rax != 0)
            return 0;
        *buf = call->a1;
        *n = ctx->dx;
    }
    return *n > 0 && *n < (1ULL << 31);
}

static __always_inline void rustls_save(struct pt_regs *ctx, u64 id, u32 fd, u32 has_fd) {
    struct rustls_call call = {.a0 = ctx->di, .a1 = ctx->si, .a2 = ctx->dx, .a3 = ctx->cx, .fd = fd,
                               .has_fd = has_fd};
    rustls_calls.update(&id, &call);
}

int rustls_write_enter(struct pt_regs *ctx) {
    u64 id = rustls_enter(ctx);
    if (id)
        rustls_save(ctx, id, 0, 0);
    return 0;
}

/* Writer::write took n bytes of buf: they wait for the thread's next socket write. */
int rustls_write_exit(struct pt_regs *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    struct rustls_call *call = rustls_calls.lookup(&id);
    if (!call)
        return 0;
    struct rustls_call cc = *call;
    rustls_calls.delete(&id);
    struct rustls_plain p = {};
    if (!rustls_result(ctx, &cc, &p.buf, &p.len))
        return 0;
    p.at_ns = bpf_ktime_get_ns();
    struct rustls_plain *first = rustls_pending.lookup(&id);
    if (first && p.at_ns - first->at_ns <= RUSTLS_PENDING_NS)
        return 0; /* an earlier part of the same message waits: it starts the message */
    rustls_pending.update(&id, &p);
    return 0;
}

int rustls_read_enter(struct pt_regs *ctx) {
    u64 id = rustls_enter(ctx);
    if (!id)
        return 0;
    u32 *fd = rustls_last_fd.lookup(&id);
    if (!fd)
        return 0; /* plaintext already buffered (no socket read since the last one): a continuation */
    u32 f = *fd;
    rustls_last_fd.delete(&id);
    rustls_save(ctx, id, f, 1);
    return 0;
}

int rustls_read_exit(struct pt_regs *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    struct rustls_call *call = rustls_calls.lookup(&id);
    if (!call)
        return 0;
    struct rustls_call cc = *call;
    rustls_calls.delete(&id);
    u64 buf = 0, n = 0;
    if (!cc.has_fd || !rustls_result(ctx, &cc, &buf, &n))
        return 0;
    struct conn_key key = {.tgid = id >> 32, .fd = cc.fd};
    struct conn *c = conns.lookup(&key);
    if (!c)
        return 0;
    if (!(c->flags & CONN_GO_TLS))
        c->flags |= CONN_GO_TLS;
    l7_on_io_tls(ctx, &key, buf, n, 0);
    return 0;
}
