"""Build of qkdnode's ahead-of-time compiled kernels (everything else is in pyproject.toml).

Every ``qkdnode/native/*.pyx`` becomes the extension module ``qkdnode.native.<stem>``,
compiled by the C compiler at ``pip install`` time. The extensions are optional: where no
compiler is found the install still succeeds and the node runs the numpy twins of the
kernels (``qkdnode.jit`` says which kernels run).
"""

from __future__ import annotations

from pathlib import Path

from setuptools import Extension, setup


def _extensions() -> list[Extension]:
    sources = sorted(Path("qkdnode/native").glob("*.pyx"))
    if not sources:
        return []
    from Cython.Build import cythonize

    exts = [
        Extension(
            f"qkdnode.native.{p.stem}",
            [p.as_posix()],
            extra_compile_args=["-O3"],
            optional=True,
        )
        for p in sources
    ]
    return list(
        cythonize(
            exts,
            language_level=3,
            compiler_directives={"boundscheck": False, "wraparound": False, "cdivision": True},
        )
    )


setup(ext_modules=_extensions())
