/* SPDX-License-Identifier: GPL-2.0 */
/*
 * runtime.c: the kernel engine's runtime.  Plain C (no kernel headers): the
 * arena, the per-task state, locks, RCU and SRCU, the page and slab
 * allocators, the access chokepoint and the first-violation record.
 *
 * The arena is one MAP_SHARED segment mapped at the same fixed address in
 * every worker (the supervisor maps it before fork), so kernel pointers are
 * process-independent.  Each worker sets its task index once after fork
 * (ks_set_task); every per-task word lives in the arena so other tasks (and
 * the supervisor, for hang reports) can read it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sched.h>
#include <signal.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include "ksrt.h"
#include "ksrt_arena.h"

struct ks_arena *ks_arena;
int ks_self = -1;                 /* this process's task index */
__thread sigjmp_buf *ks_bug_jmp;  /* where ks_bug() unwinds to (the op's entry) */

static inline struct ks_task *self(void) { return &ks_arena->tasks[ks_self]; }
static inline uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* ---- randomness: per task, seeded by the harness -------------------- */
static inline uint64_t rnd(void)
{
	uint64_t *s = &self()->rng;
	uint64_t x = *s;
	x ^= x << 13;
	x ^= x >> 7;
	x ^= x << 17;
	*s = x;
	return x;
}

/* ---- the arena ------------------------------------------------------ */
int ks_arena_map(const char *shm_name, uint64_t base, uint64_t size, int create)
{
	int fd = shm_open(shm_name, create ? (O_RDWR | O_CREAT | O_EXCL) : O_RDWR, 0600);
	if (fd < 0)
		return -errno;
	if (create && ftruncate(fd, (off_t)size) < 0) {
		int e = errno;
		close(fd);
		shm_unlink(shm_name);
		return -e;
	}
	void *p = mmap((void *)base, size, PROT_READ | PROT_WRITE,
		       MAP_SHARED | MAP_FIXED_NOREPLACE, fd, 0);
	close(fd);
	if (p == MAP_FAILED) {
		int e = errno;
		if (create)
			shm_unlink(shm_name);
		return -e;
	}
	if ((uint64_t)p != base) {  /* an old kernel ignoring NOREPLACE */
		munmap(p, size);
		if (create)
			shm_unlink(shm_name);
		return -EEXIST;
	}
	ks_arena = p;
	return 0;
}

void ks_arena_unmap(void)
{
	if (ks_arena) {
		munmap(ks_arena, ks_arena->size);
		ks_arena = NULL;
	}
}

/*
 * Lay the arena out: header, page-table pages (page aligned, with a
 * struct page each), slab objects, and a bump area for struct kvm, vCPUs,
 * memslots and their arrays.  Called once by the supervisor.
 */
int ks_arena_init(uint64_t size, uint32_t npages, uint32_t nobjs, uint32_t obj_size,
		  uint32_t ntasks, uint64_t seed)
{
	struct ks_arena *a = ks_arena;
	uint64_t off = (sizeof(*a) + 4095) & ~4095ull;

	if (ntasks > KS_MAX_TASKS || npages > KS_MAX_PAGES || nobjs > KS_MAX_OBJS)
		return -EINVAL;
	memset(a, 0, sizeof(*a));
	a->magic = KS_MAGIC;
	a->size = size;
	a->ntasks = ntasks;
	a->npages = npages;
	a->pages_off = off;
	off += (uint64_t)npages * 4096;
	a->nobjs = nobjs;
	a->obj_size = (obj_size + 63) & ~63u;
	a->objs_off = off;
	off += (uint64_t)nobjs * a->obj_size;
	a->bump_off = off;
	a->bump_end = size;
	if (off >= size)
		return -ENOSPC;
	for (uint32_t i = 0; i < npages; i++)
		a->page_fifo[i] = i;
	a->page_head = 0;
	a->page_tail = npages;
	for (uint32_t i = 0; i < nobjs; i++)
		a->obj_fifo[i] = i;
	a->obj_head = 0;
	a->obj_tail = nobjs;
	a->gp_seq = 1;
	a->srcu_seq = 1;
	a->yield_ppm = 0;
	a->timeslice_ns = 1000000;
	for (uint32_t t = 0; t < KS_MAX_TASKS; t++)
		a->tasks[t].rng = seed * 0x9E3779B97F4A7C15ull + t * 0xBF58476D1CE4E5B9ull + 1;
	ks_lock_init(&a->alloc_lock, KS_SPINLOCK, "ks_alloc_lock");
	ks_lock_init(&a->rcu_lock, KS_SPINLOCK, "ks_rcu_lock");
	return 0;
}

/*
 * A fault in kernel code is the kernel's oops ("BUG: unable to handle page
 * fault for address"): recorded as a violation of the task, which unwinds
 * to its op's entry (signal mask restored by siglongjmp).  Poison in the
 * address says what was dereferenced: a freed kvm_mmu_page (the slab's
 * 0x6b), a freed page-table page (the pages' poison).
 */
static void oops_handler(int sig, siginfo_t *si, void *uc)
{
	(void)uc;
	uint64_t a = (uint64_t)(uintptr_t)si->si_addr;
	const char *what = (a >> 32) == 0x6b6b6b6bu ? " (slab poison: a freed kvm_mmu_page's pointer)" :
			   (a >> 16) == KS_POISON >> 16 ? " (page poison: an SPTE of a freed table)" :
			   (a >> 48) == 0xdead ? " (LIST_POISON: an entry list_del() removed)" :
			   a < 4096 ? " (a NULL pointer, plus the field's offset)" :
			   "";
	ks_report(KS_V_BUG, "oops", 0, "BUG: unable to handle page fault for address %#llx%s (signal %d)",
		  (unsigned long long)a, what, sig);
	if (ks_bug_jmp)
		siglongjmp(*ks_bug_jmp, 3);
	signal(sig, SIG_DFL);
	raise(sig);
}

void ks_install_oops_handler(void)
{
	static char altstack[1 << 16];
	stack_t ss = { .ss_sp = altstack, .ss_size = sizeof(altstack) };
	struct sigaction sa;
	sigaltstack(&ss, NULL);
	memset(&sa, 0, sizeof(sa));
	sa.sa_sigaction = oops_handler;
	sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
	sigaction(SIGSEGV, &sa, NULL);
	sigaction(SIGBUS, &sa, NULL);
}

void ks_set_task(int t, int pid)
{
	ks_self = t;
	ks_arena->tasks[t].pid = pid;
	ks_arena->tasks[t].slice_start = now_ns();
}

void *ks_bump_alloc(uint64_t size)
{
	uint64_t off = __atomic_fetch_add(&ks_arena->bump_off, (size + 63) & ~63ull, __ATOMIC_SEQ_CST);
	if (off + size > ks_arena->bump_end)
		ks_bug("arena: out of bump memory (raise [kernel] arena_mib)", __FILE__, __LINE__);
	void *p = (char *)ks_arena + off;
	memset(p, 0, size);
	return p;
}

/* ---- the first violation -------------------------------------------- */
static void record(int kind, const char *what, const char *file, int line)
{
	struct ks_violation *v = &ks_arena->violation;
	uint32_t zero = 0;
	__atomic_fetch_add(&ks_arena->nviolations, 1, __ATOMIC_SEQ_CST);
	if (!__atomic_compare_exchange_n(&v->state, &zero, 1, false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST))
		return;
	v->kind = kind;
	v->task = ks_self;
	v->line = line;
	v->op = ks_self >= 0 ? self()->op : 0;
	v->seq = __atomic_load_n(&ks_arena->trace_seq, __ATOMIC_RELAXED);
	snprintf(v->what, sizeof(v->what), "%s", what);
	const char *f = strstr(file, "arch/x86/");
	if (!f)
		f = strstr(file, "virt/kvm/");
	if (!f) {
		f = strrchr(file, '/');
		f = f ? f + 1 : file;
	}
	snprintf(v->file, sizeof(v->file), "%s", f);
	__atomic_store_n(&v->state, 2, __ATOMIC_SEQ_CST);
}

void ks_warn(const char *what, const char *file, int line)
{
	record(KS_V_WARN, what, file, line);
}

_Noreturn void ks_bug(const char *what, const char *file, int line)
{
	record(KS_V_BUG, what, file, line);
	if (ks_bug_jmp)
		siglongjmp(*ks_bug_jmp, 1);
	abort();
}

void ks_report(int kind, const char *file, int line, const char *fmt, ...)
{
	char buf[sizeof(ks_arena->violation.what)];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	record(kind, buf, file, line);
}

void ks_printk(int level, const char *fmt, ...)
{
	if (level > 4)
		return;
	char buf[200];
	va_list ap;
	va_start(ap, fmt);
	vsnprintf(buf, sizeof(buf), fmt, ap);
	va_end(ap);
	/* pr_err/pr_warn from the MMU code are what a kernel log would show. */
	if (level <= 3)
		record(KS_V_PRINTK, buf, "printk", 0);
}

/*
 * Tracepoints: counted by name (a small open-addressed table in the arena,
 * keyed by the address of the name's literal in the tracepoint's inline
 * function).  A hook attached by name (ks_tracepoint_attach, before fork)
 * is bound to the tracepoint's slot when the slot is made, and then called
 * with the tracepoint's first argument, as a BPF program attached to it is.
 */
static struct { const char *name; void (*hook)(uintptr_t); } attached[4];

int ks_tracepoint_attach(const char *name, void (*hook)(uintptr_t arg0))
{
	/* a new attachment replaces the name's old one (NULL detaches) */
	for (unsigned i = 0; i < sizeof(attached) / sizeof(attached[0]); i++) {
		if (!attached[i].name || !strcmp(attached[i].name, name)) {
			attached[i].name = name;
			attached[i].hook = hook;
			return 0;
		}
	}
	return -ENOSPC;
}

static void bind_hook(uint32_t j, const char *name)
{
	for (unsigned i = 0; i < sizeof(attached) / sizeof(attached[0]); i++)
		if (attached[i].name && !strcmp(attached[i].name, name))
			__atomic_store_n(&ks_arena->trace_hooks[j], attached[i].hook, __ATOMIC_RELEASE);
}

void ks_tracepoint_arg(const char *name, uintptr_t arg0)
{
	uint64_t key = (uint64_t)(uintptr_t)name;
	for (uint32_t i = 0; i < KS_NTRACE; i++) {
		uint32_t j = (uint32_t)((key >> 4) + i) % KS_NTRACE;
		uint64_t cur = __atomic_load_n(&ks_arena->trace_names[j], __ATOMIC_ACQUIRE);
		if (cur == 0) {
			uint64_t z = 0;
			if (!__atomic_compare_exchange_n(&ks_arena->trace_names[j], &z, key, false,
							 __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
				if (z != key)
					continue;
			} else {
				bind_hook(j, name);
			}
			cur = key;
		}
		if (cur == key) {
			__atomic_fetch_add(&ks_arena->trace_counts[j], 1, __ATOMIC_RELAXED);
			void (*hook)(uintptr_t) = __atomic_load_n(&ks_arena->trace_hooks[j], __ATOMIC_ACQUIRE);
			if (hook)
				hook(arg0);
			return;
		}
	}
}

/* ---- controlled scheduling ---------------------------------------------- */
/*
 * In a controlled run (schedule.mode random, pct, replay) one task runs at a
 * time, as the model's workers do (stress/harness/sched/): the harness sets
 * this hook in each worker, and every scheduling point of the kernel code
 * calls it: after every shared access (KS_PT_POINT; a walk window's load is
 * KS_PT_WINDOW), and in every wait for another task (a lock, a grace period,
 * a kick: KS_PT_RELAX).  The hook is the harness's policy; nonzero means the
 * run is aborted: the op unwinds.  Time plays no part then: need_resched()
 * counts the task's own points, and no yield is injected.
 */
int (*ks_sched_hook)(int kind);

static void sched_point(int kind)
{
	if (ks_sched_hook(kind) && ks_bug_jmp)
		siglongjmp(*ks_bug_jmp, 2);
}

void ks_set_sched_hook(int (*hook)(int kind))
{
	ks_sched_hook = hook;
}

/* ---- the trace ------------------------------------------------------- */
/* Where an SPTE is: its gfn and level (the kernel side: ksglue.c). */
void (*ks_spte_where)(const void *sptep, uint64_t *gfn, int *level);

void ks_trace_event(struct ks_task *t, int kind, const void *addr, uint64_t old, uint64_t val,
		    uint32_t table)
{
	struct ks_arena *a = ks_arena;
	uint64_t n = t->ring_n;
	struct ks_event *e = &t->ring[n % KS_RING];
	uint64_t gfn = 0;
	int level = 0;
	if (ks_spte_where && addr)
		ks_spte_where(addr, &gfn, &level);
	e->seq = __atomic_fetch_add(&a->trace_seq, 1, __ATOMIC_RELAXED) + 1;
	e->t_ns = now_ns();
	e->kind = (uint8_t)kind;
	e->op = (uint8_t)t->op;
	e->level = (uint8_t)level;
	e->table = table;
	e->addr = (uint64_t)(uintptr_t)addr;
	e->gfn = gfn;
	e->old = old;
	e->val = val;
	__atomic_store_n(&t->ring_n, n + 1, __ATOMIC_RELEASE);
}

/* The last events of task t, oldest first (they outlive a dead worker). */
int ks_trace_copy(int t, struct ks_event *out, int max)
{
	struct ks_task *k = &ks_arena->tasks[t];
	uint64_t head = __atomic_load_n(&k->ring_n, __ATOMIC_ACQUIRE);
	uint64_t n = head < KS_RING ? head : KS_RING;
	if (n > (uint64_t)max)
		n = (uint64_t)max;
	for (uint64_t i = 0; i < n; i++)
		out[i] = k->ring[(head - n + i) % KS_RING];
	return (int)n;
}

/* ---- the access chokepoint ------------------------------------------ */
/* The kernel side's answer: is this loaded value a link to a lower table? (ksglue.c) */
bool (*ks_is_table_link)(const void *sptep, uint64_t spte);

void ks_access(int kind, const void *addr, uint64_t old, uint64_t val)
{
	struct ks_arena *a = ks_arena;
	struct ks_task *t;
	int pi;

	if (ks_self < 0)
		return;
	t = self();
	t->accesses++;
	__atomic_fetch_add(&a->events, 1, __ATOMIC_RELAXED);
	pi = ks_page_index(addr);
	if (pi >= 0) {
		uint8_t st = __atomic_load_n(&a->page_state[pi], __ATOMIC_ACQUIRE);
		/*
		 * An SPTE access to a page-table page that is back in the
		 * allocator: KASAN's use-after-free.  The page was freed by an
		 * RCU callback or a direct free_page(); a walker that still
		 * reads it was not protected by the grace period.
		 */
		if (st != KS_PAGE_USED)
			ks_report(KS_V_UAF, "kasan", 0,
				  "use-after-free: %s of SPTE at page %d offset %u (page %s, freed by task %d)",
				  kind == KS_LOAD ? "load" : "store", pi,
				  (unsigned)(((uintptr_t)addr & 4095) / 8),
				  st == KS_PAGE_FREE ? "free" : "poisoned", a->page_freed_by[pi]);
		t->spte_accesses++;
		/* The trace: every SPTE change (and failed cmpxchg) into this task's
		 * ring, numbered from one shared counter so the rings merge in order;
		 * loads are not recorded (they are most of the accesses). */
		if (a->trace_on && kind != KS_LOAD)
			ks_trace_event(t, kind, addr, old, val, (uint32_t)pi);
	}
	/*
	 * Delay injection: yield the CPU after a shared access with the
	 * configured probability, after loads most: a task preempted between
	 * a load and the cmpxchg that depends on it opens the race window.
	 */
	if (ks_sched_hook) {
		t->points++;
		sched_point(kind == KS_LOAD && pi >= 0 && ks_is_table_link &&
			    ks_is_table_link(addr, val) ? KS_PT_WINDOW : KS_PT_POINT);
		return;
	}
	if (a->yield_ppm) {
		uint64_t ppm = kind == KS_LOAD ? a->yield_ppm : a->yield_ppm / 4;
		/* A walker that just read a table pointer: the window in which the table
		 * can be removed under it (a walk window, widened for every walker). */
		if (kind == KS_LOAD && pi >= 0 && ks_is_table_link && ks_is_table_link(addr, val))
			ppm *= a->walk_window_factor;
		if ((rnd() % 1000000) < ppm) {
			t->yields++;
			sched_yield();
		}
	}
}

void ks_set_abort(void)
{
	__atomic_store_n(&ks_arena->abort, 1, __ATOMIC_SEQ_CST);
}

void ks_cpu_relax(void)
{
	if (ks_sched_hook) {
		sched_point(KS_PT_RELAX);
		return;
	}
	sched_yield();
}

/* ---- locks ---------------------------------------------------------- */
#define KS_W 0x80000000u

void ks_lock_init(ks_lock_t *l, int kind, const char *name)
{
	memset(l, 0, sizeof(*l));
	l->kind = (uint32_t)kind;
	l->name = name;
}

/*
 * A spinner gives up when the supervisor aborts the run (a worker that died
 * holding the lock, a stop after a violation): it unwinds to its op's entry,
 * as the Python model's LockAborted does.
 */
static void spin_wait(ks_lock_t *l, uint64_t *spins)
{
	(void)l;
	if (__atomic_load_n(&ks_arena->abort, __ATOMIC_RELAXED) && ks_bug_jmp)
		siglongjmp(*ks_bug_jmp, 2);
	if (ks_sched_hook) {  /* the holder must run: the turn goes on */
		if (ks_self >= 0 && !self()->rcu_nesting && !self()->in_rcu_poll)
			ks_rcu_poll();
		if (ks_self >= 0)
			self()->lock_spins++;
		sched_point(KS_PT_RELAX);
		return;
	}
	/* RCU callbacks run from softirq on whatever CPU: here, on a task that
	 * spins outside any read-side section. */
	if (*spins % 4 == 0 && ks_self >= 0 && !self()->rcu_nesting && !self()->in_rcu_poll)
		ks_rcu_poll();
	if (++*spins % 64 == 0) {
		if (ks_self >= 0)
			self()->lock_spins++;
		sched_yield();
	} else {
		__builtin_ia32_pause();
	}
}

void ks_spin_lock(ks_lock_t *l)
{
	uint64_t spins = 0;
	uint32_t z = 0;
	__atomic_fetch_add(&l->waiters, 1, __ATOMIC_SEQ_CST);
	while (!__atomic_compare_exchange_n(&l->state, &z, KS_W, false, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED)) {
		z = 0;
		if (ks_self >= 0)
			self()->waiting_for = l;
		spin_wait(l, &spins);
	}
	__atomic_fetch_sub(&l->waiters, 1, __ATOMIC_SEQ_CST);
	if (ks_self >= 0)
		self()->waiting_for = NULL;
	l->owner = (uint32_t)ks_self + 1;
}

void ks_spin_unlock(ks_lock_t *l)
{
	if (l->owner != (uint32_t)ks_self + 1)
		ks_report(KS_V_LOCKDEP, __FILE__, __LINE__,
			  "lockdep: task %d releases %s it does not hold (owner %d)",
			  ks_self, l->name ? l->name : "lock", (int)l->owner - 1);
	l->owner = 0;
	__atomic_store_n(&l->state, 0, __ATOMIC_RELEASE);
}

/*
 * The rwlock is fair as qrwlock is: a reader waits while a writer holds or
 * waits for the lock, so a stream of readers cannot starve a writer.
 */
void ks_read_lock(ks_lock_t *l)
{
	uint64_t spins = 0;
	__atomic_fetch_add(&l->waiters, 1, __ATOMIC_SEQ_CST);
	if (ks_self >= 0)
		self()->waiting_for = l;
	for (;;) {
		uint32_t s = __atomic_load_n(&l->state, __ATOMIC_RELAXED);
		if (!(s & KS_W) && !__atomic_load_n(&l->wwaiters, __ATOMIC_RELAXED) &&
		    __atomic_compare_exchange_n(&l->state, &s, s + 1, false, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
			break;
		spin_wait(l, &spins);
	}
	__atomic_fetch_sub(&l->waiters, 1, __ATOMIC_SEQ_CST);
	if (ks_self >= 0) {
		self()->waiting_for = NULL;
		__atomic_fetch_or(&l->readers, 1ull << ks_self, __ATOMIC_SEQ_CST);
	}
}

void ks_read_unlock(ks_lock_t *l)
{
	if (ks_self >= 0) {
		uint64_t r = __atomic_fetch_and(&l->readers, ~(1ull << ks_self), __ATOMIC_SEQ_CST);
		if (!(r & (1ull << ks_self)))
			ks_report(KS_V_LOCKDEP, __FILE__, __LINE__,
				  "lockdep: task %d read_unlock of %s it does not hold for read",
				  ks_self, l->name ? l->name : "lock");
	}
	__atomic_fetch_sub(&l->state, 1, __ATOMIC_RELEASE);
}

void ks_write_lock(ks_lock_t *l)
{
	uint64_t spins = 0;
	__atomic_fetch_add(&l->waiters, 1, __ATOMIC_SEQ_CST);
	__atomic_fetch_add(&l->wwaiters, 1, __ATOMIC_SEQ_CST);
	if (ks_self >= 0)
		self()->waiting_for = l;
	for (;;) {
		uint32_t z = 0;
		if (__atomic_compare_exchange_n(&l->state, &z, KS_W, false, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
			break;
		spin_wait(l, &spins);
	}
	__atomic_fetch_sub(&l->wwaiters, 1, __ATOMIC_SEQ_CST);
	__atomic_fetch_sub(&l->waiters, 1, __ATOMIC_SEQ_CST);
	if (ks_self >= 0)
		self()->waiting_for = NULL;
	l->owner = (uint32_t)ks_self + 1;
}

void ks_write_unlock(ks_lock_t *l)
{
	if (l->owner != (uint32_t)ks_self + 1)
		ks_report(KS_V_LOCKDEP, __FILE__, __LINE__,
			  "lockdep: task %d write_unlock of %s it does not hold (owner %d)",
			  ks_self, l->name ? l->name : "lock", (int)l->owner - 1);
	l->owner = 0;
	__atomic_store_n(&l->state, 0, __ATOMIC_RELEASE);
}

bool ks_lock_needbreak(ks_lock_t *l)
{
	/* qrwlock: any queued waiter, reader or writer. */
	return __atomic_load_n(&l->waiters, __ATOMIC_RELAXED) != 0;
}

bool ks_need_resched(void)
{
	if (ks_self < 0)
		return false;
	struct ks_task *t = self();
	if (ks_sched_hook)  /* controlled: a timeslice of the task's own points */
		return t->points - t->slice_points > KS_SLICE_POINTS;
	return now_ns() - t->slice_start > ks_arena->timeslice_ns;
}

int ks_cond_resched(void)
{
	if (ks_self < 0)
		return 0;
	struct ks_task *t = self();
	if (t->rcu_nesting)
		ks_report(KS_V_LOCKDEP, __FILE__, __LINE__,
			  "BUG: sleeping function called from invalid context (task %d in an RCU read-side critical section)",
			  ks_self);
	if (!ks_need_resched())
		return 0;
	t->resched++;
	if (ks_sched_hook) {
		sched_point(KS_PT_PAUSE);
		t->slice_points = t->points;
		return 1;
	}
	sched_yield();
	t->slice_start = now_ns();
	return 1;
}

int ks_cond_resched_rwlock_read(ks_lock_t *l)
{
	if (ks_lock_needbreak(l) || ks_need_resched()) {
		ks_read_unlock(l);
		ks_cond_resched();
		ks_read_lock(l);
		return 1;
	}
	return 0;
}

int ks_cond_resched_rwlock_write(ks_lock_t *l)
{
	if (ks_lock_needbreak(l) || ks_need_resched()) {
		ks_write_unlock(l);
		ks_cond_resched();
		ks_write_lock(l);
		return 1;
	}
	return 0;
}

void ks_might_sleep(const char *file, int line)
{
	if (ks_self >= 0 && self()->rcu_nesting)
		ks_report(KS_V_LOCKDEP, file, line,
			  "BUG: sleeping function called from invalid context (in an RCU read-side critical section)");
}

bool ks_lock_is_held(ks_lock_t *l)
{
	return l->owner == (uint32_t)ks_self + 1 ||
	       (__atomic_load_n(&l->readers, __ATOMIC_RELAXED) & (1ull << ks_self));
}

void ks_lockdep_assert_held(ks_lock_t *l, int mode, const char *name, const char *file, int line)
{
	bool w = l->owner == (uint32_t)ks_self + 1;
	bool r = (__atomic_load_n(&l->readers, __ATOMIC_RELAXED) & (1ull << ks_self)) != 0;
	bool ok = mode == KS_HELD_WRITE ? w : mode == KS_HELD_READ ? r :
		  mode == KS_HELD_ANY ? (w || r) : !(w || r);
	if (!ok)
		ks_report(KS_V_LOCKDEP, file, line, "lockdep: %s: task %d %s %s",
			  mode == KS_HELD_NONE ? "lockdep_assert_not_held" : "lockdep_assert_held",
			  ks_self, mode == KS_HELD_NONE ? "holds" :
			  mode == KS_HELD_READ ? "does not hold for read" :
			  mode == KS_HELD_WRITE ? "does not hold for write" : "does not hold", name);
}

/* ---- RCU ------------------------------------------------------------ */
/*
 * An epoch RCU across processes.  A reader publishes, at its outermost
 * rcu_read_lock(), 1 + the grace-period sequence it read; 0 outside.
 * call_rcu() takes a new sequence number for its callback, which may run
 * once every task is outside a read-side section or entered one after the
 * callback was queued.  The reader's publishing store is seq_cst (a full
 * barrier on x86), so a reader that the scanner sees as outside cannot
 * have loaded a pointer that was unlinked before call_rcu().
 */
void ks_rcu_read_lock(void)
{
	struct ks_task *t = self();
	if (t->rcu_nesting++ == 0) {
		uint64_t s = __atomic_load_n(&ks_arena->gp_seq, __ATOMIC_SEQ_CST);
		__atomic_store_n(&t->rcu_seq, s + 1, __ATOMIC_SEQ_CST);
	}
}

void ks_rcu_read_unlock(void)
{
	struct ks_task *t = self();
	if (t->rcu_nesting == 0) {
		ks_report(KS_V_LOCKDEP, __FILE__, __LINE__, "rcu_read_unlock() without rcu_read_lock()");
		return;
	}
	if (--t->rcu_nesting == 0) {
		__atomic_store_n(&t->rcu_seq, 0, __ATOMIC_SEQ_CST);
		/* preempt_enable() of a preemptible kernel: the outermost unlock is a
		 * preemption point, where the grace periods this task held up can end. */
		if (ks_sched_hook) {
			sched_point(KS_PT_POINT);
		} else if (ks_arena->rcu_unlock_yield_ppm &&
			   (rnd() % 1000000) < ks_arena->rcu_unlock_yield_ppm) {
			/* off the CPU for a while (10-40 us), not just to the back of the
			 * run queue: long enough for the others to run their callbacks */
			struct timespec ts = { 0, 10000 + (long)(rnd() % 30000) };
			t->yields++;
			nanosleep(&ts, NULL);
		}
	}
}

bool ks_rcu_read_lock_held(void)
{
	return ks_self >= 0 && self()->rcu_nesting > 0;
}

void ks_rcu_dereference_check(void)
{
	if (ks_self >= 0 && !self()->rcu_nesting)
		ks_report(KS_V_LOCKDEP, __FILE__, __LINE__,
			  "WARNING: suspicious RCU usage: rcu_dereference() outside rcu_read_lock() (task %d)",
			  ks_self);
}

void ks_rcu_dereference_check_cond(bool c)
{
	if (!c && ks_self >= 0 && !self()->rcu_nesting)
		ks_report(KS_V_LOCKDEP, __FILE__, __LINE__,
			  "WARNING: suspicious RCU usage: rcu_dereference_check() outside rcu_read_lock() and its condition (task %d)",
			  ks_self);
}

void ks_call_rcu(struct rcu_head *head, void (*func)(struct rcu_head *))
{
	struct ks_arena *a = ks_arena;
	ks_spin_lock(&a->rcu_lock);
	uint64_t n = a->cb_tail - a->cb_head;
	if (n >= KS_MAX_CBS) {
		ks_spin_unlock(&a->rcu_lock);
		ks_bug("RCU: callback queue full (no grace period is completing)", __FILE__, __LINE__);
	}
	struct ks_cb *cb = &a->cbs[a->cb_tail % KS_MAX_CBS];
	cb->head = head;
	cb->func = func;
	cb->seq = __atomic_add_fetch(&a->gp_seq, 1, __ATOMIC_SEQ_CST);
	cb->task = ks_self;
	a->cb_tail++;
	a->cbs_queued++;
	ks_spin_unlock(&a->rcu_lock);
}

/* The oracle layer's look at an RCU callback before it runs (ksoracle.c). */
void (*ks_rcu_cb_check)(struct rcu_head *head, void (*func)(struct rcu_head *));

/* The oldest reader's snapshot: callbacks with seq below it are safe. */
static uint64_t rcu_safe_bound(void)
{
	uint64_t bound = UINT64_MAX;
	for (uint32_t i = 0; i < ks_arena->ntasks; i++) {
		uint64_t s = __atomic_load_n(&ks_arena->tasks[i].rcu_seq, __ATOMIC_SEQ_CST);
		if (s && s - 1 < bound)
			bound = s - 1;
	}
	return bound;
}

/*
 * Run the callbacks whose grace period has ended.  Called outside any
 * read-side section, by workers between operations (the softirq of this
 * kernel) and by rcu_barrier().  Returns how many ran.
 */
int ks_rcu_poll(void)
{
	struct ks_arena *a = ks_arena;
	struct ks_cb batch[64];
	int n = 0;

	if (a->cb_head == a->cb_tail || (ks_self >= 0 && self()->in_rcu_poll))
		return 0;
	if (ks_self >= 0)
		self()->in_rcu_poll = 1;
	uint64_t bound = rcu_safe_bound();
	ks_spin_lock(&a->rcu_lock);
	while (n < 64 && a->cb_head != a->cb_tail) {
		struct ks_cb *cb = &a->cbs[a->cb_head % KS_MAX_CBS];
		if (cb->seq > bound)
			break;
		batch[n++] = *cb;
		a->cb_head++;
	}
	ks_spin_unlock(&a->rcu_lock);
	for (int i = 0; i < n; i++) {
		if (ks_rcu_cb_check)
			ks_rcu_cb_check(batch[i].head, batch[i].func);
		batch[i].func(batch[i].head);
		__atomic_fetch_add(&a->cbs_run, 1, __ATOMIC_RELAXED);
	}
	if (ks_self >= 0)
		self()->in_rcu_poll = 0;
	return n;
}

void ks_rcu_barrier(void)
{
	if (ks_self >= 0 && self()->rcu_nesting)
		ks_report(KS_V_LOCKDEP, __FILE__, __LINE__, "rcu_barrier() inside rcu_read_lock()");
	uint64_t target = __atomic_load_n(&ks_arena->gp_seq, __ATOMIC_SEQ_CST);
	uint64_t spins = 0;
	for (;;) {
		ks_rcu_poll();
		ks_spin_lock(&ks_arena->rcu_lock);
		bool done = ks_arena->cb_head == ks_arena->cb_tail ||
			    ks_arena->cbs[ks_arena->cb_head % KS_MAX_CBS].seq > target;
		ks_spin_unlock(&ks_arena->rcu_lock);
		if (done)
			return;
		if (ks_sched_hook || ++spins % 16 == 0)
			ks_cpu_relax();
	}
}

void ks_synchronize_rcu(void)
{
	uint64_t target = __atomic_add_fetch(&ks_arena->gp_seq, 1, __ATOMIC_SEQ_CST);
	while (rcu_safe_bound() < target)
		ks_cpu_relax();
}

/* ---- SRCU (kvm->srcu): the same scheme, its own sequence ------------ */
int ks_srcu_read_lock(ks_lock_t *ss)
{
	(void)ss;
	struct ks_task *t = self();
	if (t->srcu_nesting++ == 0) {
		uint64_t s = __atomic_load_n(&ks_arena->srcu_seq, __ATOMIC_SEQ_CST);
		__atomic_store_n(&t->srcu_snap, s + 1, __ATOMIC_SEQ_CST);
	}
	return 0;
}

void ks_srcu_read_unlock(ks_lock_t *ss, int idx)
{
	(void)ss;
	(void)idx;
	struct ks_task *t = self();
	if (t->srcu_nesting == 0) {
		ks_report(KS_V_LOCKDEP, __FILE__, __LINE__, "srcu_read_unlock() without srcu_read_lock()");
		return;
	}
	if (--t->srcu_nesting == 0)
		__atomic_store_n(&t->srcu_snap, 0, __ATOMIC_SEQ_CST);
}

void ks_synchronize_srcu(ks_lock_t *ss)
{
	(void)ss;
	if (self()->srcu_nesting)
		ks_report(KS_V_LOCKDEP, __FILE__, __LINE__,
			  "synchronize_srcu() inside srcu_read_lock(): self-deadlock");
	uint64_t target = __atomic_add_fetch(&ks_arena->srcu_seq, 1, __ATOMIC_SEQ_CST);
	for (;;) {
		bool ok = true;
		for (uint32_t i = 0; i < ks_arena->ntasks; i++) {
			uint64_t s = __atomic_load_n(&ks_arena->tasks[i].srcu_snap, __ATOMIC_SEQ_CST);
			if (s && s - 1 < target) {
				ok = false;
				break;
			}
		}
		if (ok)
			return;
		self()->srcu_waits++;
		if (!ks_sched_hook && !self()->rcu_nesting && !self()->in_rcu_poll)
			ks_rcu_poll();
		ks_cpu_relax();
	}
}

/* ---- pages and slab objects ----------------------------------------- */
/*
 * Freed pages and objects are reused oldest first (a FIFO), so a freed
 * page stays free as long as possible and a late access to it is seen as
 * a use-after-free rather than as a read of someone else's new table.
 * A freed page is poisoned with a value that reads as a not-present SPTE.
 */

struct page *ks_pfn_to_page(uint64_t pfn)
{
	uint64_t base = ((uint64_t)(uintptr_t)ks_arena + ks_arena->pages_off) >> 12;
	if (pfn < base || pfn >= base + ks_arena->npages)
		ks_report(KS_V_BUG, __FILE__, __LINE__, "pfn_to_page(%#llx): not a page-table page",
			  (unsigned long long)pfn);
	return (struct page *)&ks_arena->page_structs[pfn - base];
}

bool ks_pfn_valid(uint64_t pfn)
{
	uint64_t base = ((uint64_t)(uintptr_t)ks_arena + ks_arena->pages_off) >> 12;
	return pfn >= base && pfn < base + ks_arena->npages;
}

uint64_t ks_zero_pfn(void)
{
	/* The arena's first page-table page slot is never handed out. */
	return ((uint64_t)(uintptr_t)ks_arena + ks_arena->pages_off) >> 12;
}

unsigned long ks_get_free_page(unsigned int gfp)
{
	struct ks_arena *a = ks_arena;
	ks_spin_lock(&a->alloc_lock);
	if (a->page_head == a->page_tail) {
		ks_spin_unlock(&a->alloc_lock);
		return 0;
	}
	uint32_t i = a->page_fifo[a->page_head % KS_MAX_PAGES];
	a->page_head++;
	if (i == 0) {  /* the zero pfn */
		if (a->page_head == a->page_tail) {
			ks_spin_unlock(&a->alloc_lock);
			return 0;
		}
		i = a->page_fifo[a->page_head % KS_MAX_PAGES];
		a->page_head++;
	}
	a->pages_used++;
	ks_spin_unlock(&a->alloc_lock);
	char *p = (char *)a + a->pages_off + (uint64_t)i * 4096;
	if (gfp & 0x8u)
		memset(p, 0, 4096);
	a->page_structs[i].priv = 0;
	__atomic_store_n(&a->page_state[i], KS_PAGE_USED, __ATOMIC_RELEASE);
	return (unsigned long)p;
}

void ks_free_page(unsigned long addr)
{
	struct ks_arena *a = ks_arena;
	int i = ks_page_index((void *)addr);
	if (i < 0 || (addr & 4095))
		ks_bug("free_page() of an address that is no page-table page", __FILE__, __LINE__);
	uint8_t st = __atomic_load_n(&a->page_state[i], __ATOMIC_ACQUIRE);
	if (st != KS_PAGE_USED)
		ks_report(KS_V_UAF, "kasan", 0, "double-free of page-table page %d (freed by task %d)",
			  i, a->page_freed_by[i]);
	a->page_freed_by[i] = ks_self;
	uint64_t *w = (uint64_t *)addr;
	for (int k = 0; k < 512; k++)
		__atomic_store_n(&w[k], KS_POISON, __ATOMIC_RELAXED);
	if (ks_page_is_alias((uint32_t)i)) {
		/* a reserved frame goes back to its reservation, not the FIFO */
		ks_spin_lock(&a->alloc_lock);
		a->pages_used--;
		ks_spin_unlock(&a->alloc_lock);
		__atomic_store_n(&a->page_state[i], KS_PAGE_FREE, __ATOMIC_RELEASE);
		return;
	}
	__atomic_store_n(&a->page_state[i], KS_PAGE_FREE, __ATOMIC_RELEASE);
	ks_spin_lock(&a->alloc_lock);
	a->page_fifo[a->page_tail % KS_MAX_PAGES] = (uint32_t)i;
	a->page_tail++;
	a->pages_used--;
	ks_spin_unlock(&a->alloc_lock);
}

uint64_t ks_arena_alias(uint32_t n)
{
	struct ks_arena *a = ks_arena;
	uint64_t base = ((uint64_t)(uintptr_t)a + a->pages_off) >> 12;
	uint32_t first = (uint32_t)((512 - base % 512) % 512);
	uint32_t k = 0;
	if (first == 0)
		first = 512;  /* page 0 is the zero pfn */
	if (!n || first + (uint64_t)(n - 1) * 512 >= a->npages || a->page_head != 0)
		return 0;
	a->alias_first = first;
	a->alias_n = n;
	for (uint32_t i = 0; i < a->npages; i++)
		if (!ks_page_is_alias(i))
			a->page_fifo[k++] = i;
	a->page_tail = k;
	return base + first;
}

unsigned long ks_alias_claim(uint32_t k)
{
	struct ks_arena *a = ks_arena;
	uint32_t i = a->alias_first + k * 512;
	uint8_t expect = KS_PAGE_FREE;
	if (k >= a->alias_n ||
	    !__atomic_compare_exchange_n(&a->page_state[i], &expect, KS_PAGE_USED, false,
					 __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
		return 0;
	ks_spin_lock(&a->alloc_lock);
	a->pages_used++;
	ks_spin_unlock(&a->alloc_lock);
	a->page_structs[i].priv = 0;
	return (unsigned long)((char *)a + a->pages_off + (uint64_t)i * 4096);
}

void *ks_kmem_cache_zalloc(struct kmem_cache *c, unsigned int gfp)
{
	(void)c;
	(void)gfp;
	struct ks_arena *a = ks_arena;
	ks_spin_lock(&a->alloc_lock);
	if (a->obj_head == a->obj_tail) {
		ks_spin_unlock(&a->alloc_lock);
		return NULL;
	}
	uint32_t i = a->obj_fifo[a->obj_head % KS_MAX_OBJS];
	a->obj_head++;
	a->objs_used++;
	ks_spin_unlock(&a->alloc_lock);
	a->obj_state[i] = KS_PAGE_USED;
	char *p = (char *)a + a->objs_off + (uint64_t)i * a->obj_size;
	memset(p, 0, a->obj_size);
	return p;
}

void ks_kmem_cache_free(struct kmem_cache *c, void *p)
{
	(void)c;
	struct ks_arena *a = ks_arena;
	uint64_t off = (uint64_t)((char *)p - (char *)a);
	if (off < a->objs_off || off >= a->objs_off + (uint64_t)a->nobjs * a->obj_size)
		ks_bug("kmem_cache_free() of an object not from the slab", __FILE__, __LINE__);
	uint32_t i = (uint32_t)((off - a->objs_off) / a->obj_size);
	if (a->obj_state[i] != KS_PAGE_USED)
		ks_report(KS_V_UAF, "kasan", 0, "double-free of kvm_mmu_page object %u", i);
	a->obj_state[i] = KS_PAGE_FREE;
	memset(p, 0x6b, a->obj_size);  /* POISON_FREE */
	ks_spin_lock(&a->alloc_lock);
	a->obj_fifo[a->obj_tail % KS_MAX_OBJS] = i;
	a->obj_tail++;
	a->objs_used--;
	ks_spin_unlock(&a->alloc_lock);
}

void ks_account_pgtable_pages(void *virt, int nr)
{
	(void)virt;
	__atomic_fetch_add(&ks_arena->pgtable_pages, nr, __ATOMIC_RELAXED);
}

/* ---- what the harness reads ----------------------------------------- */
struct ks_arena *ks_get_arena(void) { return ks_arena; }
int ks_task_index(void) { return ks_self; }

/*
 * Reading the arena from the harness: the first violation, and named
 * counters (global, or of one task).
 */
int ks_violation(int *kind, int *task, int *line, uint32_t *op, char *file, char *what,
		 uint64_t *seq)
{
	struct ks_violation *v = &ks_arena->violation;
	if (__atomic_load_n(&v->state, __ATOMIC_ACQUIRE) != 2)
		return 0;
	*seq = v->seq;
	*kind = v->kind;
	*task = v->task;
	*line = v->line;
	*op = v->op;
	memcpy(file, v->file, sizeof(v->file));
	memcpy(what, v->what, sizeof(v->what));
	return (int)ks_arena->nviolations;
}

int64_t ks_stat(const char *name)
{
	struct ks_arena *a = ks_arena;
	if (!strcmp(name, "events")) return (int64_t)a->events;
	if (!strcmp(name, "pages_used")) return a->pages_used;
	if (!strcmp(name, "objs_used")) return a->objs_used;
	if (!strcmp(name, "pgtable_pages")) return a->pgtable_pages;
	if (!strcmp(name, "cbs_queued")) return (int64_t)a->cbs_queued;
	if (!strcmp(name, "cbs_run")) return (int64_t)a->cbs_run;
	if (!strcmp(name, "cbs_pending")) return (int64_t)(a->cb_tail - a->cb_head);
	if (!strcmp(name, "npages")) return a->npages;
	return -1;
}

int64_t ks_task_stat(int t, const char *name)
{
	struct ks_task *k = &ks_arena->tasks[t];
	if (!strcmp(name, "accesses")) return (int64_t)k->accesses;
	if (!strcmp(name, "spte_accesses")) return (int64_t)k->spte_accesses;
	if (!strcmp(name, "yields")) return (int64_t)k->yields;
	if (!strcmp(name, "resched")) return (int64_t)k->resched;
	if (!strcmp(name, "lock_spins")) return (int64_t)k->lock_spins;
	if (!strcmp(name, "srcu_waits")) return (int64_t)k->srcu_waits;
	if (!strcmp(name, "op")) return k->op;
	if (!strcmp(name, "rcu_nesting")) return k->rcu_nesting;
	if (!strcmp(name, "srcu_nesting")) return k->srcu_nesting;
	if (!strncmp(name, "ops.", 4)) return (int64_t)k->ops[atoi(name + 4) & 31];
	if (!strncmp(name, "pf.", 3)) return (int64_t)k->op_results[atoi(name + 3) & 7];
	return -1;
}

/* Tracepoint counts: name pointers are valid in every worker (same binary). */
int ks_tracepoints(const char **names, uint64_t *counts, int max)
{
	int n = 0;
	for (uint32_t j = 0; j < KS_NTRACE && n < max; j++) {
		if (!ks_arena->trace_names[j])
			continue;
		names[n] = (const char *)(uintptr_t)ks_arena->trace_names[j];
		counts[n] = ks_arena->trace_counts[j];
		n++;
	}
	return n;
}

void ks_set_knobs(uint32_t yield_ppm, uint64_t timeslice_ns, uint32_t trace_on,
		  uint32_t walk_window_factor, uint32_t rcu_unlock_yield_ppm)
{
	ks_arena->rcu_unlock_yield_ppm = rcu_unlock_yield_ppm;
	ks_arena->walk_window_factor = walk_window_factor ? walk_window_factor : 1;
	ks_arena->yield_ppm = yield_ppm;
	ks_arena->timeslice_ns = timeslice_ns;
	ks_arena->trace_on = trace_on;
}

/* Who holds or waits for what: for the supervisor's hang report. */
int ks_task_waiting(int t, char *lock_name, int n, int *owner, uint64_t *readers)
{
	ks_lock_t *l = ks_arena->tasks[t].waiting_for;
	if (!l)
		return 0;
	snprintf(lock_name, (size_t)n, "%s", l->name ? l->name : "lock");
	*owner = (int)l->owner - 1;
	*readers = l->readers;
	return 1;
}
