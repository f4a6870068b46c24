"""Copy C definitions out of a kernel tree by name.

The kernel engine keeps no kernel code in this repository.  What the shim
needs of the kernel's headers (a union, a struct, an enum) and the helpers of
mmu.c that tdp_mmu.c calls are copied out of the user's tree at build time by
name, so a tree that adds a field or changes a helper compiles with its own
version.  A name that is not found is a :class:`MissingDefinition`, which the
build reports in one line ("asm/kvm_host.h has no union kvm_mmu_page_role").

The parser is the kernel's coding style, not C: a definition starts at column
0, its body is the brace block that follows, and comments and string literals
are skipped when braces are matched.
"""

from __future__ import annotations

import re

from stress.kernel.errors import KernelEngineError


class MissingDefinition(KernelEngineError, LookupError):
    """A definition the shim needs is not in the tree."""


def _skip_to_matching_brace(text: str, i: int) -> int:
    """Index just past the brace block that opens at ``text[i] == '{'``."""
    depth = 0
    n = len(text)
    while i < n:
        c = text[i]
        if text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
            continue
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        if c in "\"'":
            j = i + 1
            while j < n and text[j] != c:
                j += 2 if text[j] == "\\" else 1
            i = j + 1
            continue
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise ValueError("unbalanced braces")


def extract_type(text: str, decl: str, where: str = "the tree") -> str:
    """The definition of ``decl`` (e.g. ``"union kvm_mmu_page_role"``), with its ``;``."""
    m = re.search(r"^" + re.escape(decl) + r"\s*\{", text, re.M)
    if not m:
        raise MissingDefinition(f"{where} has no {decl}")
    end = _skip_to_matching_brace(text, m.end() - 1)
    semi = text.index(";", end)
    return text[m.start(): semi + 1] + "\n"


def extract_function(text: str, name: str, where: str = "the tree") -> str:
    """The definition of function ``name``, from its return type to its closing brace."""
    for m in re.finditer(r"^(?P<pre>[A-Za-z_][^\n;{}()#=]*?)?\b" + re.escape(name) + r"\(",
                         text, re.M):
        start = m.start()
        if not m.group("pre"):
            # Kernel style may put the return type on the line before the name.
            prev = text.rfind("\n", 0, start - 1)
            line = text[prev + 1: start - 1]
            if not line or line[0].isspace() or line.rstrip().endswith((";", "}", "*/")):
                continue
            start = prev + 1
        # The parameter list ends at the matching parenthesis.
        depth, i = 0, m.end() - 1
        while True:
            if text[i] == "(":
                depth += 1
            elif text[i] == ")":
                depth -= 1
                if depth == 0:
                    break
            i += 1
        j = i + 1
        while j < len(text) and text[j] in " \t\n":
            j += 1
        if j < len(text) and text[j] == "{":
            return text[start: _skip_to_matching_brace(text, j)] + "\n"
        # A prototype, or an attribute between the parameters and the body.
        k = text.find("{", j)
        semi = text.find(";", j)
        if k >= 0 and (semi < 0 or k < semi) and "\n\n" not in text[j:k]:
            return text[start: _skip_to_matching_brace(text, k)] + "\n"
    raise MissingDefinition(f"{where} has no function {name}()")


def extract_define(text: str, name: str, where: str = "the tree") -> str:
    """A ``#define name ...`` with its continuation lines."""
    m = re.search(r"^#define\s+" + re.escape(name) + r"\b.*?(?<!\\)\n", text, re.M | re.S)
    if not m:
        raise MissingDefinition(f"{where} has no #define {name}")
    return m.group(0)
