#!/usr/bin/env bash
# Builds the base image `localhost/debian:bookworm-slim` with debootstrap, for machines that
# cannot pull from a container registry (a Dockerfile's `FROM debian:bookworm-slim` then resolves
# to it). Does nothing if the image exists. Needs root, debootstrap and podman.
#   docker/base-image.sh [MIRROR]      (default: the first Debian mirror in the host's apt sources)
# The host's CA bundle is copied in so that pip inside an image build trusts what the host trusts.
set -euo pipefail
IMAGE=localhost/debian:bookworm-slim
if podman image exists "$IMAGE"; then
  echo "$IMAGE exists"
  exit 0
fi
mirror="${1:-}"
if [ -z "$mirror" ]; then
  mirror=$(grep -hoE '(URIs:|deb) +https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null \
           | grep -oE 'https?://[^ ]+' | head -n1 || true)
fi
mirror="${mirror:-http://deb.debian.org/debian}"
rootfs=$(mktemp -d /tmp/kvstore-rootfs.XXXXXX)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase bookworm "$rootfs" "$mirror"
# What `-slim` leaves out, and apt lists the image does not need.
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/usr/share/doc/* "$rootfs"/usr/share/man/*
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  mkdir -p "$rootfs/etc/ssl/certs"
  cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
fi
if compgen -G "/usr/local/share/ca-certificates/*" >/dev/null; then
  mkdir -p "$rootfs/usr/local/share/ca-certificates"
  cp /usr/local/share/ca-certificates/* "$rootfs/usr/local/share/ca-certificates/"
fi
tar --numeric-owner -C "$rootfs" -c . | podman import --change 'CMD ["/bin/bash"]' - "$IMAGE"
echo "built $IMAGE"
