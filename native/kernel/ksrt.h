/* SPDX-License-Identifier: GPL-2.0 */
/*
 * ksrt.h: the kernel engine's runtime, the part of "the kernel" that is ours.
 *
 * Everything here lives in one shared arena, mapped MAP_SHARED at a fixed
 * address before the workers fork, so that every kernel pointer is the same
 * in every process: the page-table pages and their struct page array, the
 * kvm_mmu_page slab, struct kvm and its vCPUs, the locks, RCU's state and
 * callback queue, and the trace ring.  The per-process part is one word:
 * which task (worker slot) this process is.
 *
 * This header is included by the kernel TU (through kshim.h) and by
 * runtime.c, and by nothing of the kernel's: it names plain C types only.
 */
#ifndef _KSRT_H
#define _KSRT_H

#include <stdint.h>
#include <stdbool.h>
#include <stddef.h>

#define KS_MAX_TASKS 32

/* kinds of shared access, at the chokepoint */
enum ks_access_kind {
	KS_LOAD = 1,
	KS_STORE = 2,
	KS_XCHG = 3,
	KS_CMPXCHG_OK = 4,
	KS_CMPXCHG_FAIL = 5,
	KS_FETCH_AND = 6,
};

enum ks_lock_kind { KS_SPINLOCK = 1, KS_RWLOCK = 2 };
enum ks_held { KS_HELD_NONE = 0, KS_HELD_READ = 1, KS_HELD_WRITE = 2, KS_HELD_ANY = 3 };

/*
 * A lock word in the arena.  state: bit 31 = writer, low bits = readers.
 * waiters counts tasks queued in either mode (qrwlock: rwlock_needbreak()
 * is true for any queued waiter), wwaiters the writers among them.  owner is the writer's task + 1; readers
 * is a bitmask of reading tasks, so lockdep asserts and hang reports can
 * name who holds it.
 */
typedef struct {
	uint32_t state;
	uint32_t waiters;
	uint32_t wwaiters;
	uint32_t owner;
	uint32_t kind;
	uint32_t pad;
	uint64_t readers;
	const char *name;
} ks_lock_t;

void ks_access(int kind, const void *addr, uint64_t old, uint64_t val);
static inline uint64_t ks_as_u64(const void *p, size_t n)
{
	uint64_t v = 0;
	__builtin_memcpy(&v, p, n < 8 ? n : 8);
	return v;
}
void ks_cpu_relax(void);

void ks_warn(const char *what, const char *file, int line);
_Noreturn void ks_bug(const char *what, const char *file, int line);
void ks_printk(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
void ks_tracepoint_arg(const char *name, uintptr_t arg0);
/* A tracepoint of a user's patch: counted by name, no argument. */
static inline void ks_tracepoint(const char *name) { ks_tracepoint_arg(name, 0); }
/* Attach a hook to a tracepoint (before fork; one per tracepoint), as a BPF program is. */
int ks_tracepoint_attach(const char *name, void (*hook)(uintptr_t arg0));

void ks_lock_init(ks_lock_t *l, int kind, const char *name);
void ks_spin_lock(ks_lock_t *l);
void ks_spin_unlock(ks_lock_t *l);
void ks_read_lock(ks_lock_t *l);
void ks_read_unlock(ks_lock_t *l);
void ks_write_lock(ks_lock_t *l);
void ks_write_unlock(ks_lock_t *l);
bool ks_lock_needbreak(ks_lock_t *l);
int ks_cond_resched_rwlock_read(ks_lock_t *l);
int ks_cond_resched_rwlock_write(ks_lock_t *l);
bool ks_need_resched(void);
int ks_cond_resched(void);
void ks_might_sleep(const char *file, int line);
void ks_lockdep_assert_held(ks_lock_t *l, int mode, const char *name, const char *file, int line);
bool ks_lock_is_held(ks_lock_t *l);

struct rcu_head;
void ks_rcu_read_lock(void);
void ks_rcu_read_unlock(void);
bool ks_rcu_read_lock_held(void);
void ks_rcu_dereference_check(void);
void ks_rcu_dereference_check_cond(bool c);
void ks_call_rcu(struct rcu_head *head, void (*func)(struct rcu_head *));
void ks_rcu_barrier(void);
void ks_synchronize_rcu(void);

struct page;
struct kmem_cache;
struct kvm_mmu_memory_cache;
struct page *ks_pfn_to_page(uint64_t pfn);
bool ks_pfn_valid(uint64_t pfn);
unsigned long ks_get_free_page(unsigned int gfp);
void ks_free_page(unsigned long addr);
/* kernel.alias_tables: reserve every 512th page from a 2M-aligned frame, n of them; returns
 * the pfn of the first (the frame of region 0), or 0 if the pool cannot hold them. */
uint64_t ks_arena_alias(uint32_t n);
/* Claim reserved frame k if it is free: its address, or 0. */
unsigned long ks_alias_claim(uint32_t k);
void *ks_kmem_cache_zalloc(struct kmem_cache *c, unsigned int gfp);
void ks_kmem_cache_free(struct kmem_cache *c, void *p);
void *ks_mmu_memory_cache_alloc(struct kvm_mmu_memory_cache *mc);
void ks_account_pgtable_pages(void *virt, int nr);
uint64_t ks_zero_pfn(void);

#endif /* _KSRT_H */
