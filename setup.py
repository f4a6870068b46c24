# setuptools still needs cffi_modules here: pyproject.toml's [tool.setuptools] rejects the key.
from setuptools import setup

setup(cffi_modules=["native/build_atomics.py:ffibuilder"])
