#!/usr/bin/env bash
# Installs kustomize (pinned) into .venv/bin for tests/unit/test_k8s_manifests.py, built from
# source through the Go module proxy (`go install`; about a minute on 2 cores the first time,
# nothing when it is there). Needs Go 1.24+ (`go` on PATH or /usr/local/go/bin).
set -euo pipefail
cd "$(dirname "$0")/../.."

KUSTOMIZE_VERSION=v5.8.1
bin=.venv/bin/kustomize
if [ -x "$bin" ] && "$bin" version 2>/dev/null | grep -q "$KUSTOMIZE_VERSION"; then
  exit 0
fi
go=$(command -v go || true)
[ -n "$go" ] || go=/usr/local/go/bin/go
if [ ! -x "$go" ]; then
  echo "deploy/k8s/tools.sh: no Go toolchain (go on PATH or /usr/local/go/bin/go): kustomize is built with it" >&2
  exit 1
fi
mkdir -p .venv/bin
GOBIN="$PWD/.venv/bin" "$go" install "sigs.k8s.io/kustomize/kustomize/v5@${KUSTOMIZE_VERSION}"
"$bin" version
