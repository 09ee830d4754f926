#!/usr/bin/env python
"""megatron-core dist checkpoint (any layout) -> HF folder (transformers / vLLM loadable).

  python tools/convert/megatron_to_hf.py --ckpt-dir O --out-dir H [--overwrite]
"""
import argparse
import json

import _common


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args()
    from sage_megatron.parallel.convert import megatron_to_hf

    r = megatron_to_hf(a.ckpt_dir, a.out_dir, overwrite=a.overwrite)
    print(json.dumps({"out_dir": a.out_dir, "seconds": round(r["seconds"], 2), "bytes": r["bytes"]}))
    return 0


if __name__ == "__main__":
    _common.run_cli(main)
