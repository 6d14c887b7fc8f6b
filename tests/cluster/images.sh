#!/usr/bin/env bash
# Build, once per busybox version, the two container images the cluster tests run: no
# registry is reachable, so both are made here from Debian's static busybox with umoci
# and written as docker archives with skopeo, which `ctr images import` loads.
#   localhost/busybox:<tag>  /bin/busybox with its applets (sh, httpd, wget, nc, ...)
#   localhost/pause:<tag>    the sandbox image: a shell that sleeps until TERM or INT
#
# usage: tests/cluster/images.sh build|tag
#   build  build the archives if they are not cached yet, then print their paths
#   tag    print the image tag
set -euo pipefail

CACHE_DIR=${CALICO_CACHE_DIR:-/var/cache/pycalico-cni}/images
BUSYBOX=/bin/busybox
VERSION=$(dpkg-query -W -f '${Version}' busybox-static)
TAG=$(echo "${VERSION#*:}" | tr -c 'A-Za-z0-9_.\n-' '_')
PAUSE_SCRIPT='trap "exit 0" TERM INT; while :; do sleep 3600 & wait $!; done'

archive() {  # NAME -> cached path
  echo "$CACHE_DIR/$1-$TAG.tar"
}

build() {
  work=$(mktemp -d "${TMPDIR:-/tmp}/calico-images.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  umoci init --layout "$work/oci"
  umoci new --image "$work/oci:busybox"
  umoci unpack --image "$work/oci:busybox" "$work/bundle"
  local rootfs=$work/bundle/rootfs applet
  mkdir -p "$rootfs"/{bin,etc,tmp,root,www}
  chmod 1777 "$rootfs/tmp"
  cp "$BUSYBOX" "$rootfs/bin/busybox"
  for applet in $("$BUSYBOX" --list); do
    [ "$applet" = busybox ] || ln -s busybox "$rootfs/bin/$applet"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' \
    > "$rootfs/etc/passwd"
  printf 'root:x:0:\nnobody:x:65534:\n' > "$rootfs/etc/group"
  umoci repack --image "$work/oci:busybox" "$work/bundle"
  umoci config --image "$work/oci:busybox" --config.cmd /bin/sh --config.env PATH=/bin
  umoci config --image "$work/oci:busybox" --tag pause --clear=config.cmd \
    --config.entrypoint /bin/sh --config.entrypoint -c --config.entrypoint "$PAUSE_SCRIPT"
  mkdir -p "$CACHE_DIR"
  local name
  for name in busybox pause; do
    rm -f "$(archive "$name").tmp"
    skopeo copy --quiet "oci:$work/oci:$name" \
      "docker-archive:$(archive "$name").tmp:localhost/$name:$TAG"
    mv -f "$(archive "$name").tmp" "$(archive "$name")"
  done
}

case ${1:-build} in
  build)
    [ -f "$(archive busybox)" ] && [ -f "$(archive pause)" ] || build
    archive busybox
    archive pause
    ;;
  tag) echo "$TAG" ;;
  *) echo "usage: $0 build|tag" >&2; exit 2 ;;
esac
