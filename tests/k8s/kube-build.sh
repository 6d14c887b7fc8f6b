#!/usr/bin/env bash
# Build, once per version, the Kubernetes commands the tests run: kube-apiserver for the
# datastore tests, and kubelet, kube-controller-manager, kube-scheduler, kube-proxy,
# kubectl and crictl for the cluster tests (tests/cluster).
#
# k8s.io/kubernetes cannot be `go install`ed: its go.mod replaces every k8s.io/* staging
# module with a ./staging path. So we generate a throw-away wrapper module in the cache
# that requires k8s.io/kubernetes and re-states each of those replaces as the published
# staging release (k8s.io/api => k8s.io/api v0.34.4 for v1.34.4), then `go build` the
# commands from it, all in one go (they share most of their packages). crictl comes from
# sigs.k8s.io/cri-tools at the matching minor, which needs no replaces and installs as is.
# Binaries are cached outside the clone as <command>-<version>; the Go module and build
# caches are reused as well. A lock keeps concurrent builds (two worktrees) apart.
#
# usage: tests/k8s/kube-build.sh build|path COMMAND...
#   build  build the commands not cached yet, then print each one's path
#   path   print the paths the binaries are (or would be) cached at, build nothing
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.34.4}
CRI_TOOLS_VERSION=${CRI_TOOLS_VERSION:-v1.34.0}
GO=${GO:-/usr/local/go/bin/go}
CACHE_DIR=${CALICO_CACHE_DIR:-/var/cache/pycalico-cni}/k8s
KUBE_COMMANDS=" kube-apiserver kubelet kube-controller-manager kube-scheduler kube-proxy kubectl "

binary() {  # COMMAND -> its cached path
  case $1 in
    crictl) echo "$CACHE_DIR/crictl-$CRI_TOOLS_VERSION" ;;
    *) echo "$CACHE_DIR/$1-$K8S_VERSION" ;;
  esac
}

staging_version() {  # v1.34.4 -> v0.34.4: staging modules are tagged with major 0
  echo "v0.${1#v1.}"
}

write_wrapper_module() {  # DIR: go.mod requiring k8s.io/kubernetes with its replaces restated
  local dir=$1 upstream_mod staging
  upstream_mod=$(cd "$dir" && "$GO" mod download -json "k8s.io/kubernetes@$K8S_VERSION" \
                 | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p')
  staging=$(staging_version "$K8S_VERSION")
  {
    echo "module pycalico.test/kube-build"
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
    echo "kube-build.sh: found no staging replaces in $upstream_mod" >&2
    exit 1
  }
}

build_kube() {  # COMMAND...: k8s.io/kubernetes/cmd/<command> for each, in one go build
  local src=$CACHE_DIR/src-$K8S_VERSION out=$CACHE_DIR/out-$K8S_VERSION minor=${K8S_VERSION#v1.}
  local packages=() cmd
  minor=${minor%%.*}
  for cmd in "$@"; do packages+=("k8s.io/kubernetes/cmd/$cmd"); done
  mkdir -p "$src"
  rm -rf "$out" && mkdir -p "$out"
  write_wrapper_module "$src"
  echo "kube-build.sh: building $* $K8S_VERSION (several minutes the first time)" >&2
  (
    cd "$src"
    for package in "${packages[@]}"; do
      GOFLAGS=-mod=mod "$GO" get "$package@$K8S_VERSION" >&2
    done
    # The version stamp is what /version and --version report (v0.0.0-master without it).
    CGO_ENABLED=0 GOFLAGS=-mod=mod "$GO" build -trimpath -o "$out/" \
      -ldflags "-s -w \
        -X k8s.io/component-base/version.gitVersion=$K8S_VERSION \
        -X k8s.io/component-base/version.gitMajor=1 \
        -X k8s.io/component-base/version.gitMinor=$minor \
        -X k8s.io/component-base/version.gitTreeState=clean" \
      "${packages[@]}"
  )
  for cmd in "$@"; do mv -f "$out/$cmd" "$(binary "$cmd")"; done
  rm -rf "$out"
}

build_crictl() {
  echo "kube-build.sh: building crictl $CRI_TOOLS_VERSION" >&2
  local gobin=$CACHE_DIR/out-crictl
  rm -rf "$gobin" && mkdir -p "$gobin"
  (cd "$CACHE_DIR" && GOBIN=$gobin CGO_ENABLED=0 GOFLAGS=-mod=mod \
     "$GO" install -trimpath "sigs.k8s.io/cri-tools/cmd/crictl@$CRI_TOOLS_VERSION" >&2)
  mv -f "$gobin/crictl" "$(binary crictl)"
  rm -rf "$gobin"
}

build() {  # COMMAND...: build the missing ones under the cache's lock
  local missing=() want_crictl=0 cmd
  mkdir -p "$CACHE_DIR"
  exec 9>"$CACHE_DIR/.build.lock"
  flock 9
  for cmd in "$@"; do
    [ -x "$(binary "$cmd")" ] && continue
    if [ "$cmd" = crictl ]; then want_crictl=1; else missing+=("$cmd"); fi
  done
  [ ${#missing[@]} -eq 0 ] || build_kube "${missing[@]}"
  [ "$want_crictl" -eq 0 ] || build_crictl
  exec 9>&-
}

[ $# -ge 2 ] || { echo "usage: $0 build|path COMMAND..." >&2; exit 2; }
action=$1
shift
for cmd in "$@"; do
  [ "$cmd" = crictl ] || [[ $KUBE_COMMANDS == *" $cmd "* ]] || {
    echo "kube-build.sh: unknown command $cmd" >&2
    exit 2
  }
done
case $action in
  build) build "$@"; for cmd in "$@"; do binary "$cmd"; done ;;
  path) for cmd in "$@"; do binary "$cmd"; done ;;
  *) echo "usage: $0 build|path COMMAND..." >&2; exit 2 ;;
esac
