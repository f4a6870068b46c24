/* See atomics.h for the contract of each function. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stddef.h>
#include <sched.h>
#include <time.h>
#include <unistd.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include "atomics.h"

#define SEQ __ATOMIC_SEQ_CST
#define RW_WRITER  (1ULL << 63)
#define RW_WAITING (1ULL << 62)
#define RW_QUEUED  (1ULL << 32)			/* one task in the slow path */
#define RW_QUEUED_MASK (0xffffULL << 32)
#define RW_READERS 0xffffffffULL
#define SPINS_BEFORE_YIELD 64

uint64_t ts_load(uint64_t *b, size_t i) { return __atomic_load_n(&b[i], __ATOMIC_ACQUIRE); }
void ts_store(uint64_t *b, size_t i, uint64_t v) { __atomic_store_n(&b[i], v, __ATOMIC_RELEASE); }

uint64_t ts_cmpxchg(uint64_t *b, size_t i, uint64_t old, uint64_t new_)
{
	/* like try_cmpxchg64: on failure `old` is updated to the value found */
	__atomic_compare_exchange_n(&b[i], &old, new_, 0, SEQ, SEQ);
	return old;
}

uint64_t ts_xchg(uint64_t *b, size_t i, uint64_t v) { return __atomic_exchange_n(&b[i], v, SEQ); }
uint64_t ts_fetch_add(uint64_t *b, size_t i, uint64_t v) { return __atomic_fetch_add(&b[i], v, SEQ); }
uint64_t ts_fetch_and(uint64_t *b, size_t i, uint64_t v) { return __atomic_fetch_and(&b[i], v, SEQ); }
uint64_t ts_fetch_or(uint64_t *b, size_t i, uint64_t v) { return __atomic_fetch_or(&b[i], v, SEQ); }

void ts_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
	__builtin_ia32_pause();
#elif defined(__aarch64__)
	__asm__ __volatile__("yield");
#endif
}

uint64_t ts_now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

void ts_spin_ns(uint64_t ns)
{
	uint64_t end = ts_now_ns() + ns;
	while (ts_now_ns() < end)
		ts_cpu_relax();
}

/*
 * Processes outnumber cores on the machines this runs on, so a waiter that
 * spins without yielding can starve the very process it waits for.
 */
static inline int backoff(uint64_t *b, size_t abort_i, unsigned *spins)
{
	if (++*spins < SPINS_BEFORE_YIELD)
		ts_cpu_relax();
	else
		sched_yield();
	return __atomic_load_n(&b[abort_i], __ATOMIC_RELAXED) != 0;
}

/*
 * qrwlock's slow paths (kernel/locking/qrwlock.c at torvalds/linux
 * 0d3001e2690a, asm-generic/qrwlock.h at 019bc1f65e91), as rwlock_needbreak()
 * sees them: a task that cannot take the lock at once queues
 * (queued_{read,write}_lock_slowpath take wait_lock, and
 * queued_rwlock_is_contended() is arch_spin_is_locked(wait_lock)), so every
 * waiter, reader or writer, is counted in RW_QUEUED until it gets the
 * lock (the count leaves in the acquiring cmpxchg) or gives up.  A reader waits
 * behind a writer holding the lock or waiting for it (RW_WAITING), as a
 * qrwlock reader queues behind a waiting writer.
 */
int ts_read_lock(uint64_t *b, size_t lock_i, size_t abort_i)
{
	unsigned spins = 0;
	uint64_t queued = 0;
	for (;;) {
		uint64_t v = __atomic_load_n(&b[lock_i], __ATOMIC_RELAXED);
		if (!(v & (RW_WRITER | RW_WAITING))) {
			if (__atomic_compare_exchange_n(&b[lock_i], &v, v + 1 - queued, 0, SEQ, SEQ))
				return 0;
			continue;
		}
		if (!queued) {
			__atomic_fetch_add(&b[lock_i], RW_QUEUED, SEQ);
			queued = RW_QUEUED;
		}
		if (backoff(b, abort_i, &spins)) {
			__atomic_fetch_sub(&b[lock_i], queued, SEQ);
			return -1;
		}
	}
}

int ts_read_trylock(uint64_t *b, size_t lock_i)
{
	uint64_t v = __atomic_load_n(&b[lock_i], __ATOMIC_RELAXED);
	if (v & (RW_WRITER | RW_WAITING))
		return -1;
	return __atomic_compare_exchange_n(&b[lock_i], &v, v + 1, 0, SEQ, SEQ) ? 0 : -1;
}

void ts_read_unlock(uint64_t *b, size_t lock_i) { __atomic_fetch_sub(&b[lock_i], 1, SEQ); }

int ts_write_lock(uint64_t *b, size_t lock_i, size_t owner_i, uint64_t pid, size_t abort_i)
{
	unsigned spins = 0;
	uint64_t queued = 0;
	for (;;) {
		uint64_t v = __atomic_load_n(&b[lock_i], __ATOMIC_RELAXED);
		if (!(v & RW_WRITER)) {
			if (!(v & RW_READERS)) {
				/* clears RW_WAITING: other waiting writers set it again */
				uint64_t nv = RW_WRITER | ((v & RW_QUEUED_MASK) - queued);
				if (__atomic_compare_exchange_n(&b[lock_i], &v, nv, 0, SEQ, SEQ)) {
					__atomic_store_n(&b[owner_i], pid, SEQ);
					return 0;
				}
				continue;
			}
			if (!(v & RW_WAITING))
				__atomic_fetch_or(&b[lock_i], RW_WAITING, SEQ);
		}
		if (!queued) {
			__atomic_fetch_add(&b[lock_i], RW_QUEUED, SEQ);
			queued = RW_QUEUED;
		}
		if (backoff(b, abort_i, &spins)) {
			/* another waiting writer sets RW_WAITING again */
			__atomic_fetch_and(&b[lock_i], ~RW_WAITING, SEQ);
			__atomic_fetch_sub(&b[lock_i], queued, SEQ);
			return -1;
		}
	}
}

int ts_write_trylock(uint64_t *b, size_t lock_i, size_t owner_i, uint64_t pid)
{
	uint64_t v = 0;
	if (!__atomic_compare_exchange_n(&b[lock_i], &v, RW_WRITER, 0, SEQ, SEQ))
		return -1;
	__atomic_store_n(&b[owner_i], pid, SEQ);
	return 0;
}

void ts_write_unlock(uint64_t *b, size_t lock_i, size_t owner_i)
{
	__atomic_store_n(&b[owner_i], 0, SEQ);
	__atomic_fetch_and(&b[lock_i], ~RW_WRITER, SEQ);
}

int ts_rwlock_contended(uint64_t *b, size_t lock_i)
{
	return (__atomic_load_n(&b[lock_i], __ATOMIC_RELAXED) & (RW_WAITING | RW_QUEUED_MASK)) != 0;
}

int ts_spin_lock(uint64_t *b, size_t i, uint64_t pid, size_t abort_i)
{
	unsigned spins = 0;
	for (;;) {
		uint64_t v = __atomic_load_n(&b[i], __ATOMIC_RELAXED);
		if (v == 0 && __atomic_compare_exchange_n(&b[i], &v, pid, 0, SEQ, SEQ))
			return 0;
		if (backoff(b, abort_i, &spins))
			return -1;
	}
}

int ts_spin_trylock(uint64_t *b, size_t i, uint64_t pid)
{
	uint64_t v = 0;
	return __atomic_compare_exchange_n(&b[i], &v, pid, 0, SEQ, SEQ) ? 0 : -1;
}

void ts_spin_unlock(uint64_t *b, size_t i) { __atomic_store_n(&b[i], 0, SEQ); }

void ts_fill(uint64_t *b, size_t start, size_t n, uint64_t v)
{
	for (size_t k = 0; k < n; k++)
		__atomic_store_n(&b[start + k], v, __ATOMIC_RELAXED);
	__atomic_thread_fence(SEQ);
}

int64_t ts_bitmap_alloc(uint64_t *b, size_t bm_i, size_t nwords, size_t start_word)
{
	for (size_t k = 0; k < nwords; k++) {
		size_t w = (start_word + k) % nwords;
		uint64_t v = __atomic_load_n(&b[bm_i + w], __ATOMIC_RELAXED);
		while (v) {
			int bit = __builtin_ctzll(v);
			uint64_t m = 1ULL << bit;
			uint64_t old = __atomic_fetch_and(&b[bm_i + w], ~m, SEQ);
			if (old & m)
				return (int64_t)(w * 64 + (size_t)bit);
			v = old & ~m;
		}
	}
	return -1;
}

int64_t ts_popcount_range(uint64_t *b, size_t start, size_t n)
{
	int64_t c = 0;
	for (size_t k = 0; k < n; k++)
		c += __builtin_popcountll(__atomic_load_n(&b[start + k], __ATOMIC_RELAXED));
	return c;
}

/*
 * handle_removed_pt's child loop.  With freeze_nonpresent (shared mode) every
 * entry is xchg'd to `frozen`, waiting out another task's transient freeze of
 * the same entry; otherwise non-present entries are skipped.  Returns how many
 * entries held a present value (their index and old value in out_*), or -1
 * when aborted.
 */
int64_t ts_freeze_children(uint64_t *b, size_t start, size_t n, uint64_t frozen,
			   uint64_t present_mask, int freeze_nonpresent, size_t abort_i,
			   uint32_t *out_idx, uint64_t *out_old)
{
	int64_t k = 0;
	for (size_t i = 0; i < n; i++) {
		uint64_t old;
		unsigned spins = 0;
		if (freeze_nonpresent) {
			for (;;) {
				old = __atomic_exchange_n(&b[start + i], frozen, SEQ);
				if (old != frozen)
					break;
				if (backoff(b, abort_i, &spins))
					return -1;
			}
		} else {
			old = __atomic_load_n(&b[start + i], SEQ);
			if (!(old & present_mask))
				continue;
			old = __atomic_exchange_n(&b[start + i], frozen, SEQ);
		}
		if (old & present_mask) {
			out_idx[k] = (uint32_t)i;
			out_old[k] = old;
			k++;
		}
	}
	return k;
}

int64_t ts_count_equal(uint64_t *b, size_t start, size_t n, uint64_t v)
{
	int64_t c = 0;
	for (size_t k = 0; k < n; k++)
		c += __atomic_load_n(&b[start + k], __ATOMIC_RELAXED) == v;
	return c;
}

int64_t ts_find_mask(uint64_t *b, size_t start, size_t n, uint64_t mask)
{
	for (size_t k = 0; k < n; k++)
		if (__atomic_load_n(&b[start + k], __ATOMIC_RELAXED) & mask)
			return (int64_t)k;
	return -1;
}

/* Checker helper: every entry of [start, start+n) that differs from v. */
int64_t ts_scan_ne(uint64_t *b, size_t start, size_t n, uint64_t v,
		   uint32_t *out_idx, uint64_t *out_val)
{
	int64_t k = 0;
	for (size_t i = 0; i < n; i++) {
		uint64_t x = __atomic_load_n(&b[start + i], __ATOMIC_ACQUIRE);
		if (x != v) {
			out_idx[k] = (uint32_t)i;
			out_val[k] = x;
			k++;
		}
	}
	return k;
}

void ts_trace(uint64_t *b, size_t ring_i, uint64_t mask, size_t head_i, size_t seq_i,
	      uint64_t kind, uint64_t a, uint64_t x, uint64_t c)
{
	uint64_t seq = __atomic_fetch_add(&b[seq_i], 1, SEQ);
	uint64_t h = __atomic_load_n(&b[head_i], __ATOMIC_RELAXED);
	uint64_t *e = &b[ring_i + (h & mask) * 6];
	__atomic_store_n(&e[0], seq, __ATOMIC_RELAXED);
	__atomic_store_n(&e[1], ts_now_ns(), __ATOMIC_RELAXED);
	__atomic_store_n(&e[2], kind, __ATOMIC_RELAXED);
	__atomic_store_n(&e[3], a, __ATOMIC_RELAXED);
	__atomic_store_n(&e[4], x, __ATOMIC_RELAXED);
	__atomic_store_n(&e[5], c, __ATOMIC_RELAXED);
	__atomic_store_n(&b[head_i], h + 1, __ATOMIC_RELEASE);
}

/*
 * Turn words live in MAP_SHARED memory, so the futex is a shared (not
 * FUTEX_PRIVATE) one keyed by the page, and works across processes.  The low
 * 32 bits of the little-endian word are the futex value.  The wait is bounded
 * (1 ms) so an abort is noticed even if a wake-up is lost to a dead giver.
 */
int ts_turn_wait(uint64_t *b, size_t turn_i, size_t abort_i)
{
	unsigned spins = 0;
	struct timespec ts = { 0, 1000000 };
	for (;;) {
		/* abort first: a turn handed over after the abort is not taken, so
		 * no worker runs past the end of a controlled run */
		if (__atomic_load_n(&b[abort_i], __ATOMIC_ACQUIRE))
			return -1;
		if (__atomic_load_n(&b[turn_i], __ATOMIC_ACQUIRE)) {
			__atomic_store_n(&b[turn_i], 0, SEQ);
			return 0;
		}
		if (++spins < SPINS_BEFORE_YIELD)
			ts_cpu_relax();
		else
			syscall(SYS_futex, (uint32_t *)&b[turn_i], FUTEX_WAIT, 0, &ts, NULL, 0);
	}
}

void ts_turn_give(uint64_t *b, size_t turn_i)
{
	__atomic_store_n(&b[turn_i], 1, SEQ);
	syscall(SYS_futex, (uint32_t *)&b[turn_i], FUTEX_WAKE, 1, NULL, NULL, 0);
}

void ts_trace_cfg(uint64_t *b, const uint64_t *tc, uint64_t kind, uint64_t a, uint64_t x,
		  uint64_t c)
{
	if (tc[0])
		ts_trace(b, tc[1], tc[2], tc[3], tc[4], kind | tc[5], a, x, c);
}

int ts_read_lock_rec(uint64_t *b, size_t lock_i, size_t abort_i, size_t mode_i,
		     uint64_t mode, const uint64_t *tc, uint64_t kind, uint64_t a)
{
	if (ts_read_lock(b, lock_i, abort_i))
		return -1;
	ts_store(b, mode_i, mode);
	ts_trace_cfg(b, tc, kind, a, 0, 0);
	return 0;
}

void ts_read_unlock_rec(uint64_t *b, size_t lock_i, size_t mode_i, uint64_t mode,
			const uint64_t *tc, uint64_t kind, uint64_t a)
{
	ts_trace_cfg(b, tc, kind, a, 0, 0);
	ts_store(b, mode_i, mode);
	ts_read_unlock(b, lock_i);
}

uint64_t ts_xchg_from(uint64_t *b, size_t dst_i, size_t src_i)
{
	return ts_xchg(b, dst_i, ts_load(b, src_i));
}

/* ts_tdp_walk's parameters (p[]), filled by Words.walk_params in this order. */
enum {
	TS_WP_SP_META, TS_WP_SP_META_WORDS, TS_WP_PAGES, TS_WP_N_PAGES,
	TS_WP_OFF_STATE, TS_WP_OFF_ROLE, TS_WP_OFF_GFN, TS_WP_OFF_GEN,
	TS_WP_STATE_FREE, TS_WP_POISON, TS_WP_PRESENT, TS_WP_LARGE, TS_WP_PFN_MASK,
	TS_WP_LEVEL_MASK, TS_WP_SP_PFN_BASE,
};
/* ... its outputs (out[]) ... */
enum {
	TS_WO_LEVEL, TS_WO_SPTEP, TS_WO_OLD_SPTE, TS_WO_ROOT_ROLE, TS_WO_LOADS,
	TS_WO_CHILD, TS_WO_CHILD_STATE, TS_WO_CHILD_LEVEL, TS_WO_CHILD_BASE, TS_WO_STATUS,
	TS_WO_PT = 10, TS_WO_GEN = 16, TS_WO_WORDS = 22,	/* levels 0..5 */
};
/* ... and its statuses (Words.WALK_*). */
enum {
	TS_WALK_DONE, TS_WALK_STEP_DOWN_FAILED, TS_WALK_POISON, TS_WALK_GEN_MOVED,
	TS_WALK_CHILD_OUTSIDE_POOL, TS_WALK_CHILD_MISMATCH, TS_WALK_BAD_ROOT,
};
#define TS_MAX_ROOT_LEVEL 5	/* PT64_ROOT_MAX_LEVEL */

#define SPTE_INDEX(gfn, level) (((gfn) >> (9 * ((level) - 1))) & 511)
#define ROUND_GFN(gfn, level) ((gfn) & ~((1ULL << (9 * ((level) - 1))) - 1))

/*
 * Every load below is one the Python iterator makes, in the same order
 * (Words.tdp_walk_stepwise is the reference): tdp_iter_start reads the root's
 * role (level <= 0: the walk starts at the role's level, as the kernel's
 * root->role.level) and generation; _point/read_spte read the entry, test it for poison and
 * compare the table's generation with the one recorded on entry; try_step_down
 * re-reads the entry and, for a present non-leaf, reads the child's GEN,
 * STATE, ROLE and GFN before stepping into it.
 */
/* read_spte with the walker's checks: the entry (not poison), then its table's
 * generation against the one recorded on entry; each load is counted. */
static inline int64_t read_spte_checked(const uint64_t *b, uint64_t sptep, uint64_t gen_i,
					uint64_t gen, uint64_t poison, uint64_t *v,
					uint64_t *loads)
{
	*v = __atomic_load_n(&b[sptep], __ATOMIC_ACQUIRE);
	++*loads;
	if (*v == poison)
		return TS_WALK_POISON;
	++*loads;
	if (__atomic_load_n(&b[gen_i], __ATOMIC_ACQUIRE) != gen)
		return TS_WALK_GEN_MOVED;
	return TS_WALK_DONE;
}

int64_t ts_tdp_walk(uint64_t *b, const uint64_t *p, uint64_t root, uint64_t gfn,
		    int64_t level, int64_t stop_level, uint64_t *out)
{
	uint64_t *pt = &out[TS_WO_PT], *gen = &out[TS_WO_GEN];
	const uint64_t meta = p[TS_WP_SP_META], mw = p[TS_WP_SP_META_WORDS];
	const uint64_t pages = p[TS_WP_PAGES], present = p[TS_WP_PRESENT];
	uint64_t loads = 2, sptep, gen_i, v, child;
	int64_t status = TS_WALK_DONE;

	for (int64_t k = 0; k < TS_WO_WORDS; k++)
		out[k] = 0;
	out[TS_WO_ROOT_ROLE] = __atomic_load_n(&b[meta + root * mw + p[TS_WP_OFF_ROLE]],
					       __ATOMIC_ACQUIRE);
	if (level <= 0)		/* tdp_iter_start: root->role.level */
		level = (int64_t)(out[TS_WO_ROOT_ROLE] & p[TS_WP_LEVEL_MASK]);
	if (level < 1 || level > TS_MAX_ROOT_LEVEL) {
		out[TS_WO_LEVEL] = (uint64_t)level;
		out[TS_WO_LOADS] = 1;
		out[TS_WO_STATUS] = TS_WALK_BAD_ROOT;
		return TS_WALK_BAD_ROOT;
	}
	pt[level] = root;
	gen[level] = __atomic_load_n(&b[meta + root * mw + p[TS_WP_OFF_GEN]], __ATOMIC_ACQUIRE);
	for (;;) {
		/* _point + read_spte */
		sptep = pages + pt[level] * 512 + SPTE_INDEX(gfn, level);
		gen_i = meta + pt[level] * mw + p[TS_WP_OFF_GEN];
		status = read_spte_checked(b, sptep, gen_i, gen[level], p[TS_WP_POISON], &v, &loads);
		if (status != TS_WALK_DONE)
			break;
		/* the caller's loop: stop at stop_level, or unless present non-leaf */
		if (level <= stop_level || !(v & present) || level == 1 || (v & p[TS_WP_LARGE]))
			break;
		/* try_step_down: re-read (read_spte again) */
		status = read_spte_checked(b, sptep, gen_i, gen[level], p[TS_WP_POISON], &v, &loads);
		if (status != TS_WALK_DONE)
			break;
		if (!(v & present) || (v & p[TS_WP_LARGE])) {
			status = TS_WALK_STEP_DOWN_FAILED;
			break;
		}
		/* spte_to_child_pt: table p sits at frame SP_PFN_BASE + 512 * p (sp_pfn) */
		child = ((v & p[TS_WP_PFN_MASK]) >> 12) - p[TS_WP_SP_PFN_BASE];
		if (((v & p[TS_WP_PFN_MASK]) >> 12) < p[TS_WP_SP_PFN_BASE] || (child & 511))
			child = 1ULL << 62;	/* no table's frame: pfn_to_sp */
		else
			child >>= 9;
		out[TS_WO_CHILD] = child;
		if (child >= p[TS_WP_N_PAGES]) {
			status = TS_WALK_CHILD_OUTSIDE_POOL;
			break;
		}
		{
			const uint64_t *m = &b[meta + child * mw];
			uint64_t g = __atomic_load_n(&m[p[TS_WP_OFF_GEN]], __ATOMIC_ACQUIRE);
			uint64_t st = __atomic_load_n(&m[p[TS_WP_OFF_STATE]], __ATOMIC_ACQUIRE);
			uint64_t lv = __atomic_load_n(&m[p[TS_WP_OFF_ROLE]], __ATOMIC_ACQUIRE)
				      & p[TS_WP_LEVEL_MASK];
			uint64_t base = __atomic_load_n(&m[p[TS_WP_OFF_GFN]], __ATOMIC_ACQUIRE);
			loads += 4;
			if (st == p[TS_WP_STATE_FREE] || lv != (uint64_t)(level - 1)
			    || base != ROUND_GFN(gfn, level)) {
				out[TS_WO_CHILD_STATE] = st;
				out[TS_WO_CHILD_LEVEL] = lv;
				out[TS_WO_CHILD_BASE] = base;
				status = TS_WALK_CHILD_MISMATCH;
				break;
			}
			level--;
			pt[level] = child;
			gen[level] = g;
		}
	}
	out[TS_WO_LEVEL] = (uint64_t)level;
	out[TS_WO_SPTEP] = sptep;
	out[TS_WO_OLD_SPTE] = v;
	out[TS_WO_LOADS] = loads;
	out[TS_WO_STATUS] = (uint64_t)status;
	return status;
}
