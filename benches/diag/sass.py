#!/usr/bin/env python3
"""benches/diag/sass.py DIR...: finds NVIDIA machine code in driver blobs (pipeline-cache data and internal
representations written by `vk_pipeline_stats --dump`, the driver's GLCache files) and disassembles it.

Two ways in: an embedded CUDA ELF (magic 7f 45 4c 46, e_machine 190) is cut out by its header's section table
and handed to `nvdisasm`; failing that, the SM90 EXIT instruction (low word 0x...794d) marks raw instruction
bytes, and the run of 16-byte words around it goes to `nvdisasm -b SM90`. Writes NAME.sass next to each blob
and prints a one-line instruction histogram per file (HMMA, LDSM, LDS, STS, SHFL, BAR, MUFU, ...)."""
import os, re, struct, subprocess, sys, collections

NVDISASM = os.environ.get("NVDISASM", "nvdisasm")

def elfs(b):
    out, i = [], 0
    while True:
        i = b.find(b"\x7fELF", i)
        if i < 0:
            return out
        try:
            if b[i + 4] == 2 and struct.unpack_from("<H", b, i + 18)[0] == 190:
                shoff, = struct.unpack_from("<Q", b, i + 40)
                shentsize, shnum = struct.unpack_from("<HH", b, i + 58)
                end = shoff + shentsize * shnum
                # sections may lie past the section table: take the max of their ends
                for k in range(shnum):
                    off, size = struct.unpack_from("<QQ", b, i + shoff + k * shentsize + 24)
                    typ, = struct.unpack_from("<I", b, i + shoff + k * shentsize + 4)
                    if typ != 8:  # not NOBITS
                        end = max(end, off + size)
                out.append(b[i:i + end])
        except struct.error:
            pass
        i += 4

def raw_runs(b):
    """Offsets of EXIT instructions (opcode 0x94d in the low 12 bits, predicate PT: 0x794d)."""
    return [m.start() for m in re.finditer(re.escape(b"\x4d\x79\x00\x00\x00\x00\x00\x00"), b)]

def hist(text):
    c = collections.Counter()
    for line in text.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)(\.[A-Z0-9_.]+)?", line)
        if m:
            c[m.group(1)] += 1
    keys = ["HMMA", "LDSM", "LDS", "STS", "LDG", "STG", "LDL", "STL", "SHFL", "BAR", "WARPSYNC", "MUFU", "FFMA", "FMUL", "FADD", "FMNMX", "F2FP", "BRA", "EXIT"]
    total = sum(c.values())
    return f"{total} instructions: " + " ".join(f"{k}={c[k]}" for k in keys if c[k]) + \
        "  | top: " + " ".join(f"{k}={v}" for k, v in c.most_common(12))

def run(cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    return r.returncode, r.stdout + r.stderr

def main():
    files = []
    for d in sys.argv[1:]:
        for root, _, names in os.walk(d):
            files += [os.path.join(root, n) for n in names if not n.endswith((".sass", ".cubin", ".raw"))]
    for f in sorted(files):
        b = open(f, "rb").read()
        es = elfs(b)
        done = False
        for k, e in enumerate(es):
            cub = f"{f}.{k}.cubin"
            open(cub, "wb").write(e)
            rc, out = run([NVDISASM, "-c", "-hex", cub])
            if rc == 0 and out.strip():
                open(f"{f}.{k}.sass", "w").write(out)
                print(f"{f} ELF#{k} ({len(e)} B): {hist(out)}")
                done = True
            else:
                print(f"{f} ELF#{k}: nvdisasm rc={rc}: {out[:200]}")
        if done:
            continue
        ex = raw_runs(b)
        if not ex:
            print(f"{f} ({len(b)} B): no ELF, no EXIT word")
            continue
        # raw instruction words: from the first 16-byte-aligned offset (relative to the EXIT) to the last EXIT
        align = ex[0] % 16
        start, end = align, ex[-1] + 16 + 64
        raw = f"{f}.raw"
        open(raw, "wb").write(b[start:end])
        rc, out = run([NVDISASM, "-b", "SM90", "-hex", raw])
        open(f"{f}.sass", "w").write(out)
        print(f"{f} ({len(b)} B): {len(ex)} EXIT at {ex[:4]}, raw from {start}: rc={rc} {hist(out)}")

main()
