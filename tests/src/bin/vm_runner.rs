//! `vm-runner`: boots a VM scenario (a TOML file, `vnet_tests::scenario`) against our
//! host-backend and writes a JSON report (`vnet_tests::runner`).
//!
//! ```text
//! vm-runner SCENARIO.toml [--report FILE] [--mode noiommu|viommu|kernel] [--packed]
//!           [--accel auto|kvm|tcg] [--backend PATH] [--quiet]
//! ```
//!
//! Exit status: 0 when the guest passed and every check held; 1 when not (each failure
//! named on stderr); 2 for a bad scenario or command line (one line, before anything
//! starts); 3 when the run could not happen (an image build, the backend or QEMU failed).

use std::path::PathBuf;
use std::process::ExitCode;

use vnet_tests::runner::{run, Tools};
use vnet_tests::scenario::{Accel, Mode, Scenario};

const USAGE: &str =
    "usage: vm-runner SCENARIO.toml [--report FILE] [--mode noiommu|viommu|kernel] [--packed] \
                     [--accel auto|kvm|tcg] [--backend PATH] [--quiet]";

struct Args {
    scenario: PathBuf,
    report: Option<PathBuf>,
    mode: Option<Mode>,
    packed: bool,
    accel: Option<Accel>,
    backend: Option<PathBuf>,
    quiet: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut it = std::env::args_os().skip(1);
    let mut a = Args {
        scenario: PathBuf::new(),
        report: None,
        mode: None,
        packed: false,
        accel: None,
        backend: None,
        quiet: false,
    };
    let mut scenario = None;
    while let Some(arg) = it.next() {
        let s = arg.to_string_lossy().into_owned();
        let mut value = |name: &str| it.next().ok_or_else(|| format!("{name} needs a value ({USAGE})"));
        match s.as_str() {
            "--report" => a.report = Some(PathBuf::from(value("--report")?)),
            "--backend" => a.backend = Some(PathBuf::from(value("--backend")?)),
            "--mode" => {
                let v = value("--mode")?.to_string_lossy().into_owned();
                a.mode =
                    Some(Mode::parse(&v).ok_or(format!("--mode {v}: expected noiommu, viommu or kernel"))?);
            }
            "--accel" => {
                let v = value("--accel")?.to_string_lossy().into_owned();
                a.accel = Some(match v.as_str() {
                    "auto" => Accel::Auto,
                    "kvm" => Accel::Kvm,
                    "tcg" => Accel::Tcg,
                    _ => return Err(format!("--accel {v}: expected auto, kvm or tcg")),
                });
            }
            "--packed" => a.packed = true,
            "--quiet" => a.quiet = true,
            "-h" | "--help" => return Err(USAGE.into()),
            _ if s.starts_with('-') => return Err(format!("unknown option {s} ({USAGE})")),
            _ if scenario.is_none() => scenario = Some(PathBuf::from(arg)),
            _ => return Err(format!("one scenario at a time ({USAGE})")),
        }
    }
    a.scenario = scenario.ok_or(USAGE)?;
    Ok(a)
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("vm-runner: {e}");
            return ExitCode::from(2);
        }
    };
    let mut sc = match Scenario::load(&args.scenario) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("vm-runner: {e}");
            return ExitCode::from(2);
        }
    };
    if let Some(m) = args.mode {
        if sc.no_bind && m != Mode::Kernel {
            eprintln!(
                "vm-runner: --mode {}: the scenario's image leaves the devices to the kernel (--no-bind)",
                m.name()
            );
            return ExitCode::from(2);
        }
        sc.mode = m;
    }
    if args.packed {
        sc.devices.iter_mut().for_each(|d| d.packed = true);
    }
    if let Some(a) = args.accel {
        sc.accel = a;
    }
    let tools = match std::env::current_exe()
        .map_err(|e| format!("cannot find this program's path: {e}"))
        .and_then(|exe| Tools::beside(&exe, args.backend.clone()))
    {
        Ok(t) => t,
        Err(e) => {
            eprintln!("vm-runner: {e}");
            return ExitCode::from(2);
        }
    };
    let report_path = args.report.unwrap_or_else(|| PathBuf::from(format!("{}-report.json", sc.name)));
    eprintln!(
        "vm-runner: {} ({} mode, {} device(s)), report: {}",
        sc.name,
        sc.mode.name(),
        sc.devices.len(),
        report_path.display()
    );
    let report = match run(&sc, &tools, !args.quiet) {
        Ok(r) => r,
        Err(e) => {
            // The first line says what failed; the details (a log) follow.
            eprintln!("vm-runner: {e}");
            return ExitCode::from(3);
        }
    };
    let text =
        serde_json::to_string_pretty(&report.to_json()).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    if let Err(e) = std::fs::write(&report_path, text + "\n") {
        eprintln!("vm-runner: cannot write the report {}: {e}", report_path.display());
        return ExitCode::from(3);
    }
    eprintln!("vm-runner: {}, guest {} {}", report.accel_note, report.last().result, report.last().reason);
    for c in &report.checks {
        eprintln!("vm-runner: {} {}", if c.ok { "ok  " } else { "FAIL" }, c.message);
    }
    for f in report.boots.iter().flat_map(|b| &b.failures) {
        eprintln!("vm-runner: FAIL {f}");
    }
    let failures = report.failures();
    if failures.is_empty() {
        eprintln!(
            "vm-runner: PASS ({:.1} s), report: {}",
            report.elapsed.as_secs_f64(),
            report_path.display()
        );
        ExitCode::SUCCESS
    } else {
        eprintln!("vm-runner: FAIL ({} failure(s)), report: {}", failures.len(), report_path.display());
        ExitCode::from(1)
    }
}
