#!/usr/bin/env bash
# Makes a Debian base image locally, for machines that cannot pull one (no
# registry): debootstrap a minimal bookworm into a folder, then `docker
# import` it. Prints the image's name. Where a registry is reachable, use
# debian:bookworm-slim instead; the image's Dockerfile takes either.
#
#   deploy/make-base-image.sh [IMAGE]      # default strata-base:bookworm
#
# Needs root, debootstrap (apt-get install debootstrap) and a Debian mirror
# (DEBIAN_MIRROR, default deb.debian.org). An image already there is kept.
set -euo pipefail
image=${1:-strata-base:bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

if docker image inspect "$image" >/dev/null 2>&1; then
    echo "$image"
    exit 0
fi
command -v debootstrap >/dev/null || {
    echo "debootstrap is missing: apt-get install debootstrap" >&2
    exit 1
}
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
# minbase: essential packages and apt only (about 120 MiB); the binary needs
# nothing beyond glibc and libgcc.
debootstrap --variant=minbase bookworm "$root" "$mirror" >&2
rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
tar -C "$root" -c . | docker import - "$image" >/dev/null
echo "$image"
