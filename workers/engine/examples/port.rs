//! The offline port as a bare binary, with the same arguments as `patchport port`, so
//! the engine can be benchmarked before or without the CLI:
//!
//! ```text
//! cargo run --release -p patchport-engine --example port -- port \
//!     --old-base DIR --new-base DIR --patch DIR --out DIR [--merged] [--device cpu|cuda:N]
//! ```
//!
//! Prints the port report as JSON.

use std::path::PathBuf;
use std::process::ExitCode;

use patchport_engine::{PortOptions, port_dirs};

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1).peekable();
    if args.peek().map(String::as_str) == Some("port") {
        args.next();
    }
    let (mut old, mut new, mut patch, mut out) = (None, None, None, None);
    let mut opts = PortOptions::default();
    while let Some(a) = args.next() {
        let mut value = || args.next().map(PathBuf::from);
        match a.as_str() {
            "--old-base" => old = value(),
            "--new-base" => new = value(),
            "--patch" => patch = value(),
            "--out" => out = value(),
            "--merged" => opts.merged = true,
            "--json" => {}
            "--device" => match value().map(|v| v.to_string_lossy().parse()) {
                Some(Ok(d)) => opts.device = d,
                _ => {
                    eprintln!("--device: expected cpu or cuda:N");
                    return ExitCode::from(2);
                }
            },
            other => {
                eprintln!("unknown argument {other:?}");
                return ExitCode::from(2);
            }
        }
    }
    let (Some(old), Some(new), Some(patch), Some(out)) = (old, new, patch, out) else {
        eprintln!("usage: port --old-base DIR --new-base DIR --patch DIR --out DIR [--merged]");
        return ExitCode::from(2);
    };
    match port_dirs(&old, &new, &patch, &out, &opts) {
        Ok(report) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).unwrap_or_default()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(&format!(": {s}"));
                src = s.source();
            }
            eprintln!("error: {msg}");
            ExitCode::FAILURE
        }
    }
}
