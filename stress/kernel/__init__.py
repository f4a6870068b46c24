"""The kernel engine: a kernel tree's own TDP MMU, built against a shim, in the harness.

``tree`` finds the tree, ``extract`` copies definitions out of it by name,
``build`` compiles the kernel translation unit and the runtime into a cffi
module, ``mutations`` are the known bugs as tree mutations, and ``engine``
is the arena and VM a run holds.  The C side is in ``native/kernel/``.
"""
