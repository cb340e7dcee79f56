/* Go crypto/tls: uprobes on crypto/tls.(*Conn).Write and .Read of Go binaries (attached by
 * agent/l7/tls.py at the addresses agent/l7/gotls.py finds), handing the plaintext to the
 * L7 pairing of bpf/l7.c like the OpenSSL probes do. Included by bpf/l7.c.
 *
 * Go's register ABI (1.17+): the receiver and arguments are in registers (amd64: AX, BX, CX,
 * ...; the current goroutine in R14), results too at the function's RET. Go moves goroutine
 * stacks, so there are no uretprobes on Go code: Read's results are read by a uprobe on each of
 * its RET instructions. Read's buffer, known at its entry, waits in go_tls_reads keyed by the
 * goroutine (not the thread: a goroutine blocked in Read resumes on any thread).
 *
 * The socket: tls.Conn starts with its net.Conn (an interface: itab, data); for a TCP (or Unix)
 * connection the data is a *net.TCPConn, whose first word is its *net.netFD, which begins with
 * an internal/poll.FD whose Sysfd is the fd. Offsets below; agent/l7/gotls.py mirrors them and
 * checks them against the binary's DWARF when it has one. A conn that is not a socket gives an
 * fd the connection table does not know (or a wrong one of the same process: the pairing keys
 * by connection start too, so at worst a request is missed), and nothing is traced.
 *
 * A connection seen through these probes carries ciphertext in its syscalls: it is marked
 * CONN_GO_TLS, and bpf/l7.c does not parse its socket reads and writes (the OpenSSL path knows
 * its nested syscalls by thread; a goroutine's are on whatever thread runs it).
 *
 * The map and the programs are at the end of bpf/l7.c: BCC rewrites map calls (and loads
 * programs) in the main file only, not in headers. */
#ifndef COROOT_AGENT_L7_GOTLS_H
#define COROOT_AGENT_L7_GOTLS_H

#define CONN_GO_TLS (1 << 15) /* conn.flags (bpf/tcp.c): plaintext seen by the Go TLS probes */

/* Mirror: agent/l7/gotls.py OFFSETS */
#define GO_TLS_IFACE_DATA 8  /* tls.Conn.conn (offset 0) is an interface: its data pointer */
#define GO_TLS_NETCONN_FD 0  /* net.TCPConn{conn{fd *netFD}} */
#define GO_TLS_NETFD_SYSFD 16 /* netFD{pfd poll.FD{fdmu (16 bytes), Sysfd int}} */

#if defined(__TARGET_ARCH_arm64)
#define GO_REG1(x) (((struct user_pt_regs *)(x))->regs[0])
#define GO_REG2(x) (((struct user_pt_regs *)(x))->regs[1])
#define GO_REG3(x) (((struct user_pt_regs *)(x))->regs[2])
#define GO_G(x) (((struct user_pt_regs *)(x))->regs[28])
#else
#define GO_REG1(x) ((x)->ax)
#define GO_REG2(x) ((x)->bx)
#define GO_REG3(x) ((x)->cx)
#define GO_G(x) ((x)->r14)
#endif

/* The stack ABI (ABI0, Go before 1.17 on amd64). At the entry of a method such as
 * func (c *Conn) Read(b []byte) (int, error), and again at each of its RETs (the frame popped),
 * the stack pointer points at the return address and the arguments and results follow it, in
 * the caller's frame: c, b's pointer, length and capacity, then n and err. The goroutine (g) is
 * not in a register but in thread-local storage (fs base - 8), and the kernel's record of a
 * thread's fs base is at an offset of task_struct that the headers BCC compiles with need not
 * match (the closest headers of another kernel): a Read is keyed instead by its receiver, the
 * *tls.Conn, still in its argument slot at the RET (Read does not assign c; the slot moves with
 * the goroutine's stack, its value does not). Two goroutines in Read of one tls.Conn at once
 * (Read serialises them on the conn's input lock) would share the key: the first to return
 * takes the later one's buffer, the other's read is missed. Mirror: agent/l7/gotls.py STACK_ABI. */
#define GO_STACK_RECV 8
#define GO_STACK_BUF 16
#define GO_STACK_LEN 24
#define GO_STACK_N 40 /* after b's capacity at 32 */

static __always_inline u64 go_stack_word(struct pt_regs *ctx, int off) {
    u64 v = 0;
    bpf_probe_read_user(&v, sizeof(v), (void *)(PT_REGS_SP(ctx) + off));
    return v;
}

struct go_tls_read_key {
    u64 g; /* the goroutine (register ABI), or the *tls.Conn (stack ABI) */
    u32 tgid;
    u32 _pad;
};

struct go_tls_read {
    u64 buf;
    u32 fd;
    u32 _pad;
};

struct go_tls_held {
    u64 conn_start;
    u8 byte;
    u8 _pad[7];
};

/* The fd under a *tls.Conn (0 if it cannot be read). */
static __always_inline int go_tls_fd(u64 tls_conn, u32 *fd) {
    u64 data = 0, netfd = 0;
    s64 sysfd = -1;
    if (!tls_conn || bpf_probe_read_user(&data, sizeof(data), (void *)(tls_conn + GO_TLS_IFACE_DATA)) < 0 || !data)
        return 0;
    if (bpf_probe_read_user(&netfd, sizeof(netfd), (void *)(data + GO_TLS_NETCONN_FD)) < 0 || !netfd)
        return 0;
    if (bpf_probe_read_user(&sysfd, sizeof(sysfd), (void *)(netfd + GO_TLS_NETFD_SYSFD)) < 0 || sysfd < 0 ||
        sysfd > 0x7fffffff)
        return 0;
    *fd = (u32)sysfd;
    return 1;
}

#endif
