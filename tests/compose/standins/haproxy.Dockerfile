# Stand-in for haproxy:3.2, for hosts that cannot pull it: Debian forky's
# HAProxy 3.2 unpacked by scripts/fetch-haproxy32.sh, the way the native
# tests run it. The script runs here on a bare Debian, so a shared library
# it forgets to fetch fails this build (it once missed libopentracing1).
ARG BASE
FROM ${BASE} AS unpack
COPY fetch-haproxy32.sh /src/scripts/fetch-haproxy32.sh
RUN HAPROXY32_DIR=/opt/haproxy32 bash /src/scripts/fetch-haproxy32.sh \
 && rm -rf /opt/haproxy32/debs /opt/haproxy32/lists

FROM ${BASE}
COPY --from=unpack /opt/haproxy32 /opt/haproxy32
# What the official image has: the binary on PATH, user haproxy, the config
# in /usr/local/etc/haproxy, its entrypoint, soft stop on SIGUSR1.
RUN ln -s /opt/haproxy32/haproxy /usr/local/sbin/haproxy \
 && groupadd --system haproxy \
 && useradd --system --gid haproxy --home-dir /var/lib/haproxy --no-create-home --shell /usr/sbin/nologin haproxy \
 && mkdir -p /usr/local/etc/haproxy /var/lib/haproxy \
 && chown haproxy:haproxy /var/lib/haproxy
COPY haproxy-entrypoint.sh /usr/local/bin/docker-entrypoint.sh
STOPSIGNAL SIGUSR1
USER haproxy
WORKDIR /var/lib/haproxy
ENTRYPOINT ["docker-entrypoint.sh"]
CMD ["haproxy", "-f", "/usr/local/etc/haproxy/haproxy.cfg"]
