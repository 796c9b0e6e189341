# An S3-compatible server for the compose stack where no container registry can be
# reached: moto's server (PyPI) on a base made locally. Listens on 9000, accepts any
# credentials; `s3-bucket NAME` creates a bucket (idempotent), for the stack's bucket job.
# Behind a TLS-intercepting proxy, pass its CA bundle for pip:
#   docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt ...
ARG BASE_IMAGE=debian:bookworm
FROM ${BASE_IMAGE}
ARG MOTO_VERSION=5.2.5
RUN --mount=type=secret,id=ca \
    apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
       python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/moto \
    && if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && /opt/moto/bin/pip install --no-cache-dir --disable-pip-version-check "moto[server]==${MOTO_VERSION}"
COPY s3-bucket /usr/local/bin/s3-bucket
ENV PATH=/opt/moto/bin:$PATH
USER 65532:65532
EXPOSE 9000
CMD ["moto_server", "-H", "0.0.0.0", "-p", "9000"]
