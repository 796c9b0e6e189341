# A CUDA runtime base for the CUDA worker image where no container registry can be
# reached: NVIDIA's CUDA libraries from PyPI (cuBLAS, cuRAND, NVRTC, the runtime) on a
# Debian base made locally, on the loader's path. No libcuda: the NVIDIA container
# runtime mounts the driver's. CUDA_WHEELS: the pinned wheels, as
# `scripts/cuda-build.sh --wheels` prints them (the versions the binary was built with).
# Behind a TLS-intercepting proxy, pass its CA bundle for pip:
#   docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt ...
ARG BASE_IMAGE=debian:bookworm
FROM ${BASE_IMAGE}
ARG CUDA_WHEELS
RUN --mount=type=secret,id=ca \
    test -n "${CUDA_WHEELS}" \
    && apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/cuda-wheels \
    && if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && /opt/cuda-wheels/bin/pip install --no-cache-dir --disable-pip-version-check ${CUDA_WHEELS} \
    && ls -d /opt/cuda-wheels/lib/python3*/site-packages/nvidia/cu*/lib >/etc/ld.so.conf.d/cuda-wheels.conf \
    && ldconfig
