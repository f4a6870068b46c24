"""cffi (API mode) build script for stress._atomics, run by setuptools at install time."""

from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

ffibuilder = FFI()
_cdef = "\n".join(
    line for line in (HERE / "atomics.h").read_text().splitlines() if not line.startswith("#")
)
ffibuilder.cdef(_cdef)
ffibuilder.set_source(
    "stress._atomics",
    '#include <stdint.h>\n#include <stddef.h>\n#include "atomics.h"\n',
    sources=[str(Path("native") / "atomics.c")],
    include_dirs=[str(Path("native"))],
    extra_compile_args=["-O2", "-std=gnu11"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
