# Stand-in for python:3.11-slim-bookworm, for hosts that cannot pull it:
# Debian bookworm's own Python 3.11 with venv and pip, as `python`.
ARG BASE
FROM ${BASE}
ENV LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive
RUN apt-get -oAcquire::Check-Valid-Until=false update -qq \
 && apt-get install -y -qq --no-install-recommends python3 python3-venv python3-pip python-is-python3 \
        ca-certificates passwd >/dev/null \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin
# The host's CA bundle: pip's TLS may go through a proxy only it trusts.
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
CMD ["python3"]
