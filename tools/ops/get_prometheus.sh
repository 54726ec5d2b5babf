#!/usr/bin/env bash
# Put Debian's prometheus + promtool (2.42) under DEST/usr/bin without installing anything system-wide:
# `apt-get download` + `dpkg-deb -x` into a project-local, git-ignored directory (default .tools/prometheus).
# Exit 0 with the binaries in place, or exit 0 with one line saying why not (the tests then skip with
# the same reason): `make test` never fails here.
set -uo pipefail
DEST="${1:-.tools/prometheus}"
BIN="$DEST/usr/bin"
if [ -x "$BIN/prometheus" ] && [ -x "$BIN/promtool" ]; then exit 0; fi
if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
    echo "get_prometheus: no apt-get/dpkg-deb on this machine; the Prometheus tests will skip" >&2
    exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
fetch() { (cd "$tmp" && apt-get download -q prometheus >/dev/null 2>&1); }
if ! fetch; then
    # a fresh machine may have no package lists yet; refresh them when we may (root)
    if [ "$(id -u)" = 0 ]; then apt-get update -q >/dev/null 2>&1 || true; fi
    if ! fetch; then
        echo "get_prometheus: 'apt-get download prometheus' failed; the Prometheus tests will skip" >&2
        exit 0
    fi
fi
mkdir -p "$DEST"
dpkg-deb -x "$tmp"/prometheus_*.deb "$DEST"
# only the two binaries are needed: drop the web assets/docs the package also ships
rm -rf "$DEST/usr/share" "$DEST/etc" "$DEST/lib" "$DEST/var" 2>/dev/null || true
"$BIN/promtool" --version 2>&1 | head -1 | sed 's/^/get_prometheus: /'
