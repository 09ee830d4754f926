"""Installs TRL for bench/vs_trl.py only: trl==VERSION and the dependencies our venv lacks go into
runs/cache/bench-trl/trl-VERSION (``pip install --target DIR --no-deps``, pins from
requirements/bench-trl.txt), a folder the TRL worker puts on PYTHONPATH; the venv is never touched.
Also `installed_version`, the package-version lookup both sides use for their version reports.
"""
from __future__ import annotations

import importlib.metadata as md
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

DEFAULT_TRL = "1.16.0"
PINS_FILE = ROOT / "requirements" / "bench-trl.txt"


def read_pins(path: Path = PINS_FILE) -> list[str]:
    """``name==version`` lines of requirements/bench-trl.txt (comments and blanks dropped)."""
    if not path.is_file():
        return []
    return [line.split("#")[0].strip() for line in path.read_text().splitlines() if line.split("#")[0].strip()]


def installed_version(name: str) -> str | None:
    """The installed version of distribution `name` in this interpreter, None when absent."""
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def _resolve_missing(version: str) -> list[str]:
    """What ``pip install trl==VERSION`` would add to THIS venv (pip's dry-run report): name==version."""
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--quiet", "--report", "-", f"trl=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"error: cannot resolve trl=={version} against this venv:\n{proc.stderr[-2000:]}\n"
                         f"command: {' '.join(cmd)}")
    report = json.loads(proc.stdout)
    return [f"{i['metadata']['name']}=={i['metadata']['version']}" for i in report.get("install", [])]


def ensure_trl(version: str, root: Path) -> Path:
    """A folder with trl==VERSION and the dependencies our venv lacks, to put on PYTHONPATH.

    The packages come from requirements/bench-trl.txt when it pins this trl version, else from pip's
    dry-run resolution against this venv. They are installed with ``--target DIR --no-deps`` so
    nothing in the venv changes; a dependency the venv already has at ANOTHER version (which the
    target folder would shadow) stops the run: pick a trl version that accepts our pinned stack.
    Cached: a folder with its marker file is reused.
    """
    site = root / f"trl-{version}"
    marker = site / ".bench-installed.json"
    if marker.is_file():
        return site
    pins = read_pins()
    if f"trl=={version}" not in pins:
        pins = _resolve_missing(version)
    clash = [f"{p} (venv has {installed_version(p.split('==')[0])})" for p in pins
             if installed_version(p.split("==")[0]) not in (None, p.split("==")[1])]
    if clash:
        raise SystemExit(f"error: trl=={version} needs versions that differ from this venv's pinned stack: "
                         f"{', '.join(clash)}; choose another --trl-version")
    tmp = root / f".trl-{version}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
           "--target", str(tmp), *pins]
    print(f"[vs_trl] installing for the benchmark only: {' '.join(pins)} -> {site}", flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        shown = " ".join(cmd).replace(str(tmp), str(site))
        raise SystemExit(f"error: installing TRL failed ({proc.stderr.strip()[-1500:]}).\n"
                         f"Install it by hand, then re-run:\n  {shown}\n  echo '{{}}' > {marker}")
    shutil.rmtree(site, ignore_errors=True)
    tmp.rename(site)
    marker.write_text(json.dumps({"packages": pins, "python": sys.version.split()[0]}, indent=1))
    return site
