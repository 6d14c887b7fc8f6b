#!/usr/bin/env bash
# Build, once per version, the kube-apiserver the Kubernetes-datastore tests run against.
#
# k8s.io/kubernetes cannot be `go install`ed: its go.mod replaces every k8s.io/* staging
# module with a ./staging path. So we generate a throw-away wrapper module in the cache
# that requires k8s.io/kubernetes and re-states each of those replaces as the published
# staging release (k8s.io/api => k8s.io/api v0.34.4 for v1.34.4), then `go build` the
# command from it. Binaries are cached outside the clone, keyed by version; the Go module
# and build caches are reused as well.
#
# usage: tests/k8s/apiserver.sh [build|path]
#   build  build kube-apiserver if it is not cached yet, then print its path (default)
#   path   print the path the binary is (or would be) cached at, build nothing
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.34.4}
GO=${GO:-/usr/local/go/bin/go}
CACHE_DIR=${CALICO_CACHE_DIR:-/var/cache/pycalico-cni}/k8s
BINARY=$CACHE_DIR/kube-apiserver-$K8S_VERSION

staging_version() {  # v1.34.4 -> v0.34.4: staging modules are tagged with major 0
  echo "v0.${1#v1.}"
}

write_wrapper_module() {  # DIR: go.mod requiring k8s.io/kubernetes with its replaces restated
  local dir=$1 upstream_mod staging
  upstream_mod=$(cd "$dir" && "$GO" mod download -json "k8s.io/kubernetes@$K8S_VERSION" \
                 | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
  staging=$(staging_version "$K8S_VERSION")
  {
    echo "module pycalico.test/kube-apiserver-build"
    echo
    echo "go 1.24.0"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "replace ("
    sed -n "s#^[[:space:]]*\(k8s\.io/[^ ]*\) => \./staging/src/.*#\t\1 => \1 $staging#p" \
      "$upstream_mod"
    echo ")"
  } > "$dir/go.mod"
  grep -q "k8s.io/api => k8s.io/api $staging" "$dir/go.mod" || {
    echo "apiserver.sh: found no staging replaces in $upstream_mod" >&2
    exit 1
  }
}

build() {
  local src=$CACHE_DIR/src-$K8S_VERSION minor=${K8S_VERSION#v1.}
  minor=${minor%%.*}
  mkdir -p "$src"
  write_wrapper_module "$src"
  echo "apiserver.sh: building kube-apiserver $K8S_VERSION (several minutes the first time)" >&2
  (
    cd "$src"
    GOFLAGS=-mod=mod "$GO" get "k8s.io/kubernetes/cmd/kube-apiserver@$K8S_VERSION" >&2
    # The version stamp is what /version reports; without it the server says v0.0.0-master.
    CGO_ENABLED=0 GOFLAGS=-mod=mod "$GO" build -trimpath -o "$BINARY.tmp" \
      -ldflags "-s -w \
        -X k8s.io/component-base/version.gitVersion=$K8S_VERSION \
        -X k8s.io/component-base/version.gitMajor=1 \
        -X k8s.io/component-base/version.gitMinor=$minor \
        -X k8s.io/component-base/version.gitTreeState=clean" \
      k8s.io/kubernetes/cmd/kube-apiserver
  )
  mv -f "$BINARY.tmp" "$BINARY"
}

case ${1:-build} in
  build) [ -x "$BINARY" ] || build; echo "$BINARY" ;;
  path) echo "$BINARY" ;;
  *) echo "usage: $0 [build|path]" >&2; exit 2 ;;
esac
