/* bench/detach.py: empty programs on the hooks the agent uses, to time what the kernel does when
 * they are detached and what each costs per syscall. PROBES_TRACEPOINTS: one perf-event
 * tracepoint per syscall entry and exit (the agent's way); PROBES_RAW: the raw_syscalls
 * tracepoints, which fire for every syscall and return at once for the others. */
#include <linux/ptrace.h>

#ifdef PROBES_TRACEPOINTS
#define PAIR(name)                                                                                  \
    TRACEPOINT_PROBE(syscalls, sys_enter_##name) { return 0; }                                      \
    TRACEPOINT_PROBE(syscalls, sys_exit_##name) { return 0; }
PAIR(read)
PAIR(write)
PAIR(readv)
PAIR(writev)
PAIR(sendto)
PAIR(recvfrom)
PAIR(sendmsg)
PAIR(recvmsg)
PAIR(connect)
PAIR(accept)
PAIR(accept4)
PAIR(openat)
PAIR(close)
#endif

#ifdef PROBES_RAW
/* x86-64 numbers of the same 13 syscalls */
static __always_inline int traced(long id) {
    switch (id) {
    case 0: case 1: case 19: case 20: case 44: case 45: case 46: case 47:
    case 42: case 43: case 288: case 257: case 3:
        return 1;
    }
    return 0;
}

RAW_TRACEPOINT_PROBE(sys_enter) {
    return traced((long)ctx->args[1]);
}

RAW_TRACEPOINT_PROBE(sys_exit) {
    struct pt_regs *regs = (struct pt_regs *)ctx->args[0];
    long id = 0;
    bpf_probe_read_kernel(&id, sizeof(id), &regs->orig_ax);
    return traced(id);
}
#endif
