//! The `s2attn-bench` binary end to end: `--preset quick` on the default adapter writes JSON lines in which
//! every row has a time, a density and an oracle error under tolerance, in each mode (the forward,
//! forward+backward, decode); bad arguments give a clear message and a non-zero exit; what a backend cannot
//! run is a note and the grid goes on.

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
        assert_eq!(r["mode"], "fwd", "{r}");
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
    for f in [
        "--preset",
        "--seq",
        "--backend",
        "--json",
        "--peers",
        "--plot",
        "--markdown",
        "--dense-max-seq",
        "--rotate-mib",
        "--budget-s",
        "--from",
        "fwd+bwd",
        "decode",
    ] {
        assert!(help.contains(f), "{f} missing from --help");
    }
}

/// Runs the bench with `args` plus `--json FILE` on the default adapter and returns its JSON rows, or
/// `None` when the machine has no adapter. Fails the test on a non-zero exit.
fn json_rows(name: &str, args: &[&str]) -> Option<Vec<serde_json::Value>> {
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("bench_cli_{name}.jsonl"));
    let mut all = vec!["--backend", "auto", "--json", path.to_str().unwrap_or_default()];
    all.extend(args);
    let out = bench(&all);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    if stderr.contains("no device to run on") {
        eprintln!("no GPU adapter on this machine; skipping: {stderr}");
        return None;
    }
    assert!(out.status.success(), "{all:?}: exit {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}", out.status);
    let json = std::fs::read_to_string(&path).unwrap_or_default();
    let rows: Vec<serde_json::Value> = json.lines().filter_map(|l| serde_json::from_str(l).ok()).collect();
    assert_eq!(rows.len(), json.lines().count(), "every line is JSON:\n{json}");
    Some(rows)
}

/// A measured row of `mode`: a time, a density in (0, 1] (1 for dense), an error under tolerance, rates,
/// and the input sets it rotated through.
fn check_row(r: &serde_json::Value, mode: &str) {
    let num = |f: &str| r.get(f).and_then(|v| v.as_f64()).unwrap_or_else(|| panic!("row without {f}: {r}"));
    assert_eq!(r["mode"], mode, "{r}");
    assert!(num("ms") > 0.0 && num("min_ms") <= num("ms") && num("ms") <= num("max_ms"), "{r}");
    let d = num("density");
    let dense = r["impl"].as_str().unwrap_or_default().starts_with("s2attn-dense/");
    assert!(d > 0.0 && d <= 1.0 && (d == 1.0) == dense, "{r}");
    let tol = if r["dtype"] == "fp32" { 1e-4 } else { 2e-3 };
    assert!(num("max_rel_err") < tol, "{r}");
    assert!(num("tflops") > 0.0 && num("gbps") > 0.0 && num("input_sets") >= 1.0, "{r}");
}

#[test]
fn fwd_bwd_rows_have_time_density_and_small_gradient_error() {
    let Some(rows) = json_rows("fwd_bwd", &["--preset", "quick", "--mode", "fwd+bwd", "--seq", "256"]) else {
        return;
    };
    // seq 256, fp32 and fp16, sparse and dense.
    assert_eq!(rows.len(), 4, "{rows:?}");
    for r in &rows {
        check_row(r, "fwd+bwd");
        if r["timer"] == "gpu" {
            // The forward pass and the backward passes on their own.
            assert!(
                r["fwd_ms"].as_f64().is_some_and(|x| x > 0.0) && r["bwd_ms"].as_f64().is_some_and(|x| x > 0.0),
                "{r}"
            );
        }
    }
    // The saved rows report again without a device (`--from`), e.g. to merge runs split over several calls.
    let saved = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench_cli_fwd_bwd.jsonl");
    let out = bench(&["--from", saved.to_str().unwrap_or_default(), "--markdown"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("mode fwd+bwd") && stdout.matches("| s2attn").count() == 4, "{stdout}");
}

#[test]
fn decode_rows_have_time_density_error_and_cache_bytes() {
    let Some(rows) = json_rows("decode", &["--preset", "quick", "--mode", "decode", "--batch", "1,3"]) else {
        return;
    };
    // seq 256 and 512, batch 1 and 3, fp32 and fp16, sparse and dense.
    assert_eq!(rows.len(), 16, "{rows:?}");
    for r in &rows {
        check_row(r, "decode");
        let kv = |f: &str| r.get(f).and_then(|v| v.as_u64()).unwrap_or_else(|| panic!("row without {f}: {r}"));
        let dense = r["impl"].as_str().unwrap_or_default().starts_with("s2attn-dense/");
        // The S2 cache evicts the blocks no future query reads; a dense one keeps the whole history.
        assert!(kv("kv_bytes") <= kv("kv_dense_bytes") && (kv("kv_bytes") == kv("kv_dense_bytes")) == dense, "{r}");
    }
}

#[test]
fn what_a_backend_cannot_run_is_a_note_and_the_grid_goes_on() {
    // The WGSL kernels have no bf16: those rows are notes, the fp32 ones are measured, the exit is 0.
    let args = ["--preset", "quick", "--mode", "fwd+bwd,decode", "--seq", "256", "--dtype", "bf16,f32", "--no-dense"];
    let Some(rows) = json_rows("unsupported", &args) else { return };
    assert_eq!(rows.len(), 4, "{rows:?}");
    for r in &rows {
        if r["dtype"] == "bf16" {
            let e = r["error"].as_str().unwrap_or_default();
            assert!(e.starts_with("unsupported: ") && r.get("ms").is_none(), "{r}");
        } else {
            check_row(r, r["mode"].as_str().unwrap_or_default());
        }
    }
    let out = bench(&["--backend", "auto", "--preset", "quick", "--seq", "256", "--dtype", "bf16", "--mode", "decode"]);
    let stderr = text(&out.stderr);
    if !stderr.contains("no device to run on") {
        assert!(stderr.contains("note: s2attn/") && stderr.contains("unsupported: "), "{stderr}");
        assert!(stderr.contains("nothing was measured") && !stderr.contains("panicked"), "{stderr}");
        assert_eq!(out.status.code(), Some(1), "{stderr}");
    }
}

#[test]
fn report_makes_one_markdown_table_per_device_and_mode_without_a_device() {
    // Saved rows of ours and of a peer on one GPU, in two modes: two tables, the peer's ratio in the forward one.
    let ours = r#"{"impl":"s2attn/vulkan/coop","mode":"MODE","batch":1,"seq":131072,"heads":32,"kv_heads":32,"head_dim":128,"block":64,"local":16,"vert_stride":64,"offset":0,"dtype":"fp16","causal":true,"ms":23.74,"min_ms":23.64,"max_ms":23.89,"density":0.0309,"device":"NVIDIA H200","max_rel_err":0.00026,"adapter":"NVIDIA H200","backend":"vulkan","timer":"gpu","iters":10}"#;
    let peer = r#"{"impl": "flex-s2", "ms": 20.1581, "mode": "fwd", "batch": 1, "seq": 131072, "heads": 32, "kv_heads": 32, "head_dim": 128, "block": 64, "local": 16, "vert_stride": 64, "offset": 0, "dtype": "fp16", "causal": true, "density": 0.03095, "device": "NVIDIA H200"}"#;
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("bench_cli_report.jsonl");
    let text_in = format!("{}\n{}\n{peer}\n", ours.replace("MODE", "fwd"), ours.replace("MODE", "fwd+bwd"));
    std::fs::write(&path, text_in).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let out = bench(&["report", path.to_str().unwrap_or_default()]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains("### NVIDIA H200: forward\n") && stdout.contains("### NVIDIA H200: forward + backward\n"));
    assert_eq!(stdout.matches("| s2attn/vulkan/coop |").count(), 2, "{stdout}");
    // 20.1581 / 23.74 = 0.849, in the forward table only.
    assert!(stdout.contains("flex-s2/ours") && stdout.contains("| 0.849 |"), "{stdout}");
    // No file: the usage and exit status 2.
    let out = bench(&["report"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stdout).contains("USAGE: s2attn-bench report"));
}
