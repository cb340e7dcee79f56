/* Python GIL wait: the time CPython threads spend in pthread_cond_timedwait. A thread that wants
 * the GIL waits there (take_gil: a timed wait on the GIL's condition variable, 5 ms at a time,
 * again and again until the holder lets go), in every CPython from 3.8 to 3.13; CPython's other
 * blocking waits (locks, sleeps, I/O) go through semaphores and syscalls, not this function.
 *
 * The uprobe and uretprobe sit on the C library's pthread_cond_timedwait (the library file a
 * Python process maps: glibc's libc.so.6 since 2.34, libpthread before, musl's loader),
 * attached for each Python process followed (agent/runtime/python.py), so no other process
 * runs them; python_pids is checked too (a process the agent stopped following while its
 * probes are being detached). A wait is timed from entry to return, per thread, and its
 * nanoseconds are added to the process's total; user space reads the totals and deletes a
 * process's entries when it exits. */
#include "common.h"

#define CA_PYTHON_PROCESSES 4096 /* Python processes followed at once (user space bounds its set) */
#define CA_PYTHON_WAITS 16384 /* threads inside a wait at once */

/* tgid -> 1: the Python processes whose waits count. Written by user space only. */
BPF_HASH(python_pids, u32, u8, CA_PYTHON_PROCESSES);
/* pid_tgid -> entry time (ns): a thread's wait in progress. LRU: a thread killed inside a wait
 * never returns, its entry goes when room is needed. */
BPF_TABLE("lru_hash", u64, u64, python_wait_start, CA_PYTHON_WAITS);
/* tgid -> nanoseconds waited in total. Created here on a process's first wait (bounded as
 * python_pids is), deleted by user space when the process exits. */
BPF_HASH(python_wait_ns, u32, u64, CA_PYTHON_PROCESSES);

int python_cond_wait_enter(struct pt_regs *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if (!python_pids.lookup(&tgid))
        return 0;
    u64 now = bpf_ktime_get_ns();
    python_wait_start.update(&id, &now);
    return 0;
}

int python_cond_wait_exit(struct pt_regs *ctx) {
    u64 id = bpf_get_current_pid_tgid();
    u64 *start = python_wait_start.lookup(&id);
    if (!start)
        return 0;
    u64 took = bpf_ktime_get_ns() - *start;
    python_wait_start.delete(&id);
    u32 tgid = id >> 32;
    u64 zero = 0;
    u64 *total = python_wait_ns.lookup_or_try_init(&tgid, &zero);
    if (total)
        __sync_fetch_and_add(total, took);
    return 0;
}
