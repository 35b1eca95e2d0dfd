//! The benchmark binary keeps working (tiny sizes; the figures live in docs/benchmarks.md).

use std::process::Command;

#[test]
fn the_benchmarks_run_and_report() {
    let ingest = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args([
            "ingest",
            "--instances",
            "20",
            "--rounds",
            "2",
            "--concurrency",
            "4",
        ])
        .output()
        .expect("run bench ingest");
    let out = String::from_utf8_lossy(&ingest.stdout);
    assert!(
        ingest.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&ingest.stderr)
    );
    let handler_row = out
        .lines()
        .find(|l| l.starts_with("| handler"))
        .expect("a handler row");
    assert!(
        handler_row.ends_with("| 1.00 |"),
        "one table request per heartbeat: {handler_row}"
    );
    assert!(out.contains("handler / plain throughput"), "{out}");

    // The handler binary sits next to the bench binary in the same target directory.
    let startup = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["startup", "--runs", "2"])
        .output()
        .expect("run bench startup");
    let out = String::from_utf8_lossy(&startup.stdout);
    assert!(
        startup.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&startup.stderr)
    );
    assert!(out.contains("| start to ready (GET / answers) |"), "{out}");
    assert!(out.contains("| idle RSS |"), "{out}");

    let tick = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["tick", "--instances", "20"])
        .output()
        .expect("run bench tick");
    let out = String::from_utf8_lossy(&tick.stdout);
    assert!(
        tick.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&tick.stderr)
    );
    assert!(out.contains("| monitor-status |"), "{out}");
    let changed = out
        .lines()
        .find(|l| l.starts_with("| monitor-state, 0.1 % changed"))
        .expect("a second sync row");
    assert!(
        changed.contains("| 0 rows written, 0 removed |"),
        "20 instances: none in the changed 0.1 %: {changed}"
    );

    // Issue 19's burst: coalesced, and the short-circuited sets make no repair (the bench
    // asserts it too).
    let burst = Command::new(env!("CARGO_BIN_EXE_bench"))
        .args(["burst", "--sets", "4", "--set-size", "10", "--downs", "40"])
        .output()
        .expect("run bench burst");
    let out = String::from_utf8_lossy(&burst.stdout);
    assert!(
        burst.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&burst.stderr)
    );
    assert!(
        out.contains("| repairs in the mass-DOWN sets | 0 |"),
        "{out}"
    );
    assert!(
        out.contains("| mass-DOWN sets paused (too_many_unhealthy) | 2 of 2 |"),
        "{out}"
    );
}
