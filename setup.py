"""The one thing pyproject.toml cannot say: the optional C accelerator of the codecs
(domain/_speedups.c). ``optional=True``: where it cannot be compiled (no C compiler,
no Python headers) the install still succeeds and the codecs run on msgspec and the
standard library alone, with the same results and errors (domain/codecs.py);
``asyncapy run`` says so in its log. Everything else about the package is in
pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "asyncapy.domain._speedups",
            sources=["domain/_speedups.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
            optional=True,
        )
    ]
)
