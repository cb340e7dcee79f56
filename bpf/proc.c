/* Process lifecycle for the registry: a new process (fork without CLONE_THREAD), exec, exit of
 * a thread-group leader, and OOM kills. Reads tracepoint arguments only. */
#include "common.h"

#define PROC_EVENT_FORK 1
#define PROC_EVENT_EXEC 2
#define PROC_EVENT_EXIT 3
#define PROC_EVENT_OOM_KILL 4

/* Mirror: agent/containers/registry.py PROC_EVENT ("<IIIIQ16s"). The cgroup (v2) and name of
 * the task that made the event: a process that has exited by the time user space reads its
 * fork or exec event (a curl in a script, under load) still gets its container from these. */
struct proc_event {
    u32 type;
    u32 pid;
    u32 ppid;
    u32 _pad;
    u64 cgroup_id;
    char comm[16];
};

CA_EVENTS(proc_events);

static __always_inline void submit(void *ctx, struct proc_event *e) {
    e->cgroup_id = bpf_get_current_cgroup_id();
    bpf_get_current_comm(e->comm, sizeof(e->comm));
#ifdef CA_RINGBUF
    if (proc_events.ringbuf_output(e, sizeof(*e), 0) < 0)
#else
    if (proc_events.perf_submit(ctx, e, sizeof(*e)) < 0)
#endif
        proc_events_lost.increment(0);
}

#ifdef CA_L7 /* bpf/l7.c: a forked child inherits the socket its parent just accepted */
static __always_inline void l7_on_fork(u32 child);
#endif

TRACEPOINT_PROBE(task, task_newtask) {
    if (args->clone_flags & CLONE_THREAD)
        return 0;
#ifdef CA_L7
    l7_on_fork(args->pid);
#endif
    struct proc_event e = {.type = PROC_EVENT_FORK, .pid = args->pid, .ppid = ca_tgid()};
    submit(args, &e);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exec) {
    struct proc_event e = {.type = PROC_EVENT_EXEC, .pid = ca_tgid()};
    submit(args, &e);
    return 0;
}

TRACEPOINT_PROBE(sched, sched_process_exit) {
    u64 id = bpf_get_current_pid_tgid();
    if ((u32)id != (u32)(id >> 32))
        return 0; /* a thread, not the process */
    struct proc_event e = {.type = PROC_EVENT_EXIT, .pid = id >> 32};
    submit(args, &e);
    return 0;
}

TRACEPOINT_PROBE(oom, mark_victim) {
    struct proc_event e = {.type = PROC_EVENT_OOM_KILL, .pid = args->pid};
    submit(args, &e);
    return 0;
}
