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
ARG BASE_IMAGE=pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime
FROM ${BASE_IMAGE}

# Model folder(s) to bake in, relative to the build context (only models/ is sent, see
# .dockerignore). A folder with plans.json is one model; a folder whose sub-folders are
# model folders is an ensemble (predict.sh averages their logits).
ARG MODEL=models/demo

# Runtime settings (each one is read at start-up, so it is set here once):
# - PYTHONDONTWRITEBYTECODE: the container is thrown away after each case (--rm); writing
#   .pyc files would be wasted I/O. The bytecode is compiled at build time instead (below).
# - PYTHONUNBUFFERED: the log reaches `docker logs` as it happens, even if the run is killed.
# - OMP/MKL/OpenBLAS threads: torch otherwise starts one CPU thread per host core; the CPU
#   side of a GPU run (normalisation, gzip, memcpy) gains nothing beyond a few threads and
#   a 64-core host pays for spinning up and synchronising them. 8 also serves the CPU
#   fallback well; override with `docker run -e OMP_NUM_THREADS=...`.
# - CUDA_MODULE_LOADING=LAZY: kernels are loaded when first used, which shortens CUDA
#   initialisation and keeps the context (counted in the 4 GB budget) small. torch sets
#   this itself when it is unset; stating it keeps it true if a base image changes it.
# - PIP_*: no pip cache left in the image layers, no version check during the build.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OMP_NUM_THREADS=8 \
    MKL_NUM_THREADS=8 \
    OPENBLAS_NUM_THREADS=8 \
    CUDA_MODULE_LOADING=LAZY \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /workspace

# Layers from the least to the most often changed, so a code change rebuilds only the last
# few MB: dependencies (hundreds of MB), then the model, then the code.
# The inference requirements only: torch is already in the base image and requirements.txt
# pins the same version (2.13.0 matches 2.13.0+cu126), so pip keeps the CUDA build; no
# training stack (nnunetv2, scikit-learn, ...) is installed. The check fails the build if
# pip replaced torch or the base image has another torch or a Python older than 3.11.
COPY requirements.txt constraints.txt ./
RUN python -m pip install -r requirements.txt \
    && python -c "import sys, torch; \
assert sys.version_info >= (3, 11), sys.version; \
assert torch.__version__.split('+')[0] == '2.13.0', torch.__version__; \
assert torch.version.cuda, 'torch in the image has no CUDA support'"

COPY ${MODEL} models/submission

COPY predict.sh ./
COPY inference/ inference/
# Bytecode compiled now: Python then loads inference/ without compiling it on every
# container start (site-packages were compiled by pip already).
RUN python -m compileall -q inference

# The organizers give the command themselves; this default makes `docker run IMAGE` do the same.
CMD ["/bin/bash", "-c", "sh predict.sh"]
