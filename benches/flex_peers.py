#!/usr/bin/env python3
"""flex_peers.py COMBO...: FlexAttention-S2 forward timings for several (dtype, vert_stride, seqs) in ONE Python
process, through torch_peers.py's main() (one torch import; Triton's on-disk cache reused between combos), for a
device call whose time is short. COMBO is "dtype:vert_stride:seq,seq,..." (e.g. fp16:16:16384,65536). ITERS
(env, default 5) is passed as --iters. Prints torch_peers.py's JSON lines. Finds torch_peers.py in $PEERS_DIR,
else in ../shared/peers beside the checkout or peers/ beside this file (a staged folder)."""
import os, sys

here = os.path.dirname(os.path.abspath(__file__))
for d in (os.environ.get("PEERS_DIR"), os.path.join(here, "peers"), os.path.join(here, "..", "..", "shared", "peers")):
    if d and os.path.exists(os.path.join(d, "torch_peers.py")):
        sys.path.insert(0, d)
        break
import torch_peers

iters = os.environ.get("ITERS", "5")
for combo in sys.argv[1:]:
    dt, vs, seqs = combo.split(":")
    sys.argv = ["torch_peers.py", "--impls", "flex-s2", "--dtype", dt, "--vert-stride", vs, "--iters", iters,
                "--seq", *seqs.split(",")]
    torch_peers.main()
