#!/usr/bin/env python
"""HF checkpoint -> megatron-core dist checkpoint, loadable at any TP/PP (vocabulary padded for --tp).

One process reads each HF tensor once and writes the torch_dist files; no ranks are spawned.

  python tools/convert/hf_to_megatron.py --hf-dir D --out-dir O --tp 2 --pp 1 [--dtype bfloat16] [--overwrite]
                                         [--threads N]
"""
import argparse
import json

import _common


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--pp", type=int, default=1)
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: the checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out-dir (only once complete)")
    p.add_argument("--threads", type=int, default=1, help="writer threads (more can help on parallel file systems)")
    a = p.parse_args()
    from sage_megatron.parallel.convert import hf_to_megatron

    r = hf_to_megatron(a.hf_dir, a.out_dir, tp=a.tp, pp=a.pp, dtype=a.dtype, overwrite=a.overwrite,
                      thread_count=a.threads)
    print(json.dumps({"out_dir": a.out_dir, "seconds": round(r["seconds"], 2), "family": r["family"],
                      "tp": a.tp, "pp": a.pp, "dtype": r["dtype"], "padded_vocab_size": r["padded_vocab_size"]}))
    return 0


if __name__ == "__main__":
    _common.run_cli(main)
