#!/usr/bin/env bash
# The kube-apiserver the Kubernetes-datastore tests run against, built once per version
# and cached by kube-build.sh (which says how).
#
# usage: tests/k8s/apiserver.sh [build|path]
#   build  build kube-apiserver if it is not cached yet, then print its path (default)
#   path   print the path the binary is (or would be) cached at, build nothing
set -euo pipefail
case ${1:-build} in
  build|path) exec "$(dirname "$0")/kube-build.sh" "${1:-build}" kube-apiserver ;;
  *) echo "usage: $0 [build|path]" >&2; exit 2 ;;
esac
