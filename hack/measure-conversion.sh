#!/usr/bin/env bash
# Measures registry-side conversion of a ~400 MB image (issue: "measure and
# note"): conversion time against `gzip -6` of the same layer tars, the
# registry's peak memory (VmHWM) during conversion, and the size overhead
# of the converted image. Uses real files from this machine (/usr/local/go,
# /usr/share) as layer contents. Run as root after `make build`.
set -euo pipefail
cd "$(dirname "$0")/.."
export OTEL_TRACES_EXPORTER=none
BIN="${STARLIGHT_BIN:-$PWD/bin}"
tmp="$(mktemp -d /tmp/sl-measure.XXXXXX)"
reg_pid=
cleanup() {
	[[ -n "$reg_pid" ]] && kill "$reg_pid" 2>/dev/null && wait "$reg_pid" 2>/dev/null || true
	rm -rf "$tmp"
}
trap cleanup EXIT

# Layers: the Go toolchain (~270 MB) and documentation/locales (~130 MB).
mkdir -p "$tmp/img"
tar -C / -cf "$tmp/img/l1.tar" usr/local/go
tar -C / -cf "$tmp/img/l2.tar" usr/share/doc usr/share/locale usr/share/man 2>/dev/null || true
python3 - "$tmp/img" <<'PY'
import hashlib, json, os, sys
d = sys.argv[1]
layers = ["l1.tar", "l2.tar"]
diffs = []
for l in layers:
    h = hashlib.sha256()
    with open(os.path.join(d, l), "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    diffs.append("sha256:" + h.hexdigest())
cfg = {"architecture": "amd64", "os": "linux", "config": {"Cmd": ["/bin/sh"]},
       "rootfs": {"type": "layers", "diff_ids": diffs}}
c = json.dumps(cfg).encode()
cname = hashlib.sha256(c).hexdigest() + ".json"
open(os.path.join(d, cname), "wb").write(c)
json.dump([{"Config": cname, "RepoTags": ["big:v1"], "Layers": layers}], open(os.path.join(d, "manifest.json"), "w"))
PY
(cd "$tmp/img" && tar -cf "$tmp/big.tar" .)
echo "uncompressed layers: $(du -cb "$tmp"/img/l*.tar | tail -1 | cut -f1) bytes"

# Baseline: gzip -6 of the same layer tars, one after the other.
start=$(date +%s.%N)
for l in "$tmp"/img/l*.tar; do gzip -6 -c "$l" > "$l.gz"; done
gzip_s=$(echo "$(date +%s.%N) - $start" | bc)
echo "gzip -6: ${gzip_s}s, $(du -cb "$tmp"/img/l*.tar.gz | tail -1 | cut -f1) bytes"

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
sed -e "s#/var/lib/starlight#$tmp/state#g" -e "s#127.0.0.1:5000#127.0.0.1:$port#" config.yml.example > "$tmp/config.yml"
"$BIN/starlight-registry" serve "$tmp/config.yml" > "$tmp/registry.log" 2>&1 &
reg_pid=$!
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/v2/" >/dev/null && break; sleep 0.1; done

skopeo copy --quiet --dest-tls-verify=false "docker-archive:$tmp/big.tar" "docker://127.0.0.1:$port/big:v1"
hwm_before=$(awk '/VmHWM/ {print $2}' /proc/$reg_pid/status)
start=$(date +%s.%N)
while :; do
	st=$(curl -sf "http://127.0.0.1:$port/starlight/v1/images/big/v1" | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')
	[[ "$st" == ready || "$st" == failed ]] && break
	sleep 0.2
done
wall=$(echo "$(date +%s.%N) - $start" | bc)
hwm=$(awk '/VmHWM/ {print $2}' /proc/$reg_pid/status)
conv_s=$(grep -o 'conversion job done.*' "$tmp/registry.log" | grep -o 'seconds=[0-9.]*' | head -1 | cut -d= -f2)
echo "state: $st"
echo "conversion: ${conv_s}s (job), ${wall}s wall after push; ratio to gzip -6: $(echo "scale=2; $conv_s / $gzip_s" | bc)"
echo "registry peak RSS (VmHWM): before conversion ${hwm_before} kB, after ${hwm} kB"

size_of() { # repo:tag -> total compressed layer bytes
	curl -sf -H 'Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json' \
		"http://127.0.0.1:$port/v2/big/manifests/$1" | python3 -c 'import json,sys; m=json.load(sys.stdin); print(sum(l["size"] for l in m["layers"]))'
}
orig=$(size_of v1); conv=$(size_of v1-starlight)
echo "image size: original ${orig} bytes, converted ${conv} bytes, overhead $(echo "scale=2; ($conv - $orig) * 100 / $orig" | bc)%"
