//! Command line of `s2attn-bench`: hand-written argument parsing, the `paper`, `decode` and `quick`
//! presets, and the grid of problems (the cartesian product of every list flag) the runner walks.

use std::fmt;
use std::path::PathBuf;

/// What the benchmark measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// One forward pass over the whole sequence.
    Fwd,
    /// The forward, then the backward (dQ, dK, dV) on its O and LSE with a random dO.
    FwdBwd,
    /// One query token per sequence (`batch` sequences) against a KV history of `seq` tokens.
    Decode,
}

impl Mode {
    /// The name used in JSON rows (the peer script's spelling).
    pub fn name(self) -> &'static str {
        match self {
            Mode::Fwd => "fwd",
            Mode::FwdBwd => "fwd+bwd",
            Mode::Decode => "decode",
        }
    }
    fn parse(s: &str) -> Option<Self> {
        match s {
            "fwd" | "forward" => Some(Mode::Fwd),
            "fwd+bwd" | "fwdbwd" | "bwd" | "backward" => Some(Mode::FwdBwd),
            "decode" => Some(Mode::Decode),
            _ => None,
        }
    }
}

/// Storage type of Q, K, V and O.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Precision {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16 (CUDA backend only).
    Bf16,
}

impl Precision {
    /// The name used in JSON rows: the peer script's spelling (`fp32`, `fp16`, `bf16`).
    pub fn name(self) -> &'static str {
        match self {
            Precision::F32 => "fp32",
            Precision::F16 => "fp16",
            Precision::Bf16 => "bf16",
        }
    }
    /// The library's type.
    pub fn dtype(self) -> s2attn::DType {
        match self {
            Precision::F32 => s2attn::DType::F32,
            Precision::F16 => s2attn::DType::F16,
            Precision::Bf16 => s2attn::DType::BF16,
        }
    }
    /// Accepts both spellings (`f16` and `fp16`, `float16`, `half`).
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "fp32" | "float32" | "float" => Some(Precision::F32),
            "f16" | "fp16" | "float16" | "half" => Some(Precision::F16),
            "bf16" | "bfloat16" => Some(Precision::Bf16),
            _ => None,
        }
    }
}

/// The lists whose cartesian product is the grid.
#[derive(Clone, Debug, PartialEq)]
pub struct Grid {
    /// Sequence lengths (tokens).
    pub seq: Vec<u32>,
    /// Query heads.
    pub heads: Vec<u32>,
    /// KV heads; 0 means "as many as query heads".
    pub kv_heads: Vec<u32>,
    /// Features per head.
    pub head_dim: Vec<u32>,
    /// Tokens per block.
    pub block: Vec<u32>,
    /// Local window in blocks.
    pub local: Vec<u32>,
    /// Vertical stride in blocks.
    pub vert_stride: Vec<u32>,
    /// Storage types.
    pub dtype: Vec<Precision>,
    /// Sequences per call.
    pub batch: Vec<u32>,
    /// Causal or bidirectional.
    pub causal: Vec<bool>,
}

/// One point of the grid: everything that defines a measurement except the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Problem {
    /// Mode.
    pub mode: Mode,
    /// Sequences per call.
    pub batch: u32,
    /// Tokens per sequence.
    pub seq: u32,
    /// Query heads.
    pub heads: u32,
    /// KV heads.
    pub kv_heads: u32,
    /// Features per head.
    pub head_dim: u32,
    /// Tokens per block.
    pub block: u32,
    /// Local window in blocks.
    pub local: u32,
    /// Vertical stride in blocks.
    pub vert_stride: u32,
    /// Storage type.
    pub dtype: Precision,
    /// Causal or bidirectional.
    pub causal: bool,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} b{} seq {} heads {}/{} d{} block {} local {} vs {} {}{}",
            self.mode.name(),
            self.batch,
            self.seq,
            self.heads,
            self.kv_heads,
            self.head_dim,
            self.block,
            self.local,
            self.vert_stride,
            self.dtype.name(),
            if self.causal { "" } else { " bidirectional" }
        )
    }
}

impl Grid {
    /// The `paper` preset: the paper's settings (32 heads, head dim 128, block 64, local 16, vert_stride 16
    /// and 64, sequence 4k to 128k, fp16, causal).
    pub fn paper() -> Self {
        Self {
            seq: vec![4096, 8192, 16384, 32768, 65536, 131072],
            heads: vec![32],
            kv_heads: vec![0],
            head_dim: vec![128],
            block: vec![64],
            local: vec![16],
            vert_stride: vec![16, 64],
            dtype: vec![Precision::F16],
            batch: vec![1],
            causal: vec![true],
        }
    }

    /// The `decode` preset: the paper-like decode setting (32 query heads, 8 KV heads, head dim
    /// 128, block 64, local 16, vert_stride 16, fp16) at KV histories of 32k and 128k tokens, batch 1 and
    /// 16.
    pub fn decode() -> Self {
        Self {
            seq: vec![32768, 131072],
            heads: vec![32],
            kv_heads: vec![8],
            head_dim: vec![128],
            block: vec![64],
            local: vec![16],
            vert_stride: vec![16],
            dtype: vec![Precision::F16],
            batch: vec![1, 16],
            causal: vec![true],
        }
    }

    /// The `quick` preset: a few seconds on lavapipe, exercising GQA, MergeQ and both WGSL dtypes.
    pub fn quick() -> Self {
        Self {
            seq: vec![256, 512],
            heads: vec![4],
            kv_heads: vec![2],
            head_dim: vec![64],
            block: vec![32],
            local: vec![2],
            vert_stride: vec![4],
            dtype: vec![Precision::F32, Precision::F16],
            batch: vec![1],
            causal: vec![true],
        }
    }

    /// Every point of the grid for `modes`, grouped so that points sharing Q/K/V sizes are adjacent (the
    /// runner reuses their inputs).
    pub fn problems(&self, modes: &[Mode]) -> Vec<Problem> {
        let mut out = Vec::new();
        for &mode in modes {
            for &batch in &self.batch {
                for &heads in &self.heads {
                    for &kv in &self.kv_heads {
                        for &head_dim in &self.head_dim {
                            for &dtype in &self.dtype {
                                for &seq in &self.seq {
                                    for &causal in &self.causal {
                                        for &block in &self.block {
                                            for &local in &self.local {
                                                for &vert_stride in &self.vert_stride {
                                                    let kv_heads = if kv == 0 { heads } else { kv };
                                                    out.push(Problem {
                                                        mode,
                                                        batch,
                                                        seq,
                                                        heads,
                                                        kv_heads,
                                                        head_dim,
                                                        block,
                                                        local,
                                                        vert_stride,
                                                        dtype,
                                                        causal,
                                                    });
                                                }
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        out
    }
}

/// Everything the command line says.
#[derive(Clone, Debug, PartialEq)]
pub struct Args {
    /// The grid.
    pub grid: Grid,
    /// Modes to run.
    pub modes: Vec<Mode>,
    /// Backends named with `--backend` (`vulkan`, `gl`, `metal`, `dx12`, `wgpu`, `cuda`, `auto`); `None`:
    /// every one the machine has.
    pub backends: Option<Vec<String>>,
    /// Adapter name substring (`--adapter`).
    pub adapter: Option<String>,
    /// Untimed passes before timing.
    pub warmup: u32,
    /// Milliseconds the warm-ups must keep the GPU busy at least (`--warmup-ms`), so that its clocks have
    /// ramped up from idle before the timed passes.
    pub warmup_ms: u32,
    /// Timed passes (the median is reported).
    pub iters: u32,
    /// Sequence length of the oracle check (`--check-seq`; 0 = no check).
    pub check_seq: u32,
    /// Whether to time the dense causal attention of the same shape.
    pub dense: bool,
    /// Input sets rotate while one call touches fewer bytes than this (`--rotate-mib`; 0 = never).
    pub rotate_bytes: u64,
    /// Seconds the passes of one measurement may take (`--budget-s`): fewer warm-ups and timed passes
    /// when they are slow (wgpu forward and forward+backward). `None`: always `warmup` and `iters`.
    pub budget_s: Option<f64>,
    /// Longest sequence at which dense is timed (`--dense-max-seq`).
    pub dense_max_seq: Option<u32>,
    /// JSON lines output file.
    pub json: Option<PathBuf>,
    /// Peer JSON lines files to merge.
    pub peers: Vec<PathBuf>,
    /// JSON lines of earlier runs (`--from`) to report instead of measuring.
    pub from: Vec<PathBuf>,
    /// SVG plot output file.
    pub plot: Option<PathBuf>,
    /// Print a markdown table.
    pub markdown: bool,
    /// List the devices and exit.
    pub list: bool,
    /// Print each plan and device description.
    pub verbose: bool,
    /// Print the help and exit.
    pub help: bool,
}

impl Default for Args {
    fn default() -> Self {
        Self {
            grid: Grid::quick(),
            modes: vec![Mode::Fwd],
            backends: None,
            adapter: None,
            warmup: 1,
            warmup_ms: DEFAULT_WARMUP_MS,
            iters: 3,
            check_seq: 512,
            dense: true,
            rotate_bytes: DEFAULT_ROTATE_MIB << 20,
            budget_s: None,
            dense_max_seq: None,
            json: None,
            peers: Vec::new(),
            from: Vec::new(),
            plot: None,
            markdown: false,
            list: false,
            verbose: false,
            help: false,
        }
    }
}

/// Default `--rotate-mib`: about twice a large GPU's L2 (the H100 has 50 MB, the MI300X 256 MB of
/// Infinity Cache is the exception), so that rotated inputs do not stay resident between passes.
pub const DEFAULT_ROTATE_MIB: u64 = 128;
/// Default `--warmup-ms`.
pub const DEFAULT_WARMUP_MS: u32 = 200;

/// The `--help` text.
pub const HELP: &str = "\
s2attn-bench: times S2 (block-sparse) attention and dense attention of the same shape on every adapter and
backend of this machine, checks each configuration against the f64 oracle, and compares with peers.

USAGE: s2attn-bench [--preset quick|paper|decode] [GRID FLAGS] [OPTIONS]
       s2attn-bench report FILE...   (markdown tables of saved JSON lines; `s2attn-bench report --help`)

GRID FLAGS (comma-separated lists; the grid is their cartesian product; `4k` = 4096):
  --seq 4096,16384     sequence lengths (decode:   --heads 32          query heads
                       KV history per sequence)
  --kv-heads 8         KV heads (default = heads)  --head-dim 128      features per head
  --block 64           tokens per block            --local 16          local window, blocks
  --vert-stride 16,64  stripe stride, blocks       --dtype f16,f32     storage type (bf16: CUDA only)
  --batch 1            sequences per call          --causal true,false (false: bidirectional, a
                                                                       window of `local` blocks each side)
  --mode fwd           fwd: one forward over the whole sequence;
                       fwd+bwd: the forward plus the backward (dQ, dK, dV with a random dO); the time is
                         the sum of the forward pass and the backward passes, FLOPs 3.5x the forward's;
                       decode: one query token per sequence against a KV cache of `seq` tokens of history
                         (the peer script's --mode decode); the time is the decode kernels alone
OPTIONS:
  --preset NAME        quick: seconds on lavapipe (default); paper: 32 heads, head dim 128, block 64,
                       local 16, vert_stride 16 and 64, seq 4k..128k, fp16; decode: mode decode, 32 heads,
                       8 KV heads, head dim 128, block 64, local 16, vert_stride 16, seq 32k and 128k,
                       batch 1 and 16, fp16. Other flags override it.
  --backend LIST       vulkan,gl,metal,dx12 (wgpu APIs), wgpu (all of them), cuda, auto (the device
                       S2ATTN_BACKEND/S2ATTN_ADAPTER pick); default: every adapter and backend
                       (software adapters such as lavapipe only when there is no GPU)
  --adapter SUBSTR     only devices whose name contains SUBSTR (case-insensitive)
  --iters N            timed passes, median reported (quick 3, paper and decode 10)
  --warmup N           untimed passes first (quick 1, paper and decode 3)
  --warmup-ms N        then more untimed passes until the warm-ups took N ms (default 200; 0 = none):
                       GPU clocks ramp up from idle over ~0.1 s and more (wgpu forward and fwd+bwd)
  --rotate-mib N       when one call touches fewer than N MiB (default 128, about 2x a large L2), upload
                       several fresh input sets and rotate through them, pass by pass (0 = never)
  --budget-s S         let the passes of one measurement take about S seconds: warm-ups stop after S/4,
                       timed passes are cut to fit the rest (at least one; the row's `iters` says how
                       many ran). For slow points (a long fwd+bwd); default: no budget
  --check-seq N        sequence length of the oracle check (default 512, 0 = none)
  --no-dense           do not time dense attention   --dense-max-seq N   time dense only up to N tokens
  --json FILE          write JSON lines (peer rows first, then ours as they are measured)
  --peers FILE         merge peer JSON lines (torch_peers.py output; repeatable) and print ratios
  --from FILE          measure nothing: report the rows of earlier --json files (ours and peers, repeatable),
                       e.g. to merge runs made separately
  --plot FILE.svg      time (log) against sequence length, one line per implementation
  --markdown           print a markdown table for BENCHMARKS.md
  --list               list the devices and exit          -v, --verbose   print plans and devices
  -h, --help           this text
";

pub const REPORT_HELP: &str = "\
s2attn-bench report: turns JSON lines saved by `--json` (ours) and by torch_peers.py (the peers) into markdown
tables, one per device and mode (forward, forward + backward, decode); measures nothing.

USAGE: s2attn-bench report [--from] FILE...

Each table has our rows and the peers' rows of the same device; `<peer>/ours` is the peer's time over ours at the
same configuration (> 1: we are faster); TFLOP/s count active blocks only; `×dense` is our dense row's time over
the sparse row's on the same backend. Fields shared by every row are said once above the table.
";

/// A bad command line, with the message to show.
#[derive(Clone, Debug, PartialEq)]
pub struct ArgError(pub String);

impl fmt::Display for ArgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

fn err<T>(msg: impl Into<String>) -> Result<T, ArgError> {
    Err(ArgError(msg.into()))
}

/// A count: `4096`, `4k` (= 4096) or `1m` (= 1048576).
pub fn parse_count(flag: &str, s: &str) -> Result<u32, ArgError> {
    let t = s.trim().to_ascii_lowercase();
    let (digits, mult) = match t.strip_suffix('k') {
        Some(d) => (d, 1024u64),
        None => match t.strip_suffix('m') {
            Some(d) => (d, 1024 * 1024),
            None => (t.as_str(), 1),
        },
    };
    match digits.parse::<u64>() {
        Ok(n) if n * mult <= u32::MAX as u64 => Ok((n * mult) as u32),
        _ => err(format!("{flag}: `{s}` is not a count (use e.g. 4096 or 4k)")),
    }
}

fn parse_list<T>(flag: &str, s: &str, one: impl Fn(&str) -> Result<T, ArgError>) -> Result<Vec<T>, ArgError> {
    let items: Vec<&str> = s.split(',').map(str::trim).filter(|x| !x.is_empty()).collect();
    if items.is_empty() {
        return err(format!("{flag} needs at least one value"));
    }
    items.into_iter().map(one).collect()
}

fn counts(flag: &str, s: &str, min: u32) -> Result<Vec<u32>, ArgError> {
    parse_list(flag, s, |x| {
        let n = parse_count(flag, x)?;
        if n < min {
            return err(format!("{flag}: {n} is below the minimum {min}"));
        }
        Ok(n)
    })
}

fn single(flag: &str, s: &str, min: u32) -> Result<u32, ArgError> {
    match counts(flag, s, min)?.as_slice() {
        [n] => Ok(*n),
        _ => err(format!("{flag} takes one value, got `{s}`")),
    }
}

fn parse_bool(flag: &str, s: &str) -> Result<bool, ArgError> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "yes" | "1" | "causal" => Ok(true),
        "false" | "no" | "0" | "bidirectional" => Ok(false),
        _ => err(format!("{flag}: `{s}` is not true or false")),
    }
}

/// Flags that take a value.
const VALUE_FLAGS: &[&str] = &[
    "--preset",
    "--seq",
    "--heads",
    "--kv-heads",
    "--head-dim",
    "--block",
    "--local",
    "--vert-stride",
    "--batch",
    "--dtype",
    "--causal",
    "--mode",
    "--backend",
    "--adapter",
    "--iters",
    "--warmup",
    "--warmup-ms",
    "--check-seq",
    "--dense-max-seq",
    "--rotate-mib",
    "--budget-s",
    "--json",
    "--peers",
    "--from",
    "--plot",
];
/// Flags that take none.
const SWITCHES: &[&str] = &["--markdown", "--list", "--no-dense", "-v", "--verbose", "-h", "--help"];

const BACKENDS: &[&str] = &["vulkan", "gl", "metal", "dx12", "wgpu", "cuda", "auto"];

/// Parses the arguments after the program name.
pub fn parse_args<I: IntoIterator<Item = String>>(args: I) -> Result<Args, ArgError> {
    // Split into (flag, value) pairs first so the preset applies before the flags that override it.
    let mut pairs: Vec<(String, Option<String>)> = Vec::new();
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        if !arg.starts_with('-') {
            return err(format!("unexpected argument `{arg}` (flags start with --; see --help)"));
        }
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) => (f.to_string(), Some(v.to_string())),
            None => (arg.clone(), None),
        };
        let takes_value = if VALUE_FLAGS.contains(&flag.as_str()) {
            true
        } else if SWITCHES.contains(&flag.as_str()) {
            false
        } else {
            return err(format!("unknown argument `{flag}` (see --help)"));
        };
        let value = match (takes_value, inline) {
            (true, Some(v)) => Some(v),
            (true, None) => match it.next() {
                Some(v) => Some(v),
                None => return err(format!("{flag} needs a value (see --help)")),
            },
            (false, Some(_)) => return err(format!("{flag} takes no value")),
            (false, None) => None,
        };
        pairs.push((flag, value));
    }

    let mut a = Args::default();
    let pairs_have_kv_heads = pairs.iter().any(|(f, _)| f == "--kv-heads");
    for (flag, value) in &pairs {
        if flag == "--preset" {
            let v = value.as_deref().unwrap_or_default();
            match v {
                "quick" => {
                    a.grid = Grid::quick();
                    a.iters = 3;
                    a.warmup = 1;
                }
                "paper" => {
                    a.grid = Grid::paper();
                    a.iters = 10;
                    a.warmup = 3;
                }
                "decode" => {
                    a.grid = Grid::decode();
                    a.modes = vec![Mode::Decode];
                    a.iters = 10;
                    a.warmup = 3;
                }
                other => return err(format!("--preset: unknown preset `{other}` (use quick, paper or decode)")),
            }
        }
    }
    for (flag, value) in pairs {
        let v = value.unwrap_or_default();
        let f = flag.as_str();
        match f {
            "--preset" => {}
            "--seq" => a.grid.seq = counts(f, &v, 1)?,
            "--heads" => {
                a.grid.heads = counts(f, &v, 1)?;
                // `--kv-heads` defaults to the heads given here, not to the preset's KV count (quick's 2
                // KV heads must not turn an explicit `--heads 32` into 16-way GQA).
                if !pairs_have_kv_heads {
                    a.grid.kv_heads = vec![0];
                }
            }
            "--kv-heads" => a.grid.kv_heads = counts(f, &v, 1)?,
            "--head-dim" => a.grid.head_dim = counts(f, &v, 1)?,
            "--block" => a.grid.block = counts(f, &v, 1)?,
            "--local" => a.grid.local = counts(f, &v, 1)?,
            "--vert-stride" => a.grid.vert_stride = counts(f, &v, 1)?,
            "--batch" => a.grid.batch = counts(f, &v, 1)?,
            "--dtype" => {
                a.grid.dtype = parse_list(f, &v, |x| {
                    Precision::parse(x)
                        .ok_or_else(|| ArgError(format!("--dtype: unknown type `{x}` (use f32, f16, bf16)")))
                })?
            }
            "--causal" => a.grid.causal = parse_list(f, &v, |x| parse_bool(f, x))?,
            "--mode" => {
                a.modes = parse_list(f, &v, |x| {
                    Mode::parse(x)
                        .ok_or_else(|| ArgError(format!("--mode: unknown mode `{x}` (use fwd, fwd+bwd, decode)")))
                })?
            }
            "--backend" => {
                let list = parse_list(f, &v, |x| {
                    let x = x.to_ascii_lowercase();
                    let x = match x.as_str() {
                        "vk" => "vulkan".to_string(),
                        "gles" | "opengl" => "gl".to_string(),
                        "d3d12" => "dx12".to_string(),
                        _ => x,
                    };
                    if BACKENDS.contains(&x.as_str()) {
                        Ok(x)
                    } else {
                        err(format!("--backend: unknown backend `{x}` (use {})", BACKENDS.join(", ")))
                    }
                })?;
                a.backends = Some(list);
            }
            "--adapter" => a.adapter = Some(v),
            "--iters" => a.iters = single(f, &v, 1)?,
            "--warmup" => a.warmup = single(f, &v, 0)?,
            "--warmup-ms" => a.warmup_ms = single(f, &v, 0)?,
            "--check-seq" => a.check_seq = single(f, &v, 0)?,
            "--dense-max-seq" => a.dense_max_seq = Some(single(f, &v, 1)?),
            "--rotate-mib" => a.rotate_bytes = (single(f, &v, 0)? as u64) << 20,
            "--budget-s" => a.budget_s = Some(single(f, &v, 1)? as f64),
            "--no-dense" => a.dense = false,
            "--json" => a.json = Some(PathBuf::from(v)),
            "--peers" => a.peers.push(PathBuf::from(v)),
            "--from" => a.from.push(PathBuf::from(v)),
            "--plot" => a.plot = Some(PathBuf::from(v)),
            "--markdown" => a.markdown = true,
            "--list" => a.list = true,
            "-v" | "--verbose" => a.verbose = true,
            "-h" | "--help" => a.help = true,
            other => return err(format!("unknown argument `{other}` (see --help)")),
        }
    }
    Ok(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Args, ArgError> {
        parse_args(s.split_whitespace().map(String::from))
    }

    #[test]
    fn counts_accept_k_suffix_and_lists() {
        let a = parse("--seq 4k,16384,128K --heads 8").unwrap();
        assert_eq!(a.grid.seq, vec![4096, 16384, 131072]);
        assert_eq!(a.grid.heads, vec![8]);
        assert_eq!(parse_count("--seq", "1m").unwrap(), 1 << 20);
    }

    #[test]
    fn preset_applies_before_overrides_in_any_order() {
        let a = parse("--seq 4096 --preset paper").unwrap();
        assert_eq!(a.grid.seq, vec![4096]);
        assert_eq!(a.grid.vert_stride, vec![16, 64]);
        assert_eq!(a.grid.head_dim, vec![128]);
        assert_eq!(a.grid.dtype, vec![Precision::F16]);
        let q = parse("--preset=quick --dtype fp32").unwrap();
        assert_eq!(q.grid.dtype, vec![Precision::F32]);
        assert_eq!(q.iters, 3);
    }

    #[test]
    fn decode_preset_sets_the_mode_and_flags_override_it() {
        let a = parse("--preset decode").unwrap();
        assert_eq!(a.modes, vec![Mode::Decode]);
        assert_eq!((a.grid.seq.clone(), a.grid.batch.clone()), (vec![32768, 131072], vec![1, 16]));
        assert_eq!((a.grid.heads[0], a.grid.kv_heads[0], a.grid.head_dim[0]), (32, 8, 128));
        assert_eq!((a.iters, a.warmup), (10, 3));
        let p = a.grid.problems(&a.modes);
        assert_eq!(p.len(), 4);
        assert!(p.iter().all(|x| x.mode == Mode::Decode && x.kv_heads == 8 && x.dtype == Precision::F16));
        let b = parse("--mode fwd+bwd --preset decode --seq 1k").unwrap();
        assert_eq!(b.modes, vec![Mode::FwdBwd], "--mode overrides the preset's mode");
        assert_eq!(b.grid.seq, vec![1024]);
        let c = parse("--preset paper --mode fwd+bwd").unwrap();
        assert!(c.grid.problems(&c.modes).iter().all(|x| x.mode == Mode::FwdBwd));
    }

    #[test]
    fn rotate_mib_defaults_to_128_and_zero_turns_it_off() {
        assert_eq!(parse("").unwrap().rotate_bytes, 128 << 20);
        assert_eq!(parse("--rotate-mib 0").unwrap().rotate_bytes, 0);
        assert_eq!(parse("--rotate-mib 2k").unwrap().rotate_bytes, 2048 << 20);
        assert_eq!((parse("").unwrap().budget_s, parse("--budget-s 60").unwrap().budget_s), (None, Some(60.0)));
    }

    #[test]
    fn explicit_heads_do_not_inherit_a_presets_kv_heads() {
        let kv = |s: &str| parse(s).unwrap().grid.problems(&[Mode::Fwd])[0].kv_heads;
        assert_eq!(kv("--heads 32"), 32, "the default (quick) preset's 2 KV heads must not leak");
        assert_eq!(kv("--preset decode --heads 16"), 16);
        assert_eq!(kv("--heads 32 --kv-heads 8"), 8);
        assert_eq!(kv("--kv-heads 8 --heads 32"), 8, "in any order");
        assert_eq!(kv("--preset decode"), 8);
    }

    #[test]
    fn grid_is_the_cartesian_product_with_kv_default() {
        let a = parse("--preset paper --seq 4k,8k --causal true,false").unwrap();
        let p = a.grid.problems(&a.modes);
        assert_eq!(p.len(), 2 * 2 * 2);
        assert!(p.iter().all(|x| x.kv_heads == 32 && x.mode == Mode::Fwd));
        // Points sharing an input shape are adjacent.
        assert_eq!(p[0].seq, p[1].seq);
    }

    #[test]
    fn flags_parse_every_kind_of_value() {
        let a = parse(
            "--backend vk,cuda --adapter llvm --iters 5 --warmup 0 --warmup-ms 0 --check-seq 0 --dense-max-seq 32k \
             --json a.jsonl --peers p1 --peers p2 --plot x.svg --markdown --mode fwd,decode --dtype bf16 -v --no-dense",
        )
        .unwrap();
        assert_eq!(a.warmup_ms, 0);
        assert_eq!(parse("--iters 2").unwrap().warmup_ms, DEFAULT_WARMUP_MS);
        assert_eq!(a.backends, Some(vec!["vulkan".to_string(), "cuda".to_string()]));
        assert_eq!(a.adapter.as_deref(), Some("llvm"));
        assert_eq!((a.iters, a.warmup, a.check_seq, a.dense_max_seq), (5, 0, 0, Some(32768)));
        assert_eq!(a.peers.len(), 2);
        assert!(a.markdown && a.verbose && !a.dense);
        assert_eq!(a.modes, vec![Mode::Fwd, Mode::Decode]);
        assert_eq!(a.grid.dtype, vec![Precision::Bf16]);
    }

    #[test]
    fn bad_arguments_are_clear_messages() {
        let cases = [
            ("--seq abc", "--seq: `abc` is not a count"),
            ("--frobnicate 3", "unknown argument `--frobnicate`"),
            ("--frobnicate", "unknown argument `--frobnicate`"),
            ("--seq", "--seq needs a value"),
            ("--preset huge", "unknown preset `huge`"),
            ("--rotate-mib lots", "--rotate-mib: `lots` is not a count"),
            ("--budget-s 0", "--budget-s: 0 is below the minimum 1"),
            ("--dtype f8", "unknown type `f8`"),
            ("--backend opencl", "unknown backend `opencl`"),
            ("--causal maybe", "not true or false"),
            ("--iters 0", "below the minimum 1"),
            ("--markdown=yes", "takes no value"),
            ("stray", "unexpected argument `stray`"),
            ("--mode train", "unknown mode `train`"),
            ("--iters 3,5", "--iters takes one value"),
        ];
        for (line, want) in cases {
            let e = parse(line).unwrap_err();
            assert!(e.0.contains(want), "{line}: {e}");
        }
    }
}
