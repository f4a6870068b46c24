"""Where the kernel engine's kernel code comes from: a tree, or Debian's tarball.

``--ksrc`` names a kernel source directory (``~/linux``) or a
``linux-source-X.Y.tar.xz`` as Debian's ``linux-source-X.Y`` package installs
it under ``/usr/src``.  The engine reads only the files in :data:`USED`;
from a tarball they are extracted once into the cache
(``$XDG_CACHE_HOME/tdp-stress/ksrc/<tarball hash>/``).  Nothing of the
kernel is kept in this repository.
"""

from __future__ import annotations

import glob
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from stress.kernel.errors import KernelEngineError


class TreeError(KernelEngineError):
    """The tree cannot be used: the message says which file or what is missing."""


#: The files of the tree the engine reads, relative to its top.
USED: tuple[str, ...] = (
    "Makefile",
    "arch/x86/kvm/mmu/tdp_iter.c",
    "arch/x86/kvm/mmu/tdp_mmu.c",
    "arch/x86/kvm/mmu/spte.c",
    "arch/x86/kvm/mmu/mmu.c",
    "arch/x86/kvm/mmu/tdp_iter.h",
    "arch/x86/kvm/mmu/tdp_mmu.h",
    "arch/x86/kvm/mmu/spte.h",
    "arch/x86/kvm/mmu/mmu_internal.h",
    "arch/x86/kvm/mmu/mmutrace.h",
    "arch/x86/kvm/mmu.h",
    "arch/x86/include/asm/kvm_host.h",
    "arch/x86/include/asm/vmx.h",
    "arch/x86/include/asm/vmxfeatures.h",
    "arch/x86/include/asm/trapnr.h",
    "arch/x86/include/uapi/asm/vmx.h",
    "include/linux/kvm_host.h",
    "include/linux/kvm_types.h",
    "virt/kvm/kvm_main.c",
)


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tdp-stress"


def default_ksrc() -> str | None:
    """Debian's linux-source tarball when one is installed (the newest), else None."""
    found = sorted(glob.glob("/usr/src/linux-source-*.tar.xz"), key=_version_key)
    return found[-1] if found else None


def _version_key(path: str) -> tuple[int, ...]:
    m = re.search(r"linux-source-([\d.]+)\.tar", path)
    return tuple(int(x) for x in m.group(1).split(".") if x) if m else (0,)


@dataclass(frozen=True)
class Tree:
    """A kernel tree the engine can read: its top directory and version."""

    top: Path
    origin: str  # what the user named: the directory or the tarball
    version: str

    def path(self, rel: str) -> Path:
        return self.top / rel

    def read(self, rel: str) -> str:
        return self.path(rel).read_text(errors="replace")

    def content_hash(self, extra: bytes = b"") -> str:
        """sha256 over the used files (name and bytes) and ``extra`` (the shim)."""
        h = hashlib.sha256()
        for rel in USED:
            h.update(rel.encode() + b"\0")
            h.update(self.path(rel).read_bytes())
        h.update(extra)
        return h.hexdigest()


def _makefile_version(text: str) -> str:
    fields = {}
    for key in ("VERSION", "PATCHLEVEL", "SUBLEVEL", "EXTRAVERSION"):
        m = re.search(rf"^{key}[ \t]*=[ \t]*(\S*)", text, re.M)
        fields[key] = m.group(1) if m else ""
    if not fields["VERSION"]:
        raise TreeError("Makefile has no VERSION: not a kernel tree")
    v = f"{fields['VERSION']}.{fields['PATCHLEVEL']}"
    if fields["SUBLEVEL"]:
        v += f".{fields['SUBLEVEL']}"
    return v + fields["EXTRAVERSION"]


def _check(top: Path, origin: str) -> Tree:
    missing = [rel for rel in USED if not (top / rel).is_file()]
    if missing:
        raise TreeError(f"{origin}: no {missing[0]}" + (f" (and {len(missing) - 1} more used files)"
                                                        if len(missing) > 1 else ""))
    return Tree(top=top, origin=origin, version=_makefile_version((top / "Makefile").read_text()))


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _extract_tarball(tarball: Path) -> Path:
    # Keyed by the tarball and by the list of used files: a longer list re-extracts.
    used = hashlib.sha256("\0".join(USED).encode()).hexdigest()[:8]
    dest = cache_root() / "ksrc" / f"{_file_hash(tarball)[:16]}-{used}"
    done = dest / ".complete"
    if done.exists():
        return Path(done.read_text().strip())
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=dest.parent))
    try:
        # Debian's linux-source-X.Y.tar.xz holds linux-source-X.Y/; others are listed.
        prefix = re.sub(r"\.(tar\.xz|txz)$", "", tarball.name)
        if not prefix.startswith("linux-source-"):
            listing = subprocess.run(["tar", "-tJf", str(tarball)], capture_output=True,
                                     text=True, check=False)
            if listing.returncode:
                raise TreeError(f"{tarball}: not a readable tar.xz "
                                f"({listing.stderr.strip()[:80]})")
            prefix = listing.stdout.split("\n", 1)[0].split("/", 1)[0]
        members = [f"{prefix}/{rel}" for rel in USED]
        r = subprocess.run(["tar", "-xJf", str(tarball), "-C", str(tmp), *members],
                           capture_output=True, text=True, check=False)
        if r.returncode:
            raise TreeError(f"{tarball}: {r.stderr.strip().splitlines()[0][:120]}")
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
        top = dest / prefix
        done.write_text(str(top))
        return top
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def open_tree(ksrc: str | None) -> Tree:
    """The tree ``ksrc`` names (a directory or a tarball), or Debian's when None."""
    if ksrc is None:
        ksrc = default_ksrc()
        if ksrc is None:
            raise TreeError("no kernel tree: pass --ksrc TREE or install Debian's "
                            "linux-source-6.12")
    p = Path(os.path.expanduser(ksrc))
    if p.is_dir():
        return _check(p.resolve(), str(p))
    if p.is_file() and p.name.endswith((".tar.xz", ".txz")):
        return _check(_extract_tarball(p.resolve()), str(p))
    if not p.exists():
        raise TreeError(f"--ksrc {ksrc}: no such file or directory")
    raise TreeError(f"--ksrc {ksrc}: neither a kernel source directory nor a .tar.xz")
