#!/usr/bin/env python3
"""Checks the OCI image that pack.py wrote: layout files, media types, every digest and size
recomputed, the module inside equal to the built filter, the tarball equal to the directory,
and (when skopeo is installed) that skopeo reads it.

Usage: check.py --wasm FILE --out DIR --tag TAG
"""
import argparse
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

PROBLEMS = []


def expect(cond, what):
    if not cond:
        PROBLEMS.append(what)
    return cond


def blob(root, desc, media_type):
    expect(desc.get("mediaType") == media_type, f"{desc.get('digest')}: media type {desc.get('mediaType')!r}, expected {media_type!r}")
    algo, _, hexd = desc["digest"].partition(":")
    path = os.path.join(root, "blobs", algo, hexd)
    if not expect(os.path.isfile(path), f"blob {desc['digest']} is missing"):
        return b""
    with open(path, "rb") as f:
        data = f.read()
    expect(hashlib.sha256(data).hexdigest() == hexd, f"blob {desc['digest']}: content does not match its digest")
    expect(len(data) == desc["size"], f"blob {desc['digest']}: size {len(data)}, descriptor says {desc['size']}")
    return data


def check_layout(root, wasm, tag):
    with open(os.path.join(root, "oci-layout")) as f:
        expect(json.load(f) == {"imageLayoutVersion": "1.0.0"}, "oci-layout is not version 1.0.0")
    with open(os.path.join(root, "index.json")) as f:
        index = json.load(f)
    expect(index.get("schemaVersion") == 2, "index.json: schemaVersion is not 2")
    refs = [m for m in index.get("manifests", []) if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag]
    if not expect(len(refs) == 1, f"index.json: no single manifest tagged {tag!r}"):
        return None
    manifest = json.loads(blob(root, refs[0], "application/vnd.oci.image.manifest.v1+json") or b"{}")
    expect(manifest.get("schemaVersion") == 2, "manifest: schemaVersion is not 2")
    expect(manifest.get("annotations", {}).get("module.wasm.image/variant") == "compat",
           "manifest: missing the module.wasm.image/variant=compat annotation Istio looks for")
    config = json.loads(blob(root, manifest["config"], "application/vnd.oci.image.config.v1+json") or b"{}")
    layers = manifest.get("layers", [])
    if not expect(len(layers) == 1, f"manifest: {len(layers)} layers, Istio expects exactly one"):
        return None
    layer_tar = gzip.decompress(blob(root, layers[0], "application/vnd.oci.image.layer.v1.tar+gzip"))
    expect(config.get("rootfs", {}).get("diff_ids") == ["sha256:" + hashlib.sha256(layer_tar).hexdigest()],
           "config: rootfs.diff_ids does not match the uncompressed layer")
    with tarfile.open(fileobj=io.BytesIO(layer_tar)) as tar:
        names = tar.getnames()
        expect(names == ["plugin.wasm"], f"layer holds {names}, expected only plugin.wasm")
        member = tar.extractfile("plugin.wasm") if "plugin.wasm" in names else None
        expect(member is not None and member.read() == wasm, "plugin.wasm is not the built filter")
    expect(wasm[:4] == b"\0asm", "the module does not start with the wasm magic number")
    return refs[0]["digest"]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--wasm", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--tag", required=True)
    args = ap.parse_args()
    with open(args.wasm, "rb") as f:
        wasm = f.read()
    digest = check_layout(args.out, wasm, args.tag)
    # The tarball must hold the same layout, byte for byte.
    with tarfile.open(args.out + ".tar") as tar:
        for m in tar.getmembers():
            with open(os.path.join(args.out, m.name), "rb") as f:
                expect(tar.extractfile(m).read() == f.read(), f"{args.out}.tar: {m.name} differs from the directory")
        expect(sorted(tar.getnames()) == sorted(
            os.path.relpath(os.path.join(d, n), args.out) for d, _, ns in os.walk(args.out) for n in ns),
            f"{args.out}.tar and the directory hold different files")
    if shutil.which("skopeo"):
        out = subprocess.run(["skopeo", "inspect", "--raw", f"oci:{args.out}:{args.tag}"], capture_output=True, text=True)
        expect(out.returncode == 0, f"skopeo cannot read the image: {out.stderr}")
        print("skopeo inspect: OK")
    else:
        print("skopeo not installed: its check skipped (the layout was verified by recomputing every digest)")
    if PROBLEMS:
        sys.exit("OCI image problems:\n  " + "\n  ".join(PROBLEMS))
    print(f"OCI image OK: {args.out} ({digest})")


if __name__ == "__main__":
    main()
