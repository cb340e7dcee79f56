/* Native stacks without frame pointers, for the CPU profiler (bpf/profiler.c): the x86-64
 * unwind tables user space builds from each mapped file's .eh_frame/.debug_frame
 * (agent/profiling/unwind.py) and the kernel's lookups in them.
 *
 * unwind_rows: every loaded file's rows, one file's rows contiguous and sorted by address
 *   (user space allocates the ranges). A row holds from its pc up to the next row's.
 * unwind_procs: pid -> how many mappings it has in unwind_maps and the generation of that
 *   table: user space gives every write of a process's mappings a new one (never reused).
 * unwind_maps: (pid, i) -> its i-th executable file mapping, sorted by start: the range, the
 *   load bias (address in the process - address in the file) and the file's rows.
 *
 * A frame: the mapping of the pc (binary search, CA_UNWIND_MAP_SEARCH steps), the row of the pc
 * less the bias (binary search, CA_UNWIND_SEARCH steps), then CFA = rsp or rbp + offset, the
 * return address at CFA - 8, the caller's rbp at CFA + offset or unchanged, rsp = CFA. No
 * mapping or no row: one frame-pointer step instead (return address at rbp + 8, the caller's
 * rbp at rbp).
 *
 * unwind_cache: per CPU, direct-mapped by the looked-up address, the rule found for (pid,
 * generation, address): consecutive samples of the same code (the same call sites: every
 * caller's frame of a busy loop) skip both searches. An entry of an older generation (the
 * process exec'd, mapped or unmapped files since) or another pid never matches. The rows it
 * copies cannot change under a generation: user space reuses a file's rows only once no
 * process maps it, and a process's new files come with a new generation.
 *
 * Lookups go through maps, never by a computed index into one value, so the
 * verifier does not track the searches' bounds precisely (no state per branch taken). */
#ifndef COROOT_AGENT_UNWIND_H
#define COROOT_AGENT_UNWIND_H

#define UNWIND_NONE 0 /* no rule we follow: one frame-pointer step */
#define UNWIND_RSP 1  /* CFA = rsp + cfa * 8 */
#define UNWIND_RBP 2  /* CFA = rbp + cfa * 8 */
#define UNWIND_PLT 3  /* a PLT stub: CFA = rsp + 8, + 8 past its push (pc & 15 >= 11) */
#define UNWIND_END 4  /* the return address is undefined: the outermost frame */

#define CA_UNWIND_SEARCH 19 /* steps of a row search: 2^18 rows a file at most */
#ifndef CA_UNWIND_ROWS
#define CA_UNWIND_ROWS (1 << 20) /* rows of all loaded files: 8 MiB */
#endif
#define CA_UNWIND_MAPS 64 /* executable file mappings a process: at most 2^(search - 1) */
#define CA_UNWIND_MAP_SEARCH 7
#ifndef CA_UNWIND_PROCS
#define CA_UNWIND_PROCS 4096
#endif
#define CA_NATIVE_DEPTH 64 /* frames a stack; a power of two (the index is masked) */
#define CA_NATIVE_FRAMES 16 /* frames a program run: CA_NATIVE_DEPTH / CA_NATIVE_FRAMES runs */
#ifndef CA_NATIVE_STACKS
#define CA_NATIVE_STACKS 8192 /* distinct native stacks between two drains */
#endif

struct unwind_row {
    u32 pc;   /* address in the file */
    u8 type;  /* UNWIND_* */
    u8 rbp;   /* signed (s8: BCC's Python side has no signed char): the caller's rbp at
               * CFA + rbp * 8; 0: rbp unchanged */
    u16 cfa;  /* in 8-byte words */
};

struct unwind_proc {
    u32 count; /* mappings in unwind_maps */
    u32 gen;   /* generation of the process's mappings, never 0 */
};

#define CA_UNWIND_CACHE 1024 /* entries per CPU: a power of two (the slot is masked) */

struct unwind_cache_entry {
    u64 addr; /* the address looked up */
    u32 pid;
    u32 gen;
    u8 type;
    u8 rbp;
    u16 cfa;
    u32 _pad;
};

struct unwind_map_key {
    u32 pid;
    u32 index;
};

struct unwind_map {
    u64 start;
    u64 end;
    u64 bias;
    u32 rows_start; /* in unwind_rows */
    u32 rows_count; /* 0: the file has no table (frame pointers only) */
};

struct native_stack {
    u32 depth;
    u32 truncated; /* deeper than CA_NATIVE_DEPTH */
    u64 pc[CA_NATIVE_DEPTH]; /* leaf first: the sampled pc, then return addresses */
};

#define NATIVE_BY_TABLE 0 /* frames stepped by a row */
#define NATIVE_BY_FP 1    /* frames stepped by frame pointer (no mapping, no row) */
#define NATIVE_STACKS 2   /* stacks walked */
#define NATIVE_NO_TAIL 3  /* a tail call failed: the stack is cut there */
#define NATIVE_CACHED 4   /* frames whose rule came from unwind_cache */
#define NATIVE_STATS 5

#endif
