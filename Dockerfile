# multitune for serving and training. CPU by default:
#   docker build -t multitune .
#   export MULTITUNE_API_KEY=$(python -c 'import secrets; print(secrets.token_urlsafe(32))')
#   docker run -p 127.0.0.1:8000:8000 -e MULTITUNE_API_KEY -v $PWD/runs/quickstart:/model:ro multitune
# Inside the container the server listens on every interface, so give it an API key (clients then send
# "Authorization: Bearer $MULTITUNE_API_KEY"; /health stays open for probes). Without one it prints a
# warning. Publish the port on the host's loopback and put a TLS proxy in front (docs/serving.md).
# CUDA: a CUDA base image and the matching torch wheels, e.g.
#   docker build -t multitune:cuda --build-arg BASE_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu24.04 \
#                --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126 .
# Not built in CI (no Docker engine on the project's machines); see docs/serving.md.
ARG BASE_IMAGE=python:3.12-slim
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH

# CUDA base images have no Python; the python image has one and skips this
RUN if ! command -v python3 >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends python3 python3-venv && \
      rm -rf /var/lib/apt/lists/*; \
    fi && python3 -m venv /opt/venv

# torch first, from the index that matches the base image, so that the project never resolves another one
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

WORKDIR /app
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install ".[serve]"

RUN useradd --create-home multitune
USER multitune
EXPOSE 8000
ENTRYPOINT ["multitune"]
# the API key comes from the environment (MULTITUNE_API_KEY), never from this line: flags show in `ps`
CMD ["serve", "/model", "--host", "0.0.0.0", "--port", "8000"]
