# HAProxy with modsec-spoa's configs, unchanged: deploy/haproxy/ is the one
# source for the local stack, the tests, this image and the Kubernetes
# ConfigMap. Addresses come from the environment (see haproxy.cfg's
# presetenv list). The build context is the repository root:
#   docker build -f deploy/docker/haproxy.Dockerfile -t modsec-spoa/haproxy .
# The official image runs as the non-root user "haproxy" and stops with
# SIGUSR1 (soft stop: finish the requests in flight).
ARG HAPROXY_IMAGE=haproxy:3.2
FROM ${HAPROXY_IMAGE}
COPY deploy/haproxy/haproxy.cfg deploy/haproxy/spoe-modsecurity.conf /usr/local/etc/haproxy/
# SPOE_CONF is absolute: a relative one would resolve against the working
# directory. Bind on all interfaces, unprivileged ports.
ENV SPOE_CONF=/usr/local/etc/haproxy/spoe-modsecurity.conf \
    FRONTEND_ADDR=0.0.0.0:8080 \
    FRONTEND_ALT_ADDR=0.0.0.0:8081
# Fail the build, not the deployment, on a config this HAProxy rejects.
RUN ["haproxy", "-c", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]
EXPOSE 8080 8081
