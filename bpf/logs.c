/* Log files: a process opening a file under /var/log/ for writing (openat with O_WRONLY or
 * O_RDWR). The path is read from the syscall's own argument (user memory), nothing else. */
#include "common.h"

#define CA_LOG_PATH 256

/* Mirror: agent/logs/collector.py LOG_OPEN_EVENT ("<II256s"). */
struct log_open_event {
    u32 pid;
    u32 flags;
    char path[CA_LOG_PATH];
};

BPF_PERCPU_ARRAY(log_scratch, struct log_open_event, 1);
CA_EVENTS(log_events);

TRACEPOINT_PROBE(syscalls, sys_enter_openat) {
    int flags = args->flags;
    if (!(flags & 3)) /* O_WRONLY | O_RDWR */
        return 0;
    int zero = 0;
    struct log_open_event *e = log_scratch.lookup(&zero);
    if (!e)
        return 0;
    if (bpf_probe_read_user_str(e->path, sizeof(e->path), args->filename) <= 9)
        return 0;
    if (e->path[0] != '/' || e->path[1] != 'v' || e->path[2] != 'a' || e->path[3] != 'r' ||
        e->path[4] != '/' || e->path[5] != 'l' || e->path[6] != 'o' || e->path[7] != 'g' || e->path[8] != '/')
        return 0;
    e->pid = ca_tgid();
    e->flags = flags;
#ifdef CA_RINGBUF
    if (log_events.ringbuf_output(e, sizeof(*e), 0) < 0)
#else
    if (log_events.perf_submit(args, e, sizeof(*e)) < 0)
#endif
        log_events_lost.increment(0);
    return 0;
}
