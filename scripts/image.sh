#!/usr/bin/env bash
# Builds sluice's container image from deploy/Dockerfile: the `sluice` binary and ONNX
# Runtime's libonnxruntime.so on a minimal Debian bookworm (glibc 2.36, libstdc++, libgcc).
#
#   SLUICE_IMAGE=name:tag      the image to build (default sluice:latest)
#   SLUICE_BIN=/path/to/sluice use this binary instead of `cargo build --release --locked
#                              --features tract` (tract is pure Rust: the image needs no
#                              more libraries for it; OpenCV's would be, so not `opencv`)
#   SLUICE_ORT_LIB=/path/.so   ONNX Runtime library (default .sluice/lib/libonnxruntime.so,
#                              linked by scripts/setup.sh; the file is copied, not the link)
#   SLUICE_BASE=image          base image (the Dockerfile's BASE); unset: debian:bookworm-slim
#                              if the engine has it (`docker pull debian:bookworm-slim` where a
#                              registry is reachable), else a local one (below)
#   SLUICE_DEBIAN_MIRROR=url   mirror for the local base (default: the bookworm entry of this
#                              machine's apt sources, else http://deb.debian.org/debian)
#   SLUICE_BASE_REBUILD=1      build the local base again instead of using the cached one
#
# The local base, for engines that cannot pull: `debootstrap --variant=minbase bookworm`,
# trimmed like debian:bookworm-slim (no docs, man pages, locales or apt lists), imported as
# sluice-base:bookworm-minbase. Its tarball stays in .sluice/base/ so that a fresh engine
# re-imports it without debootstrap. Needs root (or sudo) and debootstrap (installed with
# apt-get when missing).
#
# The binary must have been linked against a glibc no newer than the base's (2.36): build it
# on bookworm, or on an older Debian / Ubuntu.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${SLUICE_IMAGE:-sluice:latest}
ORT_LIB=${SLUICE_ORT_LIB:-.sluice/lib/libonnxruntime.so}
SUITE=bookworm
LOCAL_BASE=sluice-base:$SUITE-minbase
BASE_DIR=.sluice/base
BASE_TAR=$BASE_DIR/$SUITE-minbase.tar
CONTEXT=.sluice/image-context

say() { echo "image: $*"; }
die() { echo "image: ERROR: $*" >&2; exit 1; }
has_image() { docker image inspect "$1" >/dev/null 2>&1; }
# as_root CMD...: runs CMD as root (debootstrap, and reading the root-owned tree it makes).
as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else die "'$1' needs root (no sudo here): set SLUICE_BASE to an image the engine has"
  fi
}

# The first plain `deb` source of $SUITE in this machine's apt configuration, one-line
# (sources.list, *.list) or deb822 (*.sources) format.
apt_mirror() {
  local f files=()
  [ -f /etc/apt/sources.list ] && files+=(/etc/apt/sources.list)
  for f in /etc/apt/sources.list.d/*.list; do [ -f "$f" ] && files+=("$f"); done
  for f in "${files[@]}"; do
    awk -v suite="$SUITE" '
      { sub(/#.*/, "") }
      $1 == "deb" {
        i = 2
        if ($i ~ /^\[/) { while (i <= NF && $i !~ /\]$/) i++; i++ }
        if ($(i + 1) == suite) { print $i; exit }
      }' "$f"
  done
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -f "$f" ] || continue
    awk -v suite="$SUITE" '
      BEGIN { RS = ""; FS = "\n" }
      {
        types = ""; uris = ""; suites = ""; enabled = "yes"
        for (i = 1; i <= NF; i++) {
          line = $i
          if (line ~ /^[ \t]*#/) continue
          key = tolower(line); sub(/:.*/, "", key)
          val = line; sub(/^[^:]*:[ \t]*/, "", val)
          if (key == "types") types = val
          else if (key == "uris") uris = val
          else if (key == "suites") suites = val
          else if (key == "enabled") enabled = tolower(val)
        }
        if (enabled != "no" && (" " types " ") ~ / deb / && (" " suites " ") ~ (" " suite " ")) {
          split(uris, u, /[ \t]+/); print u[1]; exit
        }
      }' "$f"
  done
}

# Imports the local base from its tarball, making the tarball first when there is none.
local_base() {
  if [ -f "$BASE_TAR" ] && [ "${SLUICE_BASE_REBUILD:-0}" != 1 ]; then
    say "importing $LOCAL_BASE from $BASE_TAR (cached; SLUICE_BASE_REBUILD=1 makes a new one)"
  else
    local mirror=${SLUICE_DEBIAN_MIRROR:-}
    if [ -z "$mirror" ]; then
      mirror=$(apt_mirror | head -n 1)
      mirror=${mirror:-http://deb.debian.org/debian}
    fi
    if ! command -v debootstrap >/dev/null 2>&1 && [ ! -x /usr/sbin/debootstrap ]; then
      command -v apt-get >/dev/null 2>&1 ||
        die "no debootstrap and no apt-get to install it: set SLUICE_BASE, or load debian:$SUITE-slim into the engine"
      say "installing debootstrap"
      as_root apt-get update -qq
      as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
    fi
    local arch keyring=() root=$BASE_DIR/rootfs t0
    arch=$(dpkg --print-architecture 2>/dev/null || echo amd64)
    [ -f /usr/share/keyrings/debian-archive-keyring.gpg ] &&
      keyring=(--keyring=/usr/share/keyrings/debian-archive-keyring.gpg)
    mkdir -p "$BASE_DIR"
    as_root rm -rf "$root"
    say "debootstrap --variant=minbase $SUITE ($arch) from $mirror into $root"
    t0=$SECONDS
    if ! as_root env PATH="/usr/sbin:/sbin:$PATH" debootstrap --variant=minbase --arch="$arch" \
      "${keyring[@]}" "$SUITE" "$root" "$mirror" >"$BASE_DIR/debootstrap.log" 2>&1; then
      tail -n 20 "$BASE_DIR/debootstrap.log" >&2
      die "debootstrap failed (log: $BASE_DIR/debootstrap.log; debootstrap's own: $root/debootstrap/debootstrap.log)"
    fi
    say "debootstrap took $((SECONDS - t0)) s"
    as_root bash -s "$root" <<'TRIM'
set -euo pipefail
cd "$1"
# Keep documentation, man pages and translations out, now and in derived images.
cat > etc/dpkg/dpkg.cfg.d/sluice-slim <<'EOF'
# Written by sluice's scripts/image.sh: a slim base keeps no documentation or translations.
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
cat > etc/apt/apt.conf.d/sluice-slim <<'EOF'
// Written by sluice's scripts/image.sh: no translations, compressed lists, no caches.
Acquire::Languages "none";
Acquire::GzipIndexes "true";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
EOF
# Services installed by derived images must not try to start during a build.
printf '#!/bin/sh\nexit 101\n' > usr/sbin/policy-rc.d
chmod 0755 usr/sbin/policy-rc.d
find usr/share/doc -mindepth 1 ! -type d ! -name copyright -delete
find usr/share/doc -mindepth 1 -depth -type d -empty -delete
find usr/share/locale -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
rm -rf usr/share/man/* usr/share/info/* usr/share/groff/* usr/share/lintian usr/share/linda
rm -rf var/lib/apt/lists/* var/cache/apt/*.bin var/cache/apt/archives/*.deb \
  var/cache/apt/archives/partial/* var/cache/debconf/*-old var/lib/dpkg/*-old
rm -rf var/log/apt/* var/log/*.log tmp/* var/tmp/*
# Nothing of the build host: the engine provides these at run time.
: > etc/resolv.conf
echo localhost > etc/hostname
printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost ip6-localhost ip6-loopback\n' > etc/hosts
find dev proc sys -mindepth 1 -delete 2>/dev/null || true
TRIM
    as_root tar --numeric-owner -C "$root" -cf "$BASE_TAR.tmp" .
    as_root chown "$(id -u):$(id -g)" "$BASE_TAR.tmp"
    mv "$BASE_TAR.tmp" "$BASE_TAR"
    as_root rm -rf "$root"
    echo "$mirror" > "$BASE_DIR/mirror"
    say "local base tarball $BASE_TAR ($(du -m "$BASE_TAR" | cut -f1) MB)"
  fi
  docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' \
    --message "debootstrap --variant=minbase $SUITE, trimmed (scripts/image.sh)" \
    "$BASE_TAR" "$LOCAL_BASE" >/dev/null
}

command -v docker >/dev/null 2>&1 || die "no docker CLI"
docker info >/dev/null 2>&1 || die "the docker engine does not answer (docker info)"

# The binary and the library first: failing there should not wait for a base.
if [ -n "${SLUICE_BIN:-}" ]; then
  BIN=$SLUICE_BIN
  say "binary $BIN (SLUICE_BIN)"
else
  say "cargo build --release --locked -p sluice-cli --features tract"
  cargo build --release --locked -p sluice-cli --features tract
  BIN=${CARGO_TARGET_DIR:-target}/release/sluice
fi
if [ ! -f "$BIN" ] || [ ! -x "$BIN" ]; then die "$BIN is not an executable file"; fi
[ -e "$ORT_LIB" ] || die "no ONNX Runtime library at $ORT_LIB (run scripts/setup.sh, or set SLUICE_ORT_LIB)"

# The base.
if [ -n "${SLUICE_BASE:-}" ]; then
  BASE=$SLUICE_BASE
elif has_image "debian:$SUITE-slim"; then
  BASE=debian:$SUITE-slim
else
  if [ "${SLUICE_BASE_REBUILD:-0}" = 1 ] || ! has_image "$LOCAL_BASE"; then
    local_base
  fi
  BASE=$LOCAL_BASE
fi
say "base $BASE"

# A small context: docker build sends everything under it to the engine (target/ is huge).
rm -rf "$CONTEXT"
mkdir -p "$CONTEXT"
cp -L "$BIN" "$CONTEXT/sluice"
cp -L "$ORT_LIB" "$CONTEXT/libonnxruntime.so"
# The release profile keeps line tables (file:line in local backtraces): 80 of the
# binary's ~100 MB. The image drops them and keeps the symbols (function names in a
# panic's backtrace).
if command -v strip >/dev/null 2>&1; then strip --strip-debug "$CONTEXT/sluice"; fi
chmod 0755 "$CONTEXT/sluice"
chmod 0644 "$CONTEXT/libonnxruntime.so"
cp deploy/Dockerfile "$CONTEXT/Dockerfile"

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
if [ "$revision" != unknown ] && ! git diff-index --quiet HEAD -- 2>/dev/null; then revision=$revision-dirty; fi
say "docker build -t $IMAGE (context $CONTEXT, $(du -sm "$CONTEXT" | cut -f1) MB)"
docker build \
  --build-arg BASE="$BASE" \
  --build-arg VERSION="${version:-unknown}" \
  --build-arg REVISION="$revision" \
  -t "$IMAGE" "$CONTEXT"

# Does everything load in the base? ldd names missing libraries and too-old glibc versions.
if deps=$(docker run --rm --entrypoint ldd "$IMAGE" /usr/local/bin/sluice /opt/sluice/lib/libonnxruntime.so 2>&1); then
  if grep -q 'not found' <<<"$deps"; then
    grep 'not found' <<<"$deps" >&2
    die "the base $BASE lacks what the binary or libonnxruntime.so needs (above)"
  fi
else
  say "WARNING: could not run ldd in the image (a base without it?); not checking libraries"
fi
docker run --rm "$IMAGE" --help >/dev/null || die "'sluice serve --help' fails in the image"

size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
say "built $IMAGE on $BASE: $(awk -v b="$size" 'BEGIN { printf "%.1f", b / 1e6 }') MB"
