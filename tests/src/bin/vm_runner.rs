//! `vm-runner SCENARIO.json [--report FILE]`: boots a guest image with its virtio-net
//! devices on our host-backend's ports, as the scenario file says, and checks the outcome
//! (see `vnet_tests::scenario` for the format). Writes the JSON report to FILE (default:
//! stdout). Exit status: 0 every check held and the guest passed, 1 a check or the guest
//! failed (each failed check named on stderr), 2 a bad scenario or command line (one
//! line, before anything starts), 3 the run itself failed (a process did not start, an
//! image did not build).

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (file, report) = match args.as_slice() {
        [f] => (PathBuf::from(f), None),
        [f, r, out] if r == "--report" => (PathBuf::from(f), Some(PathBuf::from(out))),
        _ => {
            eprintln!("usage: vm-runner SCENARIO.json [--report FILE]");
            return ExitCode::from(2);
        }
    };
    let sc = match vnet_tests::scenario::load(&file) {
        Ok(sc) => sc,
        Err(e) => {
            eprintln!("vm-runner: {e}");
            return ExitCode::from(2);
        }
    };
    // The harness reports a process that fails with a panic carrying its diagnostics:
    // one line here, the rest after it.
    std::panic::set_hook(Box::new(|_| {}));
    let out = match std::panic::catch_unwind(|| vnet_tests::scenario::run(&sc)) {
        Ok(r) => r,
        Err(p) => {
            let msg = p
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown failure".into());
            let (first, rest) = msg.split_once('\n').unwrap_or((&msg, ""));
            eprintln!("vm-runner: {}: run failed: {first}", sc.name);
            if !rest.is_empty() {
                eprintln!("{rest}");
            }
            return ExitCode::from(3);
        }
    };
    let text = serde_json::to_string_pretty(&out).unwrap_or_default();
    match &report {
        Some(p) => {
            if let Err(e) = std::fs::write(p, format!("{text}\n")) {
                eprintln!("vm-runner: cannot write {}: {e}", p.display());
                return ExitCode::from(3);
            }
        }
        None => println!("{text}"),
    }
    for c in out["checks"].as_array().into_iter().flatten().filter(|c| c["ok"] != true) {
        eprintln!(
            "vm-runner: {}: check failed: {} (lhs {}, rhs {})",
            sc.name, c["check"], c["lhs"], c["rhs"]
        );
    }
    if out["guest"]["passed"] != true {
        eprintln!("vm-runner: {}: the guest did not pass: {}", sc.name, out["guest"]["result"]);
    }
    if out["passed"] == true {
        eprintln!(
            "vm-runner: {}: passed ({} checks, {})",
            sc.name,
            out["checks"].as_array().map_or(0, Vec::len),
            out["accel"]
        );
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
