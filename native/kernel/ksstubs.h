/* SPDX-License-Identifier: GPL-2.0 */
/*
 * ksstubs.h: what the functions copied out of mmu.c and kvm_main.c need
 * before they are compiled, included into the kernel TU after kshim.h.
 *
 * Three kinds of thing live here:
 *  - small kernel definitions those functions name (vCPU modes, requests,
 *    SRCU, slots_lock, guard(srcu)), with the kernel's names;
 *  - prototypes of the outer protocol that ksglue.c implements for the
 *    engine (faulting in a pfn from the backing store, topping up the
 *    memory caches);
 *  - the shadow MMU's functions, as stubs that BUG.  The engine runs with
 *    tdp_mmu_enabled and never allocates a shadow root, so
 *    kvm_memslots_have_rmaps() is false and every branch that calls them is
 *    dead; a stub that runs says the harness broke that assumption.
 */
#ifndef _KSSTUBS_H
#define _KSSTUBS_H

typedef unsigned long ulong;
typedef unsigned int uint;

#define DIV_ROUND_UP(n, d) (((n) + (d) - 1) / (d))
#define LIST_HEAD(name) struct list_head name = LIST_HEAD_INIT(name)
#define list_prev_entry(pos, member) list_entry((pos)->member.prev, __typeof__(*(pos)), member)
#define list_last_entry(ptr, type, member) list_entry((ptr)->prev, type, member)
#define list_for_each_entry_safe_reverse(pos, n, head, member)                 \
	for (pos = list_last_entry(head, __typeof__(*pos), member),            \
	     n = list_prev_entry(pos, member);                                 \
	     !list_entry_is_head(pos, head, member);                           \
	     pos = n, n = list_prev_entry(n, member))
#define lockdep_assert_once(c) WARN_ON_ONCE(!(c))
#define VM_BUG_ON(c) BUG_ON(c)
#define VM_WARN_ON(c) WARN_ON(c)
#define local_irq_disable() do { } while (0)
#define local_irq_enable() do { } while (0)
#define local_irq_save(f) ((void)(f))
#define local_irq_restore(f) ((void)(f))
#define smp_store_mb(var, value) do { WRITE_ONCE(var, value); smp_mb(); } while (0)

/* vcpu->mode (include/linux/kvm_host.h) */
enum {
	OUTSIDE_GUEST_MODE,
	IN_GUEST_MODE,
	EXITING_GUEST_MODE,
	READING_SHADOW_PAGE_TABLES,
};

#define KVM_USER_MEM_SLOTS 32764
#define EMULTYPE_PF (1 << 6)
#define EMULTYPE_ALLOW_RETRY_PF (1 << 7)
#define EMULTYPE_WRITE_PF_TO_SP (1 << 8)
#define MMIO_GVA_ANY (~(gva_t)0)

/* vCPU requests: the numbers are ours, the names and semantics the kernel's. */
#define KVM_REQ_TLB_FLUSH 0
#define KVM_REQ_MMU_FREE_OBSOLETE_ROOTS 1
#define KVM_REQ_APIC_PAGE_RELOAD 2
#define KVM_REQ_MMU_RELOAD 3
static inline void kvm_make_request(int req, struct kvm_vcpu *vcpu)
{
	__atomic_fetch_or(&vcpu->requests, 1ULL << req, __ATOMIC_SEQ_CST);
}
static inline bool kvm_test_request(int req, struct kvm_vcpu *vcpu)
{
	return __atomic_load_n(&vcpu->requests, __ATOMIC_ACQUIRE) & (1ULL << req);
}
static inline bool kvm_check_request(int req, struct kvm_vcpu *vcpu)
{
	if (!kvm_test_request(req, vcpu))
		return false;
	__atomic_fetch_and(&vcpu->requests, ~(1ULL << req), __ATOMIC_SEQ_CST);
	return true;
}
bool kvm_make_all_cpus_request(struct kvm *kvm, unsigned int req);

/* boot_cpu_data: the one field spte.c reads. */
struct cpuinfo_x86 {
	u32 extended_cpuid_level;
	u8 x86_phys_bits;
	u8 x86_cache_bits;
};
extern struct cpuinfo_x86 boot_cpu_data;

/* mmu.c's module parameters and statics that the copied functions name. */
extern int max_huge_page_level;
extern int nx_huge_pages;
extern uint nx_huge_pages_recovery_ratio;
extern struct kmem_cache *mmu_page_header_cache;
extern bool tdp_mmu_enabled;

/* SRCU and slots_lock: in the arena (runtime.c), readers per task. */
int ks_srcu_read_lock(ks_lock_t *ss);
void ks_srcu_read_unlock(ks_lock_t *ss, int idx);
void ks_synchronize_srcu(ks_lock_t *ss);
#define srcu_read_lock(ss) ks_srcu_read_lock(&(ss)->lk)
#define srcu_read_unlock(ss, idx) ks_srcu_read_unlock(&(ss)->lk, (idx))
#define synchronize_srcu(ss) ks_synchronize_srcu(&(ss)->lk)
#define synchronize_srcu_expedited(ss) ks_synchronize_srcu(&(ss)->lk)
#define mutex_lock(m) ks_spin_lock(&(m)->lk)
#define mutex_unlock(m) ks_spin_unlock(&(m)->lk)
#define mutex_init(m) ks_lock_init(&(m)->lk, KS_SPINLOCK, #m)

/* guard(srcu)(&kvm->srcu) of include/linux/cleanup.h and srcu.h */
struct ks_srcu_guard { ks_lock_t *ss; int idx; };
static inline void ks_srcu_guard_exit(struct ks_srcu_guard *g) { ks_srcu_read_unlock(g->ss, g->idx); }
static inline struct ks_srcu_guard ks_srcu_guard_enter(struct srcu_struct *ss)
{
	struct ks_srcu_guard g = { &ss->lk, ks_srcu_read_lock(&ss->lk) };
	return g;
}
#define __ks_cat2(a, b) a##b
#define __ks_cat(a, b) __ks_cat2(a, b)
#define guard(name) __ks_guard_##name
#define __ks_guard_srcu(ss) \
	struct ks_srcu_guard __attribute__((cleanup(ks_srcu_guard_exit))) \
		__ks_cat(__ks_guard_, __COUNTER__) = ks_srcu_guard_enter(ss)

/* The outer protocol: ksglue.c, for the engine. */
int __kvm_faultin_pfn(struct kvm_vcpu *vcpu, struct kvm_page_fault *fault);
int kvm_handle_error_pfn(struct kvm_vcpu *vcpu, struct kvm_page_fault *fault);
int kvm_handle_noslot_fault(struct kvm_vcpu *vcpu, struct kvm_page_fault *fault, unsigned int access);
int kvm_mmu_topup_memory_cache(struct kvm_mmu_memory_cache *mc, int min);
bool page_fault_handle_page_track(struct kvm_vcpu *vcpu, struct kvm_page_fault *fault);
int host_pfn_mapping_level(struct kvm *kvm, gfn_t gfn, const struct kvm_memory_slot *slot);
static inline bool is_guest_mode(struct kvm_vcpu *vcpu) { return false; }
static inline bool kvm_apicv_activated(struct kvm *kvm) { return true; }
void kvm_mmu_invalidate_begin(struct kvm *kvm);
void kvm_mmu_invalidate_range_add(struct kvm *kvm, gfn_t start, gfn_t end);
void kvm_mmu_invalidate_end(struct kvm *kvm);

/* The stubs below name the MMU headers' own inlines: the tree's headers first. */
#include "mmu.h"
#include "mmu_internal.h"
#include "spte.h"

/* The shadow MMU: not in the engine (see above). */
#define KS_SHADOW_STUB(ret, name, ...) \
	static inline ret name(__VA_ARGS__) { ks_bug("shadow MMU: " #name "() is not in the engine", __FILE__, __LINE__); }
struct kvm_shadow_walk_iterator { u64 *sptep; };
KS_SHADOW_STUB(bool, __kvm_rmap_zap_gfn_range, struct kvm *kvm, const struct kvm_memory_slot *slot,
	       gfn_t start, gfn_t end, bool can_yield, bool flush)
KS_SHADOW_STUB(bool, kvm_mmu_prepare_zap_page, struct kvm *kvm, struct kvm_mmu_page *sp,
	       struct list_head *invalid_list)
KS_SHADOW_STUB(bool, __kvm_mmu_prepare_zap_page, struct kvm *kvm, struct kvm_mmu_page *sp,
	       struct list_head *invalid_list, int *nr_zapped)
KS_SHADOW_STUB(int, make_mmu_pages_available, struct kvm_vcpu *vcpu)
KS_SHADOW_STUB(hpa_t, mmu_alloc_root, struct kvm_vcpu *vcpu, gfn_t gfn, int quadrant, u8 level)
KS_SHADOW_STUB(int, mmu_alloc_shadow_roots, struct kvm_vcpu *vcpu)
KS_SHADOW_STUB(int, direct_page_fault, struct kvm_vcpu *vcpu, struct kvm_page_fault *fault)
KS_SHADOW_STUB(u64 *, fast_pf_get_last_sptep, struct kvm_vcpu *vcpu, gpa_t gpa, u64 *spte)
/* kvm_rmap_zap_gfn_range() begins with "if (!kvm_memslots_have_rmaps(kvm)) return false". */
static inline bool kvm_rmap_zap_gfn_range(struct kvm *kvm, gfn_t gfn_start, gfn_t gfn_end)
{
	if (!kvm_memslots_have_rmaps(kvm))
		return false;
	ks_bug("shadow MMU: kvm_rmap_zap_gfn_range() with rmaps", __FILE__, __LINE__);
}
KS_SHADOW_STUB(int, kvm_mmu_write_protect_fault, struct kvm_vcpu *vcpu, gpa_t cr2_or_gpa,
	       u64 error_code, int *emulation_type)
/* Reserved-bit (MMIO SPTE) faults: the engine creates no MMIO SPTEs
 * (kvm_handle_noslot_fault emulates), so the CPU never reports one. */
KS_SHADOW_STUB(int, handle_mmio_page_fault, struct kvm_vcpu *vcpu, u64 addr, bool direct)
/* for_each_gfn_valid_sp_with_gptes(): the shadow page hash, empty in a TDP-only VM
 * (kvm_mmu_zap_memslot_pages_and_flush returns before it: active_mmu_pages is empty). */
#define for_each_gfn_valid_sp_with_gptes(kvm, sp, gfn) for (sp = NULL; sp; )
/* x86_emulate_instruction(): the instruction emulator is not in the engine; the
 * access it would emulate (MMIO outside every memslot) completes. */
static inline int x86_emulate_instruction(struct kvm_vcpu *vcpu, gpa_t cr2_or_gpa,
					  int emulation_type, void *insn, int insn_len)
{
	return 1;
}
/* KVM_X86_QUIRK_SLOT_ZAP_ALL: on by default, as the kernel has it. */
#define KVM_X86_QUIRK_SLOT_ZAP_ALL (1 << 10)
extern u64 ks_disabled_quirks;
static inline bool kvm_check_has_quirk(struct kvm *kvm, u64 quirk)
{
	return !(ks_disabled_quirks & quirk);
}
/* A list that is empty in a TDP-only VM commits nothing. */
static inline void kvm_mmu_commit_zap_page(struct kvm *kvm, struct list_head *invalid_list)
{
	if (!list_empty(invalid_list))
		ks_bug("shadow MMU: kvm_mmu_commit_zap_page() with pages", __FILE__, __LINE__);
}
/* The special roots (pae_root, pml4_root) are for shadow paging only. */
static inline int mmu_alloc_special_roots(struct kvm_vcpu *vcpu) { return 0; }
static inline void vcpu_clear_mmio_info(struct kvm_vcpu *vcpu, gva_t gva) { }
static inline void ks_x86_flush_tlb_current(struct kvm_vcpu *vcpu);
static inline bool kvm_slot_can_be_private(const struct kvm_memory_slot *slot);

#endif /* _KSSTUBS_H */
