#!/usr/bin/env python3
"""llama.cpp's Vulkan flash attention (GGML_OP_FLASH_ATTN_EXT) as a benchmark peer: runs the `test-backend-ops`
built by llama_cpp_vulkan.sh, or reads its captured output, and prints one JSON line per case in torch_peers.py's
format (what `s2attn-bench report` reads):
  {"impl": "llama.cpp-vulkan", "mode": "fwd"|"decode", "batch": 1, "seq": KV, "heads": H, "kv_heads": HK,
   "head_dim": D, "block": B, "local": L, "vert_stride": V, "offset": O, "dtype": "fp16", "causal": true,
   "density": 1.0, "device": ..., "ms": ..., "tflops": ..., "fa_path": "coopmat2"|"coopmat1"|"scalar", ...}
Dense causal attention: the cases with `causal=1` in their params (the causal mask llama_cpp_vulkan.sh adds; the
queries are the last nb of the KV positions): nb = KV is a prefill ("fwd", seq = KV), nb = 1 a decode step against
KV tokens ("decode"). block/local/vert_stride/offset are the S2 setting the dense row stands beside (as in
torch_peers.py's dense rows); `s2attn-bench report` matches dense peers on the shape alone.
Q is f32 and O f32 (how llama.cpp calls the op), K/V f16, f32 accumulation.
Timing (test-backend-ops perf): the op repeated in one graph, wall clock around graph computes for at least a
second after a warm-up; "ms" is the mean per op (timer "wall"), "iters" the ops timed.
tflops: 2 * (hsk + hsv) * query-key pairs under the mask * heads * batch / time (4 * head_dim * pairs, as the report
counts dense causal rows).
fa_path: the shader ggml-vulkan picks, from the device line ("matrix cores: NV_coopmat2 | KHR_coopmat | none") and
this version's rule (one query row per workgroup, i.e. decode without GQA grouping, runs the scalar shader).
GGML_VK_DISABLE_COOPMAT2=1 / GGML_VK_DISABLE_COOPMAT=1 in the environment force the lower paths.

Run:   llama_cpp_json.py --bin .gpu/peers/llama-cpp/test-backend-ops --seq 4096 8192 --mode fwd decode [--log FILE]
       (one test-backend-ops process per case: FA_CAUSAL_CASES=hs:nh:nr:kv:nb test-backend-ops perf
        -o FLASH_ATTN_EXT -b Vulkan0 -p causal=1)
       --bin PATH may be staged packed as PATH.xz (llama_cpp_vulkan.sh's default): it is unpacked to PATH first
       (or to a temporary folder where PATH's is read-only). On Mesa's lavapipe, a CPU device that ggml-vulkan
       skips unless asked, set GGML_VK_VISIBLE_DEVICES=0.
Parse: llama_cpp_json.py --parse OUTPUT.txt ...  (stdout+stderr of such runs, any cases)
"""
import argparse, json, os, re, shlex, shutil, subprocess, sys, tempfile

ANSI = re.compile(r"\x1b\[[0-9;]*m")
PERF = re.compile(r"^\s*FLASH_ATTN_EXT\((?P<params>.*)\):\s+(?P<rest>.*)$")
TIMING = re.compile(r"(?P<runs>\d+) runs - +(?P<us>[0-9.]+) us/run")
DEVICE = re.compile(r"^\s*Device description: (?P<name>.+?)\s*$")
BACKEND = re.compile(r"^Backend \d+/\d+: (?P<name>\S+)")
VKDEV = re.compile(r"ggml_vulkan: \d+ = (?P<name>.+?) \((?P<driver>[^)]*)\) \|.*matrix cores: (?P<mc>\w+)")
PARAM = re.compile(r"(\w+)=(\[[^\]]*\]|[^,]*)")
DTYPES = {"f16": "fp16", "bf16": "bf16", "f32": "fp32"}


def params(text):
    return {k: v for k, v in PARAM.findall(text)}


def fa_path(matrix_cores, nb, nr):
    rows = nr if (nb <= 8 and 1 < nr <= 32) else nb  # GQA grouping of small batches (ggml_vk_flash_attn)
    if rows == 1 or not matrix_cores or matrix_cores == "none":
        return "scalar"
    return "coopmat2" if matrix_cores.startswith("NV_coopmat2") else "coopmat1"


def rows_of(output, a, version):
    """JSON-ready dicts of every FLASH_ATTN_EXT perf line in `output` (test-backend-ops console output)."""
    device, backend, mc, rows = "", "", "", []
    for line in output.splitlines():
        line = ANSI.sub("", line)
        if m := VKDEV.search(line):
            mc = m["mc"]
            device = device or m["name"]
        if m := BACKEND.match(line):
            backend = m["name"]
        if m := DEVICE.match(line):
            device = m["name"]
        m = PERF.match(line)
        if not m:
            continue
        p = params(m["params"])
        try:
            hsk, hsv, nh, kv, nb = (int(p[k]) for k in ("hsk", "hsv", "nh", "kv", "nb"))
            nr, ns = (int(x) for x in p["nr23"].strip("[]").split(","))
        except (KeyError, ValueError):
            print(f"llama_cpp_json: unparsed case: {m['params']}", file=sys.stderr)
            continue
        causal = p.get("causal") == "1"
        mode = "decode" if nb == 1 else "fwd" if nb == kv else f"q{nb}"
        r = dict(impl=a.impl, mode=mode, batch=ns, seq=kv, heads=nh * nr, kv_heads=nh, head_dim=hsk,
                 block=a.block, local=a.local, vert_stride=a.vert_stride, offset=a.offset,
                 dtype=DTYPES.get(p.get("type_K", ""), p.get("type_K", "")), causal=causal, density=1.0,
                 device=device)
        if hsv != hsk:
            r["head_dim_v"] = hsv
        if not causal:
            r["mask"] = "random" if p.get("mask") == "1" else "none"
        t = TIMING.search(m["rest"])
        if t:
            ms = float(t["us"]) / 1e3
            pairs = nb * kv - (nb * (nb - 1) // 2 if causal else 0)
            flops = 2 * (hsk + hsv) * pairs * nh * nr * ns
            r.update(ms=float(f"{ms:.6g}"), tflops=float(f"{flops / (ms * 1e-3) / 1e12:.5g}"), timer="wall",
                     iters=int(t["runs"]))
        else:
            r["error"] = m["rest"].strip() or "no timing"
        r.update(backend="vulkan", fa_path=fa_path(mc, nb, nr), matrix_cores=mc or "unknown", q_dtype="fp32",
                 llama_cpp=version, params=m["params"])
        if backend:
            r["ggml_backend"] = backend
        rows.append(r)
    return rows


def unpacked(path):
    """`path`, unpacked from `path`.xz first where only that exists."""
    if os.path.exists(path) or not os.path.exists(path + ".xz"):
        return path
    for dest in (path, os.path.join(tempfile.mkdtemp(prefix="llama-cpp-"), os.path.basename(path))):
        try:
            with open(dest + ".part", "wb") as out:
                try:
                    import lzma
                    with lzma.open(path + ".xz") as src:
                        shutil.copyfileobj(src, out)
                except ImportError:  # a Python without lzma: the xz tool
                    subprocess.run(["xz", "-dc", path + ".xz"], stdout=out, check=True)
            os.chmod(dest + ".part", 0o755)
            os.replace(dest + ".part", dest)
            print(f"llama_cpp_json: unpacked {path}.xz to {dest}", file=sys.stderr, flush=True)
            return dest
        except (OSError, subprocess.CalledProcessError) as e:
            print(f"llama_cpp_json: cannot unpack to {dest}: {e!r}", file=sys.stderr, flush=True)
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", help="test-backend-ops to run")
    ap.add_argument("--parse", nargs="+", metavar="FILE", help="captured output to read instead of running")
    ap.add_argument("--seq", type=int, nargs="+", default=[4096, 8192, 16384, 32768], help="KV lengths")
    ap.add_argument("--mode", nargs="+", choices=["fwd", "decode"], default=["fwd", "decode"])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=None)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--backend", default="Vulkan0", help="test-backend-ops -b")
    ap.add_argument("--impl", default="llama.cpp-vulkan")
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--local", type=int, default=16)
    ap.add_argument("--vert-stride", type=int, default=16)
    ap.add_argument("--offset", type=int, default=0)
    ap.add_argument("--version", default=None, help="llama.cpp version (default: first line of VERSION beside --bin)")
    ap.add_argument("--log", help="append each run's command line and output here")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per case")
    a = ap.parse_args()
    if bool(a.bin) == bool(a.parse):
        ap.error("give --bin or --parse")
    version = a.version
    if version is None:
        vf = os.path.join(os.path.dirname(a.bin or a.parse[0]), "VERSION")
        version = open(vf).readline().strip() if os.path.exists(vf) else "unknown"
    if a.parse:
        for f in a.parse:
            for r in rows_of(open(f, errors="replace").read(), a, version):
                print(json.dumps(r), flush=True)
        return 0
    a.bin = unpacked(a.bin)
    hk = a.kv_heads or a.heads
    if a.heads % hk:
        ap.error("--heads must be a multiple of --kv-heads")
    bad, device = 0, ""
    for mode in a.mode:
        for kv in a.seq:
            nb = 1 if mode == "decode" else kv
            case = f"{a.head_dim}:{hk}:{a.heads // hk}:{kv}:{nb}"
            cmd = [a.bin, "perf", "-o", "FLASH_ATTN_EXT", "-b", a.backend, "-p", "causal=1"]
            line = f"FA_CAUSAL_CASES={case} " + " ".join(shlex.quote(c) for c in cmd)
            print(f"llama_cpp_json: {line}", file=sys.stderr, flush=True)
            env = dict(os.environ, FA_CAUSAL_CASES=case)
            try:
                p = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   timeout=a.timeout, errors="replace")
                out, rc = p.stdout, p.returncode
            except subprocess.TimeoutExpired as e:
                out = (e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else e.stdout or "")
                rc = f"timeout after {a.timeout} s"
            except OSError as e:
                out, rc = "", repr(e)
            if a.log:
                with open(a.log, "a") as f:
                    f.write(f"$ {line}\n{out}\n[rc={rc}]\n")
            rows = [r for r in rows_of(out, a, version) if r["seq"] == kv and r["mode"] == mode]
            device = next((r["device"] for r in rows if r["device"]), device)
            if not rows:
                tail = [l for l in ANSI.sub("", out).splitlines() if l.strip()][-3:]
                rows = [dict(impl=a.impl, mode=mode, batch=1, seq=kv, heads=a.heads, kv_heads=hk,
                             head_dim=a.head_dim, block=a.block, local=a.local, vert_stride=a.vert_stride,
                             offset=a.offset, dtype="fp16", causal=True, density=1.0, device=device,
                             error=f"rc={rc}: " + " | ".join(tail)[-300:], llama_cpp=version)]
            for r in rows:
                bad += "error" in r
                print(json.dumps(r), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
