#!/usr/bin/env bash
# Brings this machine up as a Dolly host. Idempotent: a second run checks and changes nothing.
#
#  1. Debian packages: Docker Engine, CRIU's build dependencies, image-building tools.
#  2. CRIU 4.2.1 built from Debian's source package, with the patches in scripts/criu-patches/
#     (each says why), when the installed criu is not that build or fails `criu check` (Debian
#     12's 3.17 cannot handle this kernel's vDSO; 4.1 cannot dump inet sockets). The build names
#     its patches in `criu --version` ("GitID: dolly-<hash of the patches>").
#  3. The `dolly` OCI runtime (scripts/dolly-runc, a wrapper around runc), registered with the
#     engine and made its default; DOLLY_DEFAULT_RUNTIME=0 registers it only (containers then run
#     under runc unless created with runtime="dolly", and Dolly checkpoints them by a slower path:
#     README, "Runtimes").
#  4. dockerd with experimental mode, started if it is not answering.
#  5. The project's virtual environment .venv, with pycriu from the same CRIU source.
#  6. The local images the demo and the tests use (no registry is reachable).
#  7. The kernel's samepage merging (KSM) running, for clones made with share_memory=True. It
#     scans only the processes that asked for it (those clones: scripts/dolly-runc; any process may
#     ask for itself, docs/clones.md says what that means), so it costs nothing while there are none. DOLLY_KSM=0 leaves KSM as it is. Undo: `echo 0 >
#     /sys/kernel/mm/ksm/run` (2 also unmerges every shared page); the scan rate goes back to the
#     kernel's defaults with pages_to_scan 100, sleep_millisecs 20 (or a reboot).
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
CRIU_VERSION=4.2.1
CRIU_SHA256=29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9
CACHE=/var/cache/dolly
CRIU_SRC=$CACHE/criu-$CRIU_VERSION
CRIU_TARBALL=$CACHE/criu_$CRIU_VERSION.orig.tar.xz
CRIU_PATCHES=("$here"/scripts/criu-patches/*.patch)
CRIU_BUILD=dolly-$(cat "${CRIU_PATCHES[@]}" | sha256sum | cut -c1-12)
VENV=$here/.venv
DAEMON_JSON=/etc/docker/daemon.json
RUNTIME_BIN=/usr/local/sbin/dolly-runc

log() { printf 'host: %s\n' "$*" >&2; }

[ "$(id -u)" = 0 ] || { log "must run as root (CRIU and the Docker Engine need it)"; exit 1; }
# Appended, not prepended: the caller's python3 comes first.
export PATH=$PATH:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export DEBIAN_FRONTEND=noninteractive

PACKAGES=(docker.io runc containerd iptables iproute2 busybox-static mmdebstrap zstd xz-utils
  build-essential patch pkgconf libbsd-dev libcap-dev libgnutls28-dev libnet1-dev libnftables-dev
  libnl-3-dev libprotobuf-c-dev libprotobuf-dev protobuf-c-compiler protobuf-compiler uuid-dev
  python3-protobuf python3-venv
  skopeo podman  # read checkpoint OCI images; restore Dolly's Podman archives (the tests use both)
  docker-registry)  # distribution 2.8: the registry the tests push checkpoints to, started by them on loopback
criu_ok() {
  local v
  v=$(criu --version 2>/dev/null | awk '/^Version:/{print $2}') || return 1
  [ "$v" = "$CRIU_VERSION" ] || return 1
  criu --version | grep -qx "GitID: $CRIU_BUILD" || return 1
  criu check >/dev/null 2>&1
}

# Prints "yes" when daemon.json lacks what Dolly needs; with "write", also writes it.
daemon_json_update() {
  python3 - "$DAEMON_JSON" "$RUNTIME_BIN" "$1" "$2" <<'EOF'
import json, os, sys
path, runtime, default, write = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "write"
cfg = json.load(open(path)) if os.path.exists(path) and os.path.getsize(path) else {}
want = dict(cfg)
want["experimental"] = True
want["runtimes"] = {**cfg.get("runtimes", {}), "dolly": {"path": runtime}}
if default:
    want["default-runtime"] = "dolly"
elif cfg.get("default-runtime") == "dolly":  # ours, from an earlier run: back to the engine's own
    del want["default-runtime"]
if want != cfg:
    if write:
        with open(path + ".tmp", "w") as f:
            json.dump(want, f, indent=2)
        os.replace(path + ".tmp", path)
    print("yes")
EOF
}

# Before anything changes, say what will: this script changes the host (make demo and make test run it).
DEFAULT_RUNTIME=${DOLLY_DEFAULT_RUNTIME:-1}
case "$DEFAULT_RUNTIME" in 0|1) ;; *) log "DOLLY_DEFAULT_RUNTIME must be 0 or 1"; exit 1 ;; esac
plan=()
want_pkgs=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || want_pkgs+=("$p")
done
[ ${#want_pkgs[@]} -eq 0 ] || plan+=("install Debian packages: ${want_pkgs[*]}")
criu_ok || plan+=("build CRIU $CRIU_VERSION from Debian's source (in $CACHE) and install it as /usr/sbin/criu")
cmp -s "$here/scripts/dolly-runc" "$RUNTIME_BIN" || plan+=("install Dolly's runtime as $RUNTIME_BIN")
if [ -n "$(daemon_json_update "$DEFAULT_RUNTIME" check 2>/dev/null || true)" ]; then
  if [ "$DEFAULT_RUNTIME" = 1 ]; then
    plan+=("write $DAEMON_JSON: experimental mode, the dolly runtime as the default runtime of every container (DOLLY_DEFAULT_RUNTIME=0: registered only); restart dockerd")
  else
    plan+=("write $DAEMON_JSON: experimental mode, the dolly runtime registered (not the default); restart dockerd")
  fi
fi
[ -x "$VENV/bin/python" ] || plan+=("make the virtual environment $VENV")
# KSM: on, scanning up to KSM_PAGES_TO_SCAN pages every KSM_SLEEP_MS ms (about 1 GB/s: 30 clones of
# a 128 MiB service are merged in tens of seconds rather than the default rate's half hour),
# which takes at most about one core while clones that asked are being merged.
KSM=/sys/kernel/mm/ksm
KSM_PAGES_TO_SCAN=5000
KSM_SLEEP_MS=20
DOLLY_KSM=${DOLLY_KSM:-1}
case "$DOLLY_KSM" in 0|1) ;; *) log "DOLLY_KSM must be 0 or 1"; exit 1 ;; esac
ksm_wanted() {
  [ "$DOLLY_KSM" = 1 ] && [ -w "$KSM/run" ] && {
    [ "$(cat "$KSM/run")" != 1 ] || [ "$(cat "$KSM/pages_to_scan")" -lt "$KSM_PAGES_TO_SCAN" ] ||
      [ "$(cat "$KSM/sleep_millisecs")" -gt "$KSM_SLEEP_MS" ]
  }
}
ksm_wanted && plan+=("turn on the kernel's samepage merging, for share_memory clones only ($KSM/run=1, pages_to_scan=$KSM_PAGES_TO_SCAN, sleep_millisecs=$KSM_SLEEP_MS; was run=$(cat "$KSM/run") pages_to_scan=$(cat "$KSM/pages_to_scan") sleep_millisecs=$(cat "$KSM/sleep_millisecs"); undo: echo 2 > $KSM/run; DOLLY_KSM=0 leaves it)")
if [ ${#plan[@]} -gt 0 ]; then
  log "this will change the host (how to undo it: docs/getting-started.md, Install):"
  for item in "${plan[@]}"; do log "  - $item"; done
fi

# --- 1. packages ---------------------------------------------------------------------------------
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  # The machine's package lists are refreshed only when they cannot serve the install.
  if ! apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null 2>&1; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

# --- 2. CRIU -------------------------------------------------------------------------------------
fetch_criu_source() {
  # The orig tarball of Debian's unstable criu package, pinned by its hash; the mirror is the one
  # this machine's apt already uses, so no host is named here. apt runs on state of its own under
  # $CACHE/apt (source list, package lists, caches): the machine's own lists and caches are not
  # read or written, so `apt-get install` works afterwards exactly as it did before.
  local uri apt tmp
  uri=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$uri" ] || uri=$(awk '$1=="deb"{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$uri" ] || { log "no Debian mirror in /etc/apt/sources.list{,.d/debian.sources}"; exit 1; }
  apt=$CACHE/apt
  rm -rf "$apt"
  mkdir -p "$apt/lists/partial" "$apt/cache/archives/partial"
  printf 'Types: deb-src\nURIs: %s\nSuites: sid\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n' \
    "$uri" >"$apt/criu-src.sources"
  local opts=(-qq -o Dir::Etc::sourcelist="$apt/criu-src.sources" -o Dir::Etc::sourceparts=-
    -o Dir::State::Lists="$apt/lists" -o Dir::Cache="$apt/cache" -o Dir::Cache::pkgcache=
    -o Dir::Cache::srcpkgcache= -o APT::Sandbox::User=root)
  apt-get update "${opts[@]}" >/dev/null
  tmp=$(mktemp -d)
  # The debian.tar.xz may be missing on the mirror (apt then fails); the orig tarball is all that
  # is needed, and its hash is checked below.
  (cd "$tmp" && apt-get source --download-only "${opts[@]}" criu >/dev/null 2>&1 || true)
  rm -rf "$apt"
  [ -f "$tmp/criu_$CRIU_VERSION.orig.tar.xz" ] || { log "could not download criu_$CRIU_VERSION.orig.tar.xz"; exit 1; }
  echo "$CRIU_SHA256  $tmp/criu_$CRIU_VERSION.orig.tar.xz" | sha256sum -c --quiet
  mv "$tmp/criu_$CRIU_VERSION.orig.tar.xz" "$CRIU_TARBALL"
  rm -rf "$tmp"
}

# The source, unpacked and patched: made again from the tarball when the patches change.
prepare_criu_source() {
  [ "$(cat "$CRIU_SRC/.dolly-build" 2>/dev/null)" = "$CRIU_BUILD" ] && return 0
  mkdir -p "$CACHE"
  if [ ! -f "$CRIU_TARBALL" ] || ! echo "$CRIU_SHA256  $CRIU_TARBALL" | sha256sum -c --quiet 2>/dev/null; then
    fetch_criu_source
  fi
  rm -rf "$CRIU_SRC" "$CACHE/criu-$CRIU_VERSION".tmp
  mkdir "$CACHE/criu-$CRIU_VERSION".tmp
  tar -C "$CACHE/criu-$CRIU_VERSION".tmp --strip-components=1 -xJf "$CRIU_TARBALL"
  for p in "${CRIU_PATCHES[@]}"; do
    patch -d "$CACHE/criu-$CRIU_VERSION".tmp -p1 --quiet <"$p" || { log "patch $p does not apply"; exit 1; }
  done
  echo "$CRIU_BUILD" >"$CACHE/criu-$CRIU_VERSION.tmp/.dolly-build"
  mv "$CACHE/criu-$CRIU_VERSION".tmp "$CRIU_SRC"
}

# CRIU's Makefile asks git for a release name at parse time ("fatal: not a git repository" from a
# source tarball): that line alone is dropped, every other message is kept.
criu_make() {
  make -C "$CRIU_SRC" -j"$(nproc)" GITID="$CRIU_BUILD" "$@" 2> >(grep -v '^fatal: not a git repository' >&2) >/dev/null
}

if ! criu_ok || [ "$(cat "$CRIU_SRC/.dolly-build" 2>/dev/null)" != "$CRIU_BUILD" ]; then
  prepare_criu_source
  if ! criu_ok; then
    log "building CRIU $CRIU_VERSION ($CRIU_BUILD: ${#CRIU_PATCHES[@]} patch(es) from scripts/criu-patches)"
    criu_make criu
    install -m 0755 "$CRIU_SRC/criu/criu" /usr/sbin/criu
    criu_ok || { criu --version; criu check; exit 1; }
  fi
fi
# An unpatched CRIU on a /run that is no tmpfs leaves an empty /run/criu.kdat.tmp at every run and
# keeps no cache of its kernel probes (patch 0004 says more); that file, which blocked every later
# save, goes.
[ -f /run/criu.kdat.tmp ] && [ ! -s /run/criu.kdat.tmp ] && rm -f /run/criu.kdat.tmp
[ -f "$CRIU_SRC/lib/pycriu/images/images.py" ] && ls "$CRIU_SRC"/lib/pycriu/images/*_pb2.py >/dev/null 2>&1 ||
  criu_make lib

# --- 3. the dolly runtime ------------------------------------------------------------------------
cmp -s "$here/scripts/dolly-runc" "$RUNTIME_BIN" || install -m 0755 "$here/scripts/dolly-runc" "$RUNTIME_BIN"
# The CRIU configuration that Dolly's Podman archives name for their restore (dolly/_formats.py,
# PODMAN_CRIU_CONFIG): runc hands it to CRIU for those containers alone.
mkdir -p /usr/local/lib/dolly
[ "$(cat /usr/local/lib/dolly/criu-mntns-compat.conf 2>/dev/null)" = mntns-compat-mode ] ||
  printf 'mntns-compat-mode\n' >/usr/local/lib/dolly/criu-mntns-compat.conf

# --- 4. dockerd ----------------------------------------------------------------------------------
mkdir -p /etc/docker
changed=$(daemon_json_update "$DEFAULT_RUNTIME" write)

docker_up() { timeout 5 docker version >/dev/null 2>&1; }
start_dockerd() {
  log "starting dockerd"
  mkdir -p /var/log/dolly
  # Only stdin, stdout and stderr: a descriptor dockerd inherited (a lock that `make host` ran
  # under, say) would be held by it, and by containerd, for as long as they run.
  (
    for fd in /proc/self/fd/*; do
      fd=${fd##*/}
      [ "$fd" -gt 2 ] 2>/dev/null && eval "exec $fd>&-"
    done
    exec setsid nohup dockerd >>/var/log/dolly/dockerd.log 2>&1 </dev/null
  ) &
  for _ in $(seq 1 120); do docker_up && return 0; sleep 0.5; done
  log "dockerd did not answer within 60 s; see /var/log/dolly/dockerd.log"; tail -n 20 /var/log/dolly/dockerd.log >&2; exit 1
}
if docker_up; then
  default=$(docker info -f '{{.DefaultRuntime}}')
  if [ -n "$changed" ] || { [ "$DEFAULT_RUNTIME" = 1 ] && [ "$default" != dolly ]; } ||
     { [ "$DEFAULT_RUNTIME" = 0 ] && [ "$default" = dolly ]; } ||
     [ "$(docker version -f '{{.Server.Experimental}}')" != true ]; then
    log "restarting dockerd to apply $DAEMON_JSON"
    pid=$(cat /var/run/docker.pid 2>/dev/null || pgrep -xo dockerd)
    kill "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    start_dockerd
  fi
else
  start_dockerd
fi

# --- 5. Python environment -----------------------------------------------------------------------
# Any Python 3.11 or newer: Debian 12's own 3.11.2 included (backports.tarfile brings the
# extraction filters of 3.12's tarfile to it). A venv whose Python is gone is made again.
if [ -e "$VENV" ] && ! "$VENV/bin/python" -c '' 2>/dev/null; then
  rm -rf "$VENV"
fi
if [ ! -x "$VENV/bin/python" ]; then
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' ||
    { log "python3 on PATH is $(python3 --version 2>&1); Dolly needs 3.11 or newer"; exit 1; }
  python3 -m venv "$VENV"
fi
# Reinstalled when the project's dependencies change (setup.cfg), not on every run. With the test
# extra (tests, docs, benchmarks, lint), unless DOLLY_VENV=plain (`make demo`: Dolly alone, some
# 20 s less on a fresh machine); a venv that has the extra does for both.
want=$(cat "$here/setup.cfg" "$CRIU_SRC/lib/setup.py" 2>/dev/null | sha256sum | cut -c1-16)
installed=$(cat "$VENV/.dolly-installed" 2>/dev/null || true)
extra=test
[ "${DOLLY_VENV-}" = plain ] && [ "$installed" != "$want test" ] && extra=plain
probe="import dolly, pycriu.images"
[ "$extra" = test ] && probe="$probe, pytest"
if [ "$installed" != "$want $extra" ] || ! "$VENV/bin/python" -c "$probe" 2>/dev/null; then
  log "installing the Python environment"
  pipl=$VENV/pip-install.log
  target=$here
  [ "$extra" = test ] && target="$here[test]"
  { "$VENV/bin/pip" install --upgrade pip &&
    "$VENV/bin/pip" install -e "$target" &&
    "$VENV/bin/pip" install "$CRIU_SRC/lib"; } >"$pipl" 2>&1 || { tail -n 30 "$pipl" >&2; exit 1; }
  echo "$want $extra" >"$VENV/.dolly-installed"
fi

# --- 6. images -----------------------------------------------------------------------------------
"$here/scripts/images.sh"

# --- 7. KSM --------------------------------------------------------------------------------------
# Not set at boot: a machine restarted has KSM off until `make host` runs again (share_memory
# then says so).
if ksm_wanted; then
  log "turning on KSM ($KSM/run=1, pages_to_scan=$KSM_PAGES_TO_SCAN, sleep_millisecs=$KSM_SLEEP_MS)"
  echo "$KSM_PAGES_TO_SCAN" >"$KSM/pages_to_scan"
  echo "$KSM_SLEEP_MS" >"$KSM/sleep_millisecs"
  echo 1 >"$KSM/run"
fi
log "ready"
