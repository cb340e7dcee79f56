/* Log files: a process that has opened a file under /var/log/ for writing (openat, and openat2
 * where the kernel has it: CA_LOGS_OPENAT2, set by the loader when the tracepoint exists).
 * Only successful opens are reported, with the descriptor the call returned: user space takes
 * the file from /proc/PID/fd/N (what the kernel opened), not from the path the process passed,
 * which may name anything (`..`, symlinks) and may have been refused.
 *
 * At entry the call is remembered (filename pointer, flags) by thread when the path starts with
 * /var/log/ (the cheap test stays here: most opens are of nothing we want); at exit the entry is
 * always removed, and an event goes out when ret >= 0. The path is read again at exit (user
 * memory, still the caller's): it is only a hint, user space checks it. */
#include "common.h"

#define CA_LOG_PATH 256
#define CA_LOG_OPENS_IN_FLIGHT 10240

/* Mirror: agent/logs/collector.py LOG_OPEN_EVENT ("<IiI256s"). */
struct log_open_event {
    u32 pid;
    s32 fd; /* what openat returned */
    u32 flags;
    char path[CA_LOG_PATH];
};

struct log_open_call {
    u64 filename; /* user pointer, as passed to openat */
    u32 flags;
};

/* pid_tgid -> open in progress: lives from a syscall's entry to its exit (a thread has at most
 * one); bounded, an update into a full map is simply not made (that open is not reported, the
 * collector's rescan of /proc/PID/fd still finds the file). */
BPF_HASH(log_open_calls, u64, struct log_open_call, CA_LOG_OPENS_IN_FLIGHT);
BPF_PERCPU_ARRAY(log_scratch, struct log_open_event, 1);
CA_EVENTS(log_events);

static __always_inline int log_open_enter(const char *filename, u64 flags) {
    if (!(flags & 3)) /* O_WRONLY | O_RDWR */
        return 0;
    char p[10] = {};
    if (bpf_probe_read_user_str(p, sizeof(p), filename) < 10)
        return 0; /* shorter than "/var/log/" */
    if (p[0] != '/' || p[1] != 'v' || p[2] != 'a' || p[3] != 'r' || p[4] != '/' || p[5] != 'l' || p[6] != 'o' ||
        p[7] != 'g' || p[8] != '/')
        return 0;
    u64 id = bpf_get_current_pid_tgid();
    struct log_open_call call = {.filename = (u64)filename, .flags = (u32)flags};
    log_open_calls.update(&id, &call);
    return 0;
}

static __always_inline int log_open_exit(void *ctx, long ret) {
    u64 id = bpf_get_current_pid_tgid();
    struct log_open_call *call = log_open_calls.lookup(&id);
    if (!call)
        return 0;
    u64 filename = call->filename;
    u32 flags = call->flags;
    log_open_calls.delete(&id);
    if (ret < 0)
        return 0; /* refused (EACCES, ENOENT, ...): nothing was opened, nothing to follow */
    int zero = 0;
    struct log_open_event *e = log_scratch.lookup(&zero);
    if (!e)
        return 0;
    e->pid = id >> 32;
    e->fd = ret;
    e->flags = flags;
    if (bpf_probe_read_user_str(e->path, sizeof(e->path), (const char *)filename) < 0)
        e->path[0] = 0; /* user space still has the descriptor */
#ifdef CA_RINGBUF
    if (log_events.ringbuf_output(e, sizeof(*e), 0) < 0)
#else
    if (log_events.perf_submit(ctx, e, sizeof(*e)) < 0)
#endif
        log_events_lost.increment(0);
    return 0;
}

TRACEPOINT_PROBE(syscalls, sys_enter_openat) { return log_open_enter(args->filename, args->flags); }
TRACEPOINT_PROBE(syscalls, sys_exit_openat) { return log_open_exit(args, args->ret); }

#ifdef CA_LOGS_OPENAT2
TRACEPOINT_PROBE(syscalls, sys_enter_openat2) {
    u64 flags = 0; /* struct open_how starts with its u64 flags */
    if (bpf_probe_read_user(&flags, sizeof(flags), args->how) < 0)
        return 0;
    return log_open_enter(args->filename, flags);
}
TRACEPOINT_PROBE(syscalls, sys_exit_openat2) { return log_open_exit(args, args->ret); }
#endif
