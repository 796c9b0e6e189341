# The runtime base of the patchport images where no container registry can be reached:
# what distroless `cc` gives (glibc, libgcc, CA certificates) on Debian bookworm made
# locally. deploy/docker/Dockerfile takes it as RUNTIME_IMAGE.
ARG BASE_IMAGE=debian:bookworm
FROM ${BASE_IMAGE}
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
