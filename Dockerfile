# The AsyncAPY server image: the package installed, the examples beside it.
# docker-compose.yml runs it with two workers and a Redis session store.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The package first, so that editing an example does not reinstall it. It is built from
# /src, not from the working directory: the source folder asyncapy/ in /app would shadow
# the installed package, whose asyncapy.domain and asyncapy.adapters come from the
# top-level domain/ and adapters/ folders. A C compiler only for the build: it compiles
# the codecs' accelerator (domain/_speedups.c), and is removed after.
COPY pyproject.toml setup.py README.md /src/
COPY asyncapy /src/asyncapy
COPY domain /src/domain
COPY adapters /src/adapters
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && pip install /src \
    && apt-get purge -y --auto-remove gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/* /src \
    && python -c "import asyncapy.domain._speedups" \
    && useradd --create-home --uid 10001 asyncapy

# `asyncapy run MODULE:ATTR` imports from the working directory.
COPY examples ./examples

USER asyncapy
EXPOSE 8081

# Exec form: asyncapy is PID 1 and gets `docker stop`'s SIGTERM itself, so in-flight
# requests finish (shutdown_grace) before the container exits.
CMD ["asyncapy", "run", "examples.echo:app", "--host", "0.0.0.0", "--port", "8081"]
