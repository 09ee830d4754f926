"""scripts/gpu_check.sh / scripts/gpu_check.py: the wheel set for the GPU machine, and the check itself on CPU.

The GPU machine (Python 3.12, torch 2.11 + CUDA, transformers, safetensors, numpy; no network) cannot be
reached from here. What can be checked here: that the prepared .whl/ resolves OFFLINE for Python 3.12
manylinux x86-64 against that machine's packages (stood in by metadata-only stub wheels), within the size
limit; that the install step works on a real Python 3.12 without an index; and that every phase of the
check runs end to end on a tiny model on CPU (gloo, the CPU shims) through the same code.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"
WHL = REPO / ".whl"
NEVER_SHIPPED = re.compile(r"^(torch|nvidia[-_].*|transformers|safetensors|numpy|triton)-", re.I)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _mcore_pin() -> str:
    return re.search(r'"megatron-core==([^"]+)"', (REPO / "pyproject.toml").read_text()).group(1)


def _isolated_pip_env() -> dict:
    """pip without this machine's config (extra indexes, find-links, constraints): only what we pass."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_ROOT_USER_ACTION="ignore")
    return env


@pytest.fixture(scope="module")
def manifest() -> dict:
    """Run the prepare step (reuses a complete .whl/; downloads from PyPI otherwise)."""
    r = subprocess.run([str(SCRIPT), "--prepare"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"gpu_check.sh --prepare failed (needs PyPI):\n{r.stdout}\n{r.stderr}"
    return json.loads((WHL / "MANIFEST.json").read_text())


def _stub_wheel(directory: Path, name: str, version: str) -> None:
    """A metadata-only wheel standing in for a package the GPU machine already has."""
    dist = f"{name.replace('-', '_')}-{version}"
    with zipfile.ZipFile(directory / f"{dist}-py3-none-any.whl", "w") as z:
        z.writestr(f"{dist}.dist-info/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{dist}.dist-info/WHEEL",
                   "Wheel-Version: 1.0\nGenerator: stub\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}.dist-info/RECORD", "")


def _offline_resolve(find_links: list[Path], requested: list[str], target: dict, tmp: Path):
    """pip's resolution of ``requested`` for the target Python/platform from find_links only (no index)."""
    report = tmp / f"report-{len(list(tmp.glob('report-*')))}.json"
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--no-index", "--only-binary=:all:",
           "--python-version", target["python_version"], "--implementation", target["implementation"],
           *[a for p in target["platforms"] for a in ("--platform", p)],
           "--target", str(tmp / "target"), "--report", str(report), "-q"]
    for d in find_links:
        cmd += ["--find-links", str(d)]
    r = subprocess.run([*cmd, *requested], capture_output=True, text=True, env=_isolated_pip_env(), timeout=300)
    return r, (json.loads(report.read_text()) if r.returncode == 0 else None)


def test_prepared_wheels_complete_small_and_for_python312(manifest, tmp_path):
    files = {f["file"]: f for f in manifest["files"]}
    # the manifest describes what is on disk
    assert sorted(p.name for p in WHL.glob("*.whl")) == sorted(files)
    for name, f in files.items():
        data = (WHL / name).read_bytes()
        assert len(data) == f["bytes"] and hashlib.sha256(data).hexdigest() == f["sha256"], name
    total = sum(f["bytes"] for f in files.values())
    assert total == manifest["total_bytes"] <= 60 * 2**20
    # megatron-core at the pyproject pin, as the compiled cp312 manylinux x86-64 wheel; nothing the machine has
    pin = _mcore_pin()
    assert f"megatron-core=={pin}" in manifest["requested"]
    mcore = [n for n in files if n.startswith(f"megatron_core-{pin}-")]
    assert len(mcore) == 1 and "-cp312-cp312-" in mcore[0] and "manylinux" in mcore[0] and mcore[0].endswith(
        "x86_64.whl"), mcore
    assert not [n for n in files if NEVER_SHIPPED.match(n)], files

    # Offline resolution of everything requested, WITH dependencies, for Python 3.12 manylinux x86-64, from
    # .whl/ plus stub wheels for what the GPU machine already has (torch 2.11, ...). It fails if a
    # dependency of a shipped wheel is neither shipped nor preinstalled (or torch 2.11 is too old for it).
    target = manifest["target"]
    shipped = {_norm(s.split("==")[0]) for s in manifest["requested"]}
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, version in target["preinstalled"].items():
        if _norm(name) not in shipped:
            _stub_wheel(stubs, name, version or "0")   # unknown version: "0" fails any lower bound (conservative)
    r, report = _offline_resolve([WHL, stubs], manifest["requested"], target, tmp_path)
    assert r.returncode == 0, f"the wheel set does not resolve offline:\n{r.stdout}\n{r.stderr}"
    resolved = {_norm(i["metadata"]["name"]): i for i in report["install"]}
    from_whl = {n for n, i in resolved.items() if "/.whl/" in i["download_info"]["url"]}
    from_stubs = {n for n, i in resolved.items() if "/stubs/" in i["download_info"]["url"]}
    assert from_whl | from_stubs == set(resolved)
    assert from_whl == shipped, "every shipped wheel is used, and only shipped wheels come from .whl/"
    assert resolved["megatron-core"]["metadata"]["version"] == pin
    assert resolved["torch"]["metadata"]["version"] == target["preinstalled"]["torch"]

    # Negative control: without the packaging wheel (megatron-core needs packaging>=24.2, which is not
    # stubbed as preinstalled) the same resolution must fail, so the check above can catch a missing wheel.
    partial = tmp_path / "partial"
    partial.mkdir()
    for n in files:
        if not n.startswith("packaging-"):
            shutil.copy(WHL / n, partial / n)
    requested = [s for s in manifest["requested"] if not s.startswith("packaging==")]
    r2, _ = _offline_resolve([partial, stubs], requested, target, tmp_path)
    assert r2.returncode != 0 and "packaging" in (r2.stdout + r2.stderr)


def test_prepare_refuses_over_the_size_limit(tmp_path):
    whl = tmp_path / "whl"
    env = {**os.environ, "GPU_CHECK_WHL": str(whl), "GPU_CHECK_MAX_MIB": "1"}
    r = subprocess.run([str(SCRIPT), "--prepare"], cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode != 0
    assert "over the 1 MiB limit" in r.stderr and "megatron_core" in r.stderr
    assert not whl.exists(), "nothing is written when over the limit"


def _python312_with_pip() -> str | None:
    for cand in (shutil.which("python3.12"), "/root/.pyenv/versions/3.12.1/bin/python"):
        if cand and Path(cand).exists() and subprocess.run([cand, "-m", "pip", "--version"],
                                                           capture_output=True).returncode == 0:
            return cand
    return None


def test_install_step_on_a_real_python312(manifest, tmp_path):
    """The GPU side's install (pip --no-index --find-links .whl --target) on a Python 3.12 here (no torch)."""
    py = _python312_with_pip()
    if py is None:
        pytest.skip("no Python 3.12 with pip on this machine")
    site = tmp_path / "site"
    env = {**_isolated_pip_env(), "PYTHON": py, "GPU_CHECK_SITE": str(site)}
    r = subprocess.run([str(SCRIPT), "--install-only"], cwd=REPO, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    # (megatron.core itself needs torch, which this Python lacks: metadata and files only)
    probe = "import importlib.metadata as m; d = m.distribution('megatron-core'); print(d.version, d.locate_file(''))"
    out = subprocess.run([py, "-c", probe], capture_output=True, text=True, env={"PYTHONPATH": str(site), "PATH": ""})
    assert out.returncode == 0, out.stderr
    version, location = out.stdout.split()
    assert version == _mcore_pin() and Path(location) == site
    assert list(site.glob("megatron/core/datasets/helpers_cpp.cpython-312-x86_64-linux-gnu*.so"))


def _load_module():
    spec = importlib.util.spec_from_file_location("gpu_check_script", REPO / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_report_records_failures_and_skips_dependents(tmp_path):
    gc = _load_module()
    rep = gc.Report(tmp_path / "r.json", budget_s=100.0)

    def boom():
        raise RuntimeError("no GPU here")

    assert rep.run("a", lambda: {"x": 1}) is not None
    assert rep.run("b", boom) is None
    assert rep.run("c", lambda: {"y": 2}, "b") is None
    assert rep.run("d", lambda: {"ok": False, "z": 3}) is None
    assert rep.finish() is False
    doc = json.loads((tmp_path / "r.json").read_text())
    ph = doc["phases"]
    assert ph["a"]["ok"] and ph["a"]["x"] == 1
    assert ph["b"]["error"] == "RuntimeError: no GPU here" and "traceback" in ph["b"]
    assert ph["c"]["skipped"] and "needs phase(s) ['b']" in ph["c"]["error"]
    assert not ph["d"]["ok"] and ph["d"]["z"] == 3 and ph["d"]["error"]
    assert doc["ok"] is False and doc["failed_phases"] == ["b", "c", "d"]
    over = gc.Report(tmp_path / "o.json", budget_s=0.0)
    assert over.run("late", lambda: {}) is None
    assert "time budget" in json.loads((tmp_path / "o.json").read_text())["phases"]["late"]["error"]


@pytest.mark.multiproc
def test_cpu_smoke_runs_every_phase(tmp_path):
    """scripts/gpu_check.sh --device cpu --tiny: the same phases (converter rank spawned, gloo, CPU shims)."""
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)}
    r = subprocess.run([str(SCRIPT), "--device", "cpu", "--tiny"], cwd=REPO, capture_output=True, text=True,
                       env=env, timeout=600)
    out = tmp_path / "gpu_check.json"
    assert f"JSON: {out}" in r.stdout
    doc = json.loads(out.read_text())
    assert r.returncode == 0 and doc["ok"] is True and doc["failed_phases"] == [], \
        json.dumps({k: v.get("error") for k, v in doc["phases"].items()}) + r.stdout[-3000:] + r.stderr[-3000:]
    ph = doc["phases"]
    assert list(ph) == ["environment", "hf_model", "convert", "actor", "device_layer", "parity_float32",
                        "parity_bfloat16", "grpo_step", "throughput", "imported_distributions"]
    assert all(p["ok"] and p["seconds"] >= 0 for p in ph.values())
    assert doc["phase_seconds"].keys() == ph.keys() and 0 < doc["wall_seconds"] < 420

    env_ = ph["environment"]
    assert env_["requested_device"] == "cpu" and env_["dtype"] == "float32" and env_["size"] == "tiny"
    assert env_["megatron_core"] == _mcore_pin() and env_["torch"] and env_["transformers"]
    assert env_["python"] and env_["commit"] and env_["command"] == "scripts/gpu_check.sh --device cpu --tiny"

    n = ph["hf_model"]["params"]
    assert ph["hf_model"]["architecture"] == "LlamaForCausalLM" and n > 0
    assert ph["convert"]["tp"] == ph["convert"]["pp"] == 1 and ph["convert"]["dist_bytes"] > 0
    assert ph["actor"]["params"] == n and ph["actor"]["param_devices"] == ["cpu"]
    assert ph["actor"]["layer_spec"] == "local"

    dl = ph["device_layer"]
    assert dl["branch"] == "cpu" and dl["compute_device"] == "cpu" and dl["process_group_backend"] == "gloo"
    assert dl["needs_cpu_shims"] and all(dl["shims_in_place"].values())

    p32 = ph["parity_float32"]
    assert p32["max_abs_diff"] <= 1e-4 and p32["compared_positions"] > 0 and p32["hf_mean_logp"] < 0, p32
    pbf = ph["parity_bfloat16"]
    assert pbf["max_abs_diff"] <= pbf["tolerance_max_abs"] and pbf["mean_abs_diff"] > 0, pbf   # bf16 does round

    g = ph["grpo_step"]
    assert math.isfinite(g["loss"]) and math.isfinite(g["grad_norm"]) and g["grad_norm"] > 0
    assert g["metrics"]["update_ok"] == 1.0 and abs(g["metrics"]["ratio_mean"] - 1) <= 1e-5
    assert g["param_tensors_changed"] == g["param_tensors"] > 0
    assert g["main_param_tensors_changed"] == g["main_param_tensors"] > 0
    assert g["max_abs_param_change"] > 0 and g["policy_moved_toward_advantage"], g

    t = ph["throughput"]
    assert t["fwd_bwd_tokens_per_s"] > 0 and t["train_step_tokens_per_s"] > 0, t
    assert t["params_counted"] == t["params_formula"] == n
    # (on CPU the peak is a short matmul measurement: under load it can be far off, so no upper bound)
    assert t["peak_flops"] > 0 and 0 < t["mfu_fwd_bwd_6n"] < t["mfu_fwd_bwd_with_attention"], t

    dists = ph["imported_distributions"]["distributions"]
    assert "megatron-core" in dists and "torch" in dists
