#!/usr/bin/env bash
# Build the local CPU base image: laid out like the official pytorch/pytorch image (Python
# at /opt/conda/bin/python, first on PATH, torch preinstalled, pip, bash, WORKDIR
# /workspace), made from Debian bookworm packages and the CPU torch wheel, so that the
# project's Dockerfile builds and runs on a machine with no image registry and no GPU.
#
#   bash container/base-local.sh TAG          (what `make base-local` runs)
#
# torch and its dependencies are downloaded first as wheels for CPython 3.11 on x86_64
# (`$PIP download torch==$TORCH_VERSION`; PIP defaults to `python3 -m pip`), then installed
# inside the new root filesystem with no index. torch must be the CPU build: on this
# project's machines pip finds it on local disk; elsewhere point pip at PyTorch's CPU wheel
# index with TORCH_PIP_ARGS="--index-url <that index>" (PyPI's torch 2.13.0 for Linux is the
# CUDA build, several GB). Nothing is done if TAG exists already (FORCE=1 rebuilds it).
#
# Why mmdebstrap and not debootstrap: both make a Debian root filesystem from Debian's
# packages, but mmdebstrap downloads with apt in parallel, can stop at the `essential`
# package set (no apt, no perl modules: the image never installs Debian packages), writes
# the tarball to a pipe (straight into `docker import`, no second copy on disk) and runs
# the torch install as a hook in the same pass. Measured on 2 cores: about half of
# debootstrap's CPU time for the same packages.
set -euo pipefail

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
case ${1:-} in -h | --help) usage; exit 0 ;; esac
if [ $# -ne 1 ]; then
    echo "usage: bash container/base-local.sh TAG (--help for more)" >&2
    exit 2
fi
tag=$1
docker=${DOCKER:-docker}
pip=${PIP:-python3 -m pip}
torch_version=${TORCH_VERSION:-2.13.0}
suite=${DEBIAN_SUITE:-bookworm}   # Python 3.11, as pinned by the project

if [ "${FORCE:-0}" != 1 ] && "$docker" image inspect "$tag" >/dev/null 2>&1; then
    echo "base image $tag exists (FORCE=1 rebuilds it)" >&2
    exit 0
fi
for tool in mmdebstrap "$docker"; do
    if ! command -v "$tool" >/dev/null; then
        echo "error: $tool not found (apt-get install mmdebstrap docker.io)" >&2
        exit 2
    fi
done

start=$(date +%s)
wheels=$(mktemp -d "${TMPDIR:-/tmp}/base-local-wheels.XXXXXX")
trap 'rm -rf "$wheels"' EXIT
# shellcheck disable=SC2086 # PIP and TORCH_PIP_ARGS are split into words on purpose
$pip download --quiet --disable-pip-version-check --only-binary=:all: --python-version 3.11 \
    --implementation cp --abi cp311 --platform manylinux_2_28_x86_64 \
    --platform manylinux2014_x86_64 ${TORCH_PIP_ARGS:-} \
    -d "$wheels" "torch==$torch_version"
torch_wheel=$(basename "$(ls "$wheels"/torch-*.whl)")
case $torch_wheel in
    *+cpu*) ;;
    *) echo "warning: $torch_wheel is not marked +cpu: a CUDA build makes a base of several GB" >&2 ;;
esac
echo "building $tag: Debian $suite + $torch_wheel" >&2
# Packages: python3 (3.11) and python3-venv (ensurepip, so the venv has pip, as the
# official image has), libstdc++6 (torch and SimpleITK link it; not part of `essential`).
# Documentation, manuals and translations are never unpacked.
# The hooks run as root in the new tree: /opt/conda becomes a venv (the official image's
# Python location), torch is installed into it from the wheel folder with no index and a
# clean environment (the host's pip settings must not leak in), and the wheels are removed.
mmdebstrap --quiet --variant=essential \
    --include=python3,python3-venv,libstdc++6 \
    --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --customize-hook='chroot "$1" /usr/bin/env -i PATH=/usr/bin:/bin python3 -m venv /opt/conda' \
    --customize-hook="mkdir \"\$1/tmp/wheels\" && cp $wheels/*.whl \"\$1/tmp/wheels/\"" \
    --customize-hook='chroot "$1" /usr/bin/env -i PATH=/opt/conda/bin:/usr/bin:/bin HOME=/root \
        python -m pip install --quiet --no-cache-dir --no-index --disable-pip-version-check \
        --find-links /tmp/wheels torch' \
    --customize-hook='rm -rf "$1/tmp/wheels" "$1/root/.cache" && mkdir -p "$1/workspace"' \
    "$suite" - |
    "$docker" import \
        --change 'ENV PATH=/opt/conda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV LANG=C.UTF-8' \
        --change 'WORKDIR /workspace' \
        --change 'CMD ["/bin/bash"]' \
        --message "local CPU base laid out like pytorch/pytorch (container/base-local.sh)" \
        - "$tag" >/dev/null
"$docker" run --rm --network none "$tag" python -W ignore::UserWarning -c \
    "import sys, torch; assert sys.executable == '/opt/conda/bin/python', sys.executable; \
print(f'{sys.executable} {sys.version.split()[0]} torch {torch.__version__}')" >&2
echo "base image $tag built in $(($(date +%s) - start)) s" >&2
