# flowserve for GPU nodes.
#   Build: docker build -t flowserve .
#   Run:   docker run --gpus all -p 8001:8001 -p 8002:8002 flowserve
#   Own models: docker run --gpus all -v /srv/models:/opt/flowserve/model_store:ro ... flowserve
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 --user-group flowserve
WORKDIR /opt/flowserve

# The install steps of the README's "GPU nodes" section, verbatim (tests/test_dockerfile.py
# checks that they agree): the project from pyproject.toml (PyPI's Linux torch==2.13.0 is the
# CUDA build), then onnxruntime-gpu in place of the CPU onnxruntime, and triton for the fused
# kernels.
COPY pyproject.toml README.md ./
COPY flows/ flows/
COPY training/ training/
COPY export/ export/
COPY server/ server/
COPY protos/ protos/
COPY flowserve/ flowserve/
RUN python3.11 -m venv .venv \
    && .venv/bin/pip install -e . \
    && .venv/bin/pip uninstall -y onnxruntime \
    && .venv/bin/pip install onnxruntime-gpu==1.31.1 triton==3.9.0

# Shipped models are baked in; mount a volume over /opt/flowserve/model_store to override them.
COPY --chown=flowserve:flowserve model_store/ model_store/

USER flowserve
# 8001: gRPC (flowserve.v1, Open Inference Protocol, health, reflection); 8002: /metrics.
EXPOSE 8001 8002
# The project's own probe of grpc.health.v1 (exit 0 iff SERVING, 3 s timeout); plaintext only.
HEALTHCHECK --interval=10s --timeout=5s --start-period=60s --retries=3 \
    CMD ["/opt/flowserve/.venv/bin/python", "-m", "server.healthprobe", "127.0.0.1:8001", "--timeout", "3"]

# Exec form: the server is PID 1 and receives SIGTERM itself, so it drains (grace 30 s by
# default; give `docker stop -t` / Kubernetes a longer grace than that).
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/flowserve/.venv/bin/flowserve", "serve", "--store", "/opt/flowserve/model_store", "--host", "0.0.0.0", "--port", "8001", "--metrics-port", "8002"]
