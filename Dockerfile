# FLARE 2024 Task 1 submission image. The organizers run, once per case:
#   docker container run --gpus "device=0" -m 28G --name TEAM --rm \
#     -v $PWD/inputs/:/workspace/inputs/ -v $PWD/TEAM_outputs/:/workspace/outputs/ \
#     TEAM:latest /bin/bash -c "sh predict.sh"
# so the image needs bash, WORKDIR /workspace and /workspace/predict.sh; the wall time of
# that whole command is the measured running time. See docs/container.md.
#
# Base image: the official PyTorch runtime image for the torch pinned in requirements.txt
# (torch==2.13.0). PyTorch 2.13's stable builds are CUDA 12.6 (cuDNN 9.10) and CUDA 13.0
# (cuDNN 9.20), CUDA 13.2 is experimental (pytorch/pytorch RELEASE.md); the PyPI wheel of
# torch 2.13.0 is the CUDA 13.0 build (it depends on the cuda-toolkit 13.0 / nvidia-*-cu13
# wheels). Official images of both stable builds are in use in public Dockerfiles (the
# first also pinned by digest):
#   pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime   (default here)
#   pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime
# CUDA 12.6 is the default because it runs on the widest range of host drivers (CUDA 12.x
# minor-version compatibility from driver 525; CUDA 13 needs driver 580 or newer) and still
# covers every GPU the challenge used (Turing, Ampere such as the RTX 3090, Ada, Hopper).
# On a host with a driver >= 580 the CUDA 13.0 tag works as well:
#   docker build --build-arg BASE_IMAGE=pytorch/pytorch:2.13.0-cuda13.0-cudnn9-runtime ...
# A runtime (not devel) image: no compiler or CUDA headers, several GB smaller, and nothing
# here compiles CUDA code. A slim Python image plus the PyPI wheel would pull the same CUDA
# libraries as pip packages (no smaller) and tie the image to driver >= 580. Pin the digest
# (`@sha256:...`) for bit-for-bit reproducible builds once the image has been pulled.
#
# `make image-local` builds this same file on a local CPU base laid out like the official
# image (container/base-local.sh: Debian's Python 3.11 at /opt/conda/bin/python, the CPU
# torch wheel) for machines with no image registry and no GPU, with
#   --build-arg REQUIRE_CUDA=0 --build-arg PIP_INSTALL_ARGS="--no-index --find-links /tmp/deps"
# (the wheels come from build/wheelhouse on the host, so the build itself is offline).
#
# Three stages, so that what only the build needs stays out of the image: `deps` installs
# the inference requirements into their own folder (wheels and pip's work stay behind),
# `model` slims the checkpoints (the optimizer state stays behind), and the final stage
# copies both results onto the base.
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime

# -- deps: the inference requirements, in /opt/flare24/site-packages -----------------------
FROM ${BASE_IMAGE} AS deps
# Extra pip options: empty for the official base (pip downloads from the package index);
# "--no-index --find-links /tmp/deps" for an offline build from build/wheelhouse.
ARG PIP_INSTALL_ARGS=""
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# build/wheelhouse exists only when `make image-local` made it: the wildcard lets the COPY
# succeed without it (the wheels are then copied into /tmp/deps next to the requirements).
COPY requirements.txt build/wheelhous[e] /tmp/deps/
# torch comes with the base (and is checked below), so it is left out here. --no-deps:
# requirements.txt (the lock's view, `make lock`) pins every package the inference path
# imports at the locked version, and nothing else.
# dynamic-network-architectures declares timm (and with it torchvision, huggingface_hub,
# safetensors: about 440 MB in the image, torchvision a build that does not even match
# the base's torch) and einops, but imports them only in its transformer architectures
# (Primus, EVA), which nnU-Net's U-Nets never load. tests/test_docker.py shows the
# predictor running in the image without them.
# hadolint ignore=DL3013
RUN grep -v '^torch==' /tmp/deps/requirements.txt > /tmp/deps/requirements-image.txt \
    && python -m pip install --no-deps --target /opt/flare24/site-packages \
        ${PIP_INSTALL_ARGS} -r /tmp/deps/requirements-image.txt
ENV PYTHONPATH=/opt/flare24/site-packages

# -- model: the model folder(s) to bake in, with slim checkpoints ---------------------------
FROM deps AS model
# Model folder(s) to bake in, relative to the build context (only models/ is sent, see
# .dockerignore). A folder with plans.json is one model; a folder whose sub-folders are
# model folders is an ensemble (predict.sh averages their logits).
ARG MODEL=models/demo
# 1: keep only what prediction reads from each checkpoint (the network weights and the
# trainer's name, configuration and mirroring axes; no optimizer state, about half of a
# checkpoint that nnUNetv2_train wrote). 0: copy the checkpoints as they are.
ARG SLIM_CHECKPOINTS=1
COPY container/slim.py /tmp/slim.py
COPY ${MODEL} /tmp/model
RUN if [ "$SLIM_CHECKPOINTS" = 1 ]; then python /tmp/slim.py /tmp/model; fi

# -- the submission image -------------------------------------------------------------------
FROM ${BASE_IMAGE}
# 1: the build fails unless torch in the base has CUDA support. Only the local CPU base
# (make image-local) sets 0.
ARG REQUIRE_CUDA=1

# Runtime settings (each one is read at start-up, so it is set here once):
# - PYTHONPATH: where the deps stage installed the inference requirements (before the
#   base's own site-packages, so an older numpy in the base is not picked up).
# - PYTHONDONTWRITEBYTECODE: the container is thrown away after each case (--rm); writing
#   .pyc files would be wasted I/O. The bytecode is compiled at build time instead (below).
# - PYTHONUNBUFFERED: the log reaches `docker logs` as it happens, even if the run is killed.
# - CPU threads (OMP/MKL/OpenBLAS): predict.sh sets them to the number of usable cores, at
#   most 8: torch otherwise starts one thread per host core, and the CPU side of a GPU run
#   (normalisation, gzip, memcpy) gains nothing beyond a few while a 64-core host pays for
#   starting and synchronising them; a fixed 8 on a 2-core host oversubscribes it. Override
#   with `docker run -e OMP_NUM_THREADS=...`.
# - CUDA_MODULE_LOADING=LAZY: kernels are loaded when first used, which shortens CUDA
#   initialisation and keeps the context (counted in the 4 GB budget) small. torch sets
#   this itself when it is unset; stating it keeps it true if a base image changes it.
ENV PYTHONPATH=/opt/flare24/site-packages \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CUDA_MODULE_LOADING=LAZY

WORKDIR /workspace

# Layers from the least to the most often changed, so a code change rebuilds only the last
# few MB: dependencies (hundreds of MB), then the model, then the code.
# The check fails the build if the base has another torch, a torch without CUDA (unless
# REQUIRE_CUDA=0), a Python older than 3.11, or if numpy does not come from the deps stage.
COPY --from=deps /opt/flare24/site-packages /opt/flare24/site-packages
RUN python -c "import os, sys, numpy, torch; \
assert sys.version_info >= (3, 11), sys.version; \
assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__; \
assert torch.version.cuda or os.environ['REQUIRE_CUDA'] == '0', 'torch in the base has no CUDA'; \
assert numpy.__file__.startswith('/opt/flare24/'), numpy.__file__"

COPY --from=model /tmp/model models/submission

COPY predict.sh ./
COPY inference/ inference/
# Bytecode compiled now: Python then loads inference/ without compiling it on every
# container start (site-packages were compiled by pip already). Importing every module of
# the predictor proves the requirements are complete (the network class included).
RUN python -m compileall -q inference \
    && python -c "import inference.cli, inference.model, inference.predictor; \
import dynamic_network_architectures.architectures.unet"

# The organizers give the command themselves; this default makes `docker run IMAGE` do the same.
CMD ["/bin/bash", "-c", "sh predict.sh"]
