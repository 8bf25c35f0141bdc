# flowserve for GPU nodes. Build: docker build -t flowserve .   Run: docker run --gpus all -p 8001:8001 -p 8002:8002 flowserve
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 10001 flowserve
WORKDIR /opt/flowserve

# The same install as the README's, with the CUDA builds: PyPI's torch==2.13.0 for Linux is the
# CUDA build, and onnxruntime-gpu replaces the CPU onnxruntime.
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
EXPOSE 8001 8002
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s --retries=3 \
    CMD ["/opt/flowserve/.venv/bin/python", "-m", "server.healthprobe", "127.0.0.1:8001"]

# Exec form: the server is PID 1's only child and receives SIGTERM directly, so it drains.
ENTRYPOINT ["/opt/flowserve/.venv/bin/flowserve", "serve", "--store", "/opt/flowserve/model_store", "--host", "0.0.0.0", "--port", "8001", "--metrics-port", "8002"]
