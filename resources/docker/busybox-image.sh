#!/usr/bin/env bash
# Write a Docker image archive (the `docker save` format, which `docker
# load` reads) of a busybox-only image, built from Debian's busybox-static
# without a registry or a Docker daemon:
#   busybox-image.sh OUT.tar [TAG]
# TAG defaults to moat/busybox:latest. The image's default command prints
# "hello from a container in a moat guest".
set -euo pipefail

out=$1 tag=${2:-moat/busybox:latest}
work=$(mktemp -d "${TMPDIR:-/tmp}/moat-bbimage.XXXXXX")
trap 'rm -rf "$work"' EXIT

root=$work/root
mkdir -p "$root/bin" "$root/etc" "$root/tmp" "$root/proc" "$root/sys" "$root/dev"
cp /bin/busybox "$root/bin/busybox"
while IFS= read -r applet; do
    [[ $applet == */* ]] || continue
    a=${applet##*/}
    [[ -e $root/bin/$a ]] || ln -s busybox "$root/bin/$a"
done < <(/bin/busybox --list-full)
echo 'root:x:0:0:root:/root:/bin/sh' >"$root/etc/passwd"
echo 'root:x:0:' >"$root/etc/group"

# One layer: a tar of the tree, owned by root, in a stable order.
layer=$work/layer.tar
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$root" -cf "$layer" .
diff_id=sha256:$(sha256sum "$layer" | cut -d' ' -f1)

config=$work/config.json
cat >"$config" <<JSON
{"architecture":"amd64","os":"linux","created":"1970-01-01T00:00:00Z",
 "config":{"Env":["PATH=/bin"],"Cmd":["/bin/sh","-c","echo hello from a container in a moat guest"]},
 "rootfs":{"type":"layers","diff_ids":["$diff_id"]},
 "history":[{"created":"1970-01-01T00:00:00Z","created_by":"moat resources/docker/busybox-image.sh"}]}
JSON
config_id=$(sha256sum "$config" | cut -d' ' -f1)

img=$work/img
mkdir -p "$img/layer"
cp "$layer" "$img/layer/layer.tar"
cp "$config" "$img/$config_id.json"
printf '[{"Config":"%s.json","RepoTags":["%s"],"Layers":["layer/layer.tar"]}]\n' \
    "$config_id" "$tag" >"$img/manifest.json"
tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$img" -cf "$out" .
