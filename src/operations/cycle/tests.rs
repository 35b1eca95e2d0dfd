//! The cycle against a small model of a scale set: a call's effect lands one pass later, a
//! reimaged instance sends its next heartbeat after, a broken one never does.

use super::*;
use crate::heartbeat::{Origin, Status as Beat};
use crate::mirror::fixtures::instance;
use crate::operations::Kind;
use crate::scaleset::ScaleSetId;
use crate::verdict::Reason;
use proptest::prelude::*;
use std::collections::BTreeMap;
use time::macros::datetime;

const T0: OffsetDateTime = datetime!(2026-12-01 10:00 UTC);
const PASS: Duration = Duration::seconds(60);

#[derive(Clone)]
struct Vm {
    /// Passes until the running call on it ends.
    busy: Option<u32>,
    provisioned_at: OffsetDateTime,
    last_beat: OffsetDateTime,
    /// Never comes back healthy after a call.
    broken: bool,
    healthy: bool,
    outdated: bool,
}

struct World {
    vms: BTreeMap<String, Vm>,
    next: u64,
    now: OffsetDateTime,
    /// Calls in flight: url → (passes left, instances to add).
    running: HashMap<String, (u32, Vec<String>)>,
    statuses: HashMap<String, Status>,
    touched: HashMap<String, u32>,
    calls: Vec<(Verb, usize)>,
    incidents: HashSet<String>,
    brake: Option<String>,
    flexible: bool,
    /// The fewest healthy instances seen after any pass.
    lowest_healthy: usize,
    /// Instances that never come back after a call.
    breaks: HashSet<String>,
    /// Instances a grow adds never come up healthy.
    broken_growth: bool,
}

impl World {
    fn new(n: usize) -> Self {
        let vms = (0..n)
            .map(|i| {
                (
                    i.to_string(),
                    Vm {
                        busy: None,
                        provisioned_at: T0 - Duration::days(1),
                        last_beat: T0 - Duration::seconds(10),
                        broken: false,
                        healthy: true,
                        outdated: false,
                    },
                )
            })
            .collect();
        World {
            vms,
            next: n as u64,
            now: T0,
            running: HashMap::new(),
            statuses: HashMap::new(),
            touched: HashMap::new(),
            calls: Vec::new(),
            incidents: HashSet::new(),
            brake: None,
            flexible: false,
            lowest_healthy: n,
            breaks: HashSet::new(),
            broken_growth: false,
        }
    }

    fn healthy_now(&self) -> usize {
        self.vms
            .values()
            .filter(|v| v.busy.is_none() && v.healthy)
            .count()
    }

    fn mirror(&self) -> Vec<MirroredInstance> {
        self.vms
            .iter()
            .map(|(id, v)| {
                let mut i = instance(id);
                i.provisioning_state = Some(
                    if v.busy.is_some() {
                        "Updating"
                    } else {
                        "Succeeded"
                    }
                    .into(),
                );
                i.provisioned_at = Some(v.provisioned_at);
                i.latest_model_applied = Some(!v.outdated);
                MirroredInstance {
                    instance: i,
                    synced_at: self.now,
                }
            })
            .collect()
    }

    fn heartbeats(&self) -> HashMap<String, Heartbeat> {
        let set = ScaleSetId::new("s", "rg", "web");
        self.vms
            .iter()
            .map(|(id, v)| {
                (
                    id.clone(),
                    Heartbeat {
                        target: set.instance(id),
                        status: if v.healthy { Beat::Up } else { Beat::Down },
                        event_time: v.last_beat,
                        received_at: v.last_beat,
                        sequence: None,
                        vm_id: None,
                        computer_name: None,
                        detail: None,
                        origin: Origin::Agent,
                        event_id: "e".into(),
                        down_since: None,
                        attested: false,
                        attestation: None,
                    },
                )
            })
            .collect()
    }

    /// One monitor-status pass, then a minute of the world.
    fn pass(&mut self, op: &Operation) -> Advance {
        let instances = self.mirror();
        let heartbeats = self.heartbeats();
        let verdicts: HashMap<&str, Verdict> = instances
            .iter()
            .map(|m| {
                let v = &self.vms[&m.instance.instance_id];
                let verdict = if v.busy.is_some() {
                    Verdict::Starting
                } else if v.healthy {
                    Verdict::Healthy
                } else {
                    Verdict::Unhealthy(Reason::ReportedDown { since: T0 })
                };
                (m.instance.instance_id.as_str(), verdict)
            })
            .collect();
        let view = View {
            instances: &instances,
            heartbeats: &heartbeats,
            verdicts: &verdicts,
            incidents: self.incidents.iter().map(String::as_str).collect(),
            brake: self.brake.clone(),
            flexible: self.flexible,
            statuses: &self.statuses,
            settle: Duration::seconds(180),
            dry_run: false,
        };
        let mut out = advance(op, &view, self.now);
        // The pass sends what was decided.
        let mut memo = Memo::read(&out.op).unwrap();
        for slot in memo.slots() {
            let call = memo.call_mut(slot).unwrap();
            if call.state != CallState::Unsent {
                continue;
            }
            let url = format!("op-{}", self.calls.len());
            self.calls.push((call.verb, call.instances.len()));
            let mut added = Vec::new();
            match call.verb {
                Verb::Reimage | Verb::Upgrade => {
                    for id in &call.instances {
                        *self.touched.entry(id.clone()).or_default() += 1;
                        if let Some(v) = self.vms.get_mut(id) {
                            v.busy = Some(1);
                        }
                    }
                }
                Verb::Grow => {
                    for _ in 0..call.grow {
                        let id = self.next.to_string();
                        self.next += 1;
                        if self.broken_growth {
                            self.breaks.insert(id.clone());
                        }
                        self.vms.insert(
                            id.clone(),
                            Vm {
                                busy: Some(1),
                                provisioned_at: self.now,
                                last_beat: self.now - Duration::days(1),
                                broken: false,
                                healthy: true,
                                outdated: false,
                            },
                        );
                        added.push(id);
                    }
                }
                Verb::Delete => {
                    for id in &call.instances {
                        *self.touched.entry(id.clone()).or_default() += 1;
                        self.vms.remove(id);
                    }
                }
            }
            call.state = CallState::Accepted {
                at: self.now,
                url: Some(url.clone()),
                follow: Some("async_operation".into()),
            };
            self.statuses.insert(url.clone(), Status::Running);
            self.running.insert(url, (1, added));
        }
        out.op.memo = serde_json::to_value(&memo).unwrap();
        // While the calls run, before they end.
        self.lowest_healthy = self.lowest_healthy.min(self.healthy_now());
        // A minute passes: calls end, instances come back (and say so), unless broken.
        self.now += PASS;
        let mut ended = Vec::new();
        for (url, (left, _)) in self.running.iter_mut() {
            *left -= 1;
            if *left == 0 {
                ended.push(url.clone());
            }
        }
        let end = self.now - Duration::seconds(20);
        for url in ended {
            self.running.remove(&url);
            self.statuses.insert(url, Status::Ended(end));
        }
        let breaks = self.breaks.clone();
        for (id, v) in self.vms.iter_mut() {
            if v.busy.take().is_some() {
                v.provisioned_at = end;
                v.outdated = false;
                v.broken = breaks.contains(id);
                v.healthy = !v.broken;
            }
            if !v.broken {
                v.last_beat = self.now - Duration::seconds(5);
            }
        }
        out
    }

    /// Passes until the operation stops moving on its own (over, or paused), at most `limit`.
    fn run(&mut self, mut op: Operation, limit: usize) -> (Operation, Vec<Note>) {
        let mut notes = Vec::new();
        for _ in 0..limit {
            let out = self.pass(&op);
            notes.extend(out.notes);
            op = out.op;
            if op.state.is_over() || op.state == State::Paused {
                break;
            }
        }
        (op, notes)
    }
}

fn cycle(raw: Raw) -> Operation {
    let params = parse(&raw).unwrap();
    Operation::new(
        Kind::Cycle,
        ScaleSetId::new("s", "rg", "web"),
        serde_json::to_value(&params).unwrap(),
        "test".into(),
        params.dry_run,
        T0,
    )
}

#[test]
fn twenty_instances_in_batches_of_four_keep_sixteen_healthy() {
    let mut world = World::new(20);
    let (op, notes) = world.run(cycle(Raw::default()), 100);
    assert_eq!(op.state, State::Succeeded, "{notes:?}");
    assert_eq!((op.done, op.total), (20, 20));
    assert!(op.holds.is_empty());
    // Every instance exactly once, five calls of four, never below 80 %.
    assert!(world.touched.values().all(|n| *n == 1) && world.touched.len() == 20);
    assert_eq!(world.calls, vec![(Verb::Reimage, 4); 5]);
    assert!(world.lowest_healthy >= 16, "{}", world.lowest_healthy);
    assert_eq!(world.vms.len(), 20, "no surge was needed");
}

#[test]
fn unhealthy_instances_go_first_and_cost_no_availability() {
    let mut world = World::new(10);
    for id in ["7", "8"] {
        world.vms.get_mut(id).unwrap().healthy = false;
    }
    // 80 % of 10 is 8: with two down, no healthy instance may go, but the sick ones may.
    let op = world.pass(&cycle(Raw::default())).op;
    assert_eq!(op.holds, vec!["7", "8"]);
    assert_eq!(op.step, "batch 1");
    let (op, _) = world.run(op, 50);
    assert_eq!(op.state, State::Succeeded);
    assert_eq!(op.done, 10);
    assert!(world.lowest_healthy >= 8);
}

#[test]
fn a_single_instance_is_surged_to_two_and_given_back() {
    let mut world = World::new(1);
    let (op, notes) = world.run(cycle(Raw::default()), 20);
    assert_eq!(op.state, State::Succeeded, "{notes:?}");
    let verbs: Vec<Verb> = world.calls.iter().map(|c| c.0).collect();
    assert_eq!(verbs, vec![Verb::Grow, Verb::Reimage, Verb::Delete]);
    // The original instance reimaged once, the surge instance deleted: one instance again.
    assert_eq!(world.touched.get("0"), Some(&1));
    assert_eq!(world.vms.keys().collect::<Vec<_>>(), vec!["0"]);
    assert!(world.lowest_healthy >= 1);
}

#[test]
fn capacity_autoscale_adds_meanwhile_is_kept_when_the_surge_is_given_back() {
    let mut world = World::new(1);
    // The surge goes out; before it ends, autoscale adds two instances of its own.
    let op = world.pass(&cycle(Raw::default())).op;
    assert_eq!(op.step, "surge");
    for id in ["7", "8"] {
        world.vms.insert(
            id.into(),
            Vm {
                busy: None,
                provisioned_at: world.now,
                last_beat: world.now,
                broken: false,
                healthy: true,
                outdated: false,
            },
        );
    }
    let (op, notes) = world.run(op, 30);
    assert_eq!(op.state, State::Succeeded, "{notes:?}");
    // Only the surge's own instance went back: autoscale's two stay, and were not cycled.
    assert_eq!(
        world.vms.keys().cloned().collect::<Vec<_>>(),
        vec!["0", "7", "8"]
    );
    assert_eq!(world.touched.get("0"), Some(&1));
    assert!(!world.touched.contains_key("7") && !world.touched.contains_key("8"));
    assert_eq!(op.total, 1);
}

#[test]
fn an_instance_that_never_returns_pauses_the_cycle_and_resume_goes_on() {
    let mut world = World::new(10);
    world.breaks.insert("0".into());
    let (op, notes) = world.run(
        cycle(Raw {
            timeout: Some("5m"),
            ..Raw::default()
        }),
        30,
    );
    assert_eq!(op.state, State::Paused, "{notes:?}");
    assert_eq!(op.step, "failed_batch");
    assert!(
        op.last_error
            .as_deref()
            .unwrap()
            .contains("0 did not return healthy"),
        "{op:?}"
    );
    assert!(
        op.holds.is_empty(),
        "the broken instance is the healer's now"
    );
    assert!(notes
        .iter()
        .any(|n| n.instance == "0" && n.outcome == "failed"));
    // The other instance of the batch came back and counts.
    assert_eq!(op.done, 1);
    let resumed = op
        .command(crate::operations::Command::Resume, world.now)
        .unwrap();
    let (op, _) = world.run(resumed, 50);
    assert_eq!(op.state, State::Succeeded);
    assert_eq!(op.done, 9);
    assert_eq!(world.touched.get("0"), Some(&1), "never cycled twice");
}

#[test]
fn more_failures_than_the_availability_budget_fail_the_cycle() {
    let mut world = World::new(10);
    world.breaks.extend(["0", "1", "2"].map(String::from));
    // Batch of three, 70 % kept: three may be out; three failed is not more than the budget,
    // but with a budget of two it is.
    let raw = Raw {
        batch: Some("3"),
        min_healthy: Some("80%"),
        timeout: Some("3m"),
        ..Raw::default()
    };
    let (op, _) = world.run(cycle(raw), 30);
    assert_eq!(op.state, State::Failed, "{op:?}");
    assert!(op.last_error.unwrap().contains("more than the 2"));
}

#[test]
fn a_brake_holds_every_step_and_stretches_the_wait() {
    let mut world = World::new(10);
    let op = world.pass(&cycle(Raw::default())).op;
    assert_eq!(op.holds.len(), 2);
    world.brake = Some("pipeline fault".into());
    let calls = world.calls.len();
    let mut op = op;
    for _ in 0..40 {
        op = world.pass(&op).op;
    }
    assert_eq!(
        world.calls.len(),
        calls,
        "nothing new while the brake holds"
    );
    assert_eq!(op.state, State::Running);
    assert!(op.waiting.as_deref().unwrap().contains("pipeline fault"));
    assert!(
        op.wait_until.unwrap() >= world.now,
        "the batch's wait is stretched"
    );
    world.brake = None;
    let (op, _) = world.run(op, 50);
    assert_eq!(op.state, State::Succeeded);
    assert_eq!(op.done, 10);
}

#[test]
fn instances_with_an_open_incident_are_left_to_the_healer() {
    let mut world = World::new(5);
    world.incidents.insert("3".into());
    let (op, notes) = world.run(
        cycle(Raw {
            batch: Some("2"),
            min_healthy: Some("1"),
            ..Raw::default()
        }),
        30,
    );
    assert_eq!(op.state, State::Succeeded);
    assert_eq!(op.done, 4);
    assert!(!world.touched.contains_key("3"));
    assert!(notes
        .iter()
        .any(|n| n.instance == "3" && n.outcome == "skipped"));
}

#[test]
fn only_outdated_instances_are_upgraded() {
    let mut world = World::new(6);
    for id in ["1", "4"] {
        world.vms.get_mut(id).unwrap().outdated = true;
    }
    let (op, _) = world.run(
        cycle(Raw {
            action: Some("upgrade"),
            ..Raw::default()
        }),
        30,
    );
    assert_eq!(op.state, State::Succeeded);
    assert_eq!((op.done, op.total), (2, 2));
    assert!(world.calls.iter().all(|c| c.0 == Verb::Upgrade));
    assert_eq!(
        world.touched.keys().collect::<BTreeSet<_>>(),
        BTreeSet::from([&"1".to_string(), &"4".to_string()])
    );
}

#[test]
fn upgrade_of_a_flexible_scale_set_is_refused_at_the_start() {
    let mut world = World::new(3);
    world.flexible = true;
    let (op, _) = world.run(
        cycle(Raw {
            action: Some("upgrade"),
            ..Raw::default()
        }),
        3,
    );
    assert_eq!(op.state, State::Failed);
    assert!(op.last_error.unwrap().contains("Flexible"));
    assert!(world.calls.is_empty());
}

#[test]
fn flexible_vms_are_reimaged_one_per_call() {
    let mut world = World::new(5);
    world.flexible = true;
    let (op, _) = world.run(
        cycle(Raw {
            batch: Some("2"),
            min_healthy: Some("3"),
            ..Raw::default()
        }),
        30,
    );
    assert_eq!(op.state, State::Succeeded);
    assert!(world.calls.iter().all(|c| c == &(Verb::Reimage, 1)));
    assert_eq!(world.calls.len(), 5);
}

#[test]
fn replace_adds_new_instances_before_deleting_old_ones() {
    let mut world = World::new(4);
    let (op, notes) = world.run(
        cycle(Raw {
            action: Some("replace"),
            batch: Some("2"),
            ..Raw::default()
        }),
        30,
    );
    assert_eq!(op.state, State::Succeeded, "{notes:?}");
    assert_eq!(op.done, 4);
    let verbs: Vec<(Verb, usize)> = world.calls.clone();
    assert_eq!(
        verbs,
        vec![
            (Verb::Grow, 0),
            (Verb::Delete, 2),
            (Verb::Grow, 0),
            (Verb::Delete, 2)
        ]
    );
    // Four new instances, none of the old ones.
    assert_eq!(
        world.vms.keys().cloned().collect::<Vec<_>>(),
        vec!["4", "5", "6", "7"]
    );
    assert!(world.lowest_healthy >= 4);
}

#[test]
fn a_replace_whose_new_instances_never_come_up_leaves_the_old_ones_alone() {
    let mut world = World::new(4);
    world.broken_growth = true;
    let raw = Raw {
        action: Some("replace"),
        batch: Some("2"),
        timeout: Some("3m"),
        ..Raw::default()
    };
    let (op, notes) = world.run(cycle(raw), 20);
    assert_eq!(op.state, State::Paused, "{notes:?}");
    assert!(op
        .last_error
        .as_deref()
        .unwrap()
        .contains("new instances came up healthy"));
    // Nothing of the old ones was deleted or marked failed: they wait at the front of the queue.
    assert!(!notes.iter().any(|n| n.outcome == "failed"), "{notes:?}");
    assert!(!world.calls.iter().any(|c| c.0 == Verb::Delete));
    let memo = Memo::read(&op).unwrap();
    assert!(memo.failed.is_empty());
    assert_eq!(&memo.todo[..2], &["0".to_string(), "1".to_string()]);
    assert_eq!(op.done, 0);
}

#[test]
fn a_stale_up_from_before_the_reimage_never_counts() {
    let mut world = World::new(5);
    let op = world
        .pass(&cycle(Raw {
            batch: Some("1"),
            min_healthy: Some("1"),
            ..Raw::default()
        }))
        .op;
    let first = op.holds.clone();
    // The reimage ends; the instance is healthy by the mirror but its last UP is from before.
    let mut op = op;
    world.breaks.clear();
    for _ in 0..3 {
        for id in &first {
            let v = world.vms.get_mut(id).unwrap();
            v.last_beat = T0 - Duration::minutes(1);
        }
        op = world.pass(&op).op;
        for id in &first {
            world.vms.get_mut(id).unwrap().last_beat = T0 - Duration::minutes(1);
        }
    }
    assert_eq!(
        op.holds, first,
        "still waiting for a heartbeat after the reimage"
    );
    assert!(
        op.waiting.as_deref().unwrap().contains("0 of 1 back"),
        "{op:?}"
    );
}

#[test]
fn a_dry_run_calls_nothing_and_still_plans_every_batch() {
    let mut world = World::new(10);
    let mut op = cycle(Raw {
        dry_run: true,
        ..Raw::default()
    });
    let mut notes = Vec::new();
    for _ in 0..20 {
        // The pass does not send a dry run's calls: it records them as taken.
        let instances = world.mirror();
        let heartbeats = world.heartbeats();
        let verdicts: HashMap<&str, Verdict> = instances
            .iter()
            .map(|m| (m.instance.instance_id.as_str(), Verdict::Healthy))
            .collect();
        let statuses = HashMap::new();
        let view = View {
            instances: &instances,
            heartbeats: &heartbeats,
            verdicts: &verdicts,
            incidents: HashSet::new(),
            brake: None,
            flexible: false,
            statuses: &statuses,
            settle: Duration::seconds(180),
            dry_run: false,
        };
        let out = advance(&op, &view, world.now);
        notes.extend(out.notes);
        op = out.op;
        let mut memo = Memo::read(&op).unwrap();
        for slot in memo.slots() {
            let c = memo.call_mut(slot).unwrap();
            if c.state == CallState::Unsent {
                c.state = CallState::Accepted {
                    at: world.now,
                    url: None,
                    follow: None,
                };
            }
        }
        op.memo = serde_json::to_value(&memo).unwrap();
        world.now += PASS;
        if op.state.is_over() {
            break;
        }
    }
    assert_eq!(op.state, State::Succeeded, "{notes:?}");
    assert_eq!(op.done, 10);
    assert_eq!(notes.iter().filter(|n| n.outcome == "batch").count(), 10);
    assert!(notes[0].reason.contains("dry run"));
}

#[test]
fn a_call_whose_answer_was_lost_is_judged_by_the_mirror_and_never_sent_again() {
    let mut world = World::new(3);
    let op = cycle(Raw {
        batch: Some("1"),
        min_healthy: Some("1"),
        ..Raw::default()
    });
    let out = world.pass(&op);
    // Pretend the pass stopped after marking the call Sending: no URL, no answer.
    let mut memo = Memo::read(&out.op).unwrap();
    let c = memo.call_mut(Slot::Batch(0)).unwrap();
    c.state = CallState::Sending { at: T0 };
    let mut op = out.op;
    op.memo = serde_json::to_value(&memo).unwrap();
    let sent = world.calls.len();
    let (op, _) = world.run(op, 30);
    assert_eq!(op.state, State::Succeeded);
    assert_eq!(
        world.calls.len(),
        sent + 2,
        "the lost one was not sent again"
    );
}

#[test]
fn a_grow_or_delete_in_flight_is_what_the_healer_waits_for() {
    let mut world = World::new(1);
    let op = world.pass(&cycle(Raw::default())).op;
    assert_eq!(write_in_flight(&op), Some(crate::incident::Call::Grow));
    let mut dry = op.clone();
    dry.dry_run = true;
    assert_eq!(write_in_flight(&dry), None, "a dry run sends nothing");
    // Once the surge has ended and the batch reimages, no write of the scale set runs.
    let op = world.pass(&op).op;
    assert_eq!(op.step, "batch 1", "{op:?}");
    assert_eq!(write_in_flight(&op), None);
}

#[test]
fn parameters_no_longer_readable_fail_the_operation_with_the_reason() {
    let mut world = World::new(2);
    let mut op = cycle(Raw::default());
    op.params = serde_json::json!({"batch": 3});
    let out = world.pass(&op);
    assert_eq!(out.op.state, State::Failed);
    assert!(out.op.last_error.unwrap().contains("incomplete"));
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Whatever the fleet and the parameters: every instance cycled exactly once, never fewer
    /// healthy than --min-healthy asks, the surge given back, the scale set its size again.
    #[test]
    fn never_below_min_healthy_and_every_instance_once(
        n in 1usize..30,
        batch in 1u32..=100,
        keep in 1u32..=100,
        sick in proptest::collection::vec(any::<bool>(), 30),
        surge in proptest::option::of(0u32..5),
    ) {
        let mut world = World::new(n);
        for (i, s) in sick.iter().take(n).enumerate() {
            if *s && i % 3 == 0 {
                world.vms.get_mut(&i.to_string()).unwrap().healthy = false;
            }
        }
        let batch_s = format!("{batch}%");
        let keep_s = format!("{keep}%");
        let surge_s = surge.map(|s| s.to_string());
        let raw = Raw {
            batch: Some(&batch_s),
            min_healthy: Some(&keep_s),
            max_surge: surge_s.as_deref(),
            ..Raw::default()
        };
        let params = parse(&raw).unwrap();
        let floor = params.min_healthy_of(n);
        let healthy_at_start = world.healthy_now();
        let (op, notes) = world.run(cycle(raw), 400);
        match op.state {
            State::Succeeded => {
                prop_assert_eq!(op.done as usize, n, "{:?}", notes);
                prop_assert!(world.touched.iter().filter(|(id, _)| id.parse::<usize>().unwrap() < n).all(|(_, t)| *t == 1));
                prop_assert_eq!(world.vms.len(), n, "the surge is given back");
            }
            // Only when even a surge cannot make room.
            State::Failed => prop_assert!(op.last_error.unwrap().contains("--min-healthy")),
            other => prop_assert!(false, "{:?}: {:?}", other, notes),
        }
        prop_assert!(world.lowest_healthy >= floor.min(healthy_at_start), "lowest {} floor {}", world.lowest_healthy, floor);
    }
}
