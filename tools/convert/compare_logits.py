#!/usr/bin/env python
"""Logits of a converted checkpoint run at (tp, pp) versus HF transformers on the same tokens.

  python tools/convert/compare_logits.py --hf-dir D --ckpt-dir O --tp T --pp P [--tolerance 1e-4]
Prints one JSON line; exits 1 when max_abs_logit_diff exceeds the tolerance.
"""
import argparse
import json

import _common


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--hf-attn", default="eager", choices=["eager", "sdpa"],
                   help="HF attention implementation of the reference (eager = Megatron's operation order)")
    a = p.parse_args()
    from sage_megatron.parallel.convert import compare_logits

    r = compare_logits(a.hf_dir, a.ckpt_dir, tp=a.tp, pp=a.pp, batch=a.batch, seq=a.seq, seed=a.seed, hf_attn=a.hf_attn)
    r["tolerance"] = a.tolerance
    r["ok"] = r["max_abs_logit_diff"] <= a.tolerance
    print(json.dumps(r))
    return 0 if r["ok"] else 1


if __name__ == "__main__":
    _common.run_cli(main)
