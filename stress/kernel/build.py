"""Build the kernel engine: the tree's TDP MMU, our shim, one cffi module.

The kernel translation unit (``ktu.c``, generated) includes the tree's
``tdp_iter.c``, ``spte.c`` and ``tdp_mmu.c`` unchanged, then the functions of
``mmu.c`` and ``kvm_main.c`` listed in :data:`FROM_MMU_C` and
:data:`FROM_KVM_MAIN_C`, copied by name, then ``ksglue.c``: the outer
protocol and the entry points the workers call.  Everything is compiled
with ``kshim.h`` force-included and the replaced headers stubbed.  The
runtime (``runtime.c``: arena, locks, RCU, allocator, the access hook) is
plain C and is linked into the same module.

The module is cached by the content hash of the used tree files, the shim
sources and the mutation applied, under ``$XDG_CACHE_HOME/tdp-stress/kbuild``.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from stress.kernel.errors import KernelEngineError
from stress.kernel.extract import (
    MissingDefinition,
    extract_define,
    extract_function,
    extract_type,
)
from stress.kernel.tree import Tree, cache_root

# the shim and runtime sources: native/kernel/, linked as stress/kernel/native so an
# installed package carries them
NATIVE = (Path(__file__).resolve().parent / "native").resolve()

#: Kernel files compiled as they are, in this order.
COMPILED = ("arch/x86/kvm/mmu/tdp_iter.c", "arch/x86/kvm/mmu/spte.c",
            "arch/x86/kvm/mmu/tdp_mmu.c")

#: Types copied by name: (header, declaration).
TYPES = (
    ("arch/x86/include/asm/kvm_host.h", "union kvm_mmu_page_role"),
    ("arch/x86/include/asm/kvm_host.h", "union kvm_mmu_extended_role"),
    ("arch/x86/include/asm/kvm_host.h", "union kvm_cpu_role"),
    ("arch/x86/include/asm/kvm_host.h", "struct kvm_rmap_head"),
    ("arch/x86/include/asm/kvm_host.h", "struct rsvd_bits_validate"),
    ("arch/x86/include/asm/kvm_host.h", "struct kvm_mmu_root_info"),
    ("arch/x86/include/asm/kvm_host.h", "struct kvm_mmu"),
    ("arch/x86/include/asm/kvm_host.h", "struct kvm_lpage_info"),
    ("arch/x86/include/asm/kvm_host.h", "struct kvm_arch_memory_slot"),
    ("include/linux/kvm_types.h", "struct kvm_mmu_memory_cache"),
    ("include/linux/kvm_host.h", "struct kvm_memory_slot"),
    ("include/linux/kvm_host.h", "union kvm_mmu_notifier_arg"),
    ("include/linux/kvm_host.h", "enum kvm_gfn_range_filter"),
    ("include/linux/kvm_host.h", "struct kvm_gfn_range"),
)

#: Static inlines of linux/kvm_host.h the outer protocol uses, copied by name.
FROM_KVM_HOST_H = (
    "mmu_invalidate_retry_gfn",
    "mmu_invalidate_retry_gfn_unsafe",
)

#: Functions of mmu.c copied by name: the helpers tdp_mmu.c calls, and the
#: outer protocol around it (page fault, root load and free, fast zap, NX
#: recovery).  Their shadow-MMU branches stay in the code; the shadow MMU's
#: own functions are stubs that BUG (ksstubs.h): with tdp_mmu_enabled and no
#: shadow root allocated the kernel never takes those branches.
FROM_MMU_C = (
    "lpage_info_slot",
    "__kvm_mmu_max_mapping_level",
    "kvm_mmu_max_mapping_level",
    "kvm_mmu_hugepage_adjust",
    "disallowed_hugepage_adjust",
    "track_possible_nx_huge_page",
    "untrack_possible_nx_huge_page",
    "is_obsolete_sp",
    "is_tdp_mmu_active",
    "walk_shadow_page_lockless_begin",
    "walk_shadow_page_lockless_end",
    "mmu_topup_memory_caches",
    "page_fault_can_be_fast",
    "fast_pf_fix_direct_spte",
    "is_access_allowed",
    "fast_page_fault",
    "is_page_fault_stale",
    "kvm_faultin_pfn",
    "kvm_tdp_mmu_page_fault",
    "kvm_tdp_page_fault",
    "mmu_alloc_direct_roots",
    "kvm_mmu_load",
    "mmu_free_root_page",
    "kvm_mmu_free_roots",
    "kvm_mmu_unload",
    "is_obsolete_root",
    "__kvm_mmu_free_obsolete_roots",
    "kvm_mmu_free_obsolete_roots",
    "kvm_unmap_gfn_range",
    "kvm_zap_gfn_range",
    "kvm_zap_obsolete_pages",
    "__kvm_mmu_zap_all_fast_front_half",
    "__kvm_mmu_zap_all_fast_back_half",
    "kvm_mmu_zap_all_fast",
    "unaccount_nx_huge_page",
    "kvm_mmu_remote_flush_or_zap",
    "kvm_recover_nx_huge_pages",
    "kvm_mmu_page_fault",
    "kvm_mmu_zap_memslot_pages_and_flush",
    "kvm_arch_flush_shadow_memslot",
)

#: Macros of mmu.c the copied functions name, copied by name.
DEFINES_MMU_C = ("PTE_PREFETCH_NUM", "BATCH_ZAP_PAGES")

#: Functions of virt/kvm/kvm_main.c copied by name.
FROM_KVM_MAIN_C = (
    "kvm_mmu_invalidate_begin",
    "kvm_mmu_invalidate_range_add",
    "kvm_mmu_invalidate_end",
)


#: Bumped when the way the module is built changes (flags, the TU's layout).
BUILD_VERSION = 3


class BuildError(KernelEngineError):
    """The engine cannot be built from this tree: one line says why."""


@dataclass(frozen=True)
class Built:
    tree: Tree
    key: str
    path: Path  # the compiled extension module
    mutation: str | None


def _shim_sources() -> list[Path]:
    return sorted(p for p in NATIVE.iterdir() if p.suffix in (".c", ".h"))


def _stub_headers(tree: Tree, files: list[str]) -> set[str]:
    """The ``<...>`` headers the compiled kernel code includes that the shim replaces."""
    keep = {"asm/vmx.h", "uapi/asm/vmx.h", "asm/vmxfeatures.h", "asm/trapnr.h"}
    found: set[str] = set()
    for rel in files:
        for m in re.finditer(r'^\s*#\s*include\s*<([^>]+)>', tree.read(rel), re.M):
            found.add(m.group(1))
    return found - keep


def generate(tree: Tree, out: Path, mutation_source: dict[str, str] | None = None) -> None:
    """Write the kernel TU and its generated headers into ``out``."""
    src = dict(mutation_source or {})

    def read(rel: str) -> str:
        return src.get(rel) if rel in src else tree.read(rel)

    # Mutated files are written into the build dir and compiled from there.
    ktree = out / "ktree"
    for rel, text in src.items():
        p = ktree / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)

    stubs = out / "stubs"
    headers = [r for r in tree_files() if r.endswith(".h")]
    headers += [*COMPILED, "arch/x86/kvm/mmu/mmu.c"]
    # mmu.h's "kvm_cache_regs.h", "x86.h" and "cpuid.h": their guards are
    # taken by kshim.h; a tarball's extract does not have them at all.
    for h in sorted(_stub_headers(tree, headers) | {"kvm_cache_regs.h", "x86.h", "cpuid.h"}):
        p = stubs / h
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text("/* replaced by kshim.h */\n")

    parts = ["/* generated by stress/kernel/build.py: copied by name from the tree */\n"]
    for rel, decl in TYPES:
        try:
            parts.append(f"/* {rel}: {decl} */\n" + extract_type(read(rel), decl, rel))
        except MissingDefinition as e:
            raise BuildError(f"{tree.origin}: {e}") from None
    (out / "kstructs.h").write_text("".join(parts))

    kh = read("include/linux/kvm_host.h")
    mmu = read("arch/x86/kvm/mmu/mmu.c")
    funcs = ["/* generated: copied by name from include/linux/kvm_host.h */\n"]
    for name in FROM_KVM_HOST_H:
        funcs.append(_extract(kh, name, "include/linux/kvm_host.h", tree))
    funcs.append("/* generated: copied by name from arch/x86/kvm/mmu/mmu.c */\n")
    for name in DEFINES_MMU_C:
        try:
            funcs.append(extract_define(mmu, name, "arch/x86/kvm/mmu/mmu.c"))
        except MissingDefinition as e:
            raise BuildError(f"{tree.origin}: {e}") from None
    # Prototypes first: mmu.c's order is not ours.
    bodies = [_extract(mmu, name, "arch/x86/kvm/mmu/mmu.c", tree) for name in FROM_MMU_C]
    for body in bodies:
        head = body[: body.index("{")].rstrip()
        funcs.append(head.replace("static inline ", "static ") + ";\n")
    funcs.extend(bodies)
    main = read("virt/kvm/kvm_main.c")
    funcs.append("/* generated: copied by name from virt/kvm/kvm_main.c */\n")
    for name in FROM_KVM_MAIN_C:
        funcs.append(_extract(main, name, "virt/kvm/kvm_main.c", tree))
    (out / "kfrom.c").write_text("".join(funcs))

    lines = ["/* generated by stress/kernel/build.py: the kernel translation unit */\n",
             f'#define KS_TREE_VERSION "{tree.version}"\n',
             '#include "ksstubs.h"\n']
    for rel in COMPILED:
        base = ktree if rel in src else tree.top
        lines.append(f'#include "{base / rel}"\n')
    lines.append('#include "kfrom.c"\n')
    lines.append(f'#include "{NATIVE / "ksglue.c"}"\n')
    (out / "ktu.c").write_text("".join(lines))


def tree_files() -> tuple[str, ...]:
    from stress.kernel.tree import USED
    return USED


def _extract(text: str, name: str, rel: str, tree: Tree) -> str:
    try:
        return extract_function(text, name, rel)
    except MissingDefinition as e:
        raise BuildError(f"{tree.origin}: {e}: the shim needs it "
                         "(stress/kernel/build.py)") from None


def cflags(tree: Tree, out: Path) -> list[str]:
    kvm = tree.path("arch/x86/kvm")
    return ["-include", str(NATIVE / "kshim.h"),
            "-I", str(out), "-I", str(NATIVE), "-I", str(out / "stubs"),
            "-I", str(kvm / "mmu"), "-I", str(kvm),
            "-I", str(tree.path("arch/x86/include")),
            "-std=gnu11", "-O2", "-g", "-fno-strict-aliasing", "-fwrapv",
            "-fno-omit-frame-pointer",
            "-Wno-unused-function", "-Wno-unused-variable", "-Wno-unused-but-set-variable",
            "-Wno-address-of-packed-member", "-Wno-format-truncation"]


def syntax_check(tree: Tree, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["gcc", "-fsyntax-only", *cflags(tree, out), str(out / "ktu.c")],
                          capture_output=True, text=True, check=False)


#: What Python calls: the runtime's and ksglue.c's entry points (cffi cdef).
CDEF = """
struct kvm;
struct kvm_vcpu;
%(ks_event)s
int ks_trace_copy(int t, struct ks_event *out, int max);
int ks_arena_map(const char *shm_name, uint64_t base, uint64_t size, int create);
void ks_arena_unmap(void);
int ks_arena_init(uint64_t size, uint32_t npages, uint32_t nobjs, uint32_t obj_size,
                  uint32_t ntasks, uint64_t seed);
void ks_set_task(int t, int pid);
void ks_install_oops_handler(void);
void ks_set_sched_hook(int (*hook)(int kind));
int ks_rcu_poll(void);
void ks_set_abort(void);
int ks_violation(int *kind, int *task, int *line, uint32_t *op, char *file, char *what,
                 uint64_t *seq);
int64_t ks_stat(const char *name);
int64_t ks_task_stat(int t, const char *name);
int ks_tracepoints(const char **names, uint64_t *counts, int max);
void ks_set_knobs(uint32_t yield_ppm, uint64_t timeslice_ns, uint32_t trace_on,
                  uint32_t walk_window_factor, uint32_t rcu_unlock_yield_ppm);
int ks_task_waiting(int t, char *lock_name, int n, int *owner, uint64_t *readers);

int ke_module_init(int ad_bits, int max_level, int nx, int slot_zap_all, int nx_ratio);
int ke_alias_tables(uint32_t nregions);
struct kvm *ke_vm_create(void);
int ke_memslot_add(struct kvm *kvm, int id, uint64_t base_gfn, uint64_t npages, uint32_t flags,
                   int host_level);
struct kvm_vcpu *ke_vcpu_create(struct kvm *kvm, int id);
struct kvm_vcpu *ke_vcpu(struct kvm *kvm, int i);
int ke_guest_access(struct kvm_vcpu *vcpu, uint64_t gpa, int write, int exec);
int ke_zap_gfn_range(struct kvm *kvm, uint64_t start, uint64_t end);
int ke_unmap(struct kvm *kvm, uint64_t start, uint64_t end);
int ke_zap_all_fast(struct kvm *kvm);
int ke_wrprot_slot(struct kvm *kvm, int i);
int ke_clear_dirty_slot(struct kvm *kvm, int i);
int ke_split(struct kvm *kvm, int i, int target_level);
int ke_zap_collapsible(struct kvm *kvm, int i);
int ke_age(struct kvm *kvm, uint64_t start, uint64_t end);
int ke_test_age(struct kvm *kvm, uint64_t start, uint64_t end);
int ke_dirty_log(struct kvm *kvm, int i);
int ke_nx_recover(struct kvm *kvm);
int ke_vcpu_unload(struct kvm_vcpu *vcpu);
int ke_vm_destroy(struct kvm *kvm);
int ke_check(struct kvm *kvm, int teardown, char *name, char *msg);
void ke_attach_oracles(void);
uint64_t ke_vcpu_stat(struct kvm_vcpu *vcpu, const char *name);
int ke_slot_dirty_logging(struct kvm *kvm, int i, int enable);
int ke_nr_slots(struct kvm *kvm);
int ke_memslot_delete(struct kvm *kvm, int i);
int ke_memslot_recreate(struct kvm *kvm, int i);
void ke_slot_info(struct kvm *kvm, int i, uint64_t *base, uint64_t *npages, uint32_t *flags);
const char *ke_tree_version(void);
"""


def _cdef() -> str:
    """CDEF with the structures Python reads copied from the runtime's header by name."""
    header = (NATIVE / "ksrt_arena.h").read_text()
    return CDEF % {"ks_event": extract_type(header, "struct ks_event", "ksrt_arena.h")}


def _gcc(args: list[str], what: str) -> None:
    r = subprocess.run(["gcc", *args], capture_output=True, text=True, check=False)
    if r.returncode:
        errs = [ln for ln in r.stderr.splitlines() if "error" in ln] or r.stderr.splitlines()
        first = errs[0] if errs else f"gcc exited {r.returncode}"
        raise BuildError(f"{what}: {first.strip()}")


def compile_module(tree: Tree, out: Path, modname: str) -> Path:
    """Compile ktu.c and runtime.c, link them into the cffi module ``modname``."""
    import cffi  # a build-time dependency of the package already (the atomics)

    ktu_o = out / "ktu.o"
    rt_o = out / "runtime.o"
    _gcc(["-c", "-fPIC", "-fvisibility=hidden", *cflags(tree, out), str(out / "ktu.c"),
          "-o", str(ktu_o)], f"the kernel code of {tree.origin} does not build against the shim")
    _gcc(["-c", "-fPIC", "-fvisibility=hidden", "-std=gnu11", "-O2", "-g", "-Wall",
          "-I", str(NATIVE), str(NATIVE / "runtime.c"), "-o", str(rt_o)],
         "native/kernel/runtime.c does not build")
    ffi = cffi.FFI()
    cdef = _cdef()
    ffi.cdef(cdef)
    ffi.set_source(modname, "#include <stdint.h>\n" + cdef, extra_objects=[str(ktu_o), str(rt_o)],
                   libraries=["rt", "gcc"])
    try:
        so = ffi.compile(tmpdir=str(out), verbose=False)
    except Exception as e:  # cffi wraps the compiler's failure in its own types
        first = str(e).splitlines()[0][:160]
        raise BuildError(f"linking the kernel engine failed: {first}") from None
    return Path(so)


def build_key(tree: Tree, mutation_source: dict[str, str] | None = None) -> str:
    """The build's cache key: the used tree files, the shim, this builder, the mutation."""
    h = hashlib.sha256()
    for p in _shim_sources():
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    # what this process will build with, from memory (a file edited under a running
    # process must not give its old code a new key)
    h.update(repr((CDEF, COMPILED, TYPES, FROM_KVM_HOST_H, FROM_MMU_C, DEFINES_MMU_C,
                   FROM_KVM_MAIN_C, BUILD_VERSION)).encode())
    for rel, text in sorted((mutation_source or {}).items()):
        h.update(rel.encode() + b"\0" + text.encode())
    return tree.content_hash(h.digest())[:20]


def cached_module(key: str) -> Path | None:
    dest = cache_root() / "kbuild" / key
    return next(iter(dest.glob(f"_tdpk_{key}*.so")), None) if dest.is_dir() else None


def build(tree: Tree, mutation: str | None = None,
          mutation_source: dict[str, str] | None = None) -> Built:
    """The engine's module for ``tree`` (and a mutation of it), built once and cached."""
    key = build_key(tree, mutation_source)
    modname = f"_tdpk_{key}"
    dest = cache_root() / "kbuild" / key
    so = cached_module(key)
    if so is None:
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".build-", dir=dest.parent))
        try:
            generate(tree, tmp, mutation_source)
            compile_module(tree, tmp, modname)
            (tmp / "BUILT").write_text(f"{tree.origin}\n{tree.version}\n{mutation or ''}\n")
            try:
                tmp.rename(dest)  # atomic: a concurrent build of the same key loses here
            except OSError:
                if cached_module(key) is None:
                    raise
            so = cached_module(key)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    return Built(tree=tree, key=key, path=so, mutation=mutation)


def load(built: Built) -> ModuleType:
    """Import the built module (once per process; workers inherit it over fork)."""
    name = built.path.name.split(".")[0]
    if name in sys.modules:
        return sys.modules[name]
    loader = importlib.machinery.ExtensionFileLoader(name, str(built.path))
    spec = importlib.util.spec_from_file_location(name, built.path, loader=loader)
    assert spec is not None
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    sys.modules[name] = mod
    return mod
