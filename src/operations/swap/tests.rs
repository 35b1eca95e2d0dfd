//! The swap against a small model of two scale sets and their autoscale settings: a capacity
//! change lands one pass later, new instances report UP the pass after (unless broken), an
//! autoscale write is synchronous.

use super::*;
use crate::heartbeat::{Origin, Status as Beat};
use crate::mirror::fixtures::instance;
use crate::operations::Kind;
use crate::verdict::Reason;
use proptest::prelude::*;
use serde_json::json;
use std::collections::BTreeMap;
use time::macros::datetime;

const T0: OffsetDateTime = datetime!(2026-12-01 10:00 UTC);
const PASS: Duration = Duration::seconds(60);

fn blue() -> ScaleSetId {
    ScaleSetId::new("sub", "rg", "blue")
}
fn green() -> ScaleSetId {
    ScaleSetId::new("sub", "rg", "green")
}

#[derive(Clone, Debug)]
struct Vm {
    up_after: Option<OffsetDateTime>,
    last_beat: OffsetDateTime,
}

#[derive(Default)]
struct Set {
    vms: BTreeMap<u64, Vm>,
    /// A capacity change in flight: (url, target).
    pending: Option<(String, u32)>,
    location: String,
}

struct World {
    sets: [Set; 2],
    next: u64,
    now: OffsetDateTime,
    statuses: HashMap<String, Status>,
    autoscale: Vec<AutoscaleSetting>,
    /// (side, what) of every call sent, in order.
    calls: Vec<(Side, String)>,
    brake: Option<String>,
    /// New instances of the new set never come up.
    broken: bool,
    /// Calls of this kind are refused: "capacity to", "capacity from", or an autoscale name.
    refuse: Option<String>,
    /// The fewest instances serving across both sets after any pass, and when the old set was
    /// first touched, with how many new instances were healthy then.
    lowest: usize,
    from_touched_with: Option<usize>,
    alerts: Vec<String>,
}

fn setting(name: &str, target: &ScaleSetId, enabled: bool, min: u32, max: u32) -> AutoscaleSetting {
    AutoscaleSetting::from_arm(json!({
        "id": format!("/subscriptions/sub/resourceGroups/rg/providers/microsoft.insights/autoscalesettings/{name}"),
        "name": name,
        "location": "westeurope",
        "properties": {"enabled": enabled, "targetResourceUri": target.resource_id(),
            "profiles": [{"name": "p", "capacity": {"minimum": min.to_string(), "maximum": max.to_string(), "default": min.to_string()}, "rules": []}]}
    }))
    .unwrap()
}

impl World {
    fn new(n: u64) -> Self {
        let mut from = Set {
            location: "westeurope".into(),
            ..Set::default()
        };
        for i in 0..n {
            from.vms.insert(
                i,
                Vm {
                    up_after: None,
                    last_beat: T0 - Duration::seconds(10),
                },
            );
        }
        World {
            sets: [
                from,
                Set {
                    location: "westeurope".into(),
                    ..Set::default()
                },
            ],
            next: 100,
            now: T0,
            statuses: HashMap::new(),
            autoscale: vec![setting("as-blue", &blue(), true, 2, 10)],
            calls: Vec::new(),
            brake: None,
            broken: false,
            refuse: None,
            lowest: n as usize,
            from_touched_with: None,
            alerts: Vec::new(),
        }
    }

    fn idx(side: Side) -> usize {
        match side {
            Side::From => 0,
            Side::To => 1,
        }
    }

    fn serving(&self, side: Side) -> usize {
        self.sets[Self::idx(side)]
            .vms
            .values()
            .filter(|v| v.up_after.is_none_or(|t| t <= self.now))
            .count()
    }

    fn mirror(&self, side: Side) -> Vec<MirroredInstance> {
        self.sets[Self::idx(side)]
            .vms
            .keys()
            .map(|id| MirroredInstance {
                instance: instance(&id.to_string()),
                synced_at: self.now,
            })
            .collect()
    }

    fn heartbeats(&self, side: Side) -> HashMap<String, Heartbeat> {
        let set = if side == Side::From { blue() } else { green() };
        self.sets[Self::idx(side)]
            .vms
            .iter()
            .map(|(id, v)| {
                (
                    id.to_string(),
                    Heartbeat {
                        target: set.instance(&id.to_string()),
                        status: Beat::Up,
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

    fn record(&self, side: Side) -> ScaleSetRecord {
        let mut r = ScaleSetRecord::unsynced();
        r.capacity = Some(self.sets[Self::idx(side)].vms.len() as i64);
        r.location = Some(self.sets[Self::idx(side)].location.clone());
        r
    }

    fn verdicts(&self, side: Side) -> HashMap<String, Verdict> {
        self.sets[Self::idx(side)]
            .vms
            .iter()
            .map(|(id, v)| {
                let verdict = match v.up_after {
                    Some(t) if t > self.now => Verdict::Starting,
                    _ if side == Side::To && self.broken => {
                        Verdict::Unhealthy(Reason::ReportedDown { since: T0 })
                    }
                    _ => Verdict::Healthy,
                };
                (id.to_string(), verdict)
            })
            .collect()
    }

    /// One pass: decide, send the call whose turn it is, then a minute of the world.
    fn pass(&mut self, op: &Operation) -> Advance {
        let (fm, tm) = (self.mirror(Side::From), self.mirror(Side::To));
        let (fh, th) = (self.heartbeats(Side::From), self.heartbeats(Side::To));
        let (fr, tr) = (self.record(Side::From), self.record(Side::To));
        let (fv, tv) = (self.verdicts(Side::From), self.verdicts(Side::To));
        let fv: HashMap<&str, Verdict> = fv.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let tv: HashMap<&str, Verdict> = tv.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        let view = View {
            from: SetView {
                record: Some(&fr),
                instances: &fm,
                heartbeats: &fh,
                verdicts: &fv,
                brake: self.brake.clone(),
            },
            to: Some(SetView {
                record: Some(&tr),
                instances: &tm,
                heartbeats: &th,
                verdicts: &tv,
                brake: None,
            }),
            autoscale: needs_autoscale(op).then(|| Ok(self.autoscale.clone())),
            statuses: &self.statuses,
            settle: Duration::seconds(180),
            dry_run: false,
        };
        let mut out = advance(op, &view, self.now);
        if let Some(a) = &out.alert {
            self.alerts.push(a.clone());
        }
        let mut memo = Memo::read(&out.op).unwrap();
        if let Some(i) = sendable(&memo) {
            let call = &mut memo.calls[i];
            let what = call.act.describe();
            let refused = self.refuse.as_deref().is_some_and(|r| what.contains(r));
            call.state = if refused {
                CallState::Failed {
                    error: format!("{what}: refused"),
                }
            } else {
                match &call.act {
                    Act::Capacity { side, capacity, .. } => {
                        if *side == Side::From && self.from_touched_with.is_none() {
                            self.from_touched_with = Some(self.serving(Side::To));
                        }
                        let url = format!("op-{}", self.calls.len());
                        self.statuses.insert(url.clone(), Status::Running);
                        self.sets[Self::idx(*side)].pending = Some((url.clone(), *capacity));
                        self.calls.push((*side, what));
                        CallState::Accepted {
                            at: self.now,
                            url: Some(url),
                            follow: Some("async_operation".into()),
                        }
                    }
                    Act::PutAutoscale { write } => {
                        let mut resource = write.body.clone();
                        resource["id"] = json!(format!("/subscriptions/{}/resourceGroups/{}/providers/microsoft.insights/autoscalesettings/{}", write.subscription, write.resource_group, write.name));
                        resource["name"] = json!(write.name);
                        let s = AutoscaleSetting::from_arm(resource).unwrap();
                        self.autoscale.retain(|a| a.name != s.name);
                        self.autoscale.push(s);
                        self.calls.push((Side::To, what));
                        CallState::Ended { at: self.now }
                    }
                    Act::DeleteAutoscale { name, .. } => {
                        self.autoscale.retain(|a| &a.name != name);
                        self.calls.push((Side::To, what));
                        CallState::Ended { at: self.now }
                    }
                }
            };
        }
        out.op.memo = serde_json::to_value(&memo).unwrap();
        // A minute passes: capacity changes land; new instances report UP a minute later.
        self.now += PASS;
        for side in [Side::From, Side::To] {
            let i = Self::idx(side);
            if let Some((url, target)) = self.sets[i].pending.take() {
                let target = target as usize;
                while self.sets[i].vms.len() < target {
                    self.sets[i].vms.insert(
                        self.next,
                        Vm {
                            up_after: Some(self.now + PASS),
                            last_beat: self.now - Duration::days(1),
                        },
                    );
                    self.next += 1;
                }
                while self.sets[i].vms.len() > target {
                    let last = *self.sets[i].vms.keys().next_back().unwrap();
                    self.sets[i].vms.remove(&last);
                }
                self.statuses
                    .insert(url, Status::Ended(self.now - Duration::seconds(20)));
            }
        }
        let (now, broken) = (self.now, self.broken);
        for (i, set) in self.sets.iter_mut().enumerate() {
            for v in set.vms.values_mut() {
                if !(broken && i == 1) && v.up_after.is_none_or(|t| t <= now + PASS) {
                    v.last_beat = now - Duration::seconds(5);
                }
            }
        }
        let serving = self.serving(Side::From) + self.serving(Side::To);
        self.lowest = self.lowest.min(serving);
        out
    }

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

fn swap(raw: Raw) -> Operation {
    let params = parse(&raw, &green()).unwrap();
    let mut op = Operation::new(
        Kind::Swap,
        blue(),
        serde_json::to_value(&params).unwrap(),
        "ops: v2".into(),
        raw.dry_run,
        T0,
    );
    op.partner = Some(green());
    op
}

fn soak(s: &str) -> Raw<'_> {
    Raw {
        soak: Some(s),
        timeout: Some("10m"),
        ..Raw::default()
    }
}

#[test]
fn parameters_are_read_with_every_problem_at_once() {
    let p = parse(&Raw::default(), &green()).unwrap();
    assert_eq!((p.soak_s, p.timeout_s, p.capacity), (300, 1800, None));
    assert_eq!(p.to_set(), Some(green()));
    let stored = Params::from_stored(&serde_json::to_value(&p).unwrap()).unwrap();
    assert_eq!(stored, p);
    let e = parse(
        &Raw {
            capacity: Some("0"),
            soak: Some("soon"),
            timeout: Some("0s"),
            dry_run: false,
        },
        &green(),
    )
    .unwrap_err();
    assert_eq!(e.len(), 3, "{e:?}");
    assert!(e[0].contains("--capacity") && e[1].contains("--soak") && e[2].contains("--timeout"));
}

#[test]
fn a_swap_scales_out_soaks_moves_autoscale_then_scales_in_never_below_the_start() {
    let mut w = World::new(4);
    let (op, notes) = w.run(swap(soak("3m")), 30);
    assert_eq!(op.state, State::Succeeded, "{notes:#?}");
    assert_eq!((w.sets[0].vms.len(), w.sets[1].vms.len()), (0, 4));
    assert!(w.lowest >= 4, "serving fell to {}", w.lowest);
    assert_eq!(
        w.from_touched_with,
        Some(4),
        "the old set is let go only with every new instance up"
    );
    let order: Vec<&str> = w.calls.iter().map(|(_, c)| c.as_str()).collect();
    assert_eq!(
        order,
        vec![
            "capacity of to to 4",
            "write autoscale setting green-autoscale",
            "write autoscale setting as-blue",
            "capacity of from to 0"
        ]
    );
    // Autoscale moved: the new set's setting has the old one's range, the old one is off.
    let green_setting = w.autoscale.iter().find(|a| a.targets(&green())).unwrap();
    assert_eq!(
        (green_setting.enabled, green_setting.range),
        (true, Some((2, 10)))
    );
    let blue_setting = w.autoscale.iter().find(|a| a.targets(&blue())).unwrap();
    assert!(!blue_setting.enabled);
    let outcomes: Vec<&str> = notes.iter().map(|n| n.outcome).collect();
    for o in [
        "started",
        "scaled_out",
        "healthy",
        "soaked",
        "autoscale_moved",
        "scale_in",
        "succeeded",
    ] {
        assert!(outcomes.contains(&o), "{o} missing: {outcomes:?}");
    }
    let soaked_at = outcomes.iter().position(|o| *o == "soaked").unwrap();
    let healthy_at = outcomes.iter().position(|o| *o == "healthy").unwrap();
    assert!(healthy_at < soaked_at);
    assert!(op.holds.is_empty() && op.partner_holds.is_empty());
    assert!(
        notes[0].evidence["from"][0]["name"] == "as-blue",
        "{:?}",
        notes[0].evidence
    );
    assert!(w.alerts.is_empty(), "{:?}", w.alerts);
}

#[test]
fn a_new_set_that_never_becomes_healthy_is_rolled_back_and_the_old_set_is_untouched() {
    let mut w = World::new(3);
    w.broken = true;
    let (op, notes) = w.run(swap(soak("1m")), 30);
    assert_eq!(op.state, State::Failed, "{notes:#?}");
    assert!(
        op.last_error.as_deref().unwrap().contains("rolled back"),
        "{op:?}"
    );
    assert_eq!((w.sets[0].vms.len(), w.sets[1].vms.len()), (3, 0));
    assert!(
        w.calls.iter().all(|(side, _)| *side == Side::To),
        "{:?}",
        w.calls
    );
    assert_eq!(w.from_touched_with, None);
    assert_eq!(w.autoscale.len(), 1, "nothing was moved");
    assert!(w.autoscale[0].enabled);
    assert_eq!(w.alerts.len(), 1, "{:?}", w.alerts);
    assert!(w.alerts[0].contains("rolled back"));
    assert!(op.partner_holds.is_empty());
}

#[test]
fn an_abort_under_way_rolls_the_swap_back_without_an_alert() {
    use crate::operations::Command;
    let mut undone = Vec::new();
    for k in 1..12 {
        let mut w = World::new(3);
        let (running, _) = w.run(swap(soak("3m")), k);
        if running.state.is_over() {
            break;
        }
        let stage = Memo::read(&running).unwrap().stage;
        let aborted = running.command(Command::Abort, T0).unwrap();
        if aborted.state != State::RollingBack {
            // Nothing to undo (not started), or the old set's scale-in is under way.
            assert!(
                matches!(stage, Stage::Preflight | Stage::ScaleIn),
                "{stage:?}"
            );
            continue;
        }
        let (op, notes) = w.run(aborted, 30);
        assert_eq!(op.state, State::Aborted, "{stage:?}: {notes:#?}");
        assert_eq!(
            (w.sets[0].vms.len(), w.sets[1].vms.len()),
            (3, 0),
            "{stage:?}: the new set back where it was, the old set untouched"
        );
        assert_eq!(w.from_touched_with, None, "{stage:?}");
        assert_eq!(w.autoscale.len(), 1, "{stage:?}: {:?}", w.autoscale);
        assert!(w.autoscale[0].enabled && w.autoscale[0].targets(&blue()));
        assert!(
            w.alerts.is_empty(),
            "an operator's own abort: {:?}",
            w.alerts
        );
        assert!(op.partner_holds.is_empty() && op.holds.is_empty());
        undone.push(stage);
    }
    for stage in [Stage::ScaleOut, Stage::Soak, Stage::Move] {
        assert!(
            undone.contains(&stage),
            "{stage:?} never aborted: {undone:?}"
        );
    }
}

#[test]
fn a_failed_autoscale_write_undoes_the_ones_before_and_rolls_back() {
    let mut w = World::new(2);
    w.refuse = Some("as-blue".into());
    let (op, notes) = w.run(swap(soak("0s")), 30);
    assert_eq!(op.state, State::Failed, "{notes:#?}");
    let order: Vec<&str> = w.calls.iter().map(|(_, c)| c.as_str()).collect();
    assert_eq!(
        order,
        vec![
            "capacity of to to 2",
            "write autoscale setting green-autoscale",
            "delete autoscale setting green-autoscale",
            "capacity of to to 0"
        ]
    );
    assert_eq!(w.autoscale.len(), 1);
    assert!(w.autoscale[0].enabled && w.autoscale[0].targets(&blue()));
    assert_eq!(w.sets[0].vms.len(), 2);
}

#[test]
fn a_refused_scale_in_fails_with_an_alert_and_no_rollback() {
    let mut w = World::new(2);
    w.refuse = Some("capacity of from".into());
    let (op, _) = w.run(swap(soak("0s")), 30);
    assert_eq!(op.state, State::Failed);
    assert_eq!(
        (w.sets[0].vms.len(), w.sets[1].vms.len()),
        (2, 2),
        "both serve"
    );
    assert!(
        w.alerts.last().unwrap().contains("the other way"),
        "{:?}",
        w.alerts
    );
}

#[test]
fn a_brake_holds_every_step_and_starts_the_soak_over() {
    let mut w = World::new(2);
    let mut op = swap(soak("5m"));
    for _ in 0..4 {
        op = w.pass(&op).op;
    }
    assert_eq!(op.step, "soak", "{op:?}");
    let sent = w.calls.len();
    w.brake = Some("pipeline fault".into());
    for _ in 0..10 {
        op = w.pass(&op).op;
    }
    assert_eq!(w.calls.len(), sent, "nothing sent under the brake");
    assert_eq!(Memo::read(&op).unwrap().healthy_since, None);
    assert!(op.waiting.as_deref().unwrap().contains("brake"));
    w.brake = None;
    let (op, _) = w.run(op, 30);
    assert_eq!(op.state, State::Succeeded);
}

type Setup = Box<dyn Fn(&mut World)>;

#[test]
fn the_preflight_refuses_what_a_swap_cannot_do_with_every_reason() {
    #[rustfmt::skip]
    let cases: Vec<(&str, Setup)> = vec![
        ("different regions", Box::new(|w: &mut World| w.sets[1].location = "northeurope".into())),
        ("is enabled", Box::new(|w: &mut World| w.autoscale.push(setting("as-green", &green(), true, 0, 5)))),
        ("2 autoscale settings", Box::new(|w: &mut World| w.autoscale.push(setting("as-blue-2", &blue(), false, 0, 5)))),
        ("the new set has 1 instances", Box::new(|w: &mut World| { w.sets[1].vms.insert(7, Vm { up_after: None, last_beat: T0 }); })),
        ("no instances", Box::new(|w: &mut World| w.sets[0].vms.clear())),
    ];
    for (why, setup) in cases {
        let mut w = World::new(2);
        setup(&mut w);
        let out = w.pass(&swap(soak("1m")));
        assert_eq!(out.op.state, State::Failed, "{why}");
        let error = out.op.last_error.clone().unwrap();
        assert!(error.contains(why), "{why}: {error}");
        assert!(w.calls.is_empty(), "{why}");
        assert!(out.alert.unwrap().contains("not started"));
    }
}

#[test]
fn a_new_set_at_the_capacity_already_is_only_soaked() {
    let mut w = World::new(2);
    for id in [50, 51] {
        w.sets[1].vms.insert(
            id,
            Vm {
                up_after: None,
                last_beat: T0,
            },
        );
    }
    let (op, _) = w.run(swap(soak("1m")), 30);
    assert_eq!(op.state, State::Succeeded);
    assert!(!w
        .calls
        .iter()
        .any(|(s, c)| *s == Side::To && c.starts_with("capacity")));
}

#[test]
fn a_dry_run_walks_every_step_and_calls_nothing() {
    let mut w = World::new(2);
    let mut op = swap(Raw {
        dry_run: true,
        ..soak("1m")
    });
    let mut notes = Vec::new();
    for _ in 0..10 {
        let out = {
            let fm = w.mirror(Side::From);
            let fh = w.heartbeats(Side::From);
            let fr = w.record(Side::From);
            let tr = w.record(Side::To);
            let fv: HashMap<&str, Verdict> = HashMap::new();
            let th = HashMap::new();
            let view = View {
                from: SetView {
                    record: Some(&fr),
                    instances: &fm,
                    heartbeats: &fh,
                    verdicts: &fv,
                    brake: None,
                },
                to: Some(SetView {
                    record: Some(&tr),
                    instances: &[],
                    heartbeats: &th,
                    verdicts: &fv,
                    brake: None,
                }),
                autoscale: None,
                statuses: &w.statuses,
                settle: Duration::seconds(180),
                dry_run: true,
            };
            advance(&op, &view, w.now)
        };
        notes.extend(out.notes);
        op = out.op;
        // The pass records a dry run's calls as taken.
        let mut memo = Memo::read(&op).unwrap();
        for c in memo
            .calls
            .iter_mut()
            .filter(|c| c.state == CallState::Unsent)
        {
            c.state = CallState::Accepted {
                at: w.now,
                url: None,
                follow: None,
            };
        }
        op.memo = serde_json::to_value(&memo).unwrap();
        w.now += PASS;
        if op.state.is_over() {
            break;
        }
    }
    assert_eq!(op.state, State::Succeeded, "{notes:#?}");
    let outcomes: Vec<&str> = notes.iter().map(|n| n.outcome).collect();
    assert!(
        outcomes.contains(&"scale_in") && outcomes.contains(&"autoscale_moved"),
        "{outcomes:?}"
    );
    assert_eq!(w.sets[0].vms.len(), 2, "nothing changed");
}

#[test]
fn a_swap_in_flight_blocks_the_healers_writes_on_the_set_it_scales() {
    let mut w = World::new(2);
    let op = w.pass(&swap(soak("1m"))).op;
    assert_eq!(
        write_in_flight(&op, &green()),
        Some(crate::incident::Call::Grow)
    );
    assert_eq!(write_in_flight(&op, &blue()), None);
    assert_eq!(
        write_in_flight(&op, &ScaleSetId::new("sub", "rg", "other")),
        None
    );
    assert_eq!(op.partner_holds, Vec::<String>::new(), "nothing there yet");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]
    /// Whatever the size, the soak, whether the new set comes up and when a brake holds: fewer
    /// instances never serve than at the start, and the old set is only let go with every new
    /// instance healthy.
    #[test]
    fn never_below_the_starting_capacity(
        n in 1u64..8,
        soak_min in 0u32..4,
        broken in any::<bool>(),
        brake_at in proptest::option::of(0usize..8),
    ) {
        let mut w = World::new(n);
        w.broken = broken;
        let soak = format!("{soak_min}m");
        let mut op = swap(Raw { soak: Some(&soak), timeout: Some("6m"), ..Raw::default() });
        for pass in 0..40 {
            w.brake = brake_at.filter(|b| (*b..*b + 3).contains(&pass)).map(|_| "brake".to_string());
            op = w.pass(&op).op;
            if op.state.is_over() { break; }
        }
        prop_assert!(op.state.is_over(), "{:?}", op);
        prop_assert!(w.lowest >= n as usize, "serving fell to {}", w.lowest);
        if let Some(up) = w.from_touched_with {
            prop_assert_eq!(up, n as usize);
        }
        prop_assert_eq!(op.state == State::Succeeded, !broken);
        if broken {
            prop_assert_eq!(w.sets[0].vms.len(), n as usize);
            prop_assert_eq!(w.sets[1].vms.len(), 0);
        }
    }
}

#[test]
fn the_journaled_autoscale_settings_carry_no_webhook_token() {
    let mut w = World::new(2);
    let mut a = w.autoscale[0].resource.clone();
    a["properties"]["notifications"] = json!([{"operation": "Scale", "webhooks": [
        {"serviceUri": "https://hooks.example.com/scale?code=s3cr3t-t0ken-value"}]}]);
    w.autoscale[0] = AutoscaleSetting::from_arm(a).unwrap();
    let out = w.pass(&swap(soak("1m")));
    let started = out.notes.iter().find(|n| n.outcome == "started").unwrap();
    let text = started.evidence.to_string();
    assert!(
        text.contains("hooks.example.com"),
        "the setting is kept: {text}"
    );
    assert!(!text.contains("s3cr3t-t0ken-value"), "{text}");
}
