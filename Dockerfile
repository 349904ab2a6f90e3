# dealstream worker image: `docker build -t dealstream .`, then `docker run dealstream worker`
# (or learner, simulate, replay, ...). Settings come from DEALSTREAM_* environment variables.

# The compiled part (native/, Rust) is built into a wheel in a stage of its own, so the image
# carries no compiler. Debian 12's python3 is 3.11, the runtime stage's Python.
FROM rust:1-slim-bookworm AS native
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /build && /build/bin/pip install --no-cache-dir "maturin>=1.9,<2"
COPY native /native
RUN /build/bin/maturin build --release --interpreter python3 --out /wheels \
    --manifest-path /native/Cargo.toml

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Every other dependency ships manylinux wheels for CPython 3.11, so no compiler is needed.
# .dockerignore keeps the venv, caches, local service state and tests out of the context.
COPY --from=native /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels
COPY . .
RUN pip install .

# No reason to run a stream processor as root.
RUN useradd --create-home --uid 10001 dealstream
USER dealstream

# /metrics, /health, /ready (DEALSTREAM_HTTP_PORT)
EXPOSE 6066

ENTRYPOINT ["dealstream"]
CMD ["worker"]
