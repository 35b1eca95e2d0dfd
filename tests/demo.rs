//! README command one: the demo plays its story on the simulated fleet, heals what must be healed,
//! spares what must be spared, and says so (short mode, plain output).

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[test]
fn the_demo_plays_its_story_and_the_healer_gets_every_act_right() {
    let svg = std::env::temp_dir().join(format!("demo-{}.svg", std::process::id()));
    let mut child = Command::new(env!("CARGO_BIN_EXE_demo"))
        .args(["--fast", "--plain", "--svg"])
        .arg(&svg)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start the demo");
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(status) = child.try_wait().expect("poll the demo") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the demo did not finish within 180 s");
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
    for line in [
        "repair  web#4 replace (surge) requested: the instance reported DOWN",
        "repair  web#4 replace (delete) requested: the instance reported DOWN",
        "repair  api#7 replace (surge) requested: no heartbeat for",
        "replace (surge) requested: no heartbeat since creation",
        "withheld web#* pipeline_fault",
        "withheld api#* too_many_unhealthy",
        "withheld api#* settling",
        "resumed api: the brake `settling` released",
        "pause `settling` on api: held, then released",
        "pause `pipeline_fault`: held, then released",
        "every fault repaired, nothing repaired wrongly",
        "operator handler cycle web: operation cycle-",
        "cycle of web: succeeded",
        "cycle of web: 50 of 50 instances reimaged, each exactly once",
        "the line: 40",
        // Act 8: the swap.
        "operator handler swap api api-green: operation swap-",
        "swap api → api-green: succeeded",
        "swap api → api-green: api-green at 50, api at 0, autoscale moved",
        "the line: 50)",
        "autoscale_moved: autoscale moved to the new set: api-green-autoscale has the old set's profiles, api-autoscale is disabled",
        // Act 9: the stateful VM, restart kept out (reimage first), then its disk carried, by a
        // copy since the new VM landed in the other zone.
        "repair  db#0 reimage requested: the instance reported DOWN",
        "repair  db#0 replace (carry) requested",
        "zone_copy: the new instance landed in another zone",
        "stateful replacement of db#0: succeeded",
        "db#0 replaced by db#1 (zone 2): its data disk followed it at LUN 0, 1 disk(s) left",
        "the stateful VM's data followed it",
        // Issue 19: the DOWNs are repaired on their heartbeat's evaluation, silence by the timer.
        "healer: heartbeats every tick, monitor-state every tick, monitor-status every 4 ticks",
        "by the evaluation on the evidence",
    ] {
        assert!(out.contains(line), "missing `{line}` in:\n{out}");
    }
    let graded = |who: &str| {
        out.lines()
            .find(|l| {
                l.trim_start()
                    .starts_with(&format!("{who}: detected and repaired"))
            })
            .unwrap_or_else(|| panic!("no time to repair for {who}:\n{out}"))
            .to_string()
    };
    assert!(
        graded("web#4").ends_with("by the evaluation on the evidence"),
        "{out}"
    );
    assert!(
        graded("api#7").ends_with("by a monitor-status pass"),
        "silence is the timer's: {out}"
    );
    // The planned reboot and the mass DOWN are never repaired.
    assert!(!out.contains("repair  web#10"), "{out}");
    assert!(!out.contains("repair  api#2"), "{out}");
    // Every repair line names an instance from the story: three instances, each replaced by a
    // surge and then a delete, and the stateful VM, reimaged and then replaced with its disk.
    let repaired: std::collections::BTreeSet<&str> = out
        .lines()
        .filter_map(|l| l.split(" repair  ").nth(1))
        .filter_map(|rest| rest.split_whitespace().next())
        .collect();
    assert_eq!(repaired.len(), 4, "{repaired:?}\n{out}");
    let stages = out.lines().filter(|l| l.contains(" repair  ")).count();
    assert_eq!(stages, 8, "{out}");

    let picture = std::fs::read_to_string(&svg).expect("the timeline is written");
    let _ = std::fs::remove_file(&svg);
    assert!(
        picture.starts_with("<svg"),
        "{}",
        &picture[..80.min(picture.len())]
    );
    assert_eq!(
        picture.matches("<circle").count(),
        5,
        "one mark per repair (db#0's reimage and replacement each)"
    );
    assert!(picture.contains("paused: pipeline_fault"));
    // The pauses are labelled on the picture itself, not only on hover, and time has an axis.
    assert!(
        picture.contains(r#"class="pause-label">pipeline_fault</text>"#),
        "{picture}"
    );
    assert!(picture.contains(r#"class="axis""#) && picture.contains(">0 s</text>"));
    assert!(picture.contains("6. half of api reports DOWN"));
    // The cycle's batches, in their own colour while the operation holds them.
    assert!(picture.contains("7. handler cycle web"));
    assert!(
        picture.matches(r##"fill="#8e5bd0"/>"##).count() >= 50,
        "every web instance shown cycling"
    );
    // The swap's act, and api-green's row on the picture.
    assert!(picture.contains("8. handler swap api api-green"));
    assert!(picture.contains(">api-green<"), "api-green has its row");
    assert!(picture.contains("9. db#0, a stateful VM, dies for good"));
    assert!(picture.contains(">db<"), "db has its row");
}
