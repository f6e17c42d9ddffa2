#!/usr/bin/env bash
# debian_base.sh - a local stand-in for python:3.11-slim on a machine that can reach a Debian
# mirror but no container registry: debootstrap a minimal Debian (python3 + venv) and commit it
# as a buildah image, to pass as --build-arg BASE_IMAGE=... to Dockerfile.runtime/.toolchain.
#
# Usage:
#   debian_base.sh [--release bookworm] [--mirror URL] IMAGE
#     IMAGE            the name to commit, e.g. localhost/qexport-base:bookworm
#     --release NAME   the Debian release (default: bookworm, whose python3 is 3.11 as in
#                      python:3.11-slim)
#     --mirror URL     the Debian mirror (default: http://deb.debian.org/debian)
#
# Builds for this machine's architecture only (a foreign one needs binfmt_misc + qemu, which
# chroot isolation cannot provide). Storage: $STORAGE_DRIVER (default vfs). Needs root,
# buildah and debootstrap (apt-get install buildah debootstrap). ~1 min, ~200 MB.
# Exit status: 2 on bad arguments or missing tools, 1 when a step fails.
set -euo pipefail

PROG=debian_base
die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 1; }
usage_error() { printf '%s: error: %s; see the usage at the top of %s\n' "$PROG" "$1" "$0" >&2; exit 2; }

release=bookworm mirror=http://deb.debian.org/debian image=
while (($#)); do
    case $1 in
        --release) (($# >= 2)) || usage_error "--release needs a name"; release=$2; shift 2 ;;
        --mirror) (($# >= 2)) || usage_error "--mirror needs a URL"; mirror=$2; shift 2 ;;
        -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        -*) usage_error "unknown option $1" ;;
        *) [[ -z $image ]] || usage_error "more than one IMAGE ($image, $1)"; image=$1; shift ;;
    esac
done
[[ -n $image ]] || usage_error "missing IMAGE (e.g. localhost/qexport-base:$release)"
[[ $(id -u) == 0 ]] || usage_error "debootstrap needs root"
for tool in buildah debootstrap; do
    command -v "$tool" >/dev/null || usage_error "$tool is not installed (apt-get install buildah debootstrap)"
done
buildah=(buildah --storage-driver "${STORAGE_DRIVER:-vfs}")
keyring=()
[[ -f /usr/share/keyrings/debian-archive-keyring.gpg ]] \
    && keyring=(--keyring=/usr/share/keyrings/debian-archive-keyring.gpg)

work=$(mktemp -d "${TMPDIR:-/tmp}/$PROG.XXXXXX")
ctr=
cleanup() {
    [[ -n $ctr ]] && "${buildah[@]}" rm "$ctr" >/dev/null 2>&1
    rm -rf "$work"
}
trap cleanup EXIT

echo "$PROG: debootstrap $release from $mirror ..."
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates "${keyring[@]}" \
    "$release" "$work/rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 \
    || { tail -5 "$work/debootstrap.log" >&2; die "debootstrap $release from $mirror failed"; }
# What python:*-slim leaves out too: package caches, docs, man pages, translations.
rm -rf "$work"/rootfs/var/cache/apt/archives/*.deb "$work"/rootfs/var/lib/apt/lists/* \
    "$work"/rootfs/usr/share/{doc,man,info,locale}/*
[[ -x $work/rootfs/usr/bin/python3 ]] || die "the rootfs has no /usr/bin/python3"
tar -C "$work/rootfs" --numeric-owner -cf "$work/rootfs.tar" .

ctr=$("${buildah[@]}" from scratch)
"${buildah[@]}" add "$ctr" "$work/rootfs.tar" / >/dev/null
"${buildah[@]}" config --env LANG=C.UTF-8 --cmd python3 \
    --label "org.opencontainers.image.description=Debian $release minbase + python3 (qexport $PROG)" "$ctr"
"${buildah[@]}" commit --quiet --rm "$ctr" "$image" >/dev/null
ctr=
echo "$PROG: committed $image ($(du -sh "$work/rootfs" | cut -f1) rootfs, $(chroot "$work/rootfs" python3 -V))"
