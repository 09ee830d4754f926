"""The converter CLIs on bad input: one-paragraph errors, exit code 2, nothing written or lost."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def run(tool, *args):
    return subprocess.run([sys.executable, str(ROOT / "tools/convert" / tool), *map(str, args)],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture()
def hf(tiny_hf_factory, tmp_path):
    import shutil

    dst = tmp_path / "hf"
    shutil.copytree(tiny_hf_factory("llama"), dst)
    return dst


def test_unsupported_architecture(hf, tmp_path):
    cfg = json.loads((hf / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (hf / "config.json").write_text(json.dumps(cfg))
    r = run("hf_to_megatron.py", "--hf-dir", hf, "--out-dir", tmp_path / "o")
    assert r.returncode == 2
    assert "'GPT2LMHeadModel' is not supported; supported: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM" in r.stderr
    assert "Traceback" not in r.stderr and not (tmp_path / "o").exists()


def test_config_weights_mismatch(hf, tmp_path):
    cfg = json.loads((hf / "config.json").read_text())
    cfg["intermediate_size"] = 512
    (hf / "config.json").write_text(json.dumps(cfg))
    r = run("hf_to_megatron.py", "--hf-dir", hf, "--out-dir", tmp_path / "o")
    assert r.returncode == 2 and "config.json and the weights disagree" in r.stderr
    assert "gate_proj.weight: checkpoint (256, 128) vs config (512, 128)" in r.stderr


def test_corrupt_safetensors_names_the_file(hf, tmp_path):
    f = hf / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    r = run("hf_to_megatron.py", "--hf-dir", hf, "--out-dir", tmp_path / "o")
    assert r.returncode == 2 and f"{f} is not a readable safetensors file" in r.stderr


def test_bad_layout_is_refused_before_writing(hf, tmp_path):
    r = run("hf_to_megatron.py", "--hf-dir", hf, "--out-dir", tmp_path / "o", "--tp", "3")
    assert r.returncode == 2 and "num_attention_heads=4 is not divisible by tp=3: use tp in [1, 2, 4]" in r.stderr
    assert not (tmp_path / "o").exists()


def test_zero_writer_threads_are_refused_before_writing(hf, tmp_path):
    r = run("hf_to_megatron.py", "--hf-dir", hf, "--out-dir", tmp_path / "o", "--threads", "0")
    assert r.returncode == 2 and "the writer needs at least 1 thread (--threads 1)" in r.stderr
    assert not (tmp_path / "o").exists()


def test_existing_output_is_kept_without_overwrite(hf, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    r = run("hf_to_megatron.py", "--hf-dir", hf, "--out-dir", out)
    assert r.returncode == 2 and "already exists: choose another --out-dir or pass --overwrite" in r.stderr
    assert (out / "keep.txt").read_text() == "precious"


def test_not_a_checkpoint(tmp_path):
    r = run("megatron_to_hf.py", "--ckpt-dir", tmp_path, "--out-dir", tmp_path / "o")
    assert r.returncode == 2 and "is not a sage_megatron checkpoint" in r.stderr


@pytest.mark.multiproc
def test_cli_round_trip_and_compare_exit_codes(hf, tmp_path):
    ck = tmp_path / "ck"
    r = run("hf_to_megatron.py", "--hf-dir", hf, "--out-dir", ck, "--tp", "2")
    assert r.returncode == 0, r.stderr[-2000:]
    ok = run("compare_logits.py", "--hf-dir", hf, "--ckpt-dir", ck, "--tp", "1", "--pp", "2")
    assert ok.returncode == 0, ok.stderr[-2000:]
    line = json.loads(ok.stdout.strip().splitlines()[-1])
    assert line["ok"] and line["max_abs_logit_diff"] <= 1e-4 and "mean_abs_logit_diff" in line
    # A tolerance below the measured difference must fail with exit code 1.
    tight = run("compare_logits.py", "--hf-dir", hf, "--ckpt-dir", ck, "--tolerance", "0")
    assert tight.returncode == 1 and json.loads(tight.stdout.strip().splitlines()[-1])["ok"] is False
