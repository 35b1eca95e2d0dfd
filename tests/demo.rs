//! README command one: the demo heals its simulated fleet and says so.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn the_demo_repairs_every_fault_and_touches_nothing_else() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_demo"))
        .arg("--fast")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the demo");
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll the demo") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the demo did not finish within 120 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut out = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    assert!(status.success(), "demo failed:\n{out}");
    assert!(
        out.contains("repaired 2/2 faults; no healthy instance touched"),
        "{out}"
    );
    assert!(
        out.contains("repair  web#4 replace requested: the instance reported DOWN"),
        "{out}"
    );
    assert!(
        out.contains("repair  api#7 replace requested: no heartbeat for"),
        "{out}"
    );
}
