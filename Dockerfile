# dealstream worker image: `docker build -t dealstream .`, then `docker run dealstream worker`
# (or learner, simulate, replay, ...). Settings come from DEALSTREAM_* environment variables.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Every dependency ships manylinux wheels for CPython 3.11, so no compiler is needed.
# .dockerignore keeps the venv, caches, local service state and tests out of the context.
COPY . .
RUN pip install .

# No reason to run a stream processor as root.
RUN useradd --create-home --uid 10001 dealstream
USER dealstream

# /metrics, /health, /ready (DEALSTREAM_HTTP_PORT)
EXPOSE 6066

ENTRYPOINT ["dealstream"]
CMD ["worker"]
