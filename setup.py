"""Build the one Cython extension, etcdgw._relay, unless ETCDGW_NO_EXTENSIONS is set.

A missing compiler or Cython is a build error, not a silent fallback: an install that should
have the fast engine must not quietly ship without it (see tests/test_import.py).
"""

import os
import platform

from setuptools import setup

NO_EXTENSIONS = bool(os.environ.get("ETCDGW_NO_EXTENSIONS")) or (
    platform.python_implementation() != "CPython"
)

if NO_EXTENSIONS:
    print("*** etcdgw: pure-Python build (ETCDGW_NO_EXTENSIONS set or not CPython) ***")
    ext_modules = []
else:
    from Cython.Build import cythonize
    from setuptools import Extension

    ext_modules = cythonize(
        [
            Extension(
                "etcdgw._relay",
                ["src/etcdgw/_relay.pyx"],
                extra_compile_args=["-O2"],
            )
        ],
        compiler_directives={
            "language_level": 3,
            "embedsignature": True,
            "boundscheck": False,
            "wraparound": False,
        },
    )

# The man page goes to <prefix>/share/man/man1 (pip installs wheel data there).
setup(ext_modules=ext_modules, data_files=[("share/man/man1", ["man/etcdgw.1"])])
