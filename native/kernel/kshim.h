/* SPDX-License-Identifier: GPL-2.0 */
/*
 * kshim.h: the kernel, as far as arch/x86/kvm/mmu/{tdp_iter,tdp_mmu,spte}.c
 * and the helpers extracted from mmu.c see it.
 *
 * Force-included (gcc -include) before every line of kernel code the kernel
 * engine compiles.  The idea is tools/testing/vma's: pre-define the include
 * guards of the headers that would pull in the rest of the kernel
 * (linux/kvm_host.h, asm/kvm_host.h, x86.h, cpuid.h, kvm_cache_regs.h) and
 * give the names the MMU files use a userspace meaning; the KVM MMU headers
 * themselves (mmu.h, mmu_internal.h, spte.h, tdp_iter.h, tdp_mmu.h,
 * mmutrace.h, asm/vmx.h) are the tree's own and are compiled unchanged.
 *
 * The structures the MMU code reads field by field and that the kernel
 * defines compactly (kvm_mmu_page_role, kvm_mmu, kvm_memory_slot,
 * kvm_gfn_range, kvm_mmu_memory_cache ...) are not written here: the build
 * copies them out of the tree by name into kstructs.h, so a tree that adds a
 * field compiles with it.  struct kvm and struct kvm_vcpu are ours: the real
 * ones are hundreds of fields about everything else; ours hold the fields
 * the MMU files name, and the build fails naming a field we lack.
 *
 * Every access the kernel makes to shared memory goes through READ_ONCE,
 * WRITE_ONCE, xchg, try_cmpxchg64 or the atomic64 ops.  Here each of them is
 * a real atomic on the arena followed by one call of ks_access(): the
 * kernel engine's chokepoint, like stress/atomics.py is the model's, where
 * the trace, the use-after-free check, delay injection and controlled turns
 * live.  Locks, RCU and the page allocator live in the arena (runtime.c), so
 * forked workers share them; lockdep assertions check the calling task.
 */
#ifndef _KSHIM_H
#define _KSHIM_H

#include <stdint.h>
#include <stddef.h>
#include <stdbool.h>
#include <string.h>

#include "ksrt.h"

/* Headers whose contents this file replaces: their guards are taken. */
#define __KVM_HOST_H
#define _ASM_X86_KVM_HOST_H
#define ARCH_X86_KVM_X86_H
#define ARCH_X86_KVM_CPUID_H
#define ASM_KVM_CACHE_REGS_H

#define CONFIG_X86_64 1
#define CONFIG_KVM_GENERIC_MMU_NOTIFIER 1
#define CONFIG_KVM_PRIVATE_MEM 1
#define CONFIG_KVM_PROVE_MMU 1
#define IS_ENABLED(x) 0

/* ---- types ---------------------------------------------------------- */
typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;
typedef int8_t s8;
typedef int16_t s16;
typedef int32_t s32;
typedef int64_t s64;
typedef u64 gfn_t;
typedef u64 gpa_t;
typedef u64 gva_t;
typedef u64 hpa_t;
typedef u64 hfn_t;
typedef u64 kvm_pfn_t;
typedef unsigned long hva_t;
typedef u64 phys_addr_t;
typedef unsigned int gfp_t;
typedef unsigned long pgoff_t;
typedef struct { int counter; } atomic_t;
typedef struct { s64 counter; } atomic64_t;
typedef struct { atomic_t refs; } refcount_t;
typedef u16 __u16;
typedef u32 __u32;
typedef u64 __u64;

struct list_head { struct list_head *next, *prev; };
struct hlist_node { struct hlist_node *next, **pprev; };
struct rb_node { unsigned long __rb_parent_color; struct rb_node *rb_right, *rb_left; };
struct interval_tree_node { struct rb_node rb; unsigned long start, last, __subtree_last; };
struct rcu_head { struct rcu_head *next; void (*func)(struct rcu_head *head); };
struct file;
struct kmem_cache;
struct x86_exception;
struct page { unsigned long private; unsigned long flags; };

typedef struct { ks_lock_t lk; } spinlock_t;
typedef struct { ks_lock_t lk; } rwlock_t;

#define __rcu
#define __user
#define __iomem
#define __init
#define __exit
#define __ro_after_init
#define __read_mostly
#undef __always_inline
#define __always_inline inline __attribute__((always_inline))
#define __maybe_unused __attribute__((unused))
#define __must_check __attribute__((warn_unused_result))
#define __weak __attribute__((weak))
#define __packed __attribute__((packed))
#define __aligned(x) __attribute__((aligned(x)))
#define __always_unused __attribute__((unused))
#define noinline __attribute__((noinline))
#define __force
#define likely(x) __builtin_expect(!!(x), 1)
#define unlikely(x) __builtin_expect(!!(x), 0)
#define fallthrough __attribute__((__fallthrough__))
#define EXPORT_SYMBOL_GPL(x)
#define EXPORT_SYMBOL(x)
#define module_param_named(name, var, type, perm)
#define module_param(name, type, perm)
#define typeof __typeof__

#define PAGE_SHIFT 12
#define PAGE_SIZE (1UL << PAGE_SHIFT)
#define PAGE_MASK (~(PAGE_SIZE - 1))
#define BITS_PER_LONG 64
#define BIT(n) (1UL << (n))
#define BIT_ULL(n) (1ULL << (n))
#define GENMASK_ULL(h, l) (((~0ULL) - (1ULL << (l)) + 1) & (~0ULL >> (63 - (h))))
#define GENMASK(h, l) (((~0UL) - (1UL << (l)) + 1) & (~0UL >> (BITS_PER_LONG - 1 - (h))))
#define BITS_TO_LONGS(n) (((n) + BITS_PER_LONG - 1) / BITS_PER_LONG)
#define DECLARE_BITMAP(name, bits) unsigned long name[BITS_TO_LONGS(bits)]
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define container_of(ptr, type, member) ((type *)((char *)(ptr) - offsetof(type, member)))
#define min(a, b) ({ __typeof__(a) _a = (a); __typeof__(b) _b = (b); _a < _b ? _a : _b; })
#define max(a, b) ({ __typeof__(a) _a = (a); __typeof__(b) _b = (b); _a > _b ? _a : _b; })
#define min_t(t, a, b) min((t)(a), (t)(b))
#define max_t(t, a, b) max((t)(a), (t)(b))
#define round_up(x, y) ((((x) - 1) | ((__typeof__(x))((y) - 1))) + 1)
#define round_down(x, y) ((x) & ~((__typeof__(x))((y) - 1)))
#define ALIGN(x, a) (((x) + (a) - 1) & ~((__typeof__(x))(a) - 1))
#define IS_ALIGNED(x, a) (((x) & ((__typeof__(x))(a) - 1)) == 0)
#define static_assert(expr, ...) _Static_assert(expr, #expr)
#define BUILD_BUG_ON(cond) ((void)sizeof(char[1 - 2 * !!(cond)]))
#define BUILD_BUG_ON_INVALID(e) ((void)(sizeof((long)(e))))
#define __stringify_1(x) #x
#define __stringify(x) __stringify_1(x)
#define __ffs(x) ((unsigned long)__builtin_ctzl(x))
#define __fls(x) ((unsigned long)(63 - __builtin_clzl(x)))
#define ffs(x) __builtin_ffs(x)
#define fls64(x) ((x) ? 64 - __builtin_clzll(x) : 0)
#define hweight64(x) __builtin_popcountll(x)
#define upper_32_bits(n) ((u32)(((n) >> 16) >> 16))
#define lower_32_bits(n) ((u32)((n) & 0xffffffff))

#define ENOMEM 12
#define EFAULT 14
#define EAGAIN 11
#define EINVAL 22
#define EIO 5
#define ENOENT 2
#define EBUSY 16
#define EINTR 4
#define ENOSPC 28
#define EEXIST 17
#define EHWPOISON 133

#define GFP_KERNEL 0x1u
#define GFP_KERNEL_ACCOUNT 0x3u
#define GFP_NOWAIT 0x4u
#define __GFP_ACCOUNT 0x2u
#define __GFP_ZERO 0x8u
#define __GFP_NOWARN 0x10u

/* ---- the access chokepoint ------------------------------------------ */
/*
 * One macro per kind of kernel access.  The atomic is real (the arena is
 * shared by forked workers); ks_access() then sees the address, the value
 * before and after, and may trace, check, delay or yield the turn.  Loads
 * are hooked *after* they read, so a yield lands between a load and the
 * cmpxchg that depends on it: the window where the TDP MMU's races live.
 */
#define __ks_u64p(p) ((u64 *)(void *)(p))
#define READ_ONCE(x) ({                                                        \
	__auto_type __v = __atomic_load_n(&(x), __ATOMIC_RELAXED);             \
	if (sizeof(x) == 8)                                                    \
		ks_access(KS_LOAD, (const void *)&(x), ks_as_u64(&__v, sizeof(x)), \
			  ks_as_u64(&__v, sizeof(x)));                             \
	__v; })
#define WRITE_ONCE(x, val) do {                                                \
	__typeof__(x) __n = (val), __o;                                        \
	__atomic_exchange(&(x), &__n, &__o, __ATOMIC_RELAXED);                 \
	if (sizeof(x) == 8)                                                    \
		ks_access(KS_STORE, (const void *)&(x), ks_as_u64(&__o, sizeof(x)), \
			  ks_as_u64(&__n, sizeof(x)));                             \
	} while (0)
#define xchg(ptr, v) ({                                                        \
	__typeof__(*(ptr)) __n = (v), __o;                                     \
	__atomic_exchange((ptr), &__n, &__o, __ATOMIC_SEQ_CST);                \
	ks_access(KS_XCHG, (const void *)(ptr), ks_as_u64(&__o, sizeof(__o)),   \
		  ks_as_u64(&__n, sizeof(__n)));                                   \
	__o; })
#define try_cmpxchg64(ptr, oldp, new) ({                                       \
	u64 __exp = *(oldp), __new = (new);                                    \
	bool __ok = __atomic_compare_exchange_n(__ks_u64p(ptr), &__exp, __new, \
		false, __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                        \
	ks_access(__ok ? KS_CMPXCHG_OK : KS_CMPXCHG_FAIL, (const void *)(ptr), \
		  __ok ? *(oldp) : __exp, __ok ? __new : __exp);                   \
	if (!__ok)                                                             \
		*(oldp) = __exp;                                               \
	__ok; })
#define try_cmpxchg(ptr, oldp, new) ({                                         \
	__typeof__(*(ptr)) __e = *(oldp);                                      \
	bool __ok = __atomic_compare_exchange_n((ptr), &__e, (new), false,     \
		__ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST);                               \
	if (!__ok)                                                             \
		*(oldp) = __e;                                                 \
	__ok; })
#define cmpxchg(ptr, o, n) ({                                                  \
	__typeof__(*(ptr)) __e = (o);                                          \
	__atomic_compare_exchange_n((ptr), &__e, (n), false, __ATOMIC_SEQ_CST, \
				    __ATOMIC_SEQ_CST);                         \
	__e; })
#define smp_load_acquire(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define smp_store_release(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define smp_mb() __atomic_thread_fence(__ATOMIC_SEQ_CST)
#define smp_rmb() __atomic_thread_fence(__ATOMIC_ACQUIRE)
#define smp_wmb() __atomic_thread_fence(__ATOMIC_RELEASE)
#define smp_mb__after_atomic() smp_mb()
#define smp_mb__before_atomic() smp_mb()
#define barrier() __asm__ __volatile__("" ::: "memory")
#define cpu_relax() ks_cpu_relax()

static inline int atomic_read(const atomic_t *v) { return __atomic_load_n(&v->counter, __ATOMIC_RELAXED); }
static inline void atomic_set(atomic_t *v, int i) { __atomic_store_n(&v->counter, i, __ATOMIC_RELAXED); }
static inline void atomic_inc(atomic_t *v) { __atomic_fetch_add(&v->counter, 1, __ATOMIC_SEQ_CST); }
static inline void atomic_dec(atomic_t *v) { __atomic_fetch_sub(&v->counter, 1, __ATOMIC_SEQ_CST); }
static inline s64 atomic64_read(const atomic64_t *v) { return __atomic_load_n(&v->counter, __ATOMIC_RELAXED); }
static inline void atomic64_set(atomic64_t *v, s64 i) { __atomic_store_n(&v->counter, i, __ATOMIC_RELAXED); }
static inline void atomic64_add(s64 i, atomic64_t *v) { __atomic_fetch_add(&v->counter, i, __ATOMIC_SEQ_CST); }
static inline void atomic64_sub(s64 i, atomic64_t *v) { __atomic_fetch_sub(&v->counter, i, __ATOMIC_SEQ_CST); }
static inline void atomic64_inc(atomic64_t *v) { atomic64_add(1, v); }
static inline void atomic64_dec(atomic64_t *v) { atomic64_sub(1, v); }
/* tdp_mmu_clear_spte_bits() clears SPTE bits with this: it is an SPTE access. */
static inline s64 atomic64_fetch_and(s64 mask, atomic64_t *v)
{
	s64 old = __atomic_fetch_and(&v->counter, mask, __ATOMIC_SEQ_CST);
	ks_access(KS_FETCH_AND, v, (u64)old, (u64)(old & mask));
	return old;
}

/* refcount_t: the kernel saturates and WARNs on misuse; a misuse is a finding. */
static inline unsigned int refcount_read(const refcount_t *r) { return atomic_read(&r->refs); }
static inline void refcount_set(refcount_t *r, int n) { atomic_set(&r->refs, n); }
static inline bool refcount_inc_not_zero(refcount_t *r)
{
	int old = atomic_read(&r->refs);
	do {
		if (!old)
			return false;
	} while (!__atomic_compare_exchange_n(&r->refs.counter, &old, old + 1, false,
					      __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST));
	if (old < 0)
		ks_warn("refcount_t: saturated; leaking memory", __FILE__, __LINE__);
	return true;
}
static inline void refcount_inc(refcount_t *r)
{
	int old = __atomic_fetch_add(&r->refs.counter, 1, __ATOMIC_SEQ_CST);
	if (old <= 0)
		ks_warn("refcount_t: addition on 0; use-after-free", __FILE__, __LINE__);
}
static inline bool refcount_dec_and_test(refcount_t *r)
{
	int old = __atomic_fetch_sub(&r->refs.counter, 1, __ATOMIC_SEQ_CST);
	if (old <= 0)
		ks_warn("refcount_t: underflow; use-after-free", __FILE__, __LINE__);
	return old == 1;
}

/* ---- assertions: the kernel's own ----------------------------------- */
#define WARN_ON(c) ({ bool __c = !!(c); if (unlikely(__c)) ks_warn("WARN_ON(" #c ")", __FILE__, __LINE__); __c; })
#define WARN_ON_ONCE(c) WARN_ON(c)
#define WARN(c, fmt, ...) WARN_ON(c)
#define WARN_ONCE(c, fmt, ...) WARN_ON(c)
#define BUG() ks_bug("BUG()", __FILE__, __LINE__)
#define BUG_ON(c) do { if (unlikely(c)) ks_bug("BUG_ON(" #c ")", __FILE__, __LINE__); } while (0)
#define KVM_BUG_ON(c, kvm) ({ bool __c = !!(c); if (unlikely(__c)) ks_warn("KVM_BUG_ON(" #c ")", __FILE__, __LINE__); __c; })
#define KVM_BUG(c, kvm, fmt, ...) KVM_BUG_ON(c, kvm)
#define pr_err(fmt, ...) ks_printk(3, fmt, ##__VA_ARGS__)
#define pr_err_ratelimited(fmt, ...) ks_printk(3, fmt, ##__VA_ARGS__)
#define pr_warn(fmt, ...) ks_printk(4, fmt, ##__VA_ARGS__)
#define pr_warn_ratelimited(fmt, ...) ks_printk(4, fmt, ##__VA_ARGS__)
#define pr_warn_once(fmt, ...) ks_printk(4, fmt, ##__VA_ARGS__)
#define pr_info(fmt, ...) ks_printk(6, fmt, ##__VA_ARGS__)
#define pr_debug(fmt, ...) do { } while (0)
#define printk(fmt, ...) ks_printk(6, fmt, ##__VA_ARGS__)

/* ---- lists (include/linux/list.h, rculist.h) ------------------------ */
#define LIST_HEAD_INIT(name) { &(name), &(name) }
static inline void INIT_LIST_HEAD(struct list_head *l) { WRITE_ONCE(l->next, l); l->prev = l; }
static inline void __list_add(struct list_head *n, struct list_head *prev, struct list_head *next)
{
	next->prev = n;
	n->next = next;
	n->prev = prev;
	WRITE_ONCE(prev->next, n);
}
static inline void list_add(struct list_head *n, struct list_head *h) { __list_add(n, h, h->next); }
static inline void list_add_tail(struct list_head *n, struct list_head *h) { __list_add(n, h->prev, h); }
/* include/linux/poison.h with x86-64's POISON_POINTER_DELTA (CONFIG_ILLEGAL_POINTER_VALUE) */
#define LIST_POISON1 ((struct list_head *)(0xdead000000000000UL + 0x100))
#define LIST_POISON2 ((struct list_head *)(0xdead000000000000UL + 0x122))
static inline void __list_del(struct list_head *prev, struct list_head *next)
{
	next->prev = prev;
	WRITE_ONCE(prev->next, next);
}
static inline void list_del_init(struct list_head *e)
{
	__list_del(e->prev, e->next);
	INIT_LIST_HEAD(e);
}
static inline void list_del(struct list_head *e)
{
	__list_del(e->prev, e->next);
	e->next = LIST_POISON1;
	e->prev = LIST_POISON2;
}
static inline bool list_empty(const struct list_head *h) { return READ_ONCE(h->next) == h; }
static inline void list_add_rcu(struct list_head *n, struct list_head *h)
{
	struct list_head *next = h->next;
	n->next = next;
	n->prev = h;
	smp_store_release(&h->next, n);
	next->prev = n;
}
static inline void list_add_tail_rcu(struct list_head *n, struct list_head *h)
{
	struct list_head *prev = h->prev;
	n->next = h;
	n->prev = prev;
	smp_store_release(&prev->next, n);
	h->prev = n;
}
static inline void list_del_rcu(struct list_head *e)
{
	__list_del(e->prev, e->next);
	e->prev = LIST_POISON2;
}
#define list_entry(ptr, type, member) container_of(ptr, type, member)
#define list_first_entry(ptr, type, member) list_entry((ptr)->next, type, member)
#define list_next_entry(pos, member) list_entry((pos)->member.next, __typeof__(*(pos)), member)
#define list_entry_is_head(pos, head, member) (&pos->member == (head))
#define list_for_each_entry(pos, head, member)                                 \
	for (pos = list_first_entry(head, __typeof__(*pos), member);           \
	     !list_entry_is_head(pos, head, member);                           \
	     pos = list_next_entry(pos, member))
#define list_for_each_entry_safe(pos, n, head, member)                         \
	for (pos = list_first_entry(head, __typeof__(*pos), member),           \
	     n = list_next_entry(pos, member);                                 \
	     !list_entry_is_head(pos, head, member);                           \
	     pos = n, n = list_next_entry(n, member))
#define list_entry_rcu(ptr, type, member) container_of(READ_ONCE(ptr), type, member)
#define list_for_each_entry_rcu(pos, head, member, ...)                        \
	for (pos = list_entry_rcu((head)->next, __typeof__(*pos), member);     \
	     &pos->member != (head);                                           \
	     pos = list_entry_rcu(pos->member.next, __typeof__(*pos), member))
#define list_first_or_null_rcu(ptr, type, member) ({                           \
	struct list_head *__ptr = (ptr);                                       \
	struct list_head *__next = READ_ONCE(__ptr->next);                     \
	likely(__ptr != __next) ? list_entry_rcu(__ptr->next, type, member) : NULL; })
#define list_next_or_null_rcu(head, ptr, type, member) ({                      \
	struct list_head *__head = (head);                                     \
	struct list_head *__ptr = (ptr);                                       \
	struct list_head *__next = READ_ONCE(__ptr->next);                     \
	likely(__next != __head) ? list_entry_rcu(__next, type, member) : NULL; })

/* ---- RCU: an epoch RCU in the arena (runtime.c) ---------------------- */
#define rcu_read_lock() ks_rcu_read_lock()
#define rcu_read_unlock() ks_rcu_read_unlock()
#define rcu_read_lock_held() ks_rcu_read_lock_held()
#define rcu_dereference(p) ({ ks_rcu_dereference_check(); READ_ONCE(p); })
#define rcu_dereference_raw(p) READ_ONCE(p)
#define rcu_dereference_check(p, c) ({ ks_rcu_dereference_check_cond(!!(c)); READ_ONCE(p); })
#define rcu_dereference_protected(p, c) (p)
#define rcu_assign_pointer(p, v) smp_store_release(&(p), (v))
#define RCU_INIT_POINTER(p, v) WRITE_ONCE(p, v)
#define call_rcu(head, func) ks_call_rcu((head), (func))
#define rcu_barrier() ks_rcu_barrier()
#define synchronize_rcu() ks_synchronize_rcu()

/* ---- locks: in the arena, with their owners (runtime.c) -------------- */
#define DEFINE_SPINLOCK(x) spinlock_t x
#define spin_lock_init(l) ks_lock_init(&(l)->lk, KS_SPINLOCK, #l)
#define spin_lock(l) ks_spin_lock(&(l)->lk)
#define spin_unlock(l) ks_spin_unlock(&(l)->lk)
#define rwlock_init(l) ks_lock_init(&(l)->lk, KS_RWLOCK, #l)
#define read_lock(l) ks_read_lock(&(l)->lk)
#define read_unlock(l) ks_read_unlock(&(l)->lk)
#define write_lock(l) ks_write_lock(&(l)->lk)
#define write_unlock(l) ks_write_unlock(&(l)->lk)
#define rwlock_needbreak(l) ks_lock_needbreak(&(l)->lk)
#define spin_needbreak(l) ks_lock_needbreak(&(l)->lk)
#define cond_resched_rwlock_read(l) ks_cond_resched_rwlock_read(&(l)->lk)
#define cond_resched_rwlock_write(l) ks_cond_resched_rwlock_write(&(l)->lk)
#define need_resched() ks_need_resched()
#define cond_resched() ks_cond_resched()
#define might_sleep() ks_might_sleep(__FILE__, __LINE__)
#define lockdep_assert_held(l) ks_lockdep_assert_held(&(l)->lk, KS_HELD_ANY, #l, __FILE__, __LINE__)
#define lockdep_assert_held_read(l) ks_lockdep_assert_held(&(l)->lk, KS_HELD_READ, #l, __FILE__, __LINE__)
#define lockdep_assert_held_write(l) ks_lockdep_assert_held(&(l)->lk, KS_HELD_WRITE, #l, __FILE__, __LINE__)
#define lockdep_assert_not_held(l) ks_lockdep_assert_held(&(l)->lk, KS_HELD_NONE, #l, __FILE__, __LINE__)
#define lockdep_is_held(l) ks_lock_is_held(&(l)->lk)
#define lockdep_assert_irqs_enabled() do { } while (0)
#define lockdep_assert_preemption_disabled() do { } while (0)

/* ---- memory: pages and slabs in the arena (runtime.c) ----------------- */
/*
 * The arena is mapped at one fixed address in every worker and __pa/__va
 * are the identity, so a kernel pointer is valid in every process and
 * sptep_to_sp() (page_private(pfn_to_page(__pa(sptep) >> PAGE_SHIFT))) works
 * unchanged on the struct page array the arena carries.
 */
#define __pa(x) ((unsigned long)(x))
#define __va(x) ((void *)(unsigned long)(x))
#define pfn_to_page(pfn) ks_pfn_to_page(pfn)
#define virt_to_page(v) ks_pfn_to_page(__pa(v) >> PAGE_SHIFT)
#define page_private(page) ((page)->private)
#define set_page_private(page, v) ((page)->private = (unsigned long)(v))
#define pfn_valid(pfn) ks_pfn_valid(pfn)
#define __get_free_page(gfp) ks_get_free_page(gfp)
#define get_zeroed_page(gfp) ks_get_free_page((gfp) | __GFP_ZERO)
#define free_page(addr) ks_free_page((unsigned long)(addr))
#define kmem_cache_zalloc(c, gfp) ks_kmem_cache_zalloc(c, gfp)
#define kmem_cache_free(c, p) ks_kmem_cache_free(c, p)
#define kvm_mmu_memory_cache_alloc(mc) ks_mmu_memory_cache_alloc(mc)
#define kvm_account_pgtable_pages(virt, nr) ks_account_pgtable_pages((virt), (nr))
#define my_zero_pfn(addr) ks_zero_pfn()
#define is_zero_pfn(pfn) ((pfn) == ks_zero_pfn())

/* ---- x86: the few CPU facts the MMU files ask -------------------------- */
#define X86_FEATURE_LAM 0
#define X86_CR3_PCID_MASK 0xfffULL
#define X86_CR3_LAM_U48 (1ULL << 62)
#define X86_CR3_LAM_U57 (1ULL << 61)
#define X86_CR4_PCIDE (1UL << 17)
#define X86_CR4_PSE (1UL << 4)
#define X86_CR4_PAE (1UL << 5)
#define X86_CR4_LA57 (1UL << 12)
#define X86_CR4_SMEP (1UL << 20)
#define X86_CR4_SMAP (1UL << 21)
#define X86_CR4_PKE (1UL << 22)
#define X86_CR0_PG (1UL << 31)
#define X86_CR0_WP (1UL << 16)
#define EFER_LME (1UL << 8)
#define EFER_NX (1UL << 11)
#define X86_EFLAGS_AC (1UL << 18)
#define X86_BUG_TDP_MMU_NONE 0
#define boot_cpu_has_bug(b) false
#define boot_cpu_has(f) false
#define cpuid_eax(f) 0x00003030u /* 48-bit physical addresses */
#define e820__mapped_raw_any(start, end, type) true /* guest pfns are RAM */
#define PageReserved(page) false
#define E820_TYPE_RAM 1
#define pat_enabled() false
#define pat_pfn_immune_to_uc_mtrr(pfn) true
#define shadow_phys_bits 52
#define physical_mask ((1ULL << 52) - 1)

#define PFERR_PRESENT_BIT 0
#define PFERR_WRITE_BIT 1
#define PFERR_USER_BIT 2
#define PFERR_RSVD_BIT 3
#define PFERR_FETCH_BIT 4
#define PFERR_PK_BIT 5
#define PFERR_SGX_BIT 15
#define PFERR_GUEST_FINAL_BIT 32
#define PFERR_GUEST_PAGE_BIT 33
#define PFERR_IMPLICIT_ACCESS_BIT 48
#define PFERR_PRESENT_MASK BIT_ULL(PFERR_PRESENT_BIT)
#define PFERR_WRITE_MASK BIT_ULL(PFERR_WRITE_BIT)
#define PFERR_USER_MASK BIT_ULL(PFERR_USER_BIT)
#define PFERR_RSVD_MASK BIT_ULL(PFERR_RSVD_BIT)
#define PFERR_FETCH_MASK BIT_ULL(PFERR_FETCH_BIT)
#define PFERR_PK_MASK BIT_ULL(PFERR_PK_BIT)
#define PFERR_SGX_MASK BIT_ULL(PFERR_SGX_BIT)
#define PFERR_GUEST_FINAL_MASK BIT_ULL(PFERR_GUEST_FINAL_BIT)
#define PFERR_GUEST_PAGE_MASK BIT_ULL(PFERR_GUEST_PAGE_BIT)
#define PFERR_IMPLICIT_ACCESS BIT_ULL(PFERR_IMPLICIT_ACCESS_BIT)
#define PFERR_PRIVATE_ACCESS BIT_ULL(49)
#define PFERR_SYNTHETIC_MASK (PFERR_IMPLICIT_ACCESS | PFERR_PRIVATE_ACCESS)

/* ---- KVM constants (arch/x86/include/asm/kvm_host.h) ------------------ */
enum pg_level {
	PG_LEVEL_NONE,
	PG_LEVEL_4K,
	PG_LEVEL_2M,
	PG_LEVEL_1G,
	PG_LEVEL_512G,
	PG_LEVEL_NUM
};
#define KVM_MAX_HUGEPAGE_LEVEL PG_LEVEL_1G
#define KVM_NR_PAGE_SIZES (KVM_MAX_HUGEPAGE_LEVEL - PG_LEVEL_4K + 1)
#define KVM_HPAGE_GFN_SHIFT(x) (((x) - 1) * 9)
#define KVM_HPAGE_SHIFT(x) (PAGE_SHIFT + KVM_HPAGE_GFN_SHIFT(x))
#define KVM_HPAGE_SIZE(x) (1UL << KVM_HPAGE_SHIFT(x))
#define KVM_HPAGE_MASK(x) (~(KVM_HPAGE_SIZE(x) - 1))
#define KVM_PAGES_PER_HPAGE(x) (KVM_HPAGE_SIZE(x) / PAGE_SIZE)
#define KVM_ADDRESS_SPACE_NUM 2
#define KVM_MAX_NR_ADDRESS_SPACES 2
#define INVALID_PAGE (~(hpa_t)0)
#define VALID_PAGE(x) ((x) != INVALID_PAGE)
#define INVALID_GPA (~(gpa_t)0)
#define KVM_PFN_ERR_MASK (0x7ffULL << 52)
#define KVM_PFN_ERR_FAULT (KVM_PFN_ERR_MASK)
#define KVM_PFN_NOSLOT (0x1ULL << 63)
#define KVM_HVA_ERR_BAD (~0UL)
#define KVM_MEM_LOG_DIRTY_PAGES (1UL << 0)
#define KVM_MEM_READONLY (1UL << 1)
#define KVM_MEM_GUEST_MEMFD (1UL << 2)
#define KVM_MEMSLOT_INVALID (1UL << 16)
#define KVM_MMIO_SPTE_GEN_BITS 19
#define PT64_ROOT_MAX_LEVEL 5
#define KVM_MMU_NUM_PREV_ROOTS 3
#define KVM_MMU_ROOT_INFO_INVALID ((struct kvm_mmu_root_info) { .pgd = INVALID_PAGE, .hpa = INVALID_PAGE })
#define KVM_MMU_ROOT_CURRENT BIT(0)
#define KVM_MMU_ROOT_PREVIOUS(i) BIT(1 + i)
#define KVM_MMU_ROOTS_ALL (BIT(1 + KVM_MMU_NUM_PREV_ROOTS) - 1)
#define KVM_HAVE_MMU_RWLOCK
#define KVM_X86_DEFAULT_VM 0
#define KVM_X86_SW_PROTECTED_VM 1
#define KVM_X86_TDX_VM 5

/* kvm_host.h and asm/kvm_host.h structures, copied out of the tree by name. */
struct kvm;
struct kvm_vcpu;
struct kvm_mmu_page;
struct kvm_page_fault;
#include "kstructs.h"

static inline bool kvm_is_error_hva(unsigned long addr) { return addr >= 0x8000000000000000UL; }
static inline bool is_error_noslot_pfn(kvm_pfn_t pfn) { return !!(pfn & (KVM_PFN_ERR_MASK | KVM_PFN_NOSLOT)); }
static inline bool is_noslot_pfn(kvm_pfn_t pfn) { return pfn == KVM_PFN_NOSLOT; }
static inline bool is_error_pfn(kvm_pfn_t pfn) { return !!(pfn & KVM_PFN_ERR_MASK); }
static inline hpa_t pfn_to_hpa(kvm_pfn_t pfn) { return (hpa_t)pfn << PAGE_SHIFT; }
static inline gfn_t gpa_to_gfn(gpa_t gpa) { return gpa >> PAGE_SHIFT; }
static inline gpa_t gfn_to_gpa(gfn_t gfn) { return (gpa_t)gfn << PAGE_SHIFT; }

/*
 * struct kvm and struct kvm_vcpu: ours.  The fields are the ones the MMU
 * files and the outer protocol (glue.c) name, with the kernel's names and
 * types; everything else of the real structures is left out.
 */
struct kvm_vm_stat {
	atomic64_t pages[KVM_NR_PAGE_SIZES];
	u64 remote_tlb_flush;
	u64 remote_tlb_flush_requests;
	u64 mmu_shadow_zapped;
	u64 mmu_recycled;
	u64 mmu_cache_miss;
	u64 mmu_unsync;
	u64 nx_lpage_splits;
	u64 max_mmu_page_hash_collisions;
	u64 max_mmu_rmap_size;
};

struct kvm_vcpu_stat {
	u64 pf_taken;
	u64 pf_fixed;
	u64 pf_emulate;
	u64 pf_spurious;
	u64 pf_fast;
	u64 pf_mmio_spte_created;
	u64 pf_guest;
};

struct kvm_arch {
	unsigned long vm_type;
	bool has_private_mem;
	u8 mmu_valid_gen;
	bool shadow_root_allocated;
	bool disable_nx_huge_pages;
	u64 shadow_mmio_value;
	struct list_head active_mmu_pages;
	struct list_head zapped_obsolete_pages;
	struct list_head possible_nx_huge_pages;
	/* The TDP MMU's page lists and lock (KVM_HAVE_MMU_RWLOCK, CONFIG_X86_64). */
	struct list_head tdp_mmu_roots;
	atomic64_t tdp_mmu_pages;
	spinlock_t tdp_mmu_pages_lock;
	struct kvm_mmu_memory_cache split_shadow_page_cache;
	struct kvm_mmu_memory_cache split_page_header_cache;
	struct kvm_mmu_memory_cache split_desc_cache;
	u64 nx_huge_page_last;
};

#define KS_MAX_MEMSLOTS 16
struct kvm_memslots {
	u64 generation;
	int nr_slots;
	struct kvm_memory_slot *slots[KS_MAX_MEMSLOTS];
};

struct mutex { ks_lock_t lk; };
struct srcu_struct { ks_lock_t lk; };

struct kvm {
	rwlock_t mmu_lock;
	struct mutex slots_lock;
	struct srcu_struct srcu;
	atomic_t nr_memslots_dirty_logging;
	spinlock_t mn_invalidate_lock;
	struct kvm_memslots *memslots[KVM_MAX_NR_ADDRESS_SPACES];
	struct kvm_memslots __memslots[KVM_MAX_NR_ADDRESS_SPACES][2];
	int created_vcpus;
	int online_vcpus;
	refcount_t users_count;
	struct kvm_arch arch;
	struct kvm_vm_stat stat;
	/* mmu_notifier sequence (kvm_host.h, CONFIG_KVM_GENERIC_MMU_NOTIFIER) */
	unsigned long mmu_invalidate_seq;
	long mmu_invalidate_in_progress;
	gfn_t mmu_invalidate_range_start;
	gfn_t mmu_invalidate_range_end;
	unsigned long mn_active_invalidate_count;
	bool vm_bugged;
	bool vm_dead;
};

struct kvm_vcpu_arch {
	struct kvm_mmu *mmu;
	struct kvm_mmu root_mmu;
	struct kvm_mmu guest_mmu;
	struct kvm_mmu nested_mmu;
	struct kvm_mmu *walk_mmu;
	struct kvm_mmu_memory_cache mmu_pte_list_desc_cache;
	struct kvm_mmu_memory_cache mmu_shadow_page_cache;
	struct kvm_mmu_memory_cache mmu_shadowed_info_cache;
	struct kvm_mmu_memory_cache mmu_page_header_cache;
	u32 pkru;
	u64 last_vmentry_cr3;
	unsigned long cr0, cr3, cr4;
	u64 efer;
};

struct kvm_vcpu {
	struct kvm *kvm;
	int cpu;
	int vcpu_id;
	int vcpu_idx;
	int mode;
	u64 requests;
	struct kvm_vcpu_stat stat;
	struct kvm_vcpu_arch arch;
	int last_used_slot;
	u64 last_used_slot_gen;
};

/* x86 ops: a static call of kvm_x86_ops (kvm_x86_call) is one of ours. */
struct kvm_x86_ops {
	int cpu_dirty_log_size;
	void *set_apic_access_page_addr;
};
extern struct kvm_x86_ops kvm_x86_ops;
#define kvm_x86_call(func) ks_x86_##func
u8 ks_x86_get_mt_mask(struct kvm_vcpu *vcpu, gfn_t gfn, bool is_mmio);
void ks_x86_load_mmu_pgd(struct kvm_vcpu *vcpu, hpa_t root_hpa, int root_level);
unsigned long ks_x86_get_rflags(struct kvm_vcpu *vcpu);

struct kvm_host_values {
	u8 maxphyaddr;
	u64 efer;
	u64 xcr0;
	u64 xss;
	u64 arch_capabilities;
};
extern struct kvm_host_values kvm_host;
extern bool tdp_enabled;
extern bool enable_mmio_caching;

static inline bool kvm_is_cr4_bit_set(struct kvm_vcpu *vcpu, unsigned long bit) { return !!(vcpu->arch.cr4 & bit); }
static inline unsigned long kvm_read_cr3(struct kvm_vcpu *vcpu) { return vcpu->arch.cr3; }
static inline bool guest_cpu_cap_has(struct kvm_vcpu *vcpu, int f) { return false; }
static inline bool is_smm(struct kvm_vcpu *vcpu) { return false; }

static inline struct kvm_memslots *__kvm_memslots(struct kvm *kvm, int as_id)
{
	return READ_ONCE(kvm->memslots[as_id]);
}
static inline struct kvm_memslots *kvm_memslots(struct kvm *kvm) { return __kvm_memslots(kvm, 0); }
static inline struct kvm_memslots *kvm_vcpu_memslots(struct kvm_vcpu *vcpu) { return __kvm_memslots(vcpu->kvm, 0); }
struct kvm_memory_slot *__gfn_to_memslot(struct kvm_memslots *slots, gfn_t gfn);
static inline struct kvm_memory_slot *gfn_to_memslot(struct kvm *kvm, gfn_t gfn)
{
	return __gfn_to_memslot(kvm_memslots(kvm), gfn);
}
static inline struct kvm_memory_slot *kvm_vcpu_gfn_to_memslot(struct kvm_vcpu *vcpu, gfn_t gfn)
{
	return __gfn_to_memslot(kvm_vcpu_memslots(vcpu), gfn);
}
static inline bool kvm_slot_dirty_track_enabled(const struct kvm_memory_slot *slot)
{
	return slot->flags & KVM_MEM_LOG_DIRTY_PAGES;
}
static inline bool kvm_memslots_for_spte_role_ok(void) { return true; }
#define kvm_memslots_for_spte_role(kvm, role) __kvm_memslots(kvm, (role).smm)
void mark_page_dirty_in_slot(struct kvm *kvm, const struct kvm_memory_slot *memslot, gfn_t gfn);
static inline bool kvm_gfn_has_private(void) { return false; }
bool kvm_mem_is_private(struct kvm *kvm, gfn_t gfn);
static inline void kvm_prepare_memory_fault_exit(struct kvm_vcpu *vcpu, gpa_t gpa, gpa_t size,
						 bool is_write, bool is_exec, bool is_private) { }
static inline bool kvm_ad_enabled(void);

/* TLB flushes: kvm_main.c's, recorded for the TLB model (runtime.c). */
void kvm_flush_remote_tlbs(struct kvm *kvm);
void kvm_flush_remote_tlbs_range(struct kvm *kvm, gfn_t gfn, u64 nr_pages);
void kvm_flush_remote_tlbs_memslot(struct kvm *kvm, const struct kvm_memory_slot *memslot);

/* The host's struct page side of a pfn: accessed/dirty are host hints. */
void kvm_set_pfn_dirty(kvm_pfn_t pfn);
void kvm_set_pfn_accessed(kvm_pfn_t pfn);
void kvm_release_pfn_clean(kvm_pfn_t pfn);

/* Tracepoints become hooks (mmutrace.h and trace/events/kvm.h). */
#define TP_PROTO(args...) args
#define TP_ARGS(args...) args
#define TP_STRUCT__entry(args...)
#define TP_fast_assign(args...)
#define TP_printk(args...)
#define KS_TP_ARG0(a, ...) ((uintptr_t)(a))
#define TRACE_EVENT(name, proto, args, tstruct, assign, print) \
	static inline void trace_##name(proto) { ks_tracepoint_arg(#name, KS_TP_ARG0(args)); }
#define DECLARE_EVENT_CLASS(name, proto, args, tstruct, assign, print)
#define DEFINE_EVENT(template, name, proto, args) \
	static inline void trace_##name(proto) { ks_tracepoint_arg(#name, KS_TP_ARG0(args)); }
#define TRACE_DEFINE_ENUM(x)

#endif /* _KSHIM_H */
