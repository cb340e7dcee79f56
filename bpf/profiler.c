/* CPU profiler: a software cpu-clock perf event on every CPU at CA_PROFILING_HZ calls
 * on_cpu_sample, which counts samples per (pid, user stack, kernel stack) in the kernel.
 *
 * Two count maps: user space flips `profile_active` and drains the map that was active before,
 * so samples taken during a drain land in the other map and none is lost. Only processes in
 * `profile_pids` are sampled: the agent's registry keeps it to the processes of reported
 * containers that did not opt out (COROOT_EBPF_PROFILING=disabled), so for the others no
 * sample is even counted.
 *
 * CPython processes (in `py_procs`, with their interpreter's offsets) also get their Python
 * stack walked at the sample (bpf/include/pyframes.h): stored once per distinct stack in
 * `py_stacks` under a hash of its code-object addresses, which the count key carries; user
 * space puts those frames in place of the interpreter's eval-loop frames.
 *
 * Processes whose executable files have unwind tables (in `unwind_procs`; bpf/include/unwind.h)
 * get their user stack walked here by those tables rather than by frame pointers, in a second
 * program (`on_cpu_unwind`, tail-called, then tail-calling itself, CA_NATIVE_FRAMES frames a
 * run) that also counts the sample; the stack is stored once per distinct stack in
 * `native_stacks` under a hash of its addresses, which the count key carries. A sample taken in
 * the kernel (no user registers here) or a failed tail call falls back to frame pointers. */
#include "common.h"
#include "pyframes.h"
#include "unwind.h"
#include <uapi/linux/bpf_perf_event.h>

#ifndef CA_PROFILE_STACKS
#define CA_PROFILE_STACKS 16384 /* distinct stacks between two drains */
#endif
#ifndef CA_PROFILE_COUNTS
#define CA_PROFILE_COUNTS 32768 /* distinct (pid, stack pair) between two drains */
#endif

struct profile_key {
    u32 pid;
    s32 user_stack;
    s32 kernel_stack;
    u32 _pad;
    u64 py_stack; /* key in py_stacks; 0: no Python frames */
    u64 native_stack; /* key in native_stacks (user_stack is then -1); 0: none */
};

/* The native walk's state across its tail calls. */
struct native_state {
    struct profile_key key;
    u64 pc;
    u64 sp;
    u64 bp;
    u64 hash; /* FNV-1a of the addresses so far */
    u32 maps; /* the process's mappings in unwind_maps and their generation (unwind_procs) */
    u32 gen;
    struct native_stack stack;
};

BPF_STACK_TRACE(profile_stacks, CA_PROFILE_STACKS);
BPF_HASH(profile_counts0, struct profile_key, u64, CA_PROFILE_COUNTS);
BPF_HASH(profile_counts1, struct profile_key, u64, CA_PROFILE_COUNTS);
BPF_ARRAY(profile_active, u32, 1);
BPF_HASH(profile_pids, u32, u8, 65536);
BPF_PERCPU_ARRAY(profile_dropped, u64, 1); /* a count map was full */

BPF_HASH(py_procs, u32, struct py_proc, 4096);             /* tgid -> offsets; user space writes */
BPF_HASH(py_stacks, u64, struct py_stack, CA_PROFILE_STACKS); /* user space deletes after a drain */
/* (pid, code object) -> its name, file, line. LRU: a code object freed and its entry evicted
 * before a drain reads it shows as an unknown Python frame. */
BPF_TABLE("lru_hash", struct py_symbol_key, struct py_symbol, py_symbols, CA_PY_SYMBOLS);
BPF_PERCPU_ARRAY(py_scratch, struct py_scratch, 1);

BPF_ARRAY(unwind_rows, struct unwind_row, CA_UNWIND_ROWS);         /* user space writes */
BPF_F_TABLE("hash", u32, struct unwind_proc, unwind_procs, CA_UNWIND_PROCS, BPF_F_NO_PREALLOC);
BPF_F_TABLE("hash", struct unwind_map_key, struct unwind_map, unwind_maps, CA_UNWIND_PROCS * 16, BPF_F_NO_PREALLOC);
BPF_HASH(native_stacks, u64, struct native_stack, CA_NATIVE_STACKS); /* user space deletes after a drain */
BPF_PERCPU_ARRAY(native_scratch, struct native_state, 1);
BPF_PERCPU_ARRAY(unwind_cache, struct unwind_cache_entry, CA_UNWIND_CACHE);
BPF_PERCPU_ARRAY(native_stats, u64, NATIVE_STATS);
BPF_PROG_ARRAY(native_progs, 1); /* [0]: on_cpu_unwind (user space sets it) */

/* A str's text, read as compact ASCII or compact non-ASCII by its state's `ascii` bit, with no
 * branch (each one multiplies the verifier's paths by the frames walked); returns the state,
 * which user space checks (compact, one byte per character) before it trusts the text. */
static __always_inline u8 py_read_str(struct py_proc *pp, u64 str, char *dst, u32 size) {
    u32 state = 0;
    bpf_probe_read_user(&state, sizeof(state), (void *)(str + pp->str_state));
    u64 ascii = (state >> 6) & 1;
    u64 data = str + pp->str_compact - ascii * (u64)(pp->str_compact - pp->str_ascii);
    bpf_probe_read_user_str(dst, size, (void *)data);
    return state;
}

/* A code object's name, file and line into py_symbols, unless there already. */
static __always_inline void py_symbolize(struct py_proc *pp, struct py_symbol_key *sk, struct py_symbol *sym) {
    if (py_symbols.lookup(sk))
        return;
    u64 code = sk->code;
    sym->line = 0;
    bpf_probe_read_user(&sym->line, sizeof(sym->line), (void *)(code + pp->code_line));
    bpf_probe_read_user(&sym->name_ptr, sizeof(sym->name_ptr), (void *)(code + pp->code_name));
    bpf_probe_read_user(&sym->file_ptr, sizeof(sym->file_ptr), (void *)(code + pp->code_file));
    sym->name_state = py_read_str(pp, sym->name_ptr, sym->name, sizeof(sym->name));
    sym->file_state = py_read_str(pp, sym->file_ptr, sym->file, sizeof(sym->file));
    py_symbols.insert(sk, sym);
}

/* The sampled thread's Python stack into s->stack; returns its hash (0: none). */
static __always_inline u64 py_walk(struct py_proc *pp, u32 pid, struct py_scratch *s) {
    u32 tid = (u32)bpf_get_current_pid_tgid();
    struct bpf_pidns_info ns = {};
    if (pp->pidns_ino && bpf_get_ns_current_pid_tgid(pp->pidns_dev, pp->pidns_ino, &ns, sizeof(ns)) == 0)
        tid = ns.pid;
    u64 interp = 0, ts = 0;
    bpf_probe_read_user(&interp, sizeof(interp), (void *)(pp->runtime + pp->interp_head));
    if (!interp)
        return 0;
    bpf_probe_read_user(&ts, sizeof(ts), (void *)(interp + pp->threads_head));
    u64 found = 0;
    for (int i = 0; i < CA_PY_THREADS && ts; i++) {
        u64 native = 0;
        bpf_probe_read_user(&native, sizeof(native), (void *)(ts + pp->tstate_native_tid));
        if (native == tid) {
            found = ts;
            break;
        }
        bpf_probe_read_user(&ts, sizeof(ts), (void *)(ts + pp->tstate_next));
    }
    if (!found)
        return 0;
    u64 frame = 0, holder = found;
    if (pp->tstate_cframe != 0xffff)
        bpf_probe_read_user(&holder, sizeof(holder), (void *)(found + pp->tstate_cframe));
    if (!holder)
        return 0;
    bpf_probe_read_user(&frame, sizeof(frame), (void *)(holder + pp->cframe_frame));
    /* First the frames' code objects (a loop the verifier walks cheaply), then their symbols. */
    u64 hash = 14695981039346656037ULL;
    u32 depth = 0;
    for (int i = 0; i < CA_PY_DEPTH; i++) {
        if (!frame)
            break;
        u64 code = 0;
        bpf_probe_read_user(&code, sizeof(code), (void *)(frame + pp->frame_code));
        u8 owner = 0;
        if (pp->frame_owner)
            bpf_probe_read_user(&owner, sizeof(owner), (void *)(frame + pp->frame_owner));
        if (owner == 3) /* FRAME_OWNED_BY_CSTACK: an entry frame, no code object */
            code = 0;
        s->stack.code[i] = code;
        hash = (hash ^ code) * 1099511628211ULL;
        depth = i + 1;
        bpf_probe_read_user(&frame, sizeof(frame), (void *)(frame + pp->frame_previous));
    }
    s->key.pid = pid;
    s->key._pad = 0;
    for (int i = 0; i < CA_PY_DEPTH; i++) {
        if (i >= depth)
            break;
        s->key.code = s->stack.code[i];
        if (s->key.code)
            py_symbolize(pp, &s->key, &s->sym);
    }
    s->stack.depth = depth;
    s->stack.truncated = frame != 0;
    if (!depth)
        return 0;
    hash = (hash ^ depth) * 1099511628211ULL;
    if (!hash)
        hash = 1;
    py_stacks.insert(&hash, &s->stack); /* present already: the same frames */
    return hash;
}

/* Count one sample. Insert-if-absent, so two CPUs seeing a new stack at once cannot overwrite
 * each other; written out per map because BCC rewrites map methods only on the map itself. */
static __always_inline void profile_count(struct profile_key *key) {
    int zero = 0;
    u32 *active = profile_active.lookup(&zero);
    if (active && *active) {
        u64 *count = profile_counts1.lookup(key);
        if (!count) {
            u64 one = 1;
            if (profile_counts1.insert(key, &one) == 0)
                return;
            count = profile_counts1.lookup(key);
        }
        if (count)
            __sync_fetch_and_add(count, 1);
        else
            profile_dropped.increment(0);
        return;
    }
    u64 *count = profile_counts0.lookup(key);
    if (!count) {
        u64 one = 1;
        if (profile_counts0.insert(key, &one) == 0)
            return;
        count = profile_counts0.lookup(key);
    }
    if (count)
        __sync_fetch_and_add(count, 1);
    else
        profile_dropped.increment(0);
}

/* One frame up from (st->pc, st->sp, st->bp); `caller`: st->pc is a return address (its call
 * is the byte before). Returns 0 when it stepped, 1 at the end of the stack. */
static __always_inline int native_step(struct native_state *st, u32 caller) {
    u64 pc = st->pc;
    u64 target = pc - caller;
    u32 slot = (u32)((target * 0x9E3779B97F4A7C15ULL) >> 32) & (CA_UNWIND_CACHE - 1);
    struct unwind_cache_entry *ce = unwind_cache.lookup(&slot);
    if (!ce)
        return 1;
    if (ce->addr == target && ce->pid == st->key.pid && ce->gen == st->gen) {
        native_stats.increment(NATIVE_CACHED);
    } else {
        /* the rule goes into the cache entry, and is read from there either way: one state for
         * the verifier after the two paths, not one per value the searches leave */
        u8 type = UNWIND_NONE;
        u8 rbp = 0;
        u16 cfa = 0;
        u32 n = st->maps;
        if (n > CA_UNWIND_MAPS)
            n = CA_UNWIND_MAPS;
        /* the last mapping that starts at or below the target */
        struct unwind_map_key mk = {.pid = st->key.pid};
        u32 lo = 0, hi = n;
        for (int j = 0; j < CA_UNWIND_MAP_SEARCH; j++) {
            if (lo >= hi)
                break;
            mk.index = (lo + hi) / 2;
            struct unwind_map *m = unwind_maps.lookup(&mk);
            if (!m) {
                lo = 0;
                break;
            }
            if (m->start <= target)
                lo = mk.index + 1;
            else
                hi = mk.index;
        }
        if (lo > 0) {
            mk.index = lo - 1;
            struct unwind_map *m = unwind_maps.lookup(&mk);
            if (m && target < m->end && target - m->bias <= 0xffffffffULL && m->rows_count) {
                u32 rel = (u32)(target - m->bias);
                u32 base = m->rows_start;
                u32 rlo = 0, rhi = m->rows_count;
                for (int j = 0; j < CA_UNWIND_SEARCH; j++) {
                    if (rlo >= rhi)
                        break;
                    u32 mid = (rlo + rhi) / 2;
                    u32 idx = base + mid;
                    struct unwind_row *r = unwind_rows.lookup(&idx);
                    if (!r) {
                        rlo = 0;
                        break;
                    }
                    if (r->pc <= rel)
                        rlo = mid + 1;
                    else
                        rhi = mid;
                }
                if (rlo > 0) {
                    u32 idx = base + rlo - 1;
                    struct unwind_row *r = unwind_rows.lookup(&idx);
                    if (r) {
                        type = r->type;
                        rbp = r->rbp;
                        cfa = r->cfa;
                    }
                }
            }
        }
        ce->addr = target;
        ce->pid = st->key.pid;
        ce->gen = st->gen;
        ce->type = type;
        ce->rbp = rbp;
        ce->cfa = cfa;
    }
    u8 type = *(volatile u8 *)&ce->type; /* volatile: loaded, not the values just stored */
    s8 rbp_off = (s8) * (volatile u8 *)&ce->rbp;
    u16 cfa_off = *(volatile u16 *)&ce->cfa;
    if (type == UNWIND_END)
        return 1;
    u64 cfa, bp = st->bp, ra = 0;
    if (type == UNWIND_RSP || type == UNWIND_RBP || type == UNWIND_PLT) {
        cfa = (type == UNWIND_RBP ? st->bp : st->sp) + (u64)cfa_off * 8;
        if (type == UNWIND_PLT && (pc & 15) >= 11)
            cfa += 8;
        if (rbp_off)
            bpf_probe_read_user(&bp, sizeof(bp), (void *)(cfa + (s64)rbp_off * 8));
        native_stats.increment(NATIVE_BY_TABLE);
    } else {
        if (!st->bp)
            return 1;
        cfa = st->bp + 16;
        bpf_probe_read_user(&bp, sizeof(bp), (void *)st->bp);
        native_stats.increment(NATIVE_BY_FP);
    }
    if (cfa <= st->sp) /* the stack grows down: a caller's frame is above */
        return 1;
    if (bpf_probe_read_user(&ra, sizeof(ra), (void *)(cfa - 8)) || !ra)
        return 1;
    st->pc = ra;
    st->sp = cfa;
    st->bp = bp;
    return 0;
}

/* The native walk: CA_NATIVE_FRAMES frames a run, then a tail call to itself; at the end the
 * stack is stored and the sample counted. */
int on_cpu_unwind(struct bpf_perf_event_data *ctx) {
    int z = 0;
    struct native_state *st = native_scratch.lookup(&z);
    if (!st)
        return 0;
    int more = 1;
    for (int i = 0; i < CA_NATIVE_FRAMES; i++) {
        u32 d = st->stack.depth;
        if (d >= CA_NATIVE_DEPTH) {
            more = 0;
            st->stack.truncated = 1;
            break;
        }
        st->stack.pc[d & (CA_NATIVE_DEPTH - 1)] = st->pc;
        st->stack.depth = d + 1;
        st->hash = (st->hash ^ st->pc) * 1099511628211ULL;
        if (native_step(st, d ? 1 : 0)) {
            more = 0;
            break;
        }
    }
    if (more) {
        if (st->stack.depth < CA_NATIVE_DEPTH) {
            native_progs.call(ctx, 0);
            native_stats.increment(NATIVE_NO_TAIL);
        }
        st->stack.truncated = 1;
    }
    u64 hash = (st->hash ^ st->stack.depth) * 1099511628211ULL;
    if (!hash)
        hash = 1;
    native_stacks.insert(&hash, &st->stack); /* present already: the same frames */
    native_stats.increment(NATIVE_STACKS);
    st->key.native_stack = hash;
    st->key.user_stack = -1;
    profile_count(&st->key);
    return 0;
}

int on_cpu_sample(struct bpf_perf_event_data *ctx) {
    u32 pid = ca_tgid();
    if (pid == 0)
        return 0; /* idle */
    if (!profile_pids.lookup(&pid))
        return 0;
    struct profile_key key = {.pid = pid, .user_stack = -1};
    key.kernel_stack = profile_stacks.get_stackid(&ctx->regs, 0);
    struct py_proc *pp = py_procs.lookup(&pid);
    if (pp) {
        int z = 0;
        struct py_scratch *s = py_scratch.lookup(&z);
        if (s)
            key.py_stack = py_walk(pp, pid, s);
    }
    /* In user mode the registers are the process's: walk by its unwind tables. */
    struct unwind_proc *up = unwind_procs.lookup(&pid);
    if (up && PT_REGS_IP(&ctx->regs) < 0x800000000000ULL) {
        int z = 0;
        struct native_state *st = native_scratch.lookup(&z);
        if (st) {
            st->maps = up->count;
            st->gen = up->gen;
            st->key = key;
            st->pc = PT_REGS_IP(&ctx->regs);
            st->sp = PT_REGS_SP(&ctx->regs);
            st->bp = PT_REGS_FP(&ctx->regs);
            st->hash = 14695981039346656037ULL;
            st->stack.depth = 0;
            st->stack.truncated = 0;
            native_progs.call(ctx, 0);
            native_stats.increment(NATIVE_NO_TAIL); /* not there: frame pointers below */
        }
    }
    key.user_stack = profile_stacks.get_stackid(&ctx->regs, BPF_F_USER_STACK);
    profile_count(&key);
    return 0;
}
