//! The demo's script: nine acts, each a fault (or a non-fault, or an operator's change) played on the simulated fleet at a
//! given tick, with what the healer must and must not do about it. Times are in ticks; the
//! healer's timeouts are set in ticks too (see `Timing`), so the story is the same fast or slow.

use crate::world::{Beat, Effect, World};
use std::collections::BTreeSet;

pub const SETS: [(&str, usize); 5] = [
    ("web", 50),
    ("api", 50),
    ("jobs", 50),
    (SWAP_TO, 0),
    (STATEFUL_SET, 1),
];
/// The set in Flexible orchestration (its instances are named VMs); the others are Uniform.
pub const FLEXIBLE_SET: &str = "jobs";

/// The healer's timeouts, in ticks.
pub const HEARTBEAT_TIMEOUT: u32 = 8;
pub const DOWN_FOR: u32 = 4;
pub const STARTUP_TIMEOUT: u32 = 12;
pub const GRACE: u32 = 4;

const OUTAGE: (u32, u32) = (26, 42);
const REBOOT: u32 = 6;
const MASS_DOWN: (u32, u32) = (46, 58);
const MASS_SET: &str = "api";
const MASS: std::ops::Range<u64> = 20..45;
/// The first of the mass DOWN's stragglers: the ones from here come back two ticks later.
const MASS_MIDDLE: u64 = 33;
/// The last act: `handler cycle web` refreshes every instance, a fifth at a time.
pub const CYCLE: u32 = 62;
pub const CYCLE_SET: &str = "web";
/// 80 % of web's 50 instances must keep serving throughout.
pub const CYCLE_MIN_SERVING: usize = 40;
/// The last act too: `handler swap api api-green` moves api's traffic to an empty set.
pub const SWAP: u32 = 63;
pub const SWAP_FROM: &str = "api";
pub const SWAP_TO: &str = "api-green";
/// api's 50 instances must keep serving across the two sets throughout.
pub const SWAP_MIN_SERVING: usize = 50;
/// The last act as well: the stateful VM of `db` dies for good; its data disk (LUN 0) must follow
/// it to the new VM — in another zone, so by a copy — before the broken one goes.
pub const STATEFUL: u32 = 66;
pub const STATEFUL_SET: &str = "db";
/// db's repair timeout, in ticks: restart and reimage are given this long before the replacement.
pub const STATEFUL_REPAIR_TIMEOUT: u32 = 8;
/// What the simulator wrote on db#0's data disk: it must be on the new VM's disk at the end.
pub const STATEFUL_DATA: &str = "data written by db_0";
/// The story is over once this tick has passed and the fleet has settled (and the cycle and the
/// swap are done).
pub const LAST_TICK: u32 = 68;

pub struct Act {
    pub tick: u32,
    pub title: &'static str,
}

pub const ACTS: [Act; 9] = [
    Act {
        tick: 2,
        title: "web#4 reports DOWN: its health check fails",
    },
    Act {
        tick: 3,
        title: "api#7 hangs: no more heartbeats",
    },
    Act {
        tick: 4,
        title: "jobs scales out; the new VM never comes up",
    },
    Act {
        tick: REBOOT,
        title: "web#10 announces MAINTENANCE and reboots (planned: not an outage)",
    },
    Act {
        tick: OUTAGE.0,
        title: "the heartbeat pipeline fails: every VM falls silent at once",
    },
    Act {
        tick: MASS_DOWN.0,
        title: "half of api reports DOWN: past its unhealthy limit, it must pause",
    },
    Act {
        tick: CYCLE,
        title: "handler cycle web: every instance reimaged, 10 at a time, at least 40 serving",
    },
    Act {
        tick: SWAP,
        title: "handler swap api api-green: green soaked healthy, autoscale moved, api to zero",
    },
    Act {
        tick: STATEFUL,
        title: "db#0, a stateful VM, dies for good: its data disk must follow it to a new VM",
    },
];

/// The act running at `tick` (1-based), for the progress line.
pub fn act_at(tick: u32) -> usize {
    ACTS.iter().filter(|a| a.tick <= tick).count()
}

/// Whether heartbeats reach the healer at this tick (not during the pipeline outage).
pub fn heartbeats_flow(tick: u32) -> bool {
    !(OUTAGE.0..OUTAGE.1).contains(&tick)
}

/// What the healer must do.
pub struct Expectations {
    /// (set, instance) that must be repaired, with the tick the fault began.
    pub must_repair: Vec<(&'static str, u64, u32)>,
    /// (set, instance) that must never be repaired.
    pub must_spare: BTreeSet<(&'static str, u64)>,
    /// No repair may be requested in these ticks (the pipeline outage, and its settling).
    pub quiet_ticks: std::ops::Range<u32>,
    /// (set or "*", brake label, from tick) that must be seen in the journal after its act began.
    pub pauses: Vec<(&'static str, &'static str, u32)>,
}

/// Plays the acts due at `tick`; returns what happened, for the log. `jobs_new` receives the
/// instance id the scale-out created.
pub fn play(
    tick: u32,
    world: &mut World,
    key: impl Fn(&str) -> String,
    jobs_new: &mut Option<u64>,
) -> Vec<String> {
    let mut said = Vec::new();
    let set_beat = |world: &mut World, set: &str, id: u64, beat: Beat| {
        if let Some(vm) = world
            .sets
            .get_mut(&key(set))
            .and_then(|s| s.vms.get_mut(&id))
        {
            vm.beat = beat;
        }
    };
    match tick {
        2 => set_beat(world, "web", 4, Beat::Down),
        3 => set_beat(world, "api", 7, Beat::Silent),
        4 => {
            let k = key("jobs");
            let target = world.sets.get(&k).map_or(0, |s| s.capacity()) + 1;
            world.start_operation(&k, Effect::Scale(target));
            if let Some(set) = world.sets.get_mut(&k) {
                if let Some((id, vm)) = set.vms.iter_mut().next_back() {
                    vm.beat = Beat::Silent;
                    *jobs_new = Some(*id);
                    said.push(format!("jobs#{id} created; it will never send a heartbeat"));
                }
            }
        }
        REBOOT => {
            let until = time::OffsetDateTime::now_utc();
            if let Some(vm) = world
                .sets
                .get_mut(&key("web"))
                .and_then(|s| s.vms.get_mut(&10))
            {
                vm.beat = Beat::Maintenance;
                // Long enough for the reboot and a margin; the agent's `maintenance` command sets it.
                vm.maintenance_until = Some(until + maintenance_window());
            }
        }
        t if t == REBOOT + 1 => set_beat(world, "web", 10, Beat::Silent),
        t if t == REBOOT + 11 => {
            set_beat(world, "web", 10, Beat::Up);
            said.push("web#10 is back from its reboot".into());
        }
        t if t == OUTAGE.1 => said.push("the heartbeat pipeline works again".into()),
        STATEFUL => {
            if let Some(vm) = world
                .sets
                .get_mut(&key(STATEFUL_SET))
                .and_then(|s| s.vms.get_mut(&0))
            {
                // Neither a restart nor a reimage brings it back: only a new VM does.
                vm.beat = Beat::Down;
                vm.fault = crate::world::Fault::Hard;
            }
        }
        t if t == MASS_DOWN.0 => {
            for id in MASS {
                set_beat(world, MASS_SET, id, Beat::Down);
            }
        }
        // They come back as a fleet does, not all in one heartbeat: half now, the rest two ticks
        // later. In between the set is under its limit with stragglers still DOWN — it settles
        // rather than repair them.
        t if t == MASS_DOWN.1 => {
            for id in MASS.start..MASS_MIDDLE {
                set_beat(world, MASS_SET, id, Beat::Up);
            }
            said.push(format!(
                "{MASS_SET}#{}..#{} recover",
                MASS.start,
                MASS_MIDDLE - 1
            ));
        }
        t if t == MASS_DOWN.1 + 2 => {
            for id in MASS_MIDDLE..MASS.end {
                set_beat(world, MASS_SET, id, Beat::Up);
            }
            said.push(format!(
                "{MASS_SET}#{}..#{} recover too",
                MASS_MIDDLE,
                MASS.end - 1
            ));
        }
        _ => {}
    }
    if let Some(act) = ACTS.iter().find(|a| a.tick == tick) {
        said.insert(0, act.title.to_string());
    }
    said
}

/// Set from `main` once the tick length is known.
static TICK_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(250);

pub fn set_tick(tick: std::time::Duration) {
    TICK_MS.store(
        tick.as_millis() as u64,
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// The announced window: the reboot takes 10 ticks; the window is generous, as an operator's is,
/// so that a slow machine (longer ticks) does not end it before the VM is back.
fn maintenance_window() -> time::Duration {
    time::Duration::milliseconds((60 * TICK_MS.load(std::sync::atomic::Ordering::Relaxed)) as i64)
}

pub fn expectations(jobs_new: Option<u64>) -> Expectations {
    let mut must_spare: BTreeSet<(&'static str, u64)> = MASS.map(|id| (MASS_SET, id)).collect();
    must_spare.insert(("web", 10));
    let mut must_repair = vec![("web", 4, 2), ("api", 7, 3), (STATEFUL_SET, 0, STATEFUL)];
    if let Some(id) = jobs_new {
        must_repair.push(("jobs", id, 4));
    }
    Expectations {
        must_repair,
        must_spare,
        quiet_ticks: OUTAGE.0..OUTAGE.1 + 2,
        pauses: vec![
            ("*", "pipeline_fault", OUTAGE.0),
            (MASS_SET, "too_many_unhealthy", MASS_DOWN.0),
            // Back under its limit with stragglers still DOWN: it settles, repairs nothing.
            (MASS_SET, "settling", MASS_DOWN.1),
        ],
    }
}

/// The cycle's grade: it finished, every instance present at its start was reimaged exactly once,
/// and never fewer than [`CYCLE_MIN_SERVING`] instances served.
pub fn grade_cycle(
    state: Option<&str>,
    lowest_serving: usize,
    reimaged: &std::collections::BTreeMap<u64, usize>,
    at_start: &BTreeSet<u64>,
) -> Vec<Graded> {
    let once = at_start.iter().all(|i| reimaged.get(i) == Some(&1))
        && reimaged.keys().all(|i| at_start.contains(i));
    vec![
        finished(&format!("cycle of {CYCLE_SET}"), state),
        Graded {
            text: format!(
                "cycle of {CYCLE_SET}: {} of {} instances reimaged, {}",
                reimaged.len(),
                at_start.len(),
                if once {
                    "each exactly once"
                } else {
                    "NOT each exactly once"
                }
            ),
            ok: once,
        },
        kept_the_line(
            &format!("cycle of {CYCLE_SET}"),
            lowest_serving,
            CYCLE_MIN_SERVING,
        ),
    ]
}

/// The swap's grade: it finished, the new set serves at the old one's capacity with autoscale,
/// the old set is at zero, and never fewer than [`SWAP_MIN_SERVING`] served across the two.
pub fn grade_swap(
    state: Option<&str>,
    lowest_serving: usize,
    capacities: (usize, usize),
    autoscale_moved: bool,
) -> Vec<Graded> {
    vec![
        finished(&format!("swap {SWAP_FROM} → {SWAP_TO}"), state),
        Graded {
            text: format!(
                "swap {SWAP_FROM} → {SWAP_TO}: {SWAP_TO} at {}, {SWAP_FROM} at {}, autoscale {}",
                capacities.1,
                capacities.0,
                if autoscale_moved {
                    "moved"
                } else {
                    "NOT moved"
                }
            ),
            ok: capacities == (0, SWAP_MIN_SERVING) && autoscale_moved,
        },
        kept_the_line(
            &format!("swap {SWAP_FROM} → {SWAP_TO}"),
            lowest_serving,
            SWAP_MIN_SERVING,
        ),
    ]
}

/// The stateful act's grade: the replacement succeeded, and the one VM left is a new one whose data
/// disk at LUN 0 holds what the old one wrote, with no disk left behind.
pub fn grade_stateful(
    state: Option<&str>,
    vms: &[(u64, Option<String>, Option<String>)],
    disks: &[(String, String, Option<String>)],
) -> Vec<Graded> {
    // (instance, zone, disk at LUN 0) of each VM; (disk key, content, zone) of each disk.
    let carried = match vms {
        [(id, zone, Some(disk))] if *id != 0 => disks
            .iter()
            .find(|(k, _, _)| k == disk)
            .filter(|(_, content, _)| content == STATEFUL_DATA)
            .map(|_| (*id, zone.clone())),
        _ => None,
    };
    vec![
        finished(&format!("stateful replacement of {STATEFUL_SET}#0"), state),
        Graded {
            text: match &carried {
                Some((id, zone)) => format!(
                    "{STATEFUL_SET}#0 replaced by {STATEFUL_SET}#{id} (zone {}): its data disk followed it at LUN 0, {} disk(s) left",
                    zone.as_deref().unwrap_or("none"),
                    disks.len()
                ),
                None => format!(
                    "{STATEFUL_SET}: the data did NOT follow: VMs {vms:?}, disks {disks:?}"
                ),
            },
            ok: carried.is_some() && disks.len() == 1,
        },
    ]
}

/// An operation's first grade: it succeeded.
fn finished(what: &str, state: Option<&str>) -> Graded {
    Graded {
        text: format!("{what}: {}", state.unwrap_or("never started")),
        ok: state == Some("succeeded"),
    }
}

/// An operation's availability grade: never fewer than `line` served while it ran.
fn kept_the_line(what: &str, lowest_serving: usize, line: usize) -> Graded {
    Graded {
        text: format!(
            "{what}: at least {lowest_serving} instances serving throughout (the line: {line})"
        ),
        ok: lowest_serving >= line,
    }
}

/// One line of the demo's verdict on the healer.
pub struct Graded {
    pub text: String,
    pub ok: bool,
}

/// Grades a run: every fault repaired (and how fast), nothing else repaired, nothing in the quiet
/// ticks or of the spared instances, every expected pause seen after its act began.
pub fn grade(
    expected: &Expectations,
    repairs: &[(String, u64, u32)],
    pauses: &[(String, String, u32)],
    seconds_at: impl Fn(u32) -> f32,
    repaired_at: impl Fn(&str, u64) -> Option<(f32, String)>,
) -> Vec<Graded> {
    let mut out = Vec::new();
    for (set, instance, fault_tick) in &expected.must_repair {
        out.push(
            match repairs.iter().find(|(s, i, _)| s == set && i == instance) {
                Some((_, _, t)) => {
                    // The request's own time when the journal has it, else its tick's.
                    let (at, by) = repaired_at(set, *instance)
                        .unwrap_or_else(|| (seconds_at(*t), "timer".into()));
                    let by = match by.as_str() {
                        "evaluation" => "by the evaluation on the evidence",
                        _ => "by a monitor-status pass",
                    };
                    Graded {
                        text: format!(
                            "{set}#{instance}: detected and repaired {:.1} s after the fault, {by}",
                            at - seconds_at(*fault_tick)
                        ),
                        ok: true,
                    }
                }
                None => Graded {
                    text: format!("{set}#{instance}: MISSED — never repaired"),
                    ok: false,
                },
            },
        );
    }
    for (set, instance, t) in repairs {
        if !expected
            .must_repair
            .iter()
            .any(|(s, i, _)| s == set && i == instance)
        {
            out.push(Graded {
                text: format!("{set}#{instance}: repaired WRONGLY at tick {t}"),
                ok: false,
            });
        }
        if expected.must_spare.contains(&(set.as_str(), *instance))
            || expected.quiet_ticks.contains(t)
        {
            out.push(Graded {
                text: format!("{set}#{instance}: repaired at tick {t}, where nothing may be"),
                ok: false,
            });
        }
    }
    for (set, brake, from) in &expected.pauses {
        let seen = pauses
            .iter()
            .any(|(s, b, t)| (*set == "*" || s == set) && b == brake && t >= from);
        let on = if *set == "*" {
            String::new()
        } else {
            format!(" on {set}")
        };
        out.push(Graded {
            text: format!(
                "pause `{brake}`{on}: {}",
                if seen {
                    "held, then released"
                } else {
                    "NOT SEEN"
                }
            ),
            ok: seen,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(repairs: &[(&str, u64, u32)], pauses: &[(&str, &str, u32)]) -> Vec<(bool, String)> {
        let repairs: Vec<_> = repairs
            .iter()
            .map(|(s, i, t)| (s.to_string(), *i, *t))
            .collect();
        let pauses: Vec<_> = pauses
            .iter()
            .map(|(s, b, t)| (s.to_string(), b.to_string(), *t))
            .collect();
        let seconds_at = |tick: u32| tick as f32 * 0.25;
        grade(
            &expectations(Some(50)),
            &repairs,
            &pauses,
            seconds_at,
            |_, _| None,
        )
        .into_iter()
        .map(|g| (g.ok, g.text))
        .collect()
    }

    const GOOD_REPAIRS: [(&str, u64, u32); 4] = [
        ("web", 4, 7),
        ("api", 7, 12),
        ("jobs", 50, 18),
        (STATEFUL_SET, 0, STATEFUL + 5),
    ];
    const GOOD_PAUSES: [(&str, &str, u32); 5] = [
        ("web", "pipeline_fault", 35),
        ("api", "pipeline_fault", 35),
        ("api", "too_many_unhealthy", 51),
        ("api", "settling", 59),
        // A pause before its act counts for nothing (the fleet's first pass, say).
        ("api", "too_many_unhealthy", 0),
    ];

    #[test]
    fn a_cycle_passes_only_finished_once_each_and_above_the_line() {
        let start: BTreeSet<u64> = (0..50).collect();
        let once: std::collections::BTreeMap<u64, usize> = (0..50).map(|i| (i, 1)).collect();
        let ok = |g: Vec<Graded>| g.iter().filter(|g| !g.ok).count();
        assert_eq!(ok(grade_cycle(Some("succeeded"), 40, &once, &start)), 0);
        assert_eq!(ok(grade_cycle(Some("paused"), 40, &once, &start)), 1);
        assert_eq!(ok(grade_cycle(Some("succeeded"), 39, &once, &start)), 1);
        let mut twice = once.clone();
        twice.insert(3, 2);
        assert_eq!(ok(grade_cycle(Some("succeeded"), 45, &twice, &start)), 1);
        let mut missing = once;
        missing.remove(&7);
        assert_eq!(ok(grade_cycle(None, 45, &missing, &start)), 2);
    }

    #[test]
    fn a_swap_passes_only_finished_moved_and_above_the_line() {
        let failed = |g: Vec<Graded>| g.iter().filter(|g| !g.ok).count();
        assert_eq!(failed(grade_swap(Some("succeeded"), 50, (0, 50), true)), 0);
        assert_eq!(failed(grade_swap(Some("failed"), 50, (50, 0), false)), 2);
        assert_eq!(failed(grade_swap(Some("succeeded"), 49, (0, 50), true)), 1);
        assert_eq!(failed(grade_swap(Some("succeeded"), 50, (0, 50), false)), 1);
        assert_eq!(failed(grade_swap(None, 50, (50, 0), false)), 2);
    }

    #[test]
    fn a_stateful_replacement_passes_only_with_the_data_on_a_new_vm_and_nothing_left() {
        let failed = |g: Vec<Graded>| g.iter().filter(|g| !g.ok).count();
        let data = |k: &str, content: &str| (k.to_string(), content.to_string(), Some("2".into()));
        let new_vm = [(1, Some("2".into()), Some("copy".into()))];
        let good = [data("copy", STATEFUL_DATA)];
        assert_eq!(failed(grade_stateful(Some("succeeded"), &new_vm, &good)), 0);
        assert_eq!(failed(grade_stateful(Some("failed"), &new_vm, &good)), 1);
        // An empty disk on the new VM: the data did not follow.
        assert_eq!(
            failed(grade_stateful(
                Some("succeeded"),
                &new_vm,
                &[data("copy", "")]
            )),
            1
        );
        // The original left behind.
        let both = [data("copy", STATEFUL_DATA), data("orig", STATEFUL_DATA)];
        assert_eq!(failed(grade_stateful(Some("succeeded"), &new_vm, &both)), 1);
        // Still the old VM.
        let old = [(0, Some("1".into()), Some("copy".into()))];
        assert_eq!(failed(grade_stateful(Some("succeeded"), &old, &good)), 1);
    }

    #[test]
    fn a_run_that_got_everything_right_passes() {
        let lines = run(&GOOD_REPAIRS, &GOOD_PAUSES);
        assert!(lines.iter().all(|(ok, _)| *ok), "{lines:?}");
        assert!(
            lines[0].1.contains(
                "web#4: detected and repaired 1.2 s after the fault, by a monitor-status pass"
            ),
            "{lines:?}"
        );
        // The request's own time and who decided, when the journal says.
        let repairs: Vec<_> = GOOD_REPAIRS
            .iter()
            .map(|(s, i, t)| (s.to_string(), *i, *t))
            .collect();
        let graded = grade(
            &expectations(Some(50)),
            &repairs,
            &[],
            |tick| tick as f32 * 0.25,
            |set, i| (set == "web" && i == 4).then(|| (1.3, "evaluation".to_string())),
        );
        assert!(
            graded[0]
                .text
                .contains("web#4: detected and repaired 0.8 s after the fault, by the evaluation on the evidence"),
            "{}",
            graded[0].text
        );
    }

    #[test]
    fn a_missed_fault_a_wrong_repair_or_a_missing_pause_fails() {
        let failed = |repairs: &[(&str, u64, u32)], pauses: &[(&str, &str, u32)]| {
            run(repairs, pauses)
                .into_iter()
                .filter(|(ok, _)| !ok)
                .map(|(_, text)| text)
                .collect::<Vec<_>>()
        };
        let missed = failed(
            &[GOOD_REPAIRS[0], GOOD_REPAIRS[1], GOOD_REPAIRS[3]],
            &GOOD_PAUSES,
        );
        assert_eq!(missed, ["jobs#50: MISSED — never repaired"]);
        let mut wrong = GOOD_REPAIRS.to_vec();
        wrong.push(("web", 10, 12)); // the planned reboot
        wrong.push(("web", 33, 30)); // during the pipeline outage
        let bad = failed(&wrong, &GOOD_PAUSES);
        assert_eq!(bad.len(), 4, "{bad:?}");
        assert!(bad.iter().any(|t| t.contains("web#10: repaired WRONGLY")));
        assert!(bad
            .iter()
            .any(|t| t.contains("web#33: repaired at tick 30, where nothing may be")));
        let unpaused = failed(
            &GOOD_REPAIRS,
            &[GOOD_PAUSES[0], GOOD_PAUSES[1], GOOD_PAUSES[3]],
        );
        assert_eq!(unpaused, ["pause `too_many_unhealthy` on api: NOT SEEN"]);
        let early_only = failed(
            &GOOD_REPAIRS,
            &[GOOD_PAUSES[0], GOOD_PAUSES[4], GOOD_PAUSES[3]],
        );
        assert_eq!(early_only, ["pause `too_many_unhealthy` on api: NOT SEEN"]);
        let unsettled = failed(&GOOD_REPAIRS, &GOOD_PAUSES[..3]);
        assert_eq!(unsettled, ["pause `settling` on api: NOT SEEN"]);
    }
}
