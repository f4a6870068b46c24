/* SPDX-License-Identifier: GPL-2.0 */
/*
 * ksglue.c: the rest of KVM around the tree's TDP MMU, and the engine's
 * entry points.  Compiled at the end of the kernel TU (ktu.c), after the
 * tree's tdp_iter.c, spte.c, tdp_mmu.c and the functions copied out of
 * mmu.c and kvm_main.c, so it sees their static functions.
 *
 * What is here is what the kernel does outside those files and the engine
 * must still do for the MMU code to run as it does in a VM: module setup
 * as vmx.c and mmu.c do it, struct kvm and vCPU creation as kvm_main.c and
 * x86.c do it, memslots with their lpage_info, the pfn a fault resolves to,
 * the vCPU's entry loop and the "hardware" walk of the EPT that decides
 * whether an access faults.  Each function names the kernel function it
 * stands for and says where it differs.  Tree followed: Debian's
 * linux-source-6.12 (6.12.117); the copied functions come from the tree
 * being built, so they follow whatever tree --ksrc names.
 *
 * Entry points (ke_*) run one operation of a worker with ks_bug_jmp set,
 * so a BUG() in kernel code ends the operation, not the process, and the
 * first violation is left in the arena for the harness.
 */
#include <stdio.h>
#include <stdlib.h>

#include "ksrt_arena.h"

/* ---- the vCPUs' TLBs ----------------------------------------------------- */
/*
 * Each vCPU caches translations as a CPU does: a leaf's gfn range, pfn and
 * rights, and the tables the walk went through (the paging-structure
 * caches).  A vCPU uses them until it flushes: at its next entry after a
 * KVM_REQ_TLB_FLUSH, or when it loads a root (flush_tlb_current).  The
 * translation is tagged with the root it came from.
 */
#define KE_TLB 64
struct ke_tlb_entry {
	u64 gfn;          /* first gfn of the leaf's range; valid if level != 0 */
	u64 pfn;
	u64 root;
	int32_t tables[PT64_ROOT_4LEVEL];  /* page index + 1 of each table walked, root first */
	u8 level, writable, dirty, exec;
	u32 pad;
};

struct ke_tlb {
	u64 entries;      /* kvm_vcpu_arch's guest entries: for the kicks' waits */
	u64 servicing;    /* between consuming requests and the root reload */
	u64 hits, misses, flushes;
	struct ke_tlb_entry e[KE_TLB];
};

/* ---- what vmx.c, x86.c and mmu.c set up at module load -------------- */
struct kvm_x86_ops kvm_x86_ops = { .cpu_dirty_log_size = 0 };
struct kvm_host_values kvm_host = { .maxphyaddr = 48 };
struct cpuinfo_x86 boot_cpu_data = { .extended_cpuid_level = 0x80000008, .x86_phys_bits = 48,
				     .x86_cache_bits = 48 };
bool tdp_enabled = true;
bool tdp_mmu_enabled = true;
int max_huge_page_level = PG_LEVEL_1G;
int nx_huge_pages = 0;
uint nx_huge_pages_recovery_ratio = 60;
/* mmu.c's kmem_cache for struct kvm_mmu_page: the arena's slab (one cache). */
struct kmem_cache *mmu_page_header_cache = (struct kmem_cache *)1;
u64 ks_disabled_quirks;
/* mmu.c's pte_list_desc_cache (rmap descriptors): the same slab. */
struct kmem_cache *pte_list_desc_cache = (struct kmem_cache *)2;

/* The pfns a fault resolves to: gfn + KE_PFN_BASE, 1 GiB aligned, so a
 * gfn and its pfn agree in every huge-page offset (kvm_mmu_hugepage_adjust
 * asserts it), and outside the arena, so pfn_valid() is false for them. */
#define KE_PFN_BASE (1ULL << 30)

/*
 * kernel.alias_tables: a deliberately impossible memory map, "guest memory
 * overtop a kernel-allocated SP" (c8e5a0d0e9bc): the first gfns of the guest,
 * ke_alias_n 2M regions of them, are backed by the frames of the page-table
 * pool from ke_alias_pfn on (2M aligned, so gfn and pfn still agree in their
 * 2M offsets).  The first frame of each region is kept out of the pool's
 * FIFO and taken only by that region's level-1 table (ke_alias_place), so
 * a 2M leaf that replaces the table maps the table's own PFN.
 */
static u64 ke_alias_pfn;
static u32 ke_alias_n;

/* The host page behind a gfn (its pfn), as the primary MMU maps it. */
static kvm_pfn_t ke_gfn_to_pfn(gfn_t gfn)
{
	if (ke_alias_n && gfn < (gfn_t)ke_alias_n * 512)
		return ke_alias_pfn + gfn;
	return KE_PFN_BASE + gfn;
}

/*
 * Hooked to trace_kvm_mmu_get_page(sp, created), the last step of
 * tdp_mmu_init_sp(): the table is initialised and not yet published (its
 * link's cmpxchg, or an eager split's fill, comes after), so its page may
 * still be exchanged.  A level-1 table of an aliased region moves to the
 * region's reserved frame when that frame is free.
 */
static void ke_alias_place(uintptr_t arg0)
{
	struct kvm_mmu_page *sp = (struct kvm_mmu_page *)arg0;
	unsigned long page;
	u64 *old = sp->spt;
	if (sp->role.level != PG_LEVEL_4K || sp->gfn >= (gfn_t)ke_alias_n * 512)
		return;
	page = ks_alias_claim((u32)(sp->gfn / 512));
	if (!page)
		return;
	memcpy((void *)page, old, PAGE_SIZE);
	sp->spt = (u64 *)page;
	set_page_private(virt_to_page(sp->spt), (unsigned long)sp);
	free_page((unsigned long)old);
}

int ke_alias_tables(u32 nregions)
{
	ke_alias_pfn = ks_arena_alias(nregions);
	if (!ke_alias_pfn)
		return -ENOSPC;
	ke_alias_n = nregions;
	return ks_tracepoint_attach("kvm_mmu_get_page", ke_alias_place);
}

u8 ks_x86_get_mt_mask(struct kvm_vcpu *vcpu, gfn_t gfn, bool is_mmio)
{
	/* vmx_get_mt_mask() for a VM without non-coherent DMA: write-back. */
	return is_mmio ? 0 : (6 << VMX_EPT_MT_EPTE_SHIFT);
}

void ks_x86_load_mmu_pgd(struct kvm_vcpu *vcpu, hpa_t root_hpa, int root_level)
{
	vcpu->arch.last_vmentry_cr3 = root_hpa;
}

unsigned long ks_x86_get_rflags(struct kvm_vcpu *vcpu) { return 0; }

static struct ke_tlb *ke_tlb_of(struct kvm_vcpu *vcpu);
static void ke_check_host_release(struct kvm *kvm, gfn_t start, gfn_t end);  /* ksoracle.c */

/* vmx_flush_tlb_current(): this vCPU's translations and paging-structure caches. */
static inline void ks_x86_flush_tlb_current(struct kvm_vcpu *vcpu)
{
	struct ke_tlb *t = ke_tlb_of(vcpu);
	for (int i = 0; i < KE_TLB; i++)
		__atomic_store_n(&t->e[i].level, 0, __ATOMIC_RELEASE);
	t->flushes++;
}

/* ---- kvm_main.c ----------------------------------------------------- */
struct kvm_memory_slot *__gfn_to_memslot(struct kvm_memslots *slots, gfn_t gfn)
{
	/* search_memslots(): the real one walks an rbtree; the answer is the same. */
	for (int i = 0; i < slots->nr_slots; i++) {
		struct kvm_memory_slot *s = READ_ONCE(slots->slots[i]);
		if (s && gfn >= s->base_gfn && gfn < s->base_gfn + s->npages)
			return s;
	}
	return NULL;
}

/* struct kvm with its vCPUs (kvm->vcpu_array is an xarray in the kernel). */
struct ke_vm {
	struct kvm kvm;
	struct kvm_vcpu *vcpus[KS_MAX_TASKS];
	struct ke_tlb *tlbs[KS_MAX_TASKS];
	struct kvm_memory_slot *deleted[KS_MAX_MEMSLOTS];  /* ke_memslot_delete's, to re-create */
	/* The host's THPs of a THP-backed slot: per 2M region, split into 4K pages or not. */
	u8 *thp_split[KS_MAX_MEMSLOTS];
};

static struct ke_tlb *ke_tlb_of(struct kvm_vcpu *vcpu)
{
	return container_of(vcpu->kvm, struct ke_vm, kvm)->tlbs[vcpu->vcpu_idx];
}

/*
 * kvm_make_all_cpus_request() of kvm_main.c: the request to every vCPU, then
 * the kick.  KVM_REQ_TLB_FLUSH and KVM_REQ_MMU_FREE_OBSOLETE_ROOTS are
 * KVM_REQUEST_WAIT: the IPI waits until each vCPU that was in guest mode has
 * left it; a vCPU outside guest mode sees the request before it next enters
 * (it sets IN_GUEST_MODE, then checks its requests: ke_vcpu_access).
 */
bool kvm_make_all_cpus_request(struct kvm *kvm, unsigned int req)
{
	struct ke_vm *vm = container_of(kvm, struct ke_vm, kvm);
	u64 seen[KS_MAX_TASKS];
	int n = kvm->created_vcpus;

	for (int i = 0; i < n; i++)
		kvm_make_request(req, vm->vcpus[i]);
	smp_mb();
	for (int i = 0; i < n; i++)
		seen[i] = __atomic_load_n(&vm->tlbs[i]->entries, __ATOMIC_ACQUIRE);
	for (int i = 0; i < n; i++) {
		uint64_t spins = 0;
		while (__atomic_load_n(&vm->vcpus[i]->mode, __ATOMIC_ACQUIRE) == IN_GUEST_MODE &&
		       __atomic_load_n(&vm->tlbs[i]->entries, __ATOMIC_ACQUIRE) == seen[i]) {
			if (ks_sched_hook || ++spins % 16 == 0)
				ks_cpu_relax();
			else
				__builtin_ia32_pause();
		}
	}
	return true;
}

void mark_page_dirty_in_slot(struct kvm *kvm, const struct kvm_memory_slot *memslot, gfn_t gfn)
{
	if (memslot && kvm_slot_dirty_track_enabled(memslot) && memslot->dirty_bitmap) {
		unsigned long rel = gfn - memslot->base_gfn;
		__atomic_fetch_or(&memslot->dirty_bitmap[rel / 64], 1UL << (rel % 64), __ATOMIC_SEQ_CST);
	}
}

/*
 * kvm_flush_remote_tlbs() of kvm_main.c (no arch hook: EPT without Hyper-V):
 * KVM_REQ_TLB_FLUSH to every vCPU, waiting for those in guest mode.
 */
void kvm_flush_remote_tlbs(struct kvm *kvm)
{
	++kvm->stat.remote_tlb_flush_requests;
	kvm_make_all_cpus_request(kvm, KVM_REQ_TLB_FLUSH);
	++kvm->stat.remote_tlb_flush;
}

void kvm_flush_remote_tlbs_range(struct kvm *kvm, gfn_t gfn, u64 nr_pages)
{
	kvm_flush_remote_tlbs(kvm);
}

void kvm_flush_remote_tlbs_memslot(struct kvm *kvm, const struct kvm_memory_slot *memslot)
{
	kvm_flush_remote_tlbs(kvm);
}

void kvm_set_pfn_dirty(kvm_pfn_t pfn) { }
void kvm_set_pfn_accessed(kvm_pfn_t pfn) { }
void kvm_release_pfn_clean(kvm_pfn_t pfn) { }

bool kvm_mem_is_private(struct kvm *kvm, gfn_t gfn)
{
	/* A default VM has no private memory (no KVM_MEMORY_ATTRIBUTE_PRIVATE). */
	return false;
}

static inline bool kvm_slot_can_be_private(const struct kvm_memory_slot *slot)
{
	return slot && (slot->flags & KVM_MEM_GUEST_MEMFD);
}

/* ---- the outer protocol of a page fault ------------------------------ */
/*
 * __kvm_faultin_pfn(): gup of the host page behind the gfn.  The engine's
 * "host" is ke_gfn_to_pfn(), always present, never async.
 */
int __kvm_faultin_pfn(struct kvm_vcpu *vcpu, struct kvm_page_fault *fault)
{
	if (fault->is_private)
		return -EFAULT;
	fault->pfn = ke_gfn_to_pfn(fault->gfn);
	fault->map_writable = !(fault->slot->flags & KVM_MEM_READONLY);
	fault->hva = fault->slot->userspace_addr + ((fault->gfn - fault->slot->base_gfn) << PAGE_SHIFT);
	return RET_PF_CONTINUE;
}

int kvm_handle_error_pfn(struct kvm_vcpu *vcpu, struct kvm_page_fault *fault)
{
	return -EFAULT;
}

int kvm_handle_noslot_fault(struct kvm_vcpu *vcpu, struct kvm_page_fault *fault, unsigned int access)
{
	/* An access outside every memslot is emulated MMIO; the engine's
	 * guests access only their memslots. */
	return RET_PF_EMULATE;
}

/*
 * mmu_try_to_unsync_pages(): may a gfn be mapped writable?  Not if it is
 * write-tracked (kvm_gfn_is_write_tracked) or shadowed by a shadow page
 * that must be unsynced.  A TDP-only VM has neither: no write tracking is
 * enabled and the shadow page hash is empty, so the answer is 0, as the
 * kernel's loop over an empty hash bucket gives.
 */
int mmu_try_to_unsync_pages(struct kvm *kvm, const struct kvm_memory_slot *slot,
			    gfn_t gfn, bool synchronizing, bool prefetch)
{
	return 0;
}

bool page_fault_handle_page_track(struct kvm_vcpu *vcpu, struct kvm_page_fault *fault)
{
	/* No write-tracked gfns: page tracking is for the shadow MMU and KVMGT. */
	return false;
}

/* The host mapping level of a memslot's backing: THP (2M) when the slot says so. */
static u8 ke_host_level[KS_MAX_MEMSLOTS];

/*
 * host_pfn_mapping_level() walks the host's page tables: a THP-backed slot's
 * 2M region maps at 2M unless the host split that THP (a 4K page of it was
 * invalidated: ke_notifier_invalidate), and then at 4K.
 */
int host_pfn_mapping_level(struct kvm *kvm, gfn_t gfn, const struct kvm_memory_slot *slot)
{
	struct ke_vm *vm = container_of(kvm, struct ke_vm, kvm);
	int level;
	if (slot->id < 0 || slot->id >= KS_MAX_MEMSLOTS || !ke_host_level[slot->id])
		return PG_LEVEL_4K;
	level = ke_host_level[slot->id];
	if (level > PG_LEVEL_4K && vm->thp_split[slot->id] &&
	    READ_ONCE(vm->thp_split[slot->id][gfn_to_index(gfn, slot->base_gfn, PG_LEVEL_2M)]))
		return PG_LEVEL_4K;
	return level;
}

/* kvm_mmu_topup_memory_cache() of kvm_main.c, from the arena's allocators. */
#define KE_NR_OBJS_PER_CACHE 40
int kvm_mmu_topup_memory_cache(struct kvm_mmu_memory_cache *mc, int min)
{
	if (!mc->objects) {
		mc->objects = ks_bump_alloc(sizeof(void *) * KE_NR_OBJS_PER_CACHE);
		mc->capacity = KE_NR_OBJS_PER_CACHE;
	}
	if (mc->nobjs >= min)
		return 0;
	while (mc->nobjs < mc->capacity) {
		void *obj;
		if (mc->kmem_cache) {
			obj = kmem_cache_zalloc(mc->kmem_cache, GFP_KERNEL_ACCOUNT);
		} else {
			obj = (void *)__get_free_page(GFP_KERNEL_ACCOUNT | mc->gfp_zero);
			if (obj && mc->init_value) {
				u64 *w = obj;
				for (int i = 0; i < 512; i++)
					w[i] = mc->init_value;
			}
		}
		if (!obj)
			return mc->nobjs >= min ? 0 : -ENOMEM;
		mc->objects[mc->nobjs++] = obj;
	}
	return 0;
}

void *ks_mmu_memory_cache_alloc(struct kvm_mmu_memory_cache *mc)
{
	if (WARN_ON_ONCE(!mc->nobjs))
		ks_bug("kvm_mmu_memory_cache_alloc() of an empty cache", __FILE__, __LINE__);
	return mc->objects[--mc->nobjs];
}

static void ke_free_memory_cache(struct kvm_mmu_memory_cache *mc)
{
	while (mc->nobjs) {
		void *obj = mc->objects[--mc->nobjs];
		if (mc->kmem_cache)
			kmem_cache_free(mc->kmem_cache, obj);
		else
			free_page(obj);
	}
}

/* kvm_mmu_sync_roots() returns at once for a direct MMU (root_role.direct). */
void kvm_mmu_sync_roots(struct kvm_vcpu *vcpu)
{
	if (!vcpu->arch.mmu->root_role.direct)
		ks_bug("shadow MMU: kvm_mmu_sync_roots()", __FILE__, __LINE__);
}

/* ---- creating the VM ------------------------------------------------- */
/*
 * What kvm_arch_init/vmx_hardware_setup/kvm_mmu_vendor_module_init do for
 * the MMU, in their order: reset the masks, set EPT's (A/D bits, execute-
 * only), and spte.c's module init.
 */
int ke_module_init(int ad_bits, int max_level, int nx, int slot_zap_all, int nx_ratio)
{
	/* a process runs VMs one after another (zoo, soak): none inherits the last one's map */
	ke_alias_n = 0;
	ke_alias_pfn = 0;
	ks_tracepoint_attach("kvm_mmu_get_page", NULL);
	nx_huge_pages_recovery_ratio = (uint)nx_ratio;
	ks_disabled_quirks = slot_zap_all ? 0 : KVM_X86_QUIRK_SLOT_ZAP_ALL;
	kvm_mmu_spte_module_init();
	kvm_mmu_reset_all_pte_masks();
	kvm_mmu_set_ept_masks(ad_bits, true);
	max_huge_page_level = max_level;
	nx_huge_pages = nx;
	return (int)sizeof(struct kvm_mmu_page);
}

struct kvm *ke_vm_create(void)
{
	struct ke_vm *vm = ks_bump_alloc(sizeof(*vm));
	struct kvm *kvm = &vm->kvm;

	rwlock_init(&kvm->mmu_lock);
	spin_lock_init(&kvm->mn_invalidate_lock);
	mutex_init(&kvm->slots_lock);
	refcount_set(&kvm->users_count, 1);
	for (int as = 0; as < KVM_MAX_NR_ADDRESS_SPACES; as++)
		kvm->memslots[as] = &kvm->__memslots[as][0];
	/* kvm_mmu_init_vm() */
	INIT_LIST_HEAD(&kvm->arch.active_mmu_pages);
	INIT_LIST_HEAD(&kvm->arch.zapped_obsolete_pages);
	INIT_LIST_HEAD(&kvm->arch.possible_nx_huge_pages);
	kvm_mmu_init_tdp_mmu(kvm);
	kvm->mmu_invalidate_range_start = INVALID_GPA;
	kvm->mmu_invalidate_range_end = INVALID_GPA;
	ks_arena->vm = kvm;
	return kvm;
}

/*
 * kvm_alloc_memslot_metadata() of x86.c: lpage_info per huge level, the head
 * and tail of a slot that is not aligned to the level disallowed.
 */
static void ke_alloc_memslot_metadata(struct kvm_memory_slot *slot)
{
	for (int level = PG_LEVEL_2M; level <= KVM_MAX_HUGEPAGE_LEVEL; level++) {
		unsigned long lpages = gfn_to_index(slot->base_gfn + slot->npages - 1,
						    slot->base_gfn, level) + 1;
		struct kvm_lpage_info *linfo = ks_bump_alloc(lpages * sizeof(*linfo));
		slot->arch.lpage_info[level - 2] = linfo;
		if (slot->base_gfn & (KVM_PAGES_PER_HPAGE(level) - 1))
			linfo[0].disallow_lpage = 1;
		if ((slot->base_gfn + slot->npages) & (KVM_PAGES_PER_HPAGE(level) - 1))
			linfo[lpages - 1].disallow_lpage = 1;
	}
}

/* kvm_set_memory_region() for a new slot. */
int ke_memslot_add(struct kvm *kvm, int id, u64 base_gfn, u64 npages, u32 flags, int host_level)
{
	struct kvm_memslots *slots = kvm->memslots[0];
	struct kvm_memory_slot *slot;

	if (slots->nr_slots >= KS_MAX_MEMSLOTS || id < 0 || id >= KS_MAX_MEMSLOTS)
		return -ENOSPC;
	slot = ks_bump_alloc(sizeof(*slot));
	slot->base_gfn = base_gfn;
	slot->npages = npages;
	slot->flags = flags;
	slot->id = (short)id;
	slot->as_id = 0;
	slot->userspace_addr = 0x7f0000000000UL + (base_gfn << PAGE_SHIFT);
	slot->dirty_bitmap = ks_bump_alloc(((npages + 63) / 64) * 8);
	ke_alloc_memslot_metadata(slot);
	ke_host_level[id] = (u8)host_level;
	if (host_level > PG_LEVEL_4K)
		container_of(kvm, struct ke_vm, kvm)->thp_split[id] =
			ks_bump_alloc(gfn_to_index(base_gfn + npages - 1, base_gfn, PG_LEVEL_2M) + 1);
	slots->slots[slots->nr_slots] = slot;
	WRITE_ONCE(slots->nr_slots, slots->nr_slots + 1);
	if (flags & KVM_MEM_LOG_DIRTY_PAGES)
		atomic_inc(&kvm->nr_memslots_dirty_logging);
	return 0;
}

/*
 * kvm_vm_ioctl_create_vcpu() -> kvm_arch_vcpu_create() -> kvm_mmu_create(),
 * then kvm_init_mmu() -> init_kvm_tdp_mmu() for a vCPU in 64-bit mode: the
 * root role of kvm_calc_tdp_mmu_root_page_role() (4-level EPT, direct,
 * ACC_ALL, A/D as the masks say) and kvm_tdp_page_fault as page_fault.
 */
struct kvm_vcpu *ke_vcpu_create(struct kvm *kvm, int id)
{
	struct ke_vm *vm = container_of(kvm, struct ke_vm, kvm);
	struct kvm_vcpu *vcpu = ks_bump_alloc(sizeof(*vcpu));
	struct kvm_mmu *mmu = &vcpu->arch.root_mmu;

	vcpu->kvm = kvm;
	vcpu->vcpu_id = id;
	vcpu->vcpu_idx = kvm->created_vcpus;
	vcpu->arch.mmu = mmu;
	vcpu->arch.walk_mmu = mmu;
	vcpu->arch.mmu_page_header_cache.kmem_cache = mmu_page_header_cache;
	vcpu->arch.mmu_page_header_cache.gfp_zero = __GFP_ZERO;
	vcpu->arch.mmu_pte_list_desc_cache.kmem_cache = pte_list_desc_cache;
	vcpu->arch.mmu_pte_list_desc_cache.gfp_zero = __GFP_ZERO;
	vcpu->arch.mmu_shadow_page_cache.init_value = SHADOW_NONPRESENT_VALUE;
	if (!vcpu->arch.mmu_shadow_page_cache.init_value)
		vcpu->arch.mmu_shadow_page_cache.gfp_zero = __GFP_ZERO;
	for (int i = 0; i < 3; i++) {
		struct kvm_mmu *m = i == 0 ? &vcpu->arch.root_mmu : i == 1 ? &vcpu->arch.guest_mmu :
				    &vcpu->arch.nested_mmu;
		m->root.hpa = INVALID_PAGE;
		m->root.pgd = INVALID_PAGE;
		for (int j = 0; j < KVM_MMU_NUM_PREV_ROOTS; j++)
			m->prev_roots[j] = KVM_MMU_ROOT_INFO_INVALID;
	}
	mmu->root_role.word = 0;
	mmu->root_role.level = PT64_ROOT_4LEVEL;
	mmu->root_role.direct = 1;
	mmu->root_role.access = ACC_ALL;
	mmu->root_role.cr0_wp = 1;
	mmu->root_role.efer_nx = 1;
	mmu->root_role.ad_disabled = !kvm_ad_enabled();
	mmu->page_fault = kvm_tdp_page_fault;
	vcpu->arch.guest_mmu.root_role.direct = 0;
	vm->tlbs[kvm->created_vcpus] = ks_bump_alloc(sizeof(struct ke_tlb));
	vm->vcpus[kvm->created_vcpus] = vcpu;
	kvm->created_vcpus++;
	kvm->online_vcpus++;
	return vcpu;
}

/* ---- operations ------------------------------------------------------ */
enum ke_op {
	KE_OP_NONE,
	KE_OP_GUEST_ACCESS,      /* vCPU: guest access, EPT violation, kvm_mmu_page_fault */
	KE_OP_ZAP_GFN_RANGE,     /* kvm_zap_gfn_range(): write lock */
	KE_OP_UNMAP,             /* mmu_notifier invalidate_range_start/end: kvm_unmap_gfn_range */
	KE_OP_ZAP_ALL_FAST,      /* kvm_mmu_zap_all_fast(): invalidate roots, zap them under read lock */
	KE_OP_WRPROT_SLOT,       /* kvm_mmu_slot_remove_write_access(): read lock */
	KE_OP_CLEAR_DIRTY_SLOT,  /* kvm_tdp_mmu_clear_dirty_slot(): read lock */
	KE_OP_SPLIT,             /* kvm_mmu_slot_try_split_huge_pages(): eager split, read lock */
	KE_OP_COLLAPSIBLE,       /* kvm_mmu_zap_collapsible_sptes(): read lock */
	KE_OP_AGE,               /* mmu_notifier clear_young: kvm_age_gfn */
	KE_OP_TEST_AGE,          /* mmu_notifier test_young: kvm_test_age_gfn */
	KE_OP_DIRTY_LOG,         /* KVM_GET_DIRTY_LOG: kvm_tdp_mmu_clear_dirty_pt_masked */
	KE_OP_NX_RECOVER,        /* kvm_nx_huge_page_recovery_worker: kvm_recover_nx_huge_pages */
	KE_OP_VCPU_UNLOAD,       /* kvm_mmu_unload(): put the vCPU's roots */
	KE_OP_SLOT_FLAGS,        /* kvm_set_memslot(KVM_MR_FLAGS_ONLY): dirty logging on/off */
	KE_OP_SLOT_DELETE,       /* kvm_set_memslot(KVM_MR_DELETE) */
	KE_OP_SLOT_CREATE,       /* kvm_set_memslot(KVM_MR_CREATE) */
	KE_OP_NR,
};

#define KE_RUN(opcode, body) ({                                                \
	sigjmp_buf __jb;                                                       \
	struct ks_task *__t = &ks_arena->tasks[ks_self];                       \
	int __r = 0;                                                           \
	__t->op = (opcode);                                                    \
	if (ks_arena->trace_on)                                                \
		ks_trace_event(__t, KS_EV_OP_BEGIN, NULL, 0, 0, 0);            \
	ks_bug_jmp = &__jb;                                                    \
	if (sigsetjmp(__jb, 1) == 0) {                                         \
		body;                                                          \
	} else {                                                               \
		__r = -1000;                                                   \
	}                                                                      \
	ks_bug_jmp = NULL;                                                     \
	if (ks_arena->trace_on)                                                \
		ks_trace_event(__t, KS_EV_OP_END, NULL, 0, (u64)(s64)__r, 0);   \
	__t->op = KE_OP_NONE;                                                  \
	__t->ops[(opcode)]++;                                                  \
	if (__r != -1000 && !__t->rcu_nesting && !__t->srcu_nesting)           \
		ks_rcu_poll();                                                 \
	__r; })

/*
 * The CPU's side of an access by a vCPU in guest mode.  First its TLB: a
 * translation that allows the access is used as it is (a write needs the
 * cached D bit: without it the CPU walks to set it).  Otherwise the walk: the
 * EPT from the vCPU's loaded root, one load per level, the A and D bits set
 * with a cmpxchg, as the CPU's walker does; the translation and the tables
 * walked go into the TLB.  The walker is no RCU reader, as a CPU is none: it
 * is kept off freed tables by the TLB flush, whose IPI waits for it to leave
 * guest mode, before the tables' RCU grace period can end.
 * Returns 1 if the access completes, 0 with *err set on an EPT violation.
 */
static inline int ke_tlb_slot(u64 gfn, int level)
{
	return (int)(((gfn >> ((level - 1) * 9)) * 0x9E3779B1u + (u64)level * 7) % KE_TLB);
}

static int ke_hw_access(struct kvm_vcpu *vcpu, gpa_t gpa, bool write, bool exec, u64 *err)
{
	struct ke_tlb *tlb = ke_tlb_of(vcpu);
	hpa_t root = vcpu->arch.mmu->root.hpa;
	u64 *table = __va(root);
	u64 spte = 0, gfn = gpa >> PAGE_SHIFT;
	int level = vcpu->arch.mmu->root_role.level, depth = 0;
	int32_t tables[PT64_ROOT_4LEVEL] = { 0 };
	u64 need = write ? PT_WRITABLE_MASK : exec ? shadow_x_mask : VMX_EPT_READABLE_MASK;

	for (int l = PG_LEVEL_4K; l <= PG_LEVEL_1G; l++) {
		struct ke_tlb_entry *e = &tlb->e[ke_tlb_slot(gfn, l)];
		if (__atomic_load_n(&e->level, __ATOMIC_ACQUIRE) == l && e->root == root &&
		    gfn - e->gfn < KVM_PAGES_PER_HPAGE(l) &&
		    (write ? e->writable && e->dirty : exec ? e->exec : 1)) {
			tlb->hits++;
			return 1;
		}
	}
	tlb->misses++;
	*err = (write ? PFERR_WRITE_MASK : 0) | (exec ? PFERR_FETCH_MASK : 0) | PFERR_GUEST_FINAL_MASK;
	for (;;) {
		u64 *sptep = &table[SPTE_INDEX(gpa, level)];
		int pi = ks_page_index(table);
		if (depth < PT64_ROOT_4LEVEL)
			tables[depth++] = pi + 1;
		spte = READ_ONCE(*sptep);
		if (!is_shadow_present_pte(spte) || is_frozen_spte(spte))
			break;
		if (is_last_spte(spte, level)) {
			u64 ad;
			struct ke_tlb_entry *e;
			if ((spte & need) != need)
				break;
			ad = shadow_accessed_mask | (write ? shadow_dirty_mask : 0);
			if (ad && (spte & ad) != ad) {
				u64 old = spte;
				/* The walker's locked OR of A/D: a cmpxchg on the entry. */
				while (!try_cmpxchg64(sptep, &old, old | ad))
					if (!is_shadow_present_pte(old) || is_frozen_spte(old) ||
					    !is_last_spte(old, level) || (old & need) != need)
						goto fault;
				spte = old | ad;
			}
			e = &tlb->e[ke_tlb_slot(gfn, level)];
			__atomic_store_n(&e->level, 0, __ATOMIC_RELAXED);
			e->gfn = gfn & ~(KVM_PAGES_PER_HPAGE(level) - 1);
			e->pfn = spte_to_pfn(spte);
			e->root = root;
			memcpy(e->tables, tables, sizeof(tables));
			e->writable = !!(spte & PT_WRITABLE_MASK);
			e->dirty = !shadow_dirty_mask || !!(spte & shadow_dirty_mask);
			e->exec = !!(spte & shadow_x_mask);
			__atomic_store_n(&e->level, (u8)level, __ATOMIC_RELEASE);
			return 1;
		}
		table = __va(spte_to_pfn(spte) << PAGE_SHIFT);
		level--;
	}
fault:
	/* EPT_VIOLATION_RWX_MASK: the entry granted some access. */
	if (is_shadow_present_pte(spte) && !is_frozen_spte(spte) && (spte & VMX_EPT_RWX_MASK))
		*err |= PFERR_PRESENT_MASK;
	return 0;
}

/*
 * vcpu_enter_guest() for one guest instruction: the requests an entry
 * services (KVM_REQ_MMU_FREE_OBSOLETE_ROOTS, KVM_REQ_TLB_FLUSH), the root
 * reload, then IN_GUEST_MODE and the requests checked once more (a kick
 * that came in between backs the entry out), the access, and the exit; an
 * EPT violation is handle_ept_violation()'s kvm_mmu_page_fault() (mmu.c's,
 * copied), under kvm->srcu, and the instruction is retried.  Returns how
 * many EPT violations the access took (max_entries: it never completed).
 */
static int ke_vcpu_access(struct kvm_vcpu *vcpu, gpa_t gpa, bool write, bool exec, int max_entries)
{
	struct ke_tlb *tlb = ke_tlb_of(vcpu);
	for (int n = 0; n < max_entries; n++) {
		u64 err = 0;
		int r, ok, idx = srcu_read_lock(&vcpu->kvm->srcu);
		/* While it services requests the vCPU is "reloading" for the oracles:
		 * a request consumed but not acted on yet still counts as pending. */
		bool svc = __atomic_load_n(&vcpu->requests, __ATOMIC_ACQUIRE) != 0;
		if (svc)
			__atomic_store_n(&tlb->servicing, 1, __ATOMIC_SEQ_CST);
		if (kvm_check_request(KVM_REQ_MMU_FREE_OBSOLETE_ROOTS, vcpu))
			kvm_mmu_free_obsolete_roots(vcpu);
		if (kvm_check_request(KVM_REQ_TLB_FLUSH, vcpu))
			ks_x86_flush_tlb_current(vcpu);  /* kvm_vcpu_flush_tlb_all() */
		r = kvm_mmu_reload(vcpu);
		if (svc)
			__atomic_store_n(&tlb->servicing, 0, __ATOMIC_RELEASE);
		srcu_read_unlock(&vcpu->kvm->srcu, idx);
		if (r)
			return r;
		__atomic_store_n(&vcpu->mode, IN_GUEST_MODE, __ATOMIC_SEQ_CST);
		if (__atomic_load_n(&vcpu->requests, __ATOMIC_SEQ_CST)) {
			__atomic_store_n(&vcpu->mode, OUTSIDE_GUEST_MODE, __ATOMIC_RELEASE);
			n--;
			continue;
		}
		ok = ke_hw_access(vcpu, gpa, write, exec, &err);
		__atomic_fetch_add(&tlb->entries, 1, __ATOMIC_RELEASE);
		__atomic_store_n(&vcpu->mode, OUTSIDE_GUEST_MODE, __ATOMIC_RELEASE);
		if (ok)
			return n;
		idx = srcu_read_lock(&vcpu->kvm->srcu);
		r = kvm_mmu_page_fault(vcpu, gpa, err, NULL, 0);
		srcu_read_unlock(&vcpu->kvm->srcu, idx);
		if (r <= 0)
			return r;
		/* xfer_to_guest_mode_work: the vCPU thread may be rescheduled. */
		if (need_resched())
			cond_resched();
	}
	return max_entries;
}

int ke_guest_access(struct kvm_vcpu *vcpu, u64 gpa, int write, int exec)
{
	return KE_RUN(KE_OP_GUEST_ACCESS, __r = ke_vcpu_access(vcpu, gpa, write, exec, 64));
}

int ke_zap_gfn_range(struct kvm *kvm, u64 start, u64 end)
{
	return KE_RUN(KE_OP_ZAP_GFN_RANGE, kvm_zap_gfn_range(kvm, start, end));
}

/*
 * kvm_mmu_notifier_invalidate_range_start() and _end() of kvm_main.c for a
 * gfn range of every slot it touches: mn_active_invalidate_count, then
 * under KVM_MMU_LOCK (the write lock on x86) kvm_mmu_invalidate_begin(),
 * kvm_mmu_invalidate_range_add() and kvm_unmap_gfn_range() per slot, the
 * flush, and at _end kvm_mmu_invalidate_end().
 */
/*
 * kvm_handle_hva_range()'s walk of the memslots: slot i's part of [start,
 * end) as a kvm_gfn_range, or false if it has none (or was deleted).
 */
static bool ke_slot_range(struct kvm_memslots *slots, int i, gfn_t start, gfn_t end,
			  bool may_block, struct kvm_gfn_range *range)
{
	struct kvm_memory_slot *slot = READ_ONCE(slots->slots[i]);
	if (!slot)
		return false;
	*range = (struct kvm_gfn_range){
		.slot = slot,
		.start = max(start, slot->base_gfn),
		.end = min(end, slot->base_gfn + slot->npages),
		.may_block = may_block,
		.attr_filter = KVM_FILTER_SHARED,
	};
	return range->start < range->end;
}

/*
 * The host's side of an invalidation of a THP-backed range: a range that
 * covers part of a 2M THP is a split first (__split_huge_pmd invalidates the
 * whole 2M: the range widens to it), after which that region maps at 4K; a
 * range that covers whole 2M regions replaces them with new THPs (migration,
 * khugepaged), which map at 2M again.  Returns the (widened) range; the new
 * state is applied by ke_thp_apply between invalidate_range_start and end.
 */
/* The part of [start, end) in memslot i of slots, if that slot is THP-backed. */
static bool ke_thp_slot(struct kvm *kvm, struct kvm_memslots *slots, int i, gfn_t start,
			gfn_t end, struct kvm_gfn_range *r)
{
	struct ke_vm *vm = container_of(kvm, struct ke_vm, kvm);
	return ke_slot_range(slots, i, start, end, true, r) && vm->thp_split[r->slot->id];
}

static void ke_thp_range(struct kvm *kvm, gfn_t *start, gfn_t *end)
{
	struct ke_vm *vm = container_of(kvm, struct ke_vm, kvm);
	struct kvm_memslots *slots = kvm_memslots(kvm);
	for (int i = 0; i < slots->nr_slots; i++) {
		struct kvm_gfn_range r;
		struct kvm_memory_slot *slot;
		gfn_t s, e;
		if (!ke_thp_slot(kvm, slots, i, *start, *end, &r))
			continue;
		slot = r.slot, s = r.start, e = r.end;
		if ((s & 511) && !READ_ONCE(vm->thp_split[slot->id][gfn_to_index(s, slot->base_gfn, PG_LEVEL_2M)]))
			*start = min(*start, max(s & ~511ULL, slot->base_gfn));
		if ((e & 511) && !READ_ONCE(vm->thp_split[slot->id][gfn_to_index(e - 1, slot->base_gfn, PG_LEVEL_2M)]))
			*end = max(*end, min((e + 511) & ~511ULL, slot->base_gfn + slot->npages));
	}
}

static void ke_thp_apply(struct kvm *kvm, gfn_t start, gfn_t end)
{
	struct ke_vm *vm = container_of(kvm, struct ke_vm, kvm);
	struct kvm_memslots *slots = kvm_memslots(kvm);
	for (int i = 0; i < slots->nr_slots; i++) {
		struct kvm_gfn_range r;
		struct kvm_memory_slot *slot;
		gfn_t s, e;
		if (!ke_thp_slot(kvm, slots, i, start, end, &r))
			continue;
		slot = r.slot, s = r.start, e = r.end;
		for (gfn_t g = s & ~511ULL; g < e; g += 512) {
			bool whole = g >= s && g + 512 <= e;
			if (g < slot->base_gfn)
				continue;
			WRITE_ONCE(vm->thp_split[slot->id][gfn_to_index(g, slot->base_gfn, PG_LEVEL_2M)],
				   whole ? 0 : 1);
		}
	}
}

static void ke_notifier_invalidate(struct kvm *kvm, gfn_t start, gfn_t end)
{
	struct kvm_memslots *slots = kvm_memslots(kvm);
	bool flush = false, locked = false;
	gfn_t split_start = start, split_end = end;
	int idx;

	ke_thp_range(kvm, &start, &end);
	spin_lock(&kvm->mn_invalidate_lock);
	kvm->mn_active_invalidate_count++;
	spin_unlock(&kvm->mn_invalidate_lock);

	idx = srcu_read_lock(&kvm->srcu);
	for (int i = 0; i < slots->nr_slots; i++) {
		struct kvm_gfn_range range;
		if (!ke_slot_range(slots, i, start, end, true, &range))
			continue;
		if (!locked) {
			locked = true;
			write_lock(&kvm->mmu_lock);
			kvm_mmu_invalidate_begin(kvm);
		}
		kvm_mmu_invalidate_range_add(kvm, range.start, range.end);
		flush |= kvm_unmap_gfn_range(kvm, &range);
	}
	if (flush)
		kvm_flush_remote_tlbs(kvm);
	if (locked)
		write_unlock(&kvm->mmu_lock);
	srcu_read_unlock(&kvm->srcu, idx);

	/* The host's page tables change here, between start and end: the old
	 * pages are released (a split THP's are remapped as 4K pages). */
	ke_check_host_release(kvm, start, end);
	ke_thp_apply(kvm, split_start, split_end);
	if (need_resched())
		cond_resched();

	/* invalidate_range_end */
	if (locked) {
		write_lock(&kvm->mmu_lock);
		kvm_mmu_invalidate_end(kvm);
		write_unlock(&kvm->mmu_lock);
	}
	spin_lock(&kvm->mn_invalidate_lock);
	kvm->mn_active_invalidate_count--;
	spin_unlock(&kvm->mn_invalidate_lock);
}

int ke_unmap(struct kvm *kvm, u64 start, u64 end)
{
	return KE_RUN(KE_OP_UNMAP, ke_notifier_invalidate(kvm, start, end));
}

int ke_zap_all_fast(struct kvm *kvm)
{
	/* kvm_mmu_zap_all_fast() is called with slots_lock held (memslot
	 * deletion, kvm_mmu_invalidate_mmio_sptes, KVM_X86_QUIRK changes). */
	return KE_RUN(KE_OP_ZAP_ALL_FAST, ({
		mutex_lock(&kvm->slots_lock);
		kvm_mmu_zap_all_fast(kvm);
		mutex_unlock(&kvm->slots_lock);
	}));
}

static struct kvm_memory_slot *ke_slot(struct kvm *kvm, int i)
{
	struct kvm_memslots *slots = kvm_memslots(kvm);
	return i >= 0 && i < slots->nr_slots ? READ_ONCE(slots->slots[i]) : NULL;
}

/*
 * The memslot ioctls that run these MMU paths hold slots_lock (kvm_set_memslot,
 * KVM_GET/CLEAR_DIRTY_LOG), which keeps the slot from being deleted under them:
 * each op takes it, then looks the slot up; a slot deleted meanwhile is -ENOENT.
 */
#define KE_SLOT_OP(opcode, kvm, i, slot, body) ({                               \
	int __ret = KE_RUN(opcode, ({                                          \
		mutex_lock(&(kvm)->slots_lock);                                \
		struct kvm_memory_slot *slot = ke_slot(kvm, i);                \
		if (slot) {                                                    \
			body;                                                  \
		} else {                                                       \
			__r = -ENOENT;                                         \
		}                                                              \
		mutex_unlock(&(kvm)->slots_lock);                              \
	}));                                                                   \
	__ret; })

/* kvm_mmu_slot_remove_write_access(): the TDP MMU part, under the read lock. */
int ke_wrprot_slot(struct kvm *kvm, int i)
{
	return KE_SLOT_OP(KE_OP_WRPROT_SLOT, kvm, i, slot, ({
		bool flush;
		read_lock(&kvm->mmu_lock);
		flush = kvm_tdp_mmu_wrprot_slot(kvm, slot, PG_LEVEL_4K);
		read_unlock(&kvm->mmu_lock);
		if (flush)
			kvm_flush_remote_tlbs_memslot(kvm, slot);
	}));
}

/* kvm_mmu_slot_leaf_clear_dirty() (PML's path), under the read lock. */
int ke_clear_dirty_slot(struct kvm *kvm, int i)
{
	return KE_SLOT_OP(KE_OP_CLEAR_DIRTY_SLOT, kvm, i, slot, ({
		bool flush;
		read_lock(&kvm->mmu_lock);
		flush = kvm_tdp_mmu_clear_dirty_slot(kvm, slot);
		read_unlock(&kvm->mmu_lock);
		if (flush)
			kvm_flush_remote_tlbs_memslot(kvm, slot);
	}));
}

/* kvm_mmu_slot_try_split_huge_pages(): eager split, under the read lock. */
int ke_split(struct kvm *kvm, int i, int target_level)
{
	return KE_SLOT_OP(KE_OP_SPLIT, kvm, i, slot, ({
		read_lock(&kvm->mmu_lock);
		kvm_tdp_mmu_try_split_huge_pages(kvm, slot, slot->base_gfn,
						 slot->base_gfn + slot->npages, target_level, true);
		read_unlock(&kvm->mmu_lock);
	}));
}

/* kvm_mmu_zap_collapsible_sptes(): the TDP MMU part, under the read lock. */
int ke_zap_collapsible(struct kvm *kvm, int i)
{
	return KE_SLOT_OP(KE_OP_COLLAPSIBLE, kvm, i, slot, ({
		read_lock(&kvm->mmu_lock);
		kvm_tdp_mmu_zap_collapsible_sptes(kvm, slot);
		read_unlock(&kvm->mmu_lock);
	}));
}

/*
 * kvm_mmu_notifier_clear_young()/test_young() -> kvm_age_gfn() and
 * kvm_test_age_gfn() of mmu.c for the TDP MMU, under KVM_MMU_LOCK.
 */
static int ke_age_range(struct kvm *kvm, gfn_t start, gfn_t end, bool test)
{
	struct kvm_memslots *slots = kvm_memslots(kvm);
	bool young = false;
	write_lock(&kvm->mmu_lock);
	for (int i = 0; i < slots->nr_slots; i++) {
		struct kvm_gfn_range range;
		if (!ke_slot_range(slots, i, start, end, false, &range))
			continue;
		young |= test ? kvm_tdp_mmu_test_age_gfn(kvm, &range) :
				kvm_tdp_mmu_age_gfn_range(kvm, &range);
	}
	write_unlock(&kvm->mmu_lock);
	return young;
}

int ke_age(struct kvm *kvm, u64 start, u64 end)
{
	return KE_RUN(KE_OP_AGE, __r = ke_age_range(kvm, start, end, false));
}

int ke_test_age(struct kvm *kvm, u64 start, u64 end)
{
	return KE_RUN(KE_OP_TEST_AGE, __r = ke_age_range(kvm, start, end, true));
}

/*
 * KVM_GET_DIRTY_LOG (kvm_get_dirty_log_protect()): under slots_lock, take
 * each word of the slot's dirty bitmap and re-protect those pages:
 * kvm_arch_mmu_enable_log_dirty_pt_masked() -> kvm_mmu_write_protect_pt_masked()
 * (no PML) -> kvm_tdp_mmu_clear_dirty_pt_masked(wrprot), under KVM_MMU_LOCK,
 * then the flush.  Returns the number of dirty pages collected.
 */
int ke_dirty_log(struct kvm *kvm, int i)
{
	return KE_SLOT_OP(KE_OP_DIRTY_LOG, kvm, i, slot, ({
		bool flush = false;
		unsigned long words = (slot->npages + 63) / 64;
		write_lock(&kvm->mmu_lock);
		for (unsigned long w = 0; w < words; w++) {
			unsigned long mask = __atomic_exchange_n(&slot->dirty_bitmap[w], 0, __ATOMIC_SEQ_CST);
			if (!mask)
				continue;
			__r += __builtin_popcountl(mask);
			flush = true;
			kvm_tdp_mmu_clear_dirty_pt_masked(kvm, slot, slot->base_gfn + w * 64, mask,
							  !kvm_x86_ops.cpu_dirty_log_size);
		}
		write_unlock(&kvm->mmu_lock);
		if (flush)
			kvm_flush_remote_tlbs_memslot(kvm, slot);
	}));
}

int ke_nx_recover(struct kvm *kvm)
{
	return KE_RUN(KE_OP_NX_RECOVER, kvm_recover_nx_huge_pages(kvm));
}

int ke_vcpu_unload(struct kvm_vcpu *vcpu)
{
	return KE_RUN(KE_OP_VCPU_UNLOAD, kvm_mmu_unload(vcpu));
}

/*
 * kvm_destroy_vm() for the MMU: every vCPU puts its roots
 * (kvm_arch_destroy_vm -> kvm_mmu_unload), users_count is 0, then
 * kvm_mmu_uninit_vm() -> kvm_mmu_uninit_tdp_mmu(), which zaps every root
 * and waits for the RCU callbacks (rcu_barrier), and the vCPUs' memory
 * caches go back (mmu_free_memory_caches).
 */
int ke_vm_destroy(struct kvm *kvm)
{
	struct ke_vm *vm = container_of(kvm, struct ke_vm, kvm);
	return KE_RUN(KE_OP_NONE, ({
		for (int i = 0; i < kvm->created_vcpus; i++)
			kvm_mmu_unload(vm->vcpus[i]);
		refcount_set(&kvm->users_count, 0);
		kvm_mmu_uninit_tdp_mmu(kvm);
		for (int i = 0; i < kvm->created_vcpus; i++) {
			struct kvm_vcpu *v = vm->vcpus[i];
			ke_free_memory_cache(&v->arch.mmu_shadow_page_cache);
			ke_free_memory_cache(&v->arch.mmu_page_header_cache);
			ke_free_memory_cache(&v->arch.mmu_pte_list_desc_cache);
			ke_free_memory_cache(&v->arch.mmu_shadowed_info_cache);
		}
		ke_free_memory_cache(&kvm->arch.split_shadow_page_cache);
		ke_free_memory_cache(&kvm->arch.split_page_header_cache);
	}));
}

struct kvm_vcpu *ke_vcpu(struct kvm *kvm, int i)
{
	struct ke_vm *vm = container_of(kvm, struct ke_vm, kvm);
	return i >= 0 && i < kvm->created_vcpus ? vm->vcpus[i] : NULL;
}

const char *ke_tree_version(void) { return KS_TREE_VERSION; }

/* A vCPU's kvm_vcpu_stat, for results.json (pf_fast is counted by fast_page_fault). */
u64 ke_vcpu_stat(struct kvm_vcpu *vcpu, const char *name)
{
	if (!strcmp(name, "pf_fast")) return vcpu->stat.pf_fast;
	if (!strcmp(name, "pf_fixed")) return vcpu->stat.pf_fixed;
	if (!strcmp(name, "pf_spurious")) return vcpu->stat.pf_spurious;
	if (!strcmp(name, "pf_taken")) return vcpu->stat.pf_taken;
	if (!strcmp(name, "pf_emulate")) return vcpu->stat.pf_emulate;
	if (!strcmp(name, "pf_mmio_spte_created")) return vcpu->stat.pf_mmio_spte_created;
	if (!strcmp(name, "tlb_hits")) return ke_tlb_of(vcpu)->hits;
	if (!strcmp(name, "tlb_misses")) return ke_tlb_of(vcpu)->misses;
	if (!strcmp(name, "tlb_flushes")) return ke_tlb_of(vcpu)->flushes;
	return 0;
}

/*
 * kvm_set_memslot(KVM_MR_FLAGS_ONLY) toggling KVM_MEM_LOG_DIRTY_PAGES: under
 * slots_lock, a copy of the slot with the new flags replaces the old one in
 * the memslots (kvm_swap_active_memslots), synchronize_srcu() waits out the
 * vCPUs that may still use the old one, then kvm_arch_commit_memory_region()
 * -> kvm_mmu_slot_apply_flags(): enabling write-protects the slot and splits
 * its huge pages eagerly; disabling zaps the collapsible SPTEs so faults map
 * huge pages again.  The old slot is not freed (the engine's bump memory).
 */
int ke_slot_dirty_logging(struct kvm *kvm, int i, int enable)
{
	return KE_SLOT_OP(KE_OP_SLOT_FLAGS, kvm, i, old, ({
		struct kvm_memory_slot *new;
		if (!!(old->flags & KVM_MEM_LOG_DIRTY_PAGES) != !!enable) {
			new = ks_bump_alloc(sizeof(*new));
			*new = *old;
			new->flags = enable ? (old->flags | KVM_MEM_LOG_DIRTY_PAGES) :
					      (old->flags & ~KVM_MEM_LOG_DIRTY_PAGES);
			if (enable)
				atomic_inc(&kvm->nr_memslots_dirty_logging);
			else
				atomic_dec(&kvm->nr_memslots_dirty_logging);
			rcu_assign_pointer(kvm_memslots(kvm)->slots[i], new);
			synchronize_srcu(&kvm->srcu);
			if (enable) {
				ks_arena->tasks[ks_self].ops[KE_OP_WRPROT_SLOT]++;
				ks_arena->tasks[ks_self].ops[KE_OP_SPLIT]++;
				read_lock(&kvm->mmu_lock);
				if (kvm_tdp_mmu_wrprot_slot(kvm, new, PG_LEVEL_4K))
					kvm_flush_remote_tlbs_memslot(kvm, new);
				kvm_tdp_mmu_try_split_huge_pages(kvm, new, new->base_gfn,
								 new->base_gfn + new->npages,
								 PG_LEVEL_4K, true);
				read_unlock(&kvm->mmu_lock);
			} else {
				ks_arena->tasks[ks_self].ops[KE_OP_COLLAPSIBLE]++;
				read_lock(&kvm->mmu_lock);
				kvm_tdp_mmu_zap_collapsible_sptes(kvm, new);
				read_unlock(&kvm->mmu_lock);
			}
			__r = 1;
		}
	}));
}

/*
 * kvm_set_memslot(KVM_MR_DELETE) of kvm_main.c: under slots_lock, an invalid
 * copy of the slot (KVM_MEMSLOT_INVALID) replaces it, so a fault that finds
 * it retries; synchronize_srcu(); kvm_arch_flush_shadow_memslot() (mmu.c's:
 * a fast zap of everything with KVM_X86_QUIRK_SLOT_ZAP_ALL, else the slot's
 * range); then the slot leaves the memslots and synchronize_srcu() again.
 */
int ke_memslot_delete(struct kvm *kvm, int i)
{
	return KE_RUN(KE_OP_SLOT_DELETE, ({
		struct kvm_memory_slot *invalid, *old;
		mutex_lock(&kvm->slots_lock);
		old = ke_slot(kvm, i);
		if (old) {
			invalid = ks_bump_alloc(sizeof(*invalid));
			*invalid = *old;
			invalid->flags |= KVM_MEMSLOT_INVALID;
			rcu_assign_pointer(kvm_memslots(kvm)->slots[i], invalid);
			synchronize_srcu(&kvm->srcu);
			kvm_arch_flush_shadow_memslot(kvm, invalid);
			rcu_assign_pointer(kvm_memslots(kvm)->slots[i], NULL);
			synchronize_srcu(&kvm->srcu);
			if (old->flags & KVM_MEM_LOG_DIRTY_PAGES)
				atomic_dec(&kvm->nr_memslots_dirty_logging);
			container_of(kvm, struct ke_vm, kvm)->deleted[i] = old;
			__r = 1;
		}
		mutex_unlock(&kvm->slots_lock);
		/* userspace unmaps the slot's memory after the ioctl */
		if (__r == 1)
			ke_check_host_release(kvm, old->base_gfn, old->base_gfn + old->npages);
	}));
}

/* kvm_set_memslot(KVM_MR_CREATE) of the deleted slot again: new metadata
 * (kvm_alloc_memslot_metadata), published under slots_lock. */
int ke_memslot_recreate(struct kvm *kvm, int i)
{
	if (i < 0 || i >= KS_MAX_MEMSLOTS || !container_of(kvm, struct ke_vm, kvm)->deleted[i])
		return -EINVAL;
	return KE_RUN(KE_OP_SLOT_CREATE, ({
		struct kvm_memory_slot *old = container_of(kvm, struct ke_vm, kvm)->deleted[i], *slot;
		mutex_lock(&kvm->slots_lock);
		slot = ks_bump_alloc(sizeof(*slot));
		*slot = *old;
		slot->flags &= ~(KVM_MEM_LOG_DIRTY_PAGES | KVM_MEMSLOT_INVALID);
		ke_alloc_memslot_metadata(slot);
		memset(slot->dirty_bitmap, 0, ((slot->npages + 63) / 64) * 8);
		rcu_assign_pointer(kvm_memslots(kvm)->slots[i], slot);
		synchronize_srcu(&kvm->srcu);
		container_of(kvm, struct ke_vm, kvm)->deleted[i] = NULL;
		mutex_unlock(&kvm->slots_lock);
		__r = 1;
	}));
}

int ke_nr_slots(struct kvm *kvm) { return kvm_memslots(kvm)->nr_slots; }

void ke_slot_info(struct kvm *kvm, int i, u64 *base, u64 *npages, u32 *flags)
{
	struct kvm_memory_slot *s = ke_slot(kvm, i);
	if (!s)
		s = container_of(kvm, struct ke_vm, kvm)->deleted[i];
	*base = s->base_gfn;
	*npages = s->npages;
	*flags = s->flags;
}

#include "ksoracle.c"

/* For the chokepoint's walk windows: a present non-leaf entry of a table. */
static bool ke_is_table_link(const void *sptep, uint64_t spte)
{
	struct kvm_mmu_page *sp;
	if (!is_shadow_present_pte(spte))
		return false;
	sp = sptep_to_sp((void *)sptep);
	return sp && !is_last_spte(spte, sp->role.level);
}

/* For the trace: the gfn and level an SPTE maps (its table's kvm_mmu_page). */
static void ke_spte_where(const void *sptep, uint64_t *gfn, int *level)
{
	struct kvm_mmu_page *sp = sptep_to_sp((void *)sptep);
	int i = (int)(((uintptr_t)sptep & 4095) / 8);
	if (!sp)
		return;
	*level = sp->role.level;
	*gfn = sp->gfn + ((u64)i << ((sp->role.level - 1) * SPTE_LEVEL_BITS));
}

/* The engine's oracles attached (the harness calls it after ke_module_init). */
void ke_attach_oracles(void)
{
	ke_oracle_init();
	ks_is_table_link = ke_is_table_link;
	ks_spte_where = ke_spte_where;
}

