#!/usr/bin/env bash
# Build the S3-compatible server the tests and the test bed use: versitygw (Apache-2.0,
# github.com/versity/versitygw) with its POSIX backend, built once with `go install` and
# cached by version, so a machine builds it once (about 3 minutes cold on 2 cores).
#
#   tests/testbed/install_s3.sh              build if missing; print the binary's path
#   tests/testbed/install_s3.sh --print-bin  only print where the binary is (or would be)
#
# The cache lives under ${QMODEL_TESTBED_CACHE:-$HOME/.cache/qmodel-testbed}/s3-versitygw-<version>/bin,
# keyed by the version so a new pin never reuses an old binary. tests/testbed/s3server.py
# asks this script for the path (--print-bin), so the version is pinned here only.
# With QMODEL_TESTBED_BIN set (the test bed's install.sh does), the binary is also linked into
# that folder, beside kube-apiserver and friends.
set -euo pipefail

VERSITYGW_VERSION="${VERSITYGW_VERSION:-v1.8.0}"
CACHE="${QMODEL_TESTBED_CACHE:-$HOME/.cache/qmodel-testbed}"
BIN_DIR="$CACHE/s3-versitygw-$VERSITYGW_VERSION/bin"
BIN="$BIN_DIR/versitygw"

if [[ "${1:-}" == "--print-bin" ]]; then
    echo "$BIN"
    exit 0
fi
if [[ $# -gt 0 ]]; then
    echo "usage: $0 [--print-bin]" >&2
    exit 2
fi

publish() {
    if [[ -n "${QMODEL_TESTBED_BIN:-}" ]]; then
        mkdir -p "$QMODEL_TESTBED_BIN"
        ln -f "$BIN" "$QMODEL_TESTBED_BIN/versitygw" 2>/dev/null || cp -f "$BIN" "$QMODEL_TESTBED_BIN/versitygw"
    fi
    echo "$BIN"
}

if [[ -x "$BIN" ]] && "$BIN" --version >/dev/null 2>&1; then
    publish
    exit 0
fi

command -v go >/dev/null || { echo "install_s3.sh: needs Go >= 1.25 on PATH to build versitygw" >&2; exit 1; }

# Pure-Go static build with the toolchain at hand (never download another toolchain).
export GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -buildvcs=false"
mkdir -p "$BIN_DIR"
TMP_BIN=$(mktemp -d "$BIN_DIR/.build.XXXXXX")
trap 'rm -rf "$TMP_BIN"' EXIT
start=$(date +%s)
echo "install_s3.sh: building versitygw $VERSITYGW_VERSION (a few minutes cold) ..." >&2
# The same version ldflags as versitygw's own Makefile, so `versitygw --version` tells the truth.
GOBIN="$TMP_BIN" go install -trimpath \
    -ldflags "-s -w -X=main.Version=$VERSITYGW_VERSION -X=main.Build=go-install -X=main.BuildTime=$(date -u +%FT%TZ)" \
    "github.com/versity/versitygw/cmd/versitygw@$VERSITYGW_VERSION"
# Move into place only once complete: a cut-off build never leaves a half-written binary.
mv "$TMP_BIN/versitygw" "$BIN"
echo "install_s3.sh: built in $(( $(date +%s) - start ))s" >&2
publish
