//! scripts/bench.sh end to end, with the debug binaries (`--no-build`, `BENCH_BIN_DIR`): it
//! starts megasock, runs a scenario, stops the server and leaves every file in the results
//! directory; and it refuses runs the limits cannot hold, naming the tuning command.
//!
//! Needs the megasock binary next to megasock-bench (`cargo build --workspace`), like
//! tests/scenarios.rs; fails, not skips, without it.

use std::path::{Path, PathBuf};
use std::process::Command;

const BENCH: &str = env!("CARGO_BIN_EXE_megasock-bench");

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/bench.sh")
}

fn bin_dir() -> PathBuf {
    let dir = Path::new(BENCH).parent().unwrap().to_path_buf();
    assert!(
        dir.join("megasock").is_file(),
        "the megasock binary is missing in {}: build it first with `cargo build --workspace`",
        dir.display()
    );
    dir
}

#[test]
fn bench_sh_runs_a_scenario_and_keeps_everything() {
    let out = std::env::temp_dir().join(format!("megasock-bench-sh-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out);
    let o = Command::new("bash")
        .arg(script())
        .args([
            "echo",
            "--no-build",
            "--workers",
            "2",
            "--warmup",
            "1",
            "--runs",
            "2",
            "--out",
        ])
        .arg(&out)
        .args(["--conns", "20", "--secs", "0.5", "--progress", "none"])
        .env("BENCH_BIN_DIR", bin_dir())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "bench.sh failed\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    for f in [
        "commands.txt",
        "system.txt",
        "server.log",
        "warmup-1.txt",
        "summary.txt",
        "summary.json",
        "run-1/echo.json",
        "run-1/echo.rtt.hgrm",
        "run-1/echo.latency.svg",
        "run-2/echo.json",
    ] {
        assert!(
            out.join(f).is_file(),
            "{f} missing in {}\n{stderr}",
            out.display()
        );
    }
    let cmds = std::fs::read_to_string(out.join("commands.txt")).unwrap();
    assert!(
        cmds.contains("megasock serve --listen 127.0.0.1:0 --workers 2 --ready-file"),
        "{cmds}"
    );
    assert!(
        cmds.contains("megasock-bench echo --url ws://127.0.0.1:"),
        "{cmds}"
    );
    assert!(
        cmds.contains("# server exit status: 0"),
        "megasock did not exit 0 on SIGTERM:\n{cmds}"
    );
    let j: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run-1/echo.json")).unwrap())
            .unwrap();
    assert_eq!(j["ok"], true);
    assert!(j["msgs_per_s"].as_f64().unwrap() > 0.0);
    assert!(
        j["server"]["run_cpu_s"].is_number(),
        "--server-pid was not passed"
    );
    let summary = std::fs::read_to_string(out.join("summary.txt")).unwrap();
    assert!(summary.contains("msgs_per_s"), "{summary}");
    std::fs::remove_dir_all(&out).unwrap();
}

#[test]
fn bench_sh_refuses_what_the_limits_cannot_hold() {
    let out =
        std::env::temp_dir().join(format!("megasock-bench-sh-refused-{}", std::process::id()));
    let o = Command::new("bash")
        .arg(script())
        .args(["connect", "--no-build", "--out"])
        .arg(&out)
        .args(["--conns", "100000000"])
        .env("BENCH_BIN_DIR", bin_dir())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("scripts/tune.sh apply --role both --connections 100000000"),
        "{stderr}"
    );
    assert!(
        !out.exists(),
        "a refused run must not leave a results directory"
    );
    let o = Command::new("bash")
        .arg(script())
        .args(["nosuch"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
}
