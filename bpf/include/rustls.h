/* rustls: the plaintext of a Rust program's TLS connections, from uprobes on
 * `<rustls::conn::Writer as std::io::Write>::write` and `<rustls::conn::Reader as
 * std::io::Read>::read` (attached by agent/l7/tls.py at the addresses agent/l7/tlsbin.py finds).
 * Declarations for bpf/l7.c; the maps and programs are in bpf/rustls.c, compiled right after
 * bpf/l7.c (BCC rewrites map calls in the main text only, not in headers).
 *
 * rustls does no socket I/O of its own: a program writes plaintext into the connection
 * (Writer::write), and the ciphertext leaves by the program's own socket write, on the same
 * thread, right after (rustls::Stream::write calls complete_io -> write_tls); ciphertext comes in
 * by the program's socket read (read_tls), and the plaintext is taken out by Reader::read on the
 * same thread. So:
 *  - Writer::write's plaintext waits per thread (rustls_pending) until the thread's next socket
 *    write on a tracked connection, whose bytes it replaces, marked TLS (the first plaintext since
 *    that thread's last socket write: a message written in parts starts with its first part; one
 *    that waited longer than RUSTLS_PENDING_NS — its socket write never came on this thread — is
 *    dropped, so it can neither stand for a later message nor keep one out);
 *  - a socket read of a process using rustls leaves its fd per thread (rustls_last_fd), which the
 *    next Reader::read takes: its plaintext is handed to the L7 pairing on that connection.
 * A connection paired so is marked CONN_GO_TLS (gotls.h: its syscalls carry ciphertext and are
 * not parsed). Rust stacks do not move: the results come from uretprobes.
 *
 * The ABI: both functions return io::Result<usize>. rustc before ~1.7x returns it through a
 * hidden pointer (rdi: the result's slot, then self, buf, len in rsi, rdx, rcx; the slot holds the
 * tag at 0 and the count at 8, and rax is the slot's address at the return); later rustc in
 * registers (self, buf, len in rdi, rsi, rdx; the tag in rax, the count in rdx). The entry's
 * registers are kept, and at the return rax == the entry's rdi tells the first (a tag is 0 or 1,
 * never the address of self). x86-64 only. */
#ifndef COROOT_AGENT_RUSTLS_H
#define COROOT_AGENT_RUSTLS_H

#define RUSTLS_PENDING_NS 100000000ULL /* 100 ms */

struct rustls_call {
    u64 a0, a1, a2, a3; /* rdi, rsi, rdx, rcx at the entry */
    u32 fd;             /* Reader::read: the socket the thread read last (has_fd) */
    u32 has_fd;
};

struct rustls_plain {
    u64 buf;
    u64 len;
    u64 at_ns; /* when Writer::write returned */
};

/* A tracked connection's socket read or write (bpf/l7.c, before anything else): a read leaves
 * its fd for the thread's next Reader::read; a write takes the thread's waiting plaintext, if
 * any, into (buf, kind, size) and returns 1 (the call is then TLS plaintext). */
static __always_inline int rustls_on_io(struct conn_key *ckey, struct conn *c, int sent, u64 *buf, u32 *kind,
                                        u64 *size);

#endif
