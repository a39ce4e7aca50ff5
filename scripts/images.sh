#!/usr/bin/env bash
# Builds the local images the demo, the tests and the notebook use, once, cached by tag:
#   dolly/busybox  Debian's busybox-static and its applet links, nothing else (about 2 MB)
#   dolly/python   a Debian 12 `essential` root with python3 (about 185 MB)
#   dolly/postgres:15, dolly/mariadb:10.11, dolly/redis:7
#                  Debian 12's database servers and their clients, for dolly.testing's database
#                  fixtures, with the entrypoints in scripts/images/ (they read the environment
#                  as the official images do)
# No registry is reachable from these machines, so images are imported from local root folders.
#
#   scripts/images.sh [all|base|databases]   (default: $DOLLY_IMAGES, else all)
# base is the first two, all that `make demo` and `make bench` use; databases the other three,
# most of the build on a fresh machine (Debian's servers), which only the engine tests,
# dolly.testing's database fixtures and benchmarks/{databases,django}.py need. `make host` and
# `make test` build all.
set -euo pipefail
have() { docker image inspect "$1" >/dev/null 2>&1; }
which=${1:-${DOLLY_IMAGES:-all}}
case "$which" in
  all|base|databases) ;;
  *) echo "images: unknown set '$which' (all, base or databases)" >&2; exit 2 ;;
esac

base_images() {
  if ! have dolly/busybox:latest; then
    echo "images: building dolly/busybox" >&2
    root=$(mktemp -d)
    mkdir -p "$root"/{bin,etc,tmp,proc,sys,dev,root,var/tmp}
    cp /bin/busybox "$root/bin/busybox"
    for app in $("$root/bin/busybox" --list); do
      [ "$app" = busybox ] || ln -s busybox "$root/bin/$app"
    done
    echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
    echo 'root:x:0:' >"$root/etc/group"
    chmod 1777 "$root/tmp" "$root/var/tmp"
    tar -C "$root" -c . | docker import -c 'ENV PATH=/bin' -c 'CMD ["/bin/sh"]' - dolly/busybox:latest >/dev/null
    rm -rf "$root"
  fi

  if ! have dolly/python:latest; then
    echo "images: building dolly/python" >&2
    tmp=$(mktemp -d)
    mmdebstrap --quiet --variant=essential --include=python3 bookworm "$tmp/rootfs.tar" >/dev/null
    docker import -c 'ENV PATH=/usr/local/bin:/usr/bin:/bin' -c 'CMD ["python3"]' "$tmp/rootfs.tar" dolly/python:latest >/dev/null
    rm -rf "$tmp"
  fi
}

# A Debian 12 root with PACKAGES and the entrypoint scripts/images/<name>-entrypoint, imported as
# TAG; documentation, manuals and translations left out. Rebuilt when the entrypoint changes (its
# hash is a label of the image).
here=$(cd "$(dirname "$0")" && pwd)
database_image() {
  local tag=$1 name=$2 packages=$3 port=$4 entry want tmp old
  entry=$here/images/$name-entrypoint
  want=$(cat "$entry" | sha256sum | cut -c1-16)
  [ "$(docker image inspect -f '{{index .Config.Labels "dolly.entrypoint"}}' "$tag" 2>/dev/null)" = "$want" ] && return 0
  echo "images: building $tag" >&2
  old=$(docker image inspect -f '{{.Id}}' "$tag" 2>/dev/null || true)
  tmp=$(mktemp -d)
  mmdebstrap --quiet --variant=essential --include="$packages" \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-exclude=/usr/share/man/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --essential-hook='mkdir -p "$1/etc/postgresql-common/createcluster.d" && echo "create_main_cluster = false" >"$1/etc/postgresql-common/createcluster.d/dolly.conf"' \
    --customize-hook='rm -rf "$1"/var/lib/mysql/* "$1"/var/lib/postgresql/*' \
    --customize-hook="upload $entry /usr/local/bin/dolly-entrypoint" \
    --customize-hook='chmod 0755 "$1/usr/local/bin/dolly-entrypoint"' \
    bookworm "$tmp/rootfs.tar" >/dev/null
  docker import -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'ENTRYPOINT ["/usr/local/bin/dolly-entrypoint"]' -c "EXPOSE $port" -c "LABEL dolly.entrypoint=$want" \
    "$tmp/rootfs.tar" "$tag" >/dev/null
  rm -rf "$tmp"
  # The image this one replaces, unless a container still uses it.
  [ -z "$old" ] || docker rmi "$old" >/dev/null 2>&1 || true
}
# The three at once: each is mostly waiting on the mirror and dpkg, not on the CPU.
database_images() {
  local pids=() pid failed=0
  database_image dolly/postgres:15 postgres postgresql-15,postgresql-client-15 5432 &
  pids+=($!)
  database_image dolly/mariadb:10.11 mariadb mariadb-server,mariadb-client 3306 &
  pids+=($!)
  database_image dolly/redis:7 redis redis-server,redis-tools 6379 &
  pids+=($!)
  for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
  return "$failed"
}

case "$which" in
  base) base_images ;;
  databases) database_images ;;
  all) base_images; database_images ;;
esac
