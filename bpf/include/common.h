/* Shared by every program in bpf/: event output that works with a ring buffer (5.8+) or a
 * perf buffer, chosen at start-up by the loader's CA_RINGBUF define, and a counter of the
 * events the kernel side could not hand over (full buffer): user space reports it as
 * coroot_agent_lost_events_total{what=<buffer>}. */
#ifndef COROOT_AGENT_COMMON_H
#define COROOT_AGENT_COMMON_H

#include <uapi/linux/ptrace.h>
#include <linux/sched.h>

#ifndef CA_EVENTS_PAGES
#define CA_EVENTS_PAGES 64
#endif

/* Declares an event buffer and its lost-events counter. BCC cannot rewrite map method calls
 * written inside a macro, so each program submits through a small function of its own:
 *
 *   static __always_inline void submit_x(void *ctx, struct x *e) {
 *   #ifdef CA_RINGBUF
 *       if (x_events.ringbuf_output(e, sizeof(*e), 0) < 0)
 *   #else
 *       if (x_events.perf_submit(ctx, e, sizeof(*e)) < 0)
 *   #endif
 *           x_events_lost.increment(0);
 *   }
 */
#ifdef CA_RINGBUF
#define CA_EVENTS_SIZED(name, pages)                                                          \
    BPF_RINGBUF_OUTPUT(name, pages);                                                           \
    BPF_PERCPU_ARRAY(name##_lost, u64, 1)
#else
#define CA_EVENTS_SIZED(name, pages)                                                          \
    BPF_PERF_OUTPUT(name);                                                                     \
    BPF_PERCPU_ARRAY(name##_lost, u64, 1)
#endif
/* A buffer of the default size; CA_EVENTS_SIZED for one that needs more (a power of two of
 * pages; for perf buffers the loader sizes them per CPU, see Family.pages). */
#define CA_EVENTS(name) CA_EVENTS_SIZED(name, CA_EVENTS_PAGES)

static __always_inline u32 ca_tgid(void) { return bpf_get_current_pid_tgid() >> 32; }

#endif
