/* Node.js event-loop blocked time, by the Coroot node agent's method: libuv's loop (uv_run)
 * waits for I/O in uv__io_poll; the time the main thread spends between one uv__io_poll's
 * return and the next one's entry is time the loop ran JavaScript (timers, immediates, close
 * callbacks) instead of waiting, and inside uv__io_poll the I/O callbacks it calls
 * (uv__stream_io, uv__async_io, uv__poll_io, uv__server_io, uv__udp_io) are that too. Both are
 * added to the process's total: a loop that waits most of the time adds microseconds, one
 * whose callback spins for 200 ms adds 200 ms.
 *
 * The probes sit on the file that holds libuv (the node binary, libuv linked in, or a
 * libuv.so a process maps), attached once per file by agent/runtime/nodejs.py; only node runs
 * that code, and only the processes the agent follows count (nodejs_pids). Only the main
 * thread counts (libuv's thread pool and V8's workers never run the loop of uv_run, and a
 * worker_threads Worker's loop is not the process's event loop). User space reads the totals
 * and deletes a process's entries when it exits. */
#include "common.h"

#define CA_NODEJS_PROCESSES 4096 /* Node.js processes followed at once (user space bounds its set) */

/* tgid -> 1: the Node.js processes whose loops count. Written by user space only. */
BPF_HASH(nodejs_pids, u32, u8, CA_NODEJS_PROCESSES);
/* tgid -> when its last uv__io_poll returned (ns). */
BPF_HASH(nodejs_poll_end, u32, u64, CA_NODEJS_PROCESSES);
/* tgid -> when the I/O callback in progress was entered (ns). */
BPF_HASH(nodejs_cb_start, u32, u64, CA_NODEJS_PROCESSES);
/* tgid -> nanoseconds the event loop was blocked in total. */
BPF_HASH(nodejs_blocked_ns, u32, u64, CA_NODEJS_PROCESSES);

/* The tgid of a followed process's main thread; 0 for any other thread. */
static __always_inline u32 nodejs_main_thread(void) {
    u64 id = bpf_get_current_pid_tgid();
    u32 tgid = id >> 32;
    if ((u32)id != tgid || !nodejs_pids.lookup(&tgid))
        return 0;
    return tgid;
}

static __always_inline void nodejs_add(u32 tgid, u64 took) {
    u64 zero = 0;
    u64 *total = nodejs_blocked_ns.lookup_or_try_init(&tgid, &zero);
    if (total)
        __sync_fetch_and_add(total, took);
}

/* uv__io_poll returned: the loop goes on running callbacks until it polls again. */
int nodejs_poll_exit(struct pt_regs *ctx) {
    u32 tgid = nodejs_main_thread();
    if (!tgid)
        return 0;
    u64 now = bpf_ktime_get_ns();
    nodejs_poll_end.update(&tgid, &now);
    return 0;
}

/* uv__io_poll entered: the time since the last one returned was spent outside polling. */
int nodejs_poll_enter(struct pt_regs *ctx) {
    u32 tgid = nodejs_main_thread();
    if (!tgid)
        return 0;
    u64 *prev = nodejs_poll_end.lookup(&tgid);
    if (!prev)
        return 0;
    u64 took = bpf_ktime_get_ns() - *prev;
    nodejs_poll_end.delete(&tgid);
    nodejs_add(tgid, took);
    return 0;
}

int nodejs_io_cb_enter(struct pt_regs *ctx) {
    u32 tgid = nodejs_main_thread();
    if (!tgid)
        return 0;
    u64 now = bpf_ktime_get_ns();
    nodejs_cb_start.update(&tgid, &now);
    return 0;
}

int nodejs_io_cb_exit(struct pt_regs *ctx) {
    u32 tgid = nodejs_main_thread();
    if (!tgid)
        return 0;
    u64 *start = nodejs_cb_start.lookup(&tgid);
    if (!start)
        return 0;
    u64 took = bpf_ktime_get_ns() - *start;
    nodejs_cb_start.delete(&tgid);
    nodejs_add(tgid, took);
    return 0;
}
