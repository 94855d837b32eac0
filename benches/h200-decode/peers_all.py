#!/usr/bin/env python3
"""Runs torch_peers.py --mode decode for each (KV heads, batch, seqs) in one Python process (torch imported
once), the 128k comparisons first, after measuring the device-to-device copy bandwidth (read + write bytes)."""
import sys, os
sys.path.insert(0, os.path.join(os.environ.get("STAGE", ".stage-decode"), "peers"))
import torch_peers, torch

def bandwidth():
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda"); y = torch.empty_like(x)
    for _ in range(3): y.copy_(x)
    torch.cuda.synchronize(); s = torch.cuda.Event(enable_timing=True); e = torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(20): y.copy_(x)
    e.record(); torch.cuda.synchronize()
    print(f"copy bandwidth {2 * 20 * x.numel() / (s.elapsed_time(e) * 1e-3) / 1e9:.0f} GB/s (read + write)", file=sys.stderr, flush=True)
    del x, y

bandwidth()
for kv, b, seqs in [(8, 16, ["32768", "131072"]), (32, 1, ["131072"]), (32, 16, ["131072"]), (8, 1, ["32768", "131072"]),
                    (32, 1, ["32768"]), (32, 16, ["32768"])]:
    sys.argv = ["torch_peers.py", "--mode", "decode", "--seq", *seqs, "--kv-heads", str(kv), "--batch", str(b)]
    torch_peers.main()
    sys.stdout.flush()
