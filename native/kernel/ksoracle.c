/* SPDX-License-Identifier: GPL-2.0 */
/*
 * ksoracle.c: the oracle layer's walk of the kernel's own structures.
 *
 * Not kernel code and not the kernel's assertions: these are the tester's
 * invariants (stress/oracles/kernel.py lists them), written in C because
 * the structures they walk (kvm->arch.tdp_mmu_roots, sp->spt, sp->ptep,
 * role, refcounts, lpage_info) are the kernel's C structures.  Included at
 * the end of ksglue.c, in the kernel TU, so it sees the MMU's inlines.
 */
/*
 * ke_check(): with every worker parked between operations (outside mmu_lock,
 * RCU and SRCU), walk every root on kvm->arch.tdp_mmu_roots and every table
 * below it, and account for every page of the arena's allocator.  The
 * invariants are the oracle layer's (stress/oracles/kernel.py lists them,
 * with the names the Python model's quiescent walk uses where the invariant
 * is the same); they are checked here because here the kernel's structures
 * are C.  Reads are plain loads, not hooked accesses: the check is not part
 * of the race.  Returns 0, or 1 with the invariant's name and a message.
 */
struct ke_walk {
	struct kvm *kvm;
	uint8_t *seen;          /* page index -> linked once */
	long tables;            /* non-root tables reachable */
	long pages;             /* every page reachable, roots included */
	char *name, *msg;
	int failed;
};

#define KE_FAIL(w, n, ...) do {                                                \
	if (!(w)->failed) {                                                    \
		(w)->failed = 1;                                               \
		snprintf((w)->name, 64, "%s", n);                              \
		snprintf((w)->msg, 400, __VA_ARGS__);                          \
	}                                                                      \
	return;                                                                \
} while (0)


static void ke_walk_table(struct ke_walk *w, struct kvm_mmu_page *root, struct kvm_mmu_page *sp)
{
	int level = sp->role.level;
	int pi = ks_page_index(sp->spt);

	if (pi < 0)
		KE_FAIL(w, "corrupt non-leaf SPTE", "table of level %d at gfn %#llx is no page-table page",
			level, (unsigned long long)sp->gfn);
	if (ks_arena->page_state[pi] != KS_PAGE_USED)
		KE_FAIL(w, "reachable table not live", "table of level %d at gfn %#llx (page %d) is reachable "
			"from root %d but was freed", level, (unsigned long long)sp->gfn, pi,
			ks_page_index(root->spt));
	if (w->seen[pi]++)
		KE_FAIL(w, "page-table page linked twice", "page %d (level %d, gfn %#llx) is reachable twice",
			pi, level, (unsigned long long)sp->gfn);
	w->pages++;
	if (sp != root)
		w->tables++;
	for (int i = 0; i < SPTE_ENT_PER_PAGE; i++) {
		u64 *sptep = &sp->spt[i];
		u64 spte = __atomic_load_n(sptep, __ATOMIC_RELAXED);
		gfn_t gfn = sp->gfn + ((gfn_t)i << ((level - 1) * SPTE_LEVEL_BITS));

		if (spte == KS_POISON)
			KE_FAIL(w, "poison reachable", "entry %d of table (level %d, gfn %#llx) holds the "
				"free poison", i, level, (unsigned long long)sp->gfn);
		if (is_frozen_spte(spte))
			KE_FAIL(w, "FROZEN SPTE reachable at quiescence", "gfn %#llx level %d is FROZEN with "
				"no operation in flight", (unsigned long long)gfn, level);
		if (!is_shadow_present_pte(spte)) {
			if (spte != SHADOW_NONPRESENT_VALUE && !is_mmio_spte(w->kvm, spte))
				KE_FAIL(w, "corrupt non-present SPTE", "gfn %#llx level %d: %#llx",
					(unsigned long long)gfn, level, (unsigned long long)spte);
			continue;
		}
		if (is_last_spte(spte, level)) {
			struct kvm_memory_slot *slot = __gfn_to_memslot(kvm_memslots(w->kvm), gfn);
			kvm_pfn_t pfn = spte_to_pfn(spte);
			if (!slot || gfn + KVM_PAGES_PER_HPAGE(level) > slot->base_gfn + slot->npages)
				KE_FAIL(w, "leaf outside every memslot", "gfn %#llx level %d is mapped but no "
					"memslot holds all of it", (unsigned long long)gfn, level);
			if (pfn != ke_gfn_to_pfn(gfn))
				KE_FAIL(w, "leaf maps wrong pfn", "gfn %#llx level %d maps pfn %#llx, its host "
					"page is %#llx", (unsigned long long)gfn, level, (unsigned long long)pfn,
					(unsigned long long)ke_gfn_to_pfn(gfn));
			if (level > PG_LEVEL_4K && lpage_info_slot(gfn, slot, level)->disallow_lpage)
				KE_FAIL(w, "huge leaf where lpage_info disallows it", "gfn %#llx is mapped at "
					"level %d but its lpage_info disallows that level", (unsigned long long)gfn,
					level);
			continue;
		}
		{
			u64 *child_pt = spte_to_child_pt(spte, level);
			int ci = ks_page_index(child_pt);
			struct kvm_mmu_page *child;
			if (ci < 0 || ((uintptr_t)child_pt & 4095))
				KE_FAIL(w, "corrupt non-leaf SPTE", "gfn %#llx level %d points at %p, no "
					"page-table page", (unsigned long long)gfn, level, (void *)child_pt);
			if (ks_arena->page_state[ci] != KS_PAGE_USED)
				KE_FAIL(w, "reachable table not live", "gfn %#llx level %d links page %d, which "
					"was freed (by task %d)", (unsigned long long)gfn, level, ci,
					ks_arena->page_freed_by[ci]);
			child = sptep_to_sp(child_pt);
			if (!child || child->spt != child_pt || child->role.level != level - 1 ||
			    child->gfn != gfn || (u64 *)child->ptep != sptep)
				KE_FAIL(w, "table back-pointer wrong", "gfn %#llx level %d links a table whose "
					"kvm_mmu_page says level %d, gfn %#llx, parent %p (the entry is %p)",
					(unsigned long long)gfn, level, child ? child->role.level : -1,
					child ? (unsigned long long)child->gfn : 0ULL,
					child ? (void *)child->ptep : NULL, (void *)sptep);
			ke_walk_table(w, root, child);
			if (w->failed)
				return;
		}
	}
}

static long ke_cache_objs(struct kvm_mmu_memory_cache *mc) { return mc->nobjs; }

int ke_check(struct kvm *kvm, int teardown, char *name, char *msg)
{
	struct ke_vm *vm = container_of(kvm, struct ke_vm, kvm);
	struct ke_walk w = { .kvm = kvm, .name = name, .msg = msg };
	struct kvm_mmu_page *root;
	long cached_pages = 0, cached_objs = 0, pending = (long)(ks_arena->cb_tail - ks_arena->cb_head);
	long used, objs;

	w.seen = calloc(ks_arena->npages, 1);
	list_for_each_entry(root, &kvm->arch.tdp_mmu_roots, link) {
		if (!root->role.invalid && !refcount_read(&root->tdp_mmu_root_count) && !w.failed) {
			w.failed = 1;
			snprintf(name, 64, "listed root without references");
			snprintf(msg, 400, "valid root (page %d) is listed with no reference",
				 ks_page_index(root->spt));
		}
		if (!root->role.invalid && !w.failed) {
			/* kvm_tdp_mmu_alloc_root() looks again under tdp_mmu_pages_lock
			 * before it allocates: one valid root per role */
			struct kvm_mmu_page *other;
			list_for_each_entry(other, &kvm->arch.tdp_mmu_roots, link) {
				if (other == root)
					break;
				if (!other->role.invalid && other->role.word == root->role.word) {
					w.failed = 1;
					snprintf(name, 64, "two valid roots of one role");
					snprintf(msg, 400, "valid roots (pages %d and %d) on the list have "
						 "the same role %#x: vCPUs of one MMU use different page tables",
						 ks_page_index(other->spt), ks_page_index(root->spt),
						 root->role.word);
					break;
				}
			}
		}
		if (teardown && !w.failed) {
			w.failed = 1;
			snprintf(name, 64, "leaked root");
			snprintf(msg, 400, "root (page %d, %s, %u references) is still listed after "
				 "kvm_mmu_uninit_tdp_mmu()", ks_page_index(root->spt),
				 root->role.invalid ? "invalid" : "valid",
				 refcount_read(&root->tdp_mmu_root_count));
		}
		if (w.failed)
			break;
		ke_walk_table(&w, root, root);
		if (w.failed)
			break;
	}
	free(w.seen);
	if (w.failed)
		return 1;
	if (w.tables != atomic64_read(&kvm->arch.tdp_mmu_pages)) {
		snprintf(name, 64, "tdp_mmu_pages accounting");
		snprintf(msg, 400, "kvm->arch.tdp_mmu_pages is %lld but %ld non-root tables are linked",
			 (long long)atomic64_read(&kvm->arch.tdp_mmu_pages), w.tables);
		return 1;
	}
	for (int i = 0; i < kvm->created_vcpus; i++) {
		cached_pages += ke_cache_objs(&vm->vcpus[i]->arch.mmu_shadow_page_cache);
		cached_objs += ke_cache_objs(&vm->vcpus[i]->arch.mmu_page_header_cache);
		cached_objs += ke_cache_objs(&vm->vcpus[i]->arch.mmu_pte_list_desc_cache);
	}
	used = ks_arena->pages_used;
	objs = ks_arena->objs_used;
	/* Every page the allocator handed out is reachable, waiting for its RCU
	 * callback, or in a vCPU's memory cache; every kvm_mmu_page likewise. */
	if (used != w.pages + pending + cached_pages || objs != w.pages + pending + cached_objs) {
		snprintf(name, 64, "leaked page-table page");
		snprintf(msg, 400, "%ld pages and %ld kvm_mmu_page objects are allocated; %ld are "
			 "reachable, %ld wait for an RCU callback, %ld pages and %ld objects are in "
			 "vCPU caches", used, objs, w.pages, pending, cached_pages, cached_objs);
		return 1;
	}
	return 0;
}

/*
 * "SPTE installed in removed table": a page-table page whose RCU callback
 * frees it holds no present entry.  Tables are freed through call_rcu() once
 * they were linked: handle_removed_pt() froze or cleared every child of a
 * removed table, and a root is zapped before its last put.  A present entry
 * there was installed after the table was removed (or never cleared), and
 * the mapping, or the table it links, is lost with it.  (A table that was
 * never linked, e.g. an eager split's table whose link lost the race, is
 * freed directly with its entries filled: that is not checked.)
 */
/*
 * "stale-tlb-entry-after-free": a page is freed (a table by its RCU callback,
 * a host page by the primary MMU) only when no vCPU may still use a
 * translation through it: every vCPU whose TLB holds one has a TLB flush
 * pending (KVM_REQ_TLB_FLUSH: it flushes before it next enters the guest).
 * The same name and invariant as the Python model's oracles/tlb.py.
 */
static void ke_check_tlbs(struct kvm *kvm, int table, gfn_t start, gfn_t end, const char *what)
{
	struct ke_vm *vm = container_of(kvm, struct ke_vm, kvm);
	for (int v = 0; v < kvm->created_vcpus; v++) {
		struct kvm_vcpu *vcpu = vm->vcpus[v];
		struct ke_tlb *t = vm->tlbs[v];
		hpa_t cur = READ_ONCE(vcpu->arch.root_mmu.root.hpa);
		if (kvm_test_request(KVM_REQ_TLB_FLUSH, vcpu) ||
		    __atomic_load_n(&t->servicing, __ATOMIC_SEQ_CST))
			continue;
		/* An obsolete root the vCPU drops at its next entry: its translations
		 * (tagged with that root) are never used again; the new root's load
		 * flushes (flush_tlb_current). */
		if (kvm_test_request(KVM_REQ_MMU_FREE_OBSOLETE_ROOTS, vcpu) && VALID_PAGE(cur) &&
		    root_to_sp(cur) && root_to_sp(cur)->role.invalid)
			continue;
		for (int i = 0; i < KE_TLB; i++) {
			struct ke_tlb_entry *e = &t->e[i];
			int level = __atomic_load_n(&e->level, __ATOMIC_ACQUIRE);
			bool hit = false;
			/* a translation is usable only under the root it was made with */
			if (!level || e->root != cur)
				continue;
			if (table >= 0) {
				for (int k = 0; k < PT64_ROOT_4LEVEL; k++)
					hit |= e->tables[k] == table + 1;
			} else {
				hit = e->gfn < end && start < e->gfn + KVM_PAGES_PER_HPAGE(level);
			}
			if (hit) {
				ks_report(KS_V_ORACLE, __FILE__, __LINE__,
					  "stale-tlb-entry-after-free: %s while vCPU %d's TLB still "
					  "translates gfn %#llx (level %d, pfn %#llx) through it, with no TLB "
					  "flush pending for that vCPU", what, v, (unsigned long long)e->gfn,
					  level, (unsigned long long)e->pfn);
				return;
			}
		}
	}
}

/* The primary MMU releases the host pages of [start, end) (the notifier's
 * range after invalidate_range_start, a deleted memslot's after the ioctl). */
static void ke_check_host_release(struct kvm *kvm, gfn_t start, gfn_t end)
{
	char what[96];
	snprintf(what, sizeof(what), "the host released the pages of gfns [%#llx, %#llx)",
		 (unsigned long long)start, (unsigned long long)end);
	ke_check_tlbs(kvm, -1, start, end, what);
}

static void ke_check_rcu_free(struct rcu_head *head, void (*func)(struct rcu_head *))
{
	struct kvm_mmu_page *sp;
	if (func != tdp_mmu_free_sp_rcu_callback)
		return;
	sp = container_of(head, struct kvm_mmu_page, rcu_head);
	{
		char what[96];
		snprintf(what, sizeof(what), "the level-%d table at gfn %#llx (page %d) is freed by its "
			 "RCU callback", sp->role.level, (unsigned long long)sp->gfn,
			 ks_page_index(sp->spt));
		ke_check_tlbs((struct kvm *)ks_arena->vm, ks_page_index(sp->spt), 0, 0, what);
	}
	for (int i = 0; i < SPTE_ENT_PER_PAGE; i++) {
		u64 spte = __atomic_load_n(&sp->spt[i], __ATOMIC_RELAXED);
		if (is_shadow_present_pte(spte)) {
			gfn_t gfn = sp->gfn + ((gfn_t)i << ((sp->role.level - 1) * SPTE_LEVEL_BITS));
			ks_report(KS_V_ORACLE, __FILE__, __LINE__,
				  "SPTE installed in removed table: the level-%d table at gfn %#llx is "
				  "freed by its RCU callback with entry %d (gfn %#llx) present: %#llx (%s)",
				  sp->role.level, (unsigned long long)sp->gfn, i, (unsigned long long)gfn,
				  (unsigned long long)spte,
				  is_last_spte(spte, sp->role.level) ? "a leaf" : "a table, now leaked");
			return;
		}
	}
}

void ke_oracle_init(void)
{
	ks_rcu_cb_check = ke_check_rcu_free;
}
