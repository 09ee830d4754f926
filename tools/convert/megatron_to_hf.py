#!/usr/bin/env python
"""megatron-core dist checkpoint (any layout) -> HF folder (transformers / vLLM loadable).

  python tools/convert/megatron_to_hf.py --ckpt-dir O --out-dir H [--overwrite] [--max-stage-gib 1]

Streamed from the checkpoint's files a group of layers at a time: peak memory is one group (at most
--max-stage-gib, or one tensor if larger) plus one output shard, not the model.
"""
import argparse
import json

import _common


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt-dir", required=True)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--max-stage-gib", type=float, default=1.0, help="layers read at a time, in GiB")
    a = p.parse_args()
    from sage_megatron.parallel.convert import megatron_to_hf

    r = megatron_to_hf(a.ckpt_dir, a.out_dir, overwrite=a.overwrite, max_stage_bytes=int(a.max_stage_gib * 2**30))
    print(json.dumps({"out_dir": a.out_dir, "seconds": round(r["seconds"], 2), "bytes": r["bytes"],
                      "peak_rss_gib": round(r["peak_rss_gib"], 3)}))
    return 0


if __name__ == "__main__":
    _common.run_cli(main)
