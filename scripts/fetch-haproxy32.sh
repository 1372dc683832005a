#!/usr/bin/env bash
# Unpacks HAProxy 3.2 (Debian "forky") into .tools/haproxy32 without touching
# the system, and writes a wrapper .tools/haproxy32/haproxy that runs it
# through the unpacked loader. 3.2 has the new SPOP mux that current users run.
# HAPROXY32_DIR puts it elsewhere (the Compose test's haproxy:3.2 stand-in).
# Every shared library the binary loads is fetched, none is taken from the
# host: the wrapper's `-v` check below fails on a host that lacks one.
set -euo pipefail
cd "$(dirname "$0")/.."
D=${HAPROXY32_DIR:-$PWD/.tools/haproxy32}
WRAPPER=$D/haproxy
if [ -x "$WRAPPER" ] && "$WRAPPER" -v >/dev/null 2>&1; then exit 0; fi
rm -rf "$D"; mkdir -p "$D/lists/partial" "$D/debs" "$D/root"
echo "deb http://deb.debian.org/debian forky main" > "$D/sources.list"
# Check-Valid-Until: the mirror may serve a snapshot whose Release has expired.
APT=(-oDir::State::Lists="$D/lists" -oDir::Etc::SourceList="$D/sources.list"
     -oDir::Etc::SourceParts=/nonexistent -oAPT::Default-Release=forky
     -oAcquire::Check-Valid-Until=false -qq)
apt-get "${APT[@]}" update
PKGS=(haproxy libc6 libcrypt1 libjemalloc2 liblua5.4-0 libopentracing-c-wrapper0t64 libopentracing1
      libpcre2-8-0 libssl3t64 libstdc++6 libgcc-s1 zlib1g libzstd1)
# As root into a root-owned folder: no _apt sandbox to drop to.
(cd "$D/debs" && apt-get "${APT[@]}" -oAPT::Sandbox::User=root download "${PKGS[@]}")
for deb in "$D"/debs/*.deb; do dpkg -x "$deb" "$D/root"; done
R=$D/root
cat > "$WRAPPER" <<WRAP
#!/bin/sh
exec "$R/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2" --library-path "$R/usr/lib/x86_64-linux-gnu:$R/lib/x86_64-linux-gnu" "$R/usr/sbin/haproxy" "\$@"
WRAP
chmod +x "$WRAPPER"
"$WRAPPER" -v | head -1
