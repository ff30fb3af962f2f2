# The one kfyolo image: every pipeline step runs in it (KFP base_image) and so does every PyTorchJob
# pod. A CUDA PyTorch base; the project and its locked dependencies (torch 2.13.0 with its CUDA 13
# wheels, kfp, ...) installed from uv.lock into /opt/venv with uv's own Python 3.11, first on PATH,
# so the lock decides every version (the base's conda torch is not used); a non-root user.
#   make image IMAGE=registry.example.com/kfyolo:0.1.0 && docker push registry.example.com/kfyolo:0.1.0
ARG BASE=pytorch/pytorch:2.13.0-cuda13.2-cudnn9-runtime
FROM ghcr.io/astral-sh/uv:0.13.9 AS uv

FROM ${BASE}
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=only-managed \
    UV_PROJECT_ENVIRONMENT=/opt/venv
# bash runs the PyTorchJob pod command; libglib2.0-0 is what opencv-python-headless needs at runtime.
RUN apt-get update \
 && apt-get install -y --no-install-recommends bash ca-certificates libglib2.0-0 \
 && rm -rf /var/lib/apt/lists/*
COPY --from=uv /uv /usr/local/bin/uv

WORKDIR /opt/kfyolo
# Dependencies first (a layer that changes only with the lock), then the project itself.
COPY pyproject.toml uv.lock README.md ./
RUN uv python install 3.11 \
 && uv sync --frozen --no-dev --extra export --no-install-project --python 3.11
COPY trainer ./trainer
COPY components ./components
COPY pipelines ./pipelines
RUN uv sync --frozen --no-dev --extra export --no-editable --python 3.11 \
 && rm -rf /root/.cache/uv

# Matches runAsUser / runAsGroup in k8s/*.yaml and the launcher's pods (POD_USER).
RUN groupadd --gid 10001 kfyolo \
 && useradd --uid 10001 --gid 10001 --create-home --home-dir /home/kfyolo --shell /bin/bash kfyolo
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/kfyolo \
    KFYOLO_CACHE=/home/kfyolo/.cache/kfyolo
USER 10001:10001
WORKDIR /home/kfyolo
# Build matplotlib's font cache now, not in every pod; and fail the build if the image cannot
# import what the steps and the pods run.
RUN python -c "import matplotlib.font_manager, torch, kfp, kubernetes, kubeflow.training, onnxruntime, trainer.train, trainer.export, components.launchers.pytorchjob" \
 && torchrun --help > /dev/null
CMD ["python", "-m", "trainer.train", "--help"]
