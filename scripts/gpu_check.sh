#!/usr/bin/env bash
# The one-command GPU check (README "GPU check").
#
#   scripts/gpu_check.sh --prepare   here, with PyPI: the wheels the GPU machine lacks -> .whl/ (+ MANIFEST.json)
#   scripts/gpu_check.sh [ARGS]      on the GPU machine, no network: installs .whl/ into a temp dir, runs
#                                    scripts/gpu_check.py ARGS (default: --device cuda); one JSON at
#                                    $OUT/gpu_check.json if $OUT is set, else runs/gpu_check.json
#   scripts/gpu_check.sh --install-only   only the install step (always from .whl/), printing PYTHONPATH
#
# The GPU machine (docs/platform.md): Python 3.12, torch 2.11 + CUDA 13, transformers, safetensors, numpy,
# pytest; no megatron-core, no network. Each wheel is downloaded with --no-deps from the explicit list
# below; tests/test_gpu_check.py resolves the set offline against that machine's packages.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WHL=${GPU_CHECK_WHL:-$ROOT/.whl}
MAX_MIB=${GPU_CHECK_MAX_MIB:-60}
TARGET_PY=3.12
PLATFORMS=(manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_24_x86_64 manylinux_2_28_x86_64)
MCORE_VERSION=$(sed -n 's/^ *"megatron-core==\([^"]*\)".*/\1/p' pyproject.toml | head -1)
[ -n "$MCORE_VERSION" ] || { echo "gpu_check.sh: no megatron-core==X pin in pyproject.toml" >&2; exit 2; }
# What the machine lacks. megatron-core needs torch, numpy (there) and packaging>=24.2 (there through
# transformers, but of unknown version): packaging is installed only where the machine's is missing or
# too old. Nothing else on the check's path is missing (pyyaml is imported only by sage_megatron.config
# and optionally by megatron-core; transformers brings it anyway).
WHEELS=("megatron-core==$MCORE_VERSION" "packaging==26.3")
INSTALL_UNLESS='{"packaging": ">=24.2"}'
# Never downloaded: the machine has them (version where known, null = any). tests/test_gpu_check.py
# stands these in for the machine when it resolves the wheel set offline.
PREINSTALLED='{"torch": "2.11.0", "transformers": "5.17.0", "safetensors": null, "numpy": null, "pytest": null,
  "setuptools": null, "filelock": null, "typing-extensions": null, "sympy": null, "networkx": null, "jinja2": null,
  "fsspec": null, "huggingface-hub": null, "tokenizers": null, "regex": null, "tqdm": null, "pyyaml": null}'

# pip warns once per package about this image's empty local index folders: drop that noise, keep its status.
quiet_pip() { local py=$1; shift; "$py" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

host_python() {   # a Python here that has pip (the project venv when set up)
  if [ -x "$ROOT/.venv/bin/python" ]; then echo "$ROOT/.venv/bin/python"; else command -v python3; fi
}

prepare() {
  local py; py=$(host_python)
  export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
  local lock="${TMPDIR:-/tmp}/gpu_check_prepare_$(printf %s "$ROOT" | sha256sum | cut -c1-12).lock"
  exec 9>"$lock"
  flock 9   # two concurrent prepares (a test run and a person) take turns
  local want; want=$(printf '%s\n' "${WHEELS[@]}")
  if [ -f "$WHL/MANIFEST.json" ] && WANT="$want" "$py" - "$WHL" <<'EOF'
import hashlib, json, os, sys
from pathlib import Path
whl = Path(sys.argv[1]); m = json.loads((whl / "MANIFEST.json").read_text())
ok = m.get("requested") == os.environ["WANT"].split("\n") and all(
    (whl / f["file"]).is_file() and (whl / f["file"]).stat().st_size == f["bytes"]
    and hashlib.sha256((whl / f["file"]).read_bytes()).hexdigest() == f["sha256"] for f in m["files"])
sys.exit(0 if ok else 1)
EOF
  then
    echo "[gpu_check] $WHL is complete (MANIFEST.json matches): nothing to download"
  else
    TMP_DL=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check_whl.XXXXXX")
    local tmp=$TMP_DL
    trap 'rm -rf "${TMP_DL:-}"' EXIT
    local plat=(); for p in "${PLATFORMS[@]}"; do plat+=(--platform "$p"); done
    echo "[gpu_check] pip download (Python $TARGET_PY, ${PLATFORMS[*]}): ${WHEELS[*]}"
    quiet_pip "$py" download -q --no-deps --only-binary=:all: --python-version "$TARGET_PY" --implementation cp \
      "${plat[@]}" -d "$tmp" "${WHEELS[@]}"
    WANT="$want" MAX_MIB="$MAX_MIB" TARGET_PY="$TARGET_PY" PLATFORMS="${PLATFORMS[*]}" \
      INSTALL_UNLESS="$INSTALL_UNLESS" PREINSTALLED="$PREINSTALLED" "$py" - "$tmp" <<'EOF'
import hashlib, json, os, sys, time
from pathlib import Path
d = Path(sys.argv[1])
files = [{"file": p.name, "bytes": p.stat().st_size, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
         for p in sorted(d.glob("*.whl"))]
total = sum(f["bytes"] for f in files)
limit = float(os.environ["MAX_MIB"]) * 2**20
manifest = {"requested": os.environ["WANT"].split("\n"), "files": files, "total_bytes": total,
            "total_mib": round(total / 2**20, 3), "limit_mib": float(os.environ["MAX_MIB"]),
            "target": {"python_version": os.environ["TARGET_PY"], "implementation": "cp",
                       "platforms": os.environ["PLATFORMS"].split(), "preinstalled": json.loads(os.environ["PREINSTALLED"])},
            "install_unless_installed": json.loads(os.environ["INSTALL_UNLESS"]),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
if total > limit:
    big = ", ".join(f"{f['file']} {f['bytes'] / 2**20:.1f} MiB" for f in sorted(files, key=lambda f: -f["bytes"]))
    sys.exit(f"gpu_check.sh --prepare: the wheels total {total / 2**20:.1f} MiB, over the {limit / 2**20:.0f} MiB "
             f"limit (GPU_CHECK_MAX_MIB): {big}. Nothing was written to .whl/.")
(d / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
EOF
    rm -rf "$WHL" && mkdir -p "$WHL" && cp "$tmp"/* "$WHL"/
  fi
  # The commit the carried tree comes from (a copied work tree has no .git): rewritten on every prepare.
  git -C "$ROOT" rev-parse HEAD 2>/dev/null | tr -d '\n' > "$WHL/SOURCE_COMMIT" || true
  if [ -n "$(git -C "$ROOT" status --porcelain --untracked-files=no 2>/dev/null)" ]; then printf -- '-dirty' >> "$WHL/SOURCE_COMMIT"; fi
  "$py" - "$WHL" <<'EOF'
import json, sys
from pathlib import Path
m = json.loads((Path(sys.argv[1]) / "MANIFEST.json").read_text())
for f in m["files"]:
    print(f"  {f['file']}  {f['bytes'] / 2**20:.2f} MiB")
print(f"[gpu_check] {len(m['files'])} wheels, {m['total_mib']:.2f} MiB of {m['limit_mib']:.0f} MiB -> {sys.argv[1]}")
EOF
}

gpu_python() {   # the Python that has torch on the GPU machine
  if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
  for c in python3 python; do
    if command -v "$c" >/dev/null && "$c" -c "import torch" 2>/dev/null; then command -v "$c"; return; fi
  done
  echo "gpu_check.sh: no python with torch found (set PYTHON=)" >&2; exit 2
}

install() {   # sets GPU_CHECK_SITE / PYTHONPATH for the check; --install-only stops after it
  local py=$1 force=${2:-0}
  export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_ROOT_USER_ACTION=ignore
  if [ "$force" = 0 ] && "$py" -c "import megatron.core" 2>/dev/null; then
    echo "[gpu_check] megatron-core already importable by $py: nothing installed"
  else
    [ -f "$WHL/MANIFEST.json" ] || { echo "gpu_check.sh: $WHL/MANIFEST.json missing: run scripts/gpu_check.sh --prepare" \
      "on a machine with PyPI access and carry .whl/ with the tree" >&2; exit 2; }
    local site=${GPU_CHECK_SITE:-${TMPDIR:-/tmp}/gpu_check_site}
    rm -rf "$site" && mkdir -p "$site"
    local t0; t0=$(date +%s%N)
    # Which wheels to install: checksums first; a wheel whose package the machine already has in a good
    # enough version (MANIFEST install_unless_installed) is left out, so nothing shadows the machine's own.
    local picks; picks=$("$py" - "$WHL" <<'EOF'
import hashlib, importlib.metadata as md, json, sys
from pathlib import Path
whl = Path(sys.argv[1]); m = json.loads((whl / "MANIFEST.json").read_text())
for f in m["files"]:
    if hashlib.sha256((whl / f["file"]).read_bytes()).hexdigest() != f["sha256"]:
        sys.exit(f"{whl / f['file']}: sha256 differs from MANIFEST.json (corrupt copy): run --prepare again")
for spec in m["requested"]:
    name, version = spec.split("==")
    unless = m.get("install_unless_installed", {}).get(name)
    if unless:
        try:
            from packaging.specifiers import SpecifierSet
            if md.version(name) in SpecifierSet(unless):
                print(f"[gpu_check] {name} {md.version(name)} already satisfies {unless}: not installed", file=sys.stderr)
                continue
        except Exception:
            pass
    norm = name.replace("-", "_").lower()
    files = [f["file"] for f in m["files"] if f["file"].lower().startswith(f"{norm}-{version}-")]
    print(spec, files[0] if files else "-")
EOF
)
    local specs; specs=$(echo "$picks" | awk '{print $1}' | xargs)
    echo "[gpu_check] installing from $WHL into $site (no network): $specs"
    if "$py" -m pip --version >/dev/null 2>&1; then
      # shellcheck disable=SC2086
      quiet_pip "$py" install -q --no-index --find-links "$WHL" --target "$site" --no-deps $specs
    else   # no pip on the machine: a wheel is a zip laid out for site-packages
      echo "[gpu_check] no pip for $py: unpacking the wheels instead"
      echo "$picks" | while read -r _ file; do "$py" -m zipfile -e "$WHL/$file" "$site"; done
    fi
    local ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    export GPU_CHECK_SITE=$site GPU_CHECK_INSTALLED=${specs// /,}
    export GPU_CHECK_INSTALL_S="$((ms / 1000)).$(printf %03d $((ms % 1000)))"
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "[gpu_check] installed in ${GPU_CHECK_INSTALL_S} s: $site"
  fi
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
}

run() {
  local py; py=$(gpu_python)
  install "$py"
  local json=""; local prev=""
  for a in "$@"; do [ "$prev" = "--out" ] && json=$a; case "$a" in --out=*) json=${a#--out=} ;; esac; prev=$a; done
  [ -n "$json" ] || json=${OUT:+$OUT/gpu_check.json}
  [ -n "$json" ] || json=$ROOT/runs/gpu_check.json
  export GPU_CHECK_COMMAND="scripts/gpu_check.sh${*:+ $*}"
  local rc=0
  timeout -k 15 "${GPU_CHECK_TIMEOUT_S:-470}" "$py" scripts/gpu_check.py "$@" || rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    echo "[gpu_check] killed after ${GPU_CHECK_TIMEOUT_S:-470} s (exit $rc); $json keeps the phases that finished" >&2
    [ -f "$json" ] && "$py" - "$json" "$rc" <<'EOF' || true
import json, sys
p = sys.argv[1]; d = json.load(open(p))
d.update(ok=False, timed_out=True, timeout_exit_status=int(sys.argv[2]))
d["failed_phases"] = [*d.get("failed_phases", []), "timeout"]
json.dump(d, open(p, "w"), indent=1)
EOF
  fi
  return "$rc"
}

case "${1:-}" in
  --prepare) shift; [ $# = 0 ] || { echo "gpu_check.sh --prepare takes no other arguments" >&2; exit 2; }; prepare ;;
  --install-only) py=$(gpu_python); install "$py" 1; echo "PYTHONPATH=$PYTHONPATH" ;;
  -h|--help) sed -n '2,12p' "$0" ;;
  *) run "$@" ;;
esac
