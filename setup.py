"""The one thing pyproject.toml cannot say: the optional C accelerator of the ZiProto
codec (domain/_ziproto.c). ``optional=True``: where it cannot be compiled (no C
compiler, no Python headers) the install still succeeds and the codec uses msgspec
alone, with the same results and errors (domain/codecs.py); ``asyncapy run`` says so
in its log. Everything else about the package is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "domain._ziproto",
            sources=["domain/_ziproto.c"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers"],
            optional=True,
        )
    ]
)
