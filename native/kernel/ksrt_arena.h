/* SPDX-License-Identifier: GPL-2.0 */
/*
 * ksrt_arena.h: the layout of the kernel engine's arena.  Shared by
 * runtime.c and ksglue.c; Python reads it through accessor functions only.
 */
#ifndef _KSRT_ARENA_H
#define _KSRT_ARENA_H

#include <setjmp.h>
#include <stdint.h>
#include "ksrt.h"

#define KS_MAGIC 0x6b73746470737472ull  /* "kstdpstr" */
#define KS_MAX_PAGES (1u << 17)          /* page-table pages: 512 MiB at most */
#define KS_MAX_OBJS (1u << 17)           /* struct kvm_mmu_page objects */
#define KS_MAX_CBS (1u << 16)            /* queued RCU callbacks */
#define KS_RING 4096                     /* per-task trace ring */
#define KS_NTRACE 64                     /* distinct tracepoints */

enum { KS_PAGE_FREE = 0, KS_PAGE_USED = 1 };

/* scheduling points, as stress/harness/sched/turns.py numbers them */
enum { KS_PT_POINT = 0, KS_PT_RELAX = 1, KS_PT_PAUSE = 2, KS_PT_WINDOW = 4 };
#define KS_SLICE_POINTS 4000  /* a controlled run's timeslice, in the task's own points */

/* kinds of violation */
enum {
	KS_V_WARN = 1,     /* WARN_ON / KVM_BUG_ON / refcount_t: the kernel's own assertion */
	KS_V_BUG = 2,      /* BUG / BUG_ON */
	KS_V_LOCKDEP = 3,  /* lockdep and RCU-lockdep splats */
	KS_V_UAF = 4,      /* KASAN: use-after-free, double free */
	KS_V_PRINTK = 5,   /* pr_err from the MMU code */
	KS_V_ORACLE = 6,   /* an invariant of the oracle layer */
	KS_V_HANG = 7,     /* a lock or wait past its bound */
};

struct ks_page { unsigned long priv; unsigned long flags; };

/* A trace event: an SPTE change (kind: KS_STORE...), or an op's begin (KS_EV_OP_BEGIN) or
 * end (KS_EV_OP_END, val = its result). */
enum { KS_EV_OP_BEGIN = 16, KS_EV_OP_END = 17 };
struct ks_event {
	uint64_t seq;
	uint64_t t_ns;
	uint64_t addr;
	uint64_t gfn;
	uint64_t old;
	uint64_t val;
	uint32_t table;
	uint8_t kind;
	uint8_t op;
	uint8_t level;
	uint8_t pad;
};

struct ks_task {
	int32_t pid;
	uint32_t op;               /* the op this task is in (ksglue.c's KE_OP_*) */
	uint64_t rng;
	uint64_t rcu_seq;          /* 0 outside RCU; else 1 + gp_seq at entry */
	uint32_t rcu_nesting;
	uint32_t srcu_nesting;
	uint32_t in_rcu_poll;
	uint32_t pad1;
	uint64_t srcu_snap;
	uint64_t slice_start;      /* need_resched(): start of the timeslice */
	uint64_t points, slice_points;  /* controlled runs: scheduling points passed */
	ks_lock_t *waiting_for;    /* the lock this task spins on, for hang reports */
	uint64_t accesses, spte_accesses, yields, resched, lock_spins, srcu_waits;
	uint64_t ops[32];          /* per-op counts */
	uint64_t op_results[8];
	uint64_t ring_n;
	struct ks_event ring[KS_RING];
	uint8_t pad[64];
};

struct ks_cb {
	struct rcu_head *head;
	void (*func)(struct rcu_head *);
	uint64_t seq;
	int32_t task;
	int32_t pad;
};

struct ks_violation {
	uint32_t state;            /* 0 none, 1 being written, 2 written */
	int32_t kind;
	int32_t task;
	int32_t line;
	uint32_t op;
	uint64_t seq;
	char file[96];
	char what[400];
};

struct ks_arena {
	uint64_t magic;
	uint64_t size;
	uint32_t ntasks;
	uint32_t npages, nobjs, obj_size;
	uint64_t pages_off, objs_off, bump_off, bump_end;
	uint64_t events;
	uint64_t trace_seq;
	uint32_t trace_on;
	uint32_t yield_ppm;
	uint32_t walk_window_factor;  /* yield_ppm x this after a load of a table link */
	uint32_t rcu_unlock_yield_ppm;  /* a yield after the outermost rcu_read_unlock */
	uint64_t timeslice_ns;
	uint32_t nviolations;
	uint32_t abort;            /* the supervisor tears the run down: spinners give up */
	struct ks_violation violation;

	ks_lock_t alloc_lock;
	uint64_t page_head, page_tail;
	uint64_t obj_head, obj_tail;
	int64_t pages_used, objs_used, pgtable_pages;
	uint32_t page_fifo[KS_MAX_PAGES];
	uint8_t page_state[KS_MAX_PAGES];
	int16_t page_freed_by[KS_MAX_PAGES];
	struct ks_page page_structs[KS_MAX_PAGES];
	uint32_t obj_fifo[KS_MAX_OBJS];
	uint8_t obj_state[KS_MAX_OBJS];

	ks_lock_t rcu_lock;
	uint64_t gp_seq;
	uint64_t cb_head, cb_tail;
	uint64_t cbs_queued, cbs_run;
	struct ks_cb cbs[KS_MAX_CBS];
	uint64_t srcu_seq;

	uint64_t trace_names[KS_NTRACE];
	uint64_t trace_counts[KS_NTRACE];
	/* a tracepoint's attached hook (ks_tracepoint_attach), called with its first argument */
	void (*trace_hooks[KS_NTRACE])(uintptr_t arg0);

	/* kernel.alias_tables: pages alias_first + 512 k (k < alias_n) are kept out of
	 * the FIFO, each claimed only by ks_alias_claim(k) (ksglue.c's memory map) */
	uint32_t alias_first, alias_n;

	void *vm;                  /* struct kvm *, set by ke_vm_create */
	struct ks_task tasks[KS_MAX_TASKS];
};

extern struct ks_arena *ks_arena;

/* A freed page-table page's words: a value that reads as a not-present SPTE. */
#define KS_POISON 0x8000deadbeef0000ull

/* Is page i one of kernel.alias_tables' reserved frames? */
static inline bool ks_page_is_alias(uint32_t i)
{
	return ks_arena->alias_n && i >= ks_arena->alias_first &&
	       (i - ks_arena->alias_first) % 512 == 0 &&
	       (i - ks_arena->alias_first) / 512 < ks_arena->alias_n;
}

/* The index of the page-table page holding addr, or -1 if it is none. */
static inline int ks_page_index(const void *addr)
{
	uint64_t off = (uint64_t)((const char *)addr - (const char *)ks_arena);
	if (off < ks_arena->pages_off || off >= ks_arena->pages_off + (uint64_t)ks_arena->npages * 4096)
		return -1;
	return (int)((off - ks_arena->pages_off) >> 12);
}
extern int ks_self;
extern __thread sigjmp_buf *ks_bug_jmp;
void ks_install_oops_handler(void);

int ks_arena_map(const char *shm_name, uint64_t base, uint64_t size, int create);
void ks_arena_unmap(void);
int ks_arena_init(uint64_t size, uint32_t npages, uint32_t nobjs, uint32_t obj_size,
		  uint32_t ntasks, uint64_t seed);
void ks_set_task(int t, int pid);
void *ks_bump_alloc(uint64_t size);
void ks_report(int kind, const char *file, int line, const char *fmt, ...)
	__attribute__((format(printf, 4, 5)));
int ks_rcu_poll(void);
void ks_trace_event(struct ks_task *t, int kind, const void *addr, uint64_t old, uint64_t val,
		    uint32_t table);
extern void (*ks_spte_where)(const void *sptep, uint64_t *gfn, int *level);
extern int (*ks_sched_hook)(int kind);
extern bool (*ks_is_table_link)(const void *sptep, uint64_t spte);
extern void (*ks_rcu_cb_check)(struct rcu_head *head, void (*func)(struct rcu_head *));
void ks_set_abort(void);

#endif /* _KSRT_ARENA_H */
