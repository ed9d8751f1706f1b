#!/usr/bin/env bash
# The system packages the tests need (network namespaces and iptables for the chaos tests, chromium
# to render reports, podman & co. for tests/containers, etcd 3.4 for the benchmark smoke), installed
# from Debian when missing. Needs root; scripts/test.sh runs it when it runs as root (and .ci/run
# through it), so the README's test command works on a fresh machine.
set -euo pipefail
need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v iptables >/dev/null 2>&1 || need+=(iptables)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v mount >/dev/null 2>&1 || need+=(mount)
# Containers (tests/containers): podman with runc and CNI's DNS plugin (compose services find each
# other by name), debootstrap for the base image (no registry is reachable).
command -v podman >/dev/null 2>&1 || need+=(podman)
command -v runc >/dev/null 2>&1 || need+=(runc)
command -v debootstrap >/dev/null 2>&1 || need+=(debootstrap)
[ -e /usr/lib/cni/dnsname ] || need+=(golang-github-containernetworking-plugin-dnsname)
# etcd 3.4, the peer system of the benchmark smoke (tests/integration/test_bench_smoke.py), and
# etcdctl 3.4, which drives kvstore's etcd API (tests/integration/test_etcd_api.py).
{ command -v etcd && command -v etcdctl; } >/dev/null 2>&1 || need+=(etcd-server etcd-client)
if [ "${#need[@]}" -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  # Installing etcd-server must not start a system etcd (it would take 127.0.0.1:2379):
  # a policy-rc.d that refuses every service start, for the duration of the install.
  policy=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    policy=/usr/sbin/policy-rc.d
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy"
  fi
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}"
  if [ -n "$policy" ]; then rm -f "$policy"; fi
fi
