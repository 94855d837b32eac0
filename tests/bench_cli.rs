//! The `s2attn-bench` binary end to end: `--preset quick` on the default adapter writes JSON lines in which
//! every row has a time, a density and an oracle error under tolerance; bad arguments give a clear message
//! and a non-zero exit; modes that do not exist yet say so.

use std::process::{Command, Output};

fn bench(args: &[&str]) -> Output {
    match Command::new(env!("CARGO_BIN_EXE_s2attn-bench")).args(args).env("XDG_RUNTIME_DIR", "/tmp").output() {
        Ok(o) => o,
        Err(e) => panic!("running s2attn-bench: {e}"),
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[test]
fn quick_preset_rows_have_time_density_and_small_error() {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench_cli_quick.jsonl");
    let svg = path.with_extension("svg");
    let out = bench(&[
        "--preset",
        "quick",
        "--backend",
        "auto",
        "--json",
        path.to_str().unwrap_or_default(),
        "--plot",
        svg.to_str().unwrap_or_default(),
        "--markdown",
    ]);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    if stderr.contains("no device to run on") {
        eprintln!("no GPU adapter on this machine; skipping: {stderr}");
        return;
    }
    assert!(out.status.success(), "exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    let json = std::fs::read_to_string(&path).unwrap_or_default();
    let rows: Vec<serde_json::Value> = json.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert_eq!(rows.len(), json.lines().count(), "every line is JSON:\n{json}");
    // quick: seq 256 and 512, fp32 and fp16, sparse and dense rows.
    assert_eq!(rows.len(), 8, "{json}");
    for r in &rows {
        let num = |f: &str| r.get(f).and_then(|v| v.as_f64()).unwrap_or_else(|| panic!("row without {f}: {r}"));
        assert!(num("ms") > 0.0 && num("min_ms") <= num("ms") && num("ms") <= num("max_ms"), "{r}");
        let d = num("density");
        assert!(d > 0.0 && d <= 1.0, "{r}");
        let tol = if r["dtype"] == "fp32" { 1e-4 } else { 2e-3 };
        assert!(num("max_rel_err") < tol, "{r}");
        assert!(num("tflops") > 0.0 && num("gbps") > 0.0, "{r}");
        let imp = r["impl"].as_str().unwrap_or_default();
        assert!(imp.starts_with("s2attn/") || imp.starts_with("s2attn-dense/"), "{r}");
        if imp.starts_with("s2attn-dense/") {
            assert!((d - 1.0).abs() < 1e-12, "{r}");
        } else {
            assert!(d < 1.0, "{r}");
        }
        for f in ["mode", "batch", "seq", "heads", "kv_heads", "head_dim", "block", "local", "vert_stride"] {
            assert!(r.get(f).is_some(), "row without {f}: {r}");
        }
        for f in ["causal", "device", "adapter", "backend"] {
            assert!(r.get(f).is_some(), "row without {f}: {r}");
        }
    }
    assert!(stdout.contains("×dense") && stdout.contains("| impl |"), "{stdout}");
    let plot = std::fs::read_to_string(&svg).unwrap_or_default();
    assert!(plot.starts_with("<svg") && plot.contains("<polyline"), "{plot}");
}

#[test]
fn bad_arguments_give_a_clear_message_and_nonzero_exit() {
    for (args, want) in [
        (&["--seq", "lots"][..], "--seq: `lots` is not a count"),
        (&["--bogus"][..], "unknown argument `--bogus`"),
        (&["--preset"][..], "--preset needs a value"),
        (&["--peers", "/nonexistent/peers.jsonl"][..], "--peers /nonexistent/peers.jsonl"),
    ] {
        let out = bench(args);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
    }
}

#[test]
fn help_lists_the_flags() {
    let out = bench(&["--help"]);
    assert!(out.status.success());
    let help = text(&out.stdout);
    for f in ["--preset", "--seq", "--backend", "--json", "--peers", "--plot", "--markdown", "--dense-max-seq"] {
        assert!(help.contains(f), "{f} missing from --help");
    }
}

#[test]
fn modes_not_implemented_yet_say_so_and_fail_when_nothing_runs() {
    let out = bench(&["--mode", "decode", "--backend", "auto"]);
    let stderr = text(&out.stderr);
    assert!(stderr.contains("mode decode: not implemented yet"), "{stderr}");
    assert_eq!(out.status.code(), Some(1), "{stderr}");
}
