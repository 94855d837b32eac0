//! `s2attn-bench`: the cross-vendor benchmark tool. Runs a grid of S2-attention problems (and the dense
//! attention of the same shapes) on every adapter and backend of the machine, in three modes (the
//! forward, forward+backward, decode), checks each configuration against the f64 oracle, merges peer
//! results (`torch_peers.py` JSON lines), and prints a table, JSON lines, markdown and an SVG plot.
//! `s2attn-bench --help` lists the flags; `s2attn-bench report FILE...` turns saved JSON lines into the
//! markdown tables of BENCHMARKS.md, one per device and mode.
//!
//! Exit status: 0 when every row was measured or skipped with a note, 1 when nothing was measured or a
//! check exceeded its tolerance, 2 on a bad command line or unreadable file. Rows a backend cannot run
//! (the library's `unsupported` errors, e.g. f32 on CUDA, or a shape over an adapter's limits) are notes; the
//! grid goes on.

mod check;
mod data;
mod decode;
mod grid;
mod plot;
mod report;
mod run;
mod timer;

use std::fs;
use std::io::{BufWriter, IsTerminal, Write};

fn main() {
    let code = match bench() {
        Ok(code) => code,
        Err(msg) => {
            eprintln!("s2attn-bench: {msg}");
            2
        }
    };
    std::process::exit(code);
}

/// The rows of every file given to `flag` (`--peers`, `--from`), and their lines verbatim (for `--json`).
fn read_rows(flag: &str, paths: &[std::path::PathBuf]) -> Result<(Vec<report::Row>, Vec<String>), String> {
    let (mut rows, mut raw) = (Vec::new(), Vec::new());
    for path in paths {
        let text = fs::read_to_string(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
        rows.extend(report::parse_peers(&text, &path.display().to_string())?);
        raw.extend(text.lines().map(str::trim).filter(|l| l.starts_with('{')).map(String::from));
    }
    Ok((rows, raw))
}

/// `s2attn-bench report [--from] FILE...`: one markdown table per (device, mode) of the rows in the files (ours
/// and the peers measured on the same device), with the peers' time over ours; measures nothing.
fn report_cmd(args: &[String]) -> Result<i32, String> {
    let files: Vec<std::path::PathBuf> = args.iter().filter(|a| *a != "--from").map(Into::into).collect();
    if files.is_empty() || args.iter().any(|a| a == "-h" || a == "--help") {
        print!("{}", grid::REPORT_HELP);
        return Ok(if files.is_empty() { 2 } else { 0 });
    }
    let (rows, _) = read_rows("report", &files)?;
    let groups: std::collections::BTreeSet<(String, String)> =
        rows.iter().map(|r| (r.device.clone(), r.mode.clone())).collect();
    let mut out = String::new();
    for (device, mode) in &groups {
        let (ours, peers): (Vec<report::Row>, Vec<report::Row>) =
            rows.iter().filter(|r| &r.device == device && &r.mode == mode).cloned().partition(|r| r.is_ours());
        if ours.is_empty() {
            continue;
        }
        let label = match mode.as_str() {
            "fwd" => "forward",
            "fwd+bwd" => "forward + backward",
            "decode" => "decode",
            m => m,
        };
        let dev = if device.is_empty() { "unnamed device" } else { device };
        out.push_str(&format!(
            "### {dev}: {label}\n\n{}\n",
            report::render_markdown(&report::build_table(&ours, &peers))
        ));
    }
    if out.is_empty() {
        eprintln!("s2attn-bench report: no rows of ours in {}", files.len());
        return Ok(1);
    }
    print!("{}", out.trim_end());
    println!();
    Ok(0)
}

fn bench() -> Result<i32, String> {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    if argv.first().map(String::as_str) == Some("report") {
        return report_cmd(&argv[1..]);
    }
    let args = grid::parse_args(argv).map_err(|e| e.to_string())?;
    if args.help {
        print!("{}", grid::HELP);
        return Ok(0);
    }
    let mut notes = Vec::new();
    if args.list {
        for t in run::open_targets(&args, &mut notes) {
            println!("{:<7} {}", t.backend, t.adapter);
            if args.verbose {
                println!("{}\n", t.ctx.describe());
            }
        }
        notes.iter().for_each(|n| println!("note: {n}"));
        return Ok(0);
    }
    // Rows of earlier runs (`--from`): ours are reported as if measured now, the rest are peers.
    let (mut peers, mut peer_lines) = read_rows("--peers", &args.peers)?;
    let (saved, saved_lines) = read_rows("--from", &args.from)?;
    let (mut ours, saved_peers): (Vec<report::Row>, Vec<report::Row>) = saved.into_iter().partition(|r| r.is_ours());
    peers.extend(saved_peers);
    peer_lines.extend(saved_lines);
    let mut json = match &args.json {
        Some(path) => {
            let f = fs::File::create(path).map_err(|e| format!("--json {}: {e}", path.display()))?;
            Some((BufWriter::new(f), path.clone()))
        }
        None => None,
    };
    let mut write_line = |line: &str| -> Result<(), String> {
        if let Some((w, path)) = json.as_mut() {
            writeln!(w, "{line}").and_then(|_| w.flush()).map_err(|e| format!("--json {}: {e}", path.display()))?;
        }
        Ok(())
    };
    for line in &peer_lines {
        write_line(line)?;
    }

    let problems = if args.from.is_empty() { args.grid.problems(&args.modes) } else { Vec::new() };
    let targets = if problems.is_empty() { Vec::new() } else { run::open_targets(&args, &mut notes) };
    for n in &notes {
        eprintln!("note: {n}");
    }
    if !problems.is_empty() && targets.is_empty() {
        eprintln!("s2attn-bench: no device to run on (see the notes above; `--list` shows what this machine has)");
    }

    let tty = std::io::stderr().is_terminal();
    let total = targets.len() * problems.len();
    let mut runner = run::Runner::new(&args);
    let mut done = 0;
    for (ti, t) in targets.iter().enumerate() {
        if args.verbose {
            eprintln!("{}", t.ctx.describe());
        }
        for p in &problems {
            done += 1;
            let line = format!("[{done}/{total}] {} {}: {p}", t.backend, t.adapter);
            if tty {
                eprint!("\r\x1b[2K{line}");
            } else {
                eprintln!("{line}");
            }
            for r in runner.run(ti, t, p) {
                if let Some(e) = &r.error {
                    let kind = if e.starts_with(run::UNSUPPORTED) { "note" } else { "error" };
                    eprintln!(
                        "{}{kind}: {} on {} ({p}): {e}",
                        if tty { "\r\x1b[2K" } else { "" },
                        r.implementation,
                        t.adapter
                    );
                }
                write_line(&r.to_json())?;
                ours.push(r);
            }
        }
    }
    if tty && total > 0 {
        eprint!("\r\x1b[2K");
    }

    let mut table = report::build_table(&ours, &peers);
    if !runner.dense_skipped.is_empty() {
        let seqs: Vec<String> = runner.dense_skipped.iter().map(u32::to_string).collect();
        table.notes.push(format!(
            "dense not timed at seq {} (beyond --dense-max-seq {})",
            seqs.join(", "),
            args.dense_max_seq.unwrap_or_default()
        ));
    }
    print!("{}", report::render_text(&table));
    if args.markdown {
        println!();
        print!("{}", report::render_markdown(&table));
    }
    if let Some(path) = &args.plot {
        let all: Vec<report::Row> = ours.iter().chain(&peers).cloned().collect();
        let modes: std::collections::BTreeSet<&str> = all.iter().map(|r| r.mode.as_str()).collect();
        let title = format!("S2 attention {}: {}", modes.into_iter().collect::<Vec<_>>().join(", "), table.caption);
        fs::write(path, plot::svg(&all, &title)).map_err(|e| format!("--plot {}: {e}", path.display()))?;
    }

    let measured = ours.iter().filter(|r| r.measured()).count();
    if measured == 0 {
        eprintln!("s2attn-bench: nothing was measured");
        return Ok(1);
    }
    if !runner.over_tolerance.is_empty() {
        for m in &runner.over_tolerance {
            eprintln!("s2attn-bench: check failed: {m}");
        }
        return Ok(1);
    }
    Ok(0)
}
