#!/usr/bin/env bash
# Builds the local images the demo, the tests and the notebook use, once, cached by tag:
#   dolly/busybox  Debian's busybox-static and its applet links, nothing else (about 2 MB)
#   dolly/python   a Debian 12 `essential` root with python3 (about 185 MB)
# No registry is reachable from these machines, so images are imported from local root folders.
set -euo pipefail
have() { docker image inspect "$1" >/dev/null 2>&1; }

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
