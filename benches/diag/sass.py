#!/usr/bin/env python3
"""benches/diag/sass.py DIR...: the NVIDIA machine code in driver blobs (the pipeline-cache data that
`vk_pipeline_stats --dump DIR` writes, or the driver's GLCache files), disassembled.

NVIDIA's pipeline-cache blob holds a zstd frame (magic 28 b5 2f fd); it is decompressed with the `zstd` tool.
In the result (or in the blob itself) an embedded CUDA ELF (7f 45 4c 46, e_machine 190) goes to `nvdisasm`
whole; failing that, SM90 EXIT instructions (low word 0x...794d) mark raw instruction bytes, and the first
16-byte-aligned start (same alignment as the EXITs) that `nvdisasm -b SM90` accepts, up to the last EXIT, is
taken. Writes NAME.sass next to each blob and prints a per-file instruction histogram, and for the innermost
backward branch whose body holds matrix instructions (a kernel's chunk loop) the body's size and histogram with
its register moves (MOV and IMAD.MOV) counted apart. NVDISASM (env) names the disassembler (default: nvdisasm on
PATH). `sass.py --loops FILE.sass...` does the loop part alone on disassembly already written."""
import collections, os, re, struct, subprocess, sys

NVDISASM = os.environ.get("NVDISASM", "nvdisasm")
EXIT = re.escape(b"\x4d\x79\x00\x00\x00\x00\x00\x00")
KEYS = ["HMMA", "LDSM", "LDS", "STS", "LDG", "STG", "LDL", "STL", "SHFL", "BAR", "MUFU", "F2FP", "MOV", "IMAD", "BRA"]


def run(cmd, data=None):
    r = subprocess.run(cmd, input=data, capture_output=True)
    return r.returncode, r.stdout, r.stderr


def unzstd(b):
    i = b.find(b"\x28\xb5\x2f\xfd")
    if i < 0:
        return None
    rc, out, _ = run(["zstd", "-d", "-q", "-c"], b[i:])
    return out if rc == 0 or out else None


def elf(b):
    i = b.find(b"\x7fELF")
    while i >= 0:
        try:
            if b[i + 4] == 2 and struct.unpack_from("<H", b, i + 18)[0] == 190:
                shoff, = struct.unpack_from("<Q", b, i + 40)
                shentsize, shnum = struct.unpack_from("<HH", b, i + 58)
                end = shoff + shentsize * shnum
                for k in range(shnum):
                    typ, = struct.unpack_from("<I", b, i + shoff + k * shentsize + 4)
                    off, size = struct.unpack_from("<QQ", b, i + shoff + k * shentsize + 24)
                    if typ != 8:  # not NOBITS
                        end = max(end, off + size)
                return b[i:i + end]
        except struct.error:
            pass
        i = b.find(b"\x7fELF", i + 4)
    return None


def disassemble(path, b):
    e = elf(b)
    if e is not None:
        open(path + ".cubin", "wb").write(e)
        rc, out, err = run([NVDISASM, "-c", path + ".cubin"])
        return out.decode() if rc == 0 else None
    ex = [m.start() for m in re.finditer(EXIT, b)]
    if not ex:
        return None
    for start in range(ex[0] % 16, ex[0] + 1, 16):
        open(path + ".raw", "wb").write(b[start:ex[-1] + 16])
        rc, out, _ = run([NVDISASM, "-b", "SM90", path + ".raw"])
        if rc == 0 and out:
            return out.decode()
    return None


def hist(text):
    c = collections.Counter()
    for line in text.splitlines():
        m = re.match(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", line)
        if m:
            c[m.group(1)] += 1
    return f"{sum(c.values())} instructions: " + " ".join(f"{k}={c[k]}" for k in KEYS if c[k])


INSN = re.compile(r"\s*/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def loops(text):
    """The loops holding matrix instructions: the smallest and the largest backward `BRA` range with HMMA (in
    the forward the smallest is the chunk walk; in the dQ pass it is the inner dS K loop, the largest the walk)."""
    ins = [(int(m.group(1), 16), m.group(2), m.group(3)) for m in map(INSN.match, text.splitlines()) if m]
    found = []
    for at, op, args in ins:
        t = re.search(r"0x([0-9a-f]+)\s*$", args.strip())
        if op.startswith("BRA") and t and int(t.group(1), 16) < at:
            body = [o for a, o, _ in ins if int(t.group(1), 16) <= a <= at]
            if any(o.startswith("HMMA") for o in body):
                found.append((len(body), int(t.group(1), 16), at, body))
    if not found:
        return "no loop with matrix instructions"
    out = []
    for n, start, end, body in sorted({min(found)[:3]: min(found), max(found)[:3]: max(found)}.values()):
        moves = sum(1 for o in body if o == "MOV" or o.startswith("IMAD.MOV"))
        c = collections.Counter(o.split(".")[0] for o in body)
        top = " ".join(f"{k}={v}" for k, v in c.most_common(12))
        out.append(f"loop {start:#x}..{end:#x}: {n} instructions, {moves} register moves; {top}")
    return "\n    ".join(out)


def main():
    if sys.argv[1:2] == ["--loops"]:
        for f in sys.argv[2:]:
            print(f"{f}: {loops(open(f).read())}")
        return
    files = []
    for d in sys.argv[1:]:
        for root, _, names in os.walk(d):
            files += [os.path.join(root, n) for n in names if not n.endswith((".sass", ".cubin", ".raw"))]
    for f in sorted(files):
        b = open(f, "rb").read()
        text = None
        for blob in (unzstd(b), b):
            if blob:
                text = disassemble(f, blob)
                if text:
                    break
        if text is None:
            print(f"{f} ({len(b)} B): no machine code found")
            continue
        open(f + ".sass", "w").write(text)
        print(f"{f}: {hist(text)}")
        print(f"{f}: {loops(text)}")


main()
