#!/usr/bin/env python3
"""Packs the tokengate filter as an OCI image that Istio pulls with `oci://` (stdlib only).

Format: Istio's "compat" Wasm image, i.e. a standard OCI image whose single tar+gzip layer
holds `plugin.wasm`, annotated `module.wasm.image/variant=compat`. Istio accepts it, and being
an ordinary image it can be pushed, copied and scanned by oras, crane, skopeo or any registry.
The output is deterministic (fixed times and owners), so the digest is reproducible.

Writes an OCI image layout directory and a tarball of it, then prints the digests and the
push commands.

Usage: pack.py --wasm FILE --out DIR --tag TAG
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import tarfile

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def digest(data):
    return "sha256:" + hashlib.sha256(data).hexdigest()


def canonical(obj):
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def deterministic_tar(files):
    """A tar of (name, bytes) pairs with fixed metadata."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o444, 0
            info.uid = info.gid = 0
            info.uname = info.gname = ""
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def gzip_fixed(data):
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=9) as gz:
        gz.write(data)
    return buf.getvalue()


def build(wasm, tag):
    """Returns (blobs by digest, index.json bytes, manifest digest)."""
    layer_tar = deterministic_tar([("plugin.wasm", wasm)])
    layer = gzip_fixed(layer_tar)
    config = canonical({
        "architecture": "wasm",
        "os": "wasip1",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": [digest(layer_tar)]},
    })
    manifest = canonical({
        "schemaVersion": 2,
        "mediaType": MANIFEST,
        "config": {"mediaType": CONFIG, "digest": digest(config), "size": len(config)},
        "layers": [{
            "mediaType": LAYER,
            "digest": digest(layer),
            "size": len(layer),
            "annotations": {"org.opencontainers.image.title": "plugin.wasm"},
        }],
        "annotations": {
            "module.wasm.image/variant": "compat",
            "org.opencontainers.image.title": "tokengate-filter",
            "org.opencontainers.image.version": tag,
        },
    })
    index = canonical({
        "schemaVersion": 2,
        "mediaType": INDEX,
        "manifests": [{
            "mediaType": MANIFEST,
            "digest": digest(manifest),
            "size": len(manifest),
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    })
    blobs = {digest(b): b for b in (layer, config, manifest)}
    return blobs, index, digest(manifest)


def write_layout(out, blobs, index):
    if os.path.exists(out):
        shutil.rmtree(out)
    os.makedirs(os.path.join(out, "blobs", "sha256"))
    files = {"oci-layout": canonical({"imageLayoutVersion": "1.0.0"}), "index.json": index}
    for d, data in blobs.items():
        files["blobs/sha256/" + d.split(":", 1)[1]] = data
    for name, data in files.items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    with open(out + ".tar", "wb") as f:
        f.write(deterministic_tar(files.items()))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wasm", required=True)
    ap.add_argument("--out", required=True, help="layout directory; the tarball is DIR.tar")
    ap.add_argument("--tag", required=True)
    args = ap.parse_args()
    with open(args.wasm, "rb") as f:
        wasm = f.read()
    blobs, index, manifest_digest = build(wasm, args.tag)
    write_layout(args.out, blobs, index)
    out = os.path.relpath(args.out)
    print(f"OCI image layout: {out}/ (tarball {out}.tar), tag {args.tag}")
    print(f"  image manifest digest: {manifest_digest}")
    print(f"  WasmPlugin sha256 for an oci:// url (the image digest): {manifest_digest.split(':', 1)[1]}")
    print(f"  sha256 of the module itself (for file:// or http(s):// urls): {hashlib.sha256(wasm).hexdigest()}")
    print("Push it with one of:")
    print(f"  skopeo copy oci:{out}:{args.tag} docker://REGISTRY/tokengate-filter:{args.tag}")
    print(f"  oras cp --from-oci-layout {out}:{args.tag} REGISTRY/tokengate-filter:{args.tag}")
    print(f"  crane push {out} REGISTRY/tokengate-filter:{args.tag}")
    print(f"then in the WasmPlugin: url: oci://REGISTRY/tokengate-filter:{args.tag}")


if __name__ == "__main__":
    main()
