use super::*;
use crate::compute::ArmError;
use crate::heartbeat::{Origin, Status};
use crate::incident::Call;
use crate::incident::{Hold, Incident, Phase, Stage, State, Versioned};
use crate::mirror::fixtures::instance;
use crate::policy::RepairAction::{self, *};
use crate::scaleset::ScaleSetId;
use crate::settings::Settings;
use proptest::prelude::*;
use std::collections::HashSet;
use time::macros::datetime;

const NOW: OffsetDateTime = datetime!(2026-11-22 12:00 UTC);
const BRAKES: Brakes = Brakes {
    mirror_max_age: Duration::seconds(300),
    full_resync: Duration::seconds(600),
    pipeline_fault: None,
    dry_run: false,
    lease: Duration::seconds(180),
};

fn secs(n: i64) -> Duration {
    Duration::seconds(n)
}

fn policy(overrides: &[(&str, &str)]) -> Policy {
    let overrides: Vec<(String, String)> = overrides
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Settings::from_lookup(|k| {
        if let Some((_, v)) = overrides.iter().find(|(name, _)| name == k) {
            return Some(v.clone());
        }
        match k {
            "HEALER_SCALE_SETS" => Some("/subscriptions/s/resourceGroups/r/providers/Microsoft.Compute/virtualMachineScaleSets/w".into()),
            "HEALER_STORAGE" => Some("UseDevelopmentStorage=true".into()),
            "HEALER_MAX_PARALLEL" => Some("100%".into()),
            "HEALER_MAX_UNHEALTHY" => Some("100%".into()),
            _ => None,
        }
    })
    .unwrap()
    .defaults
}

fn beat(id: &str, status: Status, age_s: i64) -> Heartbeat {
    let down_since = (status == Status::Down).then(|| NOW - secs(age_s.max(600)));
    Heartbeat {
        target: ScaleSetId::new("s", "r", "w").instance(id),
        status,
        event_time: NOW - secs(age_s),
        received_at: NOW - secs(age_s),
        sequence: None,
        vm_id: Some(format!("vm-{id}")),
        computer_name: None,
        detail: None,
        origin: Origin::Agent,
        event_id: "e".into(),
        down_since,
        attested: false,
        attestation: None,
    }
}

/// A fleet of `n` instances created a day ago, mirrored 30 s ago, each with a fresh UP heartbeat.
struct Fleet(Observation);

fn fleet(n: usize) -> Fleet {
    let mut obs = Observation {
        record: Some(ScaleSetRecord {
            synced_at: Some(NOW - secs(30)),
            capacity: Some(n as i64),
            ..ScaleSetRecord::unsynced()
        }),
        ..Observation::default()
    };
    for i in 0..n {
        let id = i.to_string();
        let mut inst = instance(&id);
        inst.created_at = Some(NOW - Duration::days(1));
        obs.instances.push(MirroredInstance {
            instance: inst,
            synced_at: NOW - Duration::days(1),
        });
        obs.heartbeats.insert(id.clone(), beat(&id, Status::Up, 10));
    }
    Fleet(obs)
}

impl Fleet {
    fn down(mut self, id: &str) -> Self {
        self.0
            .heartbeats
            .insert(id.into(), beat(id, Status::Down, 5));
        self
    }
    /// DRAINING until `in_s` from now (its scheduled event's NotBefore).
    fn draining(mut self, id: &str, in_s: i64) -> Self {
        self.0.heartbeats.insert(
            id.into(),
            beat(
                id,
                Status::Draining {
                    until: NOW + secs(in_s),
                },
                5,
            ),
        );
        self
    }
    /// DOWN from a legacy agent that proves only the computer name.
    fn name_only_down(mut self, id: &str) -> Self {
        let mut hb = beat(id, Status::Down, 5);
        hb.origin = crate::heartbeat::Origin::Prunella;
        self.0.heartbeats.insert(id.into(), hb);
        self
    }
    /// The instance was created `age_s` ago (within its startup timeout if under 600).
    fn created(mut self, id: &str, age_s: i64) -> Self {
        for m in &mut self.0.instances {
            if m.instance.instance_id == id {
                m.instance.created_at = Some(NOW - secs(age_s));
            }
        }
        self
    }
    fn up(mut self, id: &str, age_s: i64) -> Self {
        self.0
            .heartbeats
            .insert(id.into(), beat(id, Status::Up, age_s));
        self
    }
    fn protected(mut self, id: &str) -> Self {
        self.0
            .instances
            .iter_mut()
            .find(|m| m.instance.instance_id == id)
            .unwrap()
            .instance
            .protected_from_scale_set_actions = true;
        self
    }
    /// A long-running operation holds the instance.
    fn operation_writing(mut self, call: Call) -> Self {
        self.0.operation_write = Some(call);
        self
    }

    fn held(mut self, id: &str, operation: &str) -> Self {
        self.0.held.insert(id.into(), operation.into());
        self
    }
    /// A resource lock forbids deleting the instance (a Flexible VM).
    fn delete_locked(mut self, id: &str) -> Self {
        self.0
            .instances
            .iter_mut()
            .find(|m| m.instance.instance_id == id)
            .unwrap()
            .instance
            .delete_locked = true;
        self
    }
    fn power(mut self, id: &str, state: &str) -> Self {
        self.0
            .instances
            .iter_mut()
            .find(|m| m.instance.instance_id == id)
            .unwrap()
            .instance
            .power_state = Some(state.into());
        self
    }
    fn stopped(self, id: &str) -> Self {
        self.power(id, "stopped")
    }
    fn paused_by_operator(mut self) -> Self {
        let record = self.0.record.as_mut().unwrap();
        record.operator_pause = Some("deploying".into());
        record.operator_pause_since = Some(NOW - secs(60));
        self
    }
    /// The row's brake, as the last pass left it `ago_s` ago.
    fn braked(mut self, label: &str, ago_s: i64) -> Self {
        let record = self.0.record.as_mut().unwrap();
        record.brake = Some(label.into());
        record.brake_since = Some(NOW - secs(ago_s));
        self
    }
    fn changed(mut self, ago_s: i64) -> Self {
        self.0.record.as_mut().unwrap().changed_at = Some(NOW - secs(ago_s));
        self
    }
    fn gone(mut self, id: &str) -> Self {
        self.0.instances.retain(|m| m.instance.instance_id != id);
        self
    }
    /// An operation on the instance ended `ago_s` ago (its instance view's provisioning time).
    fn provisioned(mut self, id: &str, ago_s: i64) -> Self {
        for m in &mut self.0.instances {
            if m.instance.instance_id == id {
                m.instance.provisioned_at = Some(NOW - secs(ago_s));
            }
        }
        self
    }
    fn mirror_age(mut self, s: i64) -> Self {
        self.0.record.as_mut().unwrap().synced_at = Some(NOW - secs(s));
        self
    }
    fn never_synced(mut self) -> Self {
        self.0.record = None;
        self
    }
    fn throttled(mut self, for_s: i64) -> Self {
        self.0.record.as_mut().unwrap().throttled_until = Some(NOW + secs(for_s));
        self
    }
    fn platform_repairs(mut self) -> Self {
        self.0.record.as_mut().unwrap().platform_auto_repair = true;
        self
    }
    /// An incident for `id` whose current step (attempt `attempt`, `action`) began `ago_s` ago.
    fn repairing(mut self, id: &str, action: RepairAction, attempt: u32, ago_s: i64) -> Self {
        let mut inc = Incident::open(
            id,
            "reported_down",
            action,
            NOW - secs(ago_s),
            Duration::seconds(900),
        );
        inc.attempt = attempt;
        let inc = inc.accepted(None);
        self.0.incidents.insert(
            id.into(),
            Versioned {
                value: inc,
                version: format!("v-{id}"),
            },
        );
        self
    }
    /// Changes the incident of `id` (its phase, stage, error…).
    fn step(mut self, id: &str, change: impl FnOnce(&mut Incident)) -> Self {
        change(&mut self.0.incidents.get_mut(id).unwrap().value);
        self
    }
    /// An operation runs on the instance (`Updating`).
    fn updating(mut self, id: &str) -> Self {
        for m in &mut self.0.instances {
            if m.instance.instance_id == id {
                m.instance.provisioning_state = Some("Updating".into());
            }
        }
        self
    }
    fn deallocated(self, id: &str) -> Self {
        self.power(id, "deallocated")
    }
    fn incident_state(mut self, id: &str, state: State, ended_ago_s: i64) -> Self {
        let v = self.0.incidents.get_mut(id).unwrap();
        v.value.state = state;
        v.value.ended_at = Some(NOW - secs(ended_ago_s));
        self
    }
    fn decide(&self, overrides: &[(&str, &str)]) -> Plan {
        decide(&self.0, &policy(overrides), BRAKES, NOW)
    }
    fn decide_dry_run(&self, overrides: &[(&str, &str)]) -> Plan {
        decide(
            &self.0,
            &policy(overrides),
            Brakes {
                dry_run: true,
                ..BRAKES
            },
            NOW,
        )
    }
}

/// Terminate notifications (issue 16): a delete's step times out only after the instance's drain
/// window, and the journal's evidence says so; other actions are not delayed.
#[test]
fn a_delete_in_a_scale_set_with_terminate_notifications_waits_out_the_drain() {
    let mut f = fleet(4)
        .down("2")
        .repairing("3", Restart, 1, 1000)
        .down("3");
    f.0.record.as_mut().unwrap().terminate_notice = Some(secs(300));
    let overrides = [("HEALER_REPAIR_ACTIONS", "restart,delete")];
    let timeout = policy(&overrides).repair_timeout;
    let plan = f.decide(&overrides);
    let opened = plan
        .transitions
        .iter()
        .find(|t| t.incident.target == "2")
        .unwrap();
    assert_eq!(opened.action(), Some(Restart));
    assert_eq!(
        opened.incident.deadline,
        Some(NOW + timeout),
        "a restart is not delayed"
    );
    assert!(opened.evidence.get("drain").is_none());
    let escalated = plan
        .transitions
        .iter()
        .find(|t| t.incident.target == "3")
        .unwrap();
    assert_eq!(escalated.action(), Some(Delete));
    assert_eq!(escalated.incident.deadline, Some(NOW + timeout + secs(300)));
    assert!(
        escalated.evidence["drain"]
            .as_str()
            .unwrap()
            .contains("300 s"),
        "{}",
        escalated.evidence
    );
    let plan = f.decide(&[("HEALER_REPAIR_ACTIONS", "replace")]);
    let opened = plan
        .transitions
        .iter()
        .find(|t| t.incident.target == "2")
        .unwrap();
    assert_eq!(
        opened.incident.deadline,
        Some(NOW + policy(&[]).repair_timeout + secs(300)),
        "a replace deletes too"
    );
}

fn steps(plan: &Plan) -> Vec<(&str, &'static str, Option<RepairAction>, u32)> {
    plan.transitions
        .iter()
        .map(|t| {
            (
                t.incident.target.as_str(),
                t.step.label(),
                t.incident.action,
                t.incident.attempt,
            )
        })
        .collect()
}

fn withheld(plan: &Plan) -> Vec<(Option<&str>, &'static str)> {
    plan.withheld
        .iter()
        .map(|w| (w.instance_id.as_deref(), w.why.label()))
        .collect()
}

type Expect = (
    Vec<(&'static str, &'static str, Option<RepairAction>, u32)>,
    Vec<(Option<&'static str>, &'static str)>,
);
type Case = (
    &'static str,
    Fleet,
    &'static [(&'static str, &'static str)],
    Expect,
);

#[test]
fn decision_table() {
    let esc: &[(&str, &str)] = &[("HEALER_REPAIR_ACTIONS", "restart,reimage,replace")];
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        ("healthy fleet", fleet(4), &[], (vec![], vec![])),
        ("one DOWN opens an incident", fleet(4).down("2"), &[("HEALER_REPAIR_ACTIONS", "delete")], (vec![("2", "open", Some(Delete), 1)], vec![])),
        ("silent", fleet(4).up("1", 400), &[], (vec![("1", "open", Some(Replace), 1)], vec![])),
        ("protected", fleet(4).down("3").protected("3"), &[], (vec![], vec![(Some("3"), "protected")])),
        ("held by an operation: left to it", fleet(4).down("2").held("2", "cycle-1"), &[], (vec![], vec![(Some("2"), "held_by_operation")])),
        ("an operation's delete runs: the healer's surge waits for it", fleet(4).down("1").operation_writing(Call::Delete), &[], (vec![], vec![(Some("1"), "scale_set_busy")])),
        ("an operation's hold spares only what it holds", fleet(4).down("1").down("2").held("2", "cycle-1"), &[], (vec![("1", "open", Some(Replace), 1)], vec![(Some("2"), "held_by_operation")])),
        ("locked against deletion: no replace", fleet(4).down("3").delete_locked("3"), &[], (vec![], vec![(Some("3"), "delete_locked")])),
        ("locked against deletion: no delete", fleet(4).down("3").delete_locked("3"), &[("HEALER_REPAIR_ACTIONS", "delete")], (vec![], vec![(Some("3"), "delete_locked")])),
        ("locked against deletion: a restart still goes", fleet(4).down("3").delete_locked("3"), esc, (vec![("3", "open", Some(Restart), 1)], vec![])),
        ("locked against deletion: no escalation to replace", fleet(4).down("2").delete_locked("2").repairing("2", Reimage, 2, 1000), esc, (vec![], vec![(Some("2"), "delete_locked")])),
        ("in flight", fleet(4).up("2", 400).repairing("2", Restart, 1, 60), esc, (vec![], vec![(Some("2"), "repair_in_flight")])),
        ("DOWN within the grace after a repair is not acted on", fleet(4).down("2").repairing("2", Restart, 1, 60), esc, (vec![], vec![])),
        ("timed out: escalate restart → reimage", fleet(4).down("2").repairing("2", Restart, 1, 1000), esc, (vec![("2", "escalate", Some(Reimage), 2)], vec![])),
        ("timed out again: reimage → replace", fleet(4).down("2").repairing("2", Reimage, 2, 1000), esc, (vec![("2", "escalate", Some(Replace), 3)], vec![])),
        ("timed out, but draining before a platform event: no escalation meanwhile", fleet(4).draining("2", 120).repairing("2", Restart, 1, 1000), esc, (vec![], vec![])),
        ("a draining instance is never a fault", fleet(4).draining("2", -60), esc, (vec![], vec![])),
        ("last attempt timed out: give up", fleet(4).down("2").repairing("2", Replace, 3, 1000), esc, (vec![("2", "given_up", Some(Replace), 3)], vec![])),
        ("given up stays given up", fleet(4).down("2").repairing("2", Replace, 3, 2000).incident_state("2", State::GivenUp, 900), esc, (vec![], vec![(Some("2"), "given_up")])),
        ("given up, then healthy: closed", fleet(4).repairing("2", Replace, 3, 2000).incident_state("2", State::GivenUp, 900), esc, (vec![("2", "recovered", Some(Replace), 3)], vec![])),
        ("removed after delete", fleet(4).gone("2").repairing("2", Delete, 1, 60), &[], (vec![("2", "removed", Some(Delete), 1)], vec![])),
        ("recovered after restart", fleet(4).up("2", 5).repairing("2", Restart, 1, 60), esc, (vec![("2", "recovered", Some(Restart), 1)], vec![])),
        ("cool-down after a closed incident", fleet(4).down("2").repairing("2", Restart, 1, 400).incident_state("2", State::Closed, 100), esc, (vec![], vec![(Some("2"), "cooldown")])),
        ("after the cool-down a new incident", fleet(4).down("2").repairing("2", Restart, 1, 4000).incident_state("2", State::Closed, 3000), esc, (vec![("2", "open", Some(Restart), 1)], vec![])),
        ("max parallel", fleet(10).down("1").down("2").down("3"), &[("HEALER_MAX_PARALLEL", "2")], (vec![("1", "open", Some(Replace), 1), ("2", "open", Some(Replace), 1)], vec![(Some("3"), "max_parallel")])),
        ("max parallel counts running incidents", fleet(10).up("1", 400).down("2").repairing("1", Restart, 1, 60), &[("HEALER_MAX_PARALLEL", "1"), ("HEALER_REPAIR_ACTIONS", "restart")], (vec![], vec![(Some("1"), "repair_in_flight"), (Some("2"), "max_parallel")])),
        ("too many unhealthy: short-circuit", fleet(5).down("0").down("1").down("2"), &[("HEALER_MAX_UNHEALTHY", "40%")], (vec![], vec![(None, "too_many_unhealthy")])),
        ("instances an operation holds are out on purpose: no short-circuit", fleet(5).down("0").down("1").down("2").held("1", "cycle-1").held("2", "cycle-1"), &[("HEALER_MAX_UNHEALTHY", "40%")], (vec![("0", "open", Some(Replace), 1)], vec![(Some("1"), "held_by_operation"), (Some("2"), "held_by_operation")])),
        ("at the unhealthy limit still heals", fleet(5).down("0").down("1"), &[("HEALER_MAX_UNHEALTHY", "40%")], (vec![("0", "open", Some(Replace), 1), ("1", "open", Some(Replace), 1)], vec![])),
        // A set-wide pause on the fleet's evidence settles for HEALER_HEARTBEAT_TIMEOUT (180 s)
        // once its evidence clears: the instances not yet reported again are not repaired.
        ("a mass DOWN clears: the set settles, the stragglers wait", fleet(5).down("0").braked("too_many_unhealthy", 300), &[("HEALER_MAX_UNHEALTHY", "40%")], (vec![], vec![(None, "settling")])),
        ("a pipeline fault clears: the set settles", fleet(4).up("1", 600).braked("pipeline_fault", 300), &[], (vec![], vec![(None, "settling")])),
        ("settling, not yet a heartbeat timeout", fleet(5).down("0").braked("settling", 179), &[], (vec![], vec![(None, "settling")])),
        ("settled: what is still DOWN is repaired", fleet(5).down("0").braked("settling", 180), &[], (vec![("0", "open", Some(Replace), 1)], vec![])),
        ("settling, and over the limit again: paused again", fleet(5).down("0").down("1").down("2").braked("settling", 30), &[("HEALER_MAX_UNHEALTHY", "40%")], (vec![], vec![(None, "too_many_unhealthy")])),
        ("a mass DOWN clears and the set is whole: it resumes at once", fleet(5).braked("too_many_unhealthy", 300), &[], (vec![], vec![])),
        ("settling, and the set is whole: it resumes", fleet(5).braked("settling", 30), &[], (vec![], vec![])),
        ("other pauses end at once", fleet(4).down("1").braked("stale_mirror", 300), &[], (vec![("1", "open", Some(Replace), 1)], vec![])),
        ("outcomes are recorded even while paused", fleet(5).down("0").down("1").down("2").gone("4").repairing("4", Delete, 1, 60), &[("HEALER_MAX_UNHEALTHY", "1")], (vec![("4", "removed", Some(Delete), 1)], vec![(None, "too_many_unhealthy")])),
        ("quiet mirror within the full resync: heartbeats are acted on", fleet(4).down("1").mirror_age(800), &[], (vec![("1", "open", Some(Replace), 1)], vec![])),
        ("mirror not read for full resync + max age", fleet(4).down("1").mirror_age(901), &[], (vec![], vec![(None, "stale_mirror")])),
        ("announced change mirrored late", fleet(4).down("1").mirror_age(400).changed(301), &[], (vec![], vec![(None, "stale_mirror")])),
        ("announced change, the mirror has time to catch up", fleet(4).down("1").mirror_age(400).changed(60), &[], (vec![("1", "open", Some(Replace), 1)], vec![])),
        ("change before the last read is mirrored", fleet(4).down("1").mirror_age(100).changed(500), &[], (vec![("1", "open", Some(Replace), 1)], vec![])),
        ("stopped, on a current mirror", fleet(4).stopped("1"), &[], (vec![("1", "open", Some(Replace), 1)], vec![])),
        ("stopped, on an old mirror: confirm first", fleet(4).stopped("1").mirror_age(301), &[], (vec![], vec![(Some("1"), "awaiting_resync")])),
        ("a DOWN proven by a name only is no evidence: the VM never proved it reported", fleet(4).name_only_down("1").created("1", 60), &[], (vec![], vec![])),
        ("unless names are accepted as proof", fleet(4).name_only_down("1"), &[("HEALER_DOWN_PROOF", "name")], (vec![("1", "open", Some(Replace), 1)], vec![])),
        ("paused by an operator", fleet(4).down("1").paused_by_operator(), &[], (vec![], vec![(None, "paused_by_operator")])),
        ("paused by an operator: outcomes still recorded", fleet(4).gone("2").repairing("2", Delete, 1, 60).paused_by_operator(), &[], (vec![("2", "removed", Some(Delete), 1)], vec![(None, "paused_by_operator")])),
        ("never mirrored", fleet(4).down("1").never_synced(), &[], (vec![], vec![(None, "no_mirror")])),
        ("platform repairs on: defer", fleet(4).down("1").platform_repairs(), &[], (vec![], vec![(None, "platform_repairs")])),
        ("throttled: no repair until Retry-After passes", fleet(4).down("1").throttled(60), &[], (vec![], vec![(None, "throttled")])),
        ("throttle expired", fleet(4).down("1").throttled(-1), &[], (vec![("1", "open", Some(Replace), 1)], vec![])),
        ("platform repairs on: act", fleet(4).down("1").platform_repairs(), &[("HEALER_PLATFORM_REPAIRS", "act")], (vec![("1", "open", Some(Replace), 1)], vec![])),
    ];
    for (name, f, overrides, (want_steps, want_withheld)) in cases {
        let plan = f.decide(overrides);
        assert_eq!(steps(&plan), want_steps, "{name}: transitions");
        assert_eq!(withheld(&plan), want_withheld, "{name}: withheld");
    }
}

fn preempted() -> ArmError {
    ArmError {
        status: 200,
        code: "OperationPreempted".into(),
        message: "Operation execution has been preempted by a more recent operation.".into(),
    }
}

fn failed(i: &mut Incident) {
    *i = i.failed(preempted(), NOW - secs(10));
}

fn pending(hold: Hold) -> impl FnOnce(&mut Incident) {
    move |i: &mut Incident| *i = i.pending(hold, None)
}

fn sending(i: &mut Incident) {
    i.phase = Phase::Sending;
}

/// Claimed to be sent `ago_s` ago and never answered, found not to have landed `unanswered` times.
fn lost(ago_s: i64, unanswered: u32) -> impl FnOnce(&mut Incident) {
    move |i: &mut Incident| {
        i.phase = Phase::Sending;
        i.sent_at = Some(NOW - secs(ago_s));
        i.unanswered = unanswered;
    }
}

/// The step's operation succeeded `ago_s` ago, in stage `stage`.
fn succeeded(stage: Stage, ago_s: i64) -> impl FnOnce(&mut Incident) {
    move |i: &mut Incident| {
        i.stage = stage;
        *i = i.succeeded(NOW - secs(ago_s));
    }
}

fn in_stage(stage: Stage, phase: Phase) -> impl FnOnce(&mut Incident) {
    move |i: &mut Incident| {
        i.stage = stage;
        i.phase = phase;
        i.operation = Some(crate::compute::OperationRef {
            url: "https://management.azure.com/subscriptions/s/providers/Microsoft.Compute/locations/x/operations/1".into(),
            kind: crate::compute::OperationKind::AsyncOperation,
        });
    }
}

fn dry(i: &mut Incident) {
    i.dry_run = true;
}

/// What the incidents' steps do next: followed operations, resends, the stages of a replace, the
/// writes kept apart, and dry run kept apart from live.
#[test]
fn steps_are_followed_to_their_end() {
    let esc: &[(&str, &str)] = &[("HEALER_REPAIR_ACTIONS", "restart,reimage,replace")];
    let restart: &[(&str, &str)] = &[("HEALER_REPAIR_ACTIONS", "restart")];
    #[rustfmt::skip]
    let cases: Vec<Case> = vec![
        ("a failed step escalates at once, before its deadline", fleet(4).down("2").repairing("2", Restart, 1, 60).step("2", failed), esc, (vec![("2", "escalate", Some(Reimage), 2)], vec![])),
        ("a failed last step gives up", fleet(4).down("2").repairing("2", Replace, 3, 60).step("2", failed), esc, (vec![("2", "given_up", Some(Replace), 3)], vec![])),
        ("a busy step is sent again, as the same attempt", fleet(4).down("2").repairing("2", Restart, 1, 60).step("2", pending(Hold::Busy)), esc, (vec![("2", "resend", Some(Restart), 1)], vec![])),
        ("a pending step past its deadline is spent", fleet(4).down("2").repairing("2", Restart, 1, 1000).step("2", pending(Hold::Busy)), esc, (vec![("2", "escalate", Some(Reimage), 2)], vec![])),
        ("a step whose answer was lost is never sent again", fleet(4).up("2", 400).repairing("2", Restart, 1, 60).step("2", sending), esc, (vec![], vec![(Some("2"), "repair_in_flight")])),
        // Issue 12 items 4-5: a call whose claiming pass is over (the lease: 180 s here) and whose
        // answer never came is found out from the instance, read by the mirror after that pass.
        ("a lost answer, no operation on the instance since: sent again, same attempt", fleet(4).down("2").repairing("2", Restart, 1, 300).step("2", lost(300, 0)), esc, (vec![("2", "resend", Some(Restart), 1)], vec![])),
        ("… the claiming pass may still run: wait", fleet(4).down("2").repairing("2", Restart, 1, 100).step("2", lost(100, 0)), esc, (vec![], vec![])),
        ("… the mirror not read since that pass: wait", fleet(4).down("2").mirror_age(200).repairing("2", Restart, 1, 300).step("2", lost(300, 0)), esc, (vec![], vec![(Some("2"), "repair_in_flight")])),
        ("… an operation ended on the instance since: it landed, wait", fleet(4).down("2").provisioned("2", 100).repairing("2", Restart, 1, 300).step("2", lost(300, 0)), esc, (vec![], vec![(Some("2"), "repair_in_flight")])),
        ("… one still runs on it: wait", fleet(4).down("2").updating("2").repairing("2", Restart, 1, 300).step("2", lost(300, 0)), esc, (vec![], vec![])),
        ("… lost again and not landed: the attempt is spent", fleet(4).down("2").repairing("2", Restart, 1, 300).step("2", lost(300, 1)), esc, (vec![("2", "escalate", Some(Reimage), 2)], vec![])),
        ("… even with every parallel slot taken by it", fleet(4).down("2").repairing("2", Restart, 1, 300).step("2", lost(300, 1)), &[("HEALER_REPAIR_ACTIONS", "restart,reimage"), ("HEALER_MAX_PARALLEL", "1")], (vec![("2", "escalate", Some(Reimage), 2)], vec![])),
        ("… on the last attempt: give up", fleet(4).down("2").repairing("2", Restart, 3, 300).step("2", lost(300, 1)), restart, (vec![("2", "given_up", Some(Restart), 3)], vec![])),
        ("… a grow cannot be told from another's: its deadline decides", fleet(4).down("2").repairing("2", Replace, 1, 300).step("2", lost(300, 0)), &[], (vec![], vec![(Some("2"), "repair_in_flight")])),
        ("a delete-first whose answer was lost, target gone: it landed, restore", fleet(4).gone("1").repairing("1", Replace, 1, 60).step("1", in_stage(Stage::DeleteFirst, Phase::Sending)), &[], (vec![("1", "advance", Some(Replace), 1)], vec![])),
        ("a stopped instance is started, not restarted", fleet(4).deallocated("1"), restart, (vec![("1", "open", Some(Start), 1)], vec![])),
        ("an escalation to restart starts a stopped instance", fleet(4).deallocated("1").repairing("1", Restart, 1, 1000), restart, (vec![("1", "escalate", Some(Start), 2)], vec![])),
        ("replace surges first", fleet(4).down("1"), &[], (vec![("1", "open", Some(Replace), 1)], vec![])),
        ("surge done, new instance not mirrored yet: wait", fleet(4).up("1", 400).repairing("1", Replace, 1, 60).step("1", succeeded(Stage::Surge, 20)), &[], (vec![], vec![(Some("1"), "repair_in_flight")])),
        ("surge done and mirrored: delete", fleet(4).down("1").repairing("1", Replace, 1, 60).step("1", succeeded(Stage::Surge, 40)), &[], (vec![("1", "advance", Some(Replace), 1)], vec![])),
        ("a healthy heartbeat during our delete does not close it as recovered", fleet(4).repairing("1", Replace, 1, 60).step("1", in_stage(Stage::Delete, Phase::Running)), &[], (vec![], vec![])),
        ("deleted first: restore the capacity once the delete succeeded", fleet(4).gone("1").repairing("1", Replace, 1, 60).step("1", succeeded(Stage::DeleteFirst, 40)), &[], (vec![("1", "advance", Some(Replace), 1)], vec![])),
        ("gone while our surge runs: the incident waits for the surge to end", fleet(4).gone("1").repairing("1", Replace, 1, 60).step("1", in_stage(Stage::Surge, Phase::Running)), &[], (vec![], vec![])),
        ("gone, surge ended: closed", fleet(4).gone("1").repairing("1", Replace, 1, 60).step("1", succeeded(Stage::Surge, 40)), &[], (vec![("1", "removed", Some(Replace), 1)], vec![])),
        ("deleted first, still deleting: wait", fleet(4).gone("1").repairing("1", Replace, 1, 60).step("1", in_stage(Stage::DeleteFirst, Phase::Running)), &[], (vec![], vec![])),
        ("restored: replaced", fleet(4).gone("1").repairing("1", Replace, 1, 60).step("1", succeeded(Stage::Restore, 40)), &[], (vec![("1", "removed", Some(Replace), 1)], vec![])),
        ("a grow waits while our delete runs", fleet(4).down("1").down("2").repairing("1", Replace, 1, 60).step("1", in_stage(Stage::Delete, Phase::Running)), &[], (vec![], vec![(Some("2"), "scale_set_busy")])),
        ("a delete and a grow due together: the delete goes first", fleet(4).down("1").down("2").repairing("1", Replace, 1, 60).step("1", succeeded(Stage::Surge, 40)), &[], (vec![("1", "advance", Some(Replace), 1)], vec![(Some("2"), "scale_set_busy")])),
        ("instance actions go alongside a running delete", fleet(4).down("1").down("2").repairing("1", Delete, 1, 60), &[("HEALER_REPAIR_ACTIONS", "restart,delete")], (vec![("2", "open", Some(Restart), 1)], vec![])),
        ("deletes split from a refused batch go one per pass", fleet(4).down("1").down("2").repairing("1", Delete, 1, 60).repairing("2", Delete, 1, 60).step("1", pending(Hold::Alone)).step("2", pending(Hold::Alone)), &[("HEALER_REPAIR_ACTIONS", "delete")], (vec![("1", "resend", Some(Delete), 1)], vec![(Some("2"), "scale_set_busy")])),
        ("restarts split from a refused batch all go", fleet(4).down("1").down("2").repairing("1", Restart, 1, 60).repairing("2", Restart, 1, 60).step("1", pending(Hold::Alone)).step("2", pending(Hold::Alone)), restart, (vec![("1", "resend", Some(Restart), 1), ("2", "resend", Some(Restart), 1)], vec![])),
        ("a target protected mid-replace is not deleted", fleet(4).down("1").protected("1").repairing("1", Replace, 1, 60).step("1", succeeded(Stage::Surge, 40)), &[], (vec![], vec![(Some("1"), "protected")])),
        ("a live pass does not see what a dry run decided", fleet(4).down("1").repairing("1", Restart, 2, 60).step("1", dry), esc, (vec![("1", "open", Some(Restart), 1)], vec![])),
        ("nor the cool-down of a dry-run incident", fleet(4).down("1").repairing("1", Restart, 1, 400).incident_state("1", State::Closed, 100).step("1", dry), esc, (vec![("1", "open", Some(Restart), 1)], vec![])),
        ("brakes hold resends too", fleet(4).down("2").repairing("2", Restart, 1, 60).step("2", pending(Hold::Busy)).throttled(60), esc, (vec![], vec![(None, "throttled")])),
    ];
    for (name, f, overrides, (want_steps, want_withheld)) in cases {
        let plan = f.decide(overrides);
        assert_eq!(steps(&plan), want_steps, "{name}: transitions");
        assert_eq!(withheld(&plan), want_withheld, "{name}: withheld");
    }
    let plan = fleet(4)
        .down("1")
        .repairing("1", Restart, 1, 1000)
        .decide_dry_run(esc);
    assert_eq!(
        (steps(&plan), withheld(&plan)),
        (vec![], vec![(Some("1"), "dry_run_holds")]),
        "a dry run leaves a live incident's next step to a live pass"
    );
    let plan = fleet(4).down("1").decide_dry_run(esc);
    assert!(
        plan.transitions[0].incident.dry_run,
        "a dry run marks what it decides"
    );
}

#[test]
fn claims_carry_the_version_read_and_the_previous_row() {
    let plan = fleet(3)
        .down("1")
        .repairing("1", Restart, 1, 1000)
        .decide(&[("HEALER_REPAIR_ACTIONS", "restart,replace")]);
    let t = &plan.transitions[0];
    assert_eq!(t.claim.as_deref(), Some("v-1"));
    assert_eq!(t.previous.as_ref().map(|p| p.attempt), Some(1));
    let plan = fleet(3).down("2").decide(&[]);
    assert_eq!(
        (
            plan.transitions[0].claim.as_deref(),
            plan.transitions[0].previous.is_none()
        ),
        (None, true),
        "a new incident is inserted"
    );
}

#[test]
fn a_fleet_wide_silence_is_a_pipeline_fault() {
    let p = policy(&[]);
    let mut a = fleet(4);
    let mut b = fleet(4);
    for id in ["0", "1", "2"] {
        a = a.up(id, 400);
        b = b.up(id, 400);
    }
    let fault = pipeline_fault(&[(&a.0, &p), (&b.0, &p)], NOW);
    assert_eq!(
        fault,
        Some(PipelineFault {
            silent: 6,
            reporting: 8
        })
    );
    let plan = decide(
        &a.0,
        &p,
        Brakes {
            pipeline_fault: fault,
            ..BRAKES
        },
        NOW,
    );
    assert!(plan.transitions.is_empty());
    assert_eq!(withheld(&plan), vec![(None, "pipeline_fault")]);

    // Half silent is not "most"; a single silent VM is a VM problem.
    let half = fleet(4).up("0", 400).up("1", 400);
    assert_eq!(pipeline_fault(&[(&half.0, &p)], NOW), None);
    let one = fleet(1).up("0", 400);
    assert_eq!(pipeline_fault(&[(&one.0, &p)], NOW), None);
}

#[test]
fn the_next_check_is_the_nearest_deadline() {
    let plan = fleet(3).up("1", 170).decide(&[]);
    assert_eq!(
        plan.next_check,
        Some(secs(11)),
        "heartbeat timeout 180 s - 170 s + 1 s"
    );
    assert_eq!((plan.healthy, plan.unhealthy, plan.total), (3, 0, 3));
}

#[derive(Debug, Clone)]
enum Beat {
    None,
    Up(i64),
    Down,
}

#[derive(Debug, Clone)]
struct Spec {
    beat: Beat,
    protected: bool,
    gone: bool,
    stopped: bool,
    /// (action step index, attempt, started ago, state, phase, replace stage, dry run)
    incident: Option<(usize, u32, i64, u8, u8, u8, bool)>,
}

fn arb_spec() -> impl Strategy<Value = Spec> {
    (
        prop_oneof![
            Just(Beat::None),
            (0i64..1000).prop_map(Beat::Up),
            Just(Beat::Down)
        ],
        any::<bool>(),
        prop::bool::weighted(0.1),
        prop::bool::weighted(0.1),
        proptest::option::of((
            0usize..3,
            1u32..4,
            0i64..3000,
            0u8..3,
            0u8..6,
            0u8..4,
            prop::bool::weighted(0.2),
        )),
    )
        .prop_map(|(beat, protected, gone, stopped, incident)| Spec {
            beat,
            protected,
            gone,
            stopped,
            incident,
        })
}

const PHASES: [Phase; 5] = [
    Phase::Pending,
    Phase::Sending,
    Phase::Running,
    Phase::Succeeded,
    Phase::Failed,
];

proptest! {
    #[test]
    fn safety_invariants_hold_for_any_fleet_and_history(
        specs in proptest::collection::vec(arb_spec(), 0..40),
        mirror_age in 0i64..1200,
        changed_ago in proptest::option::of(0i64..1200),
        max_parallel in 1u32..6,
        max_unhealthy in 1u32..100,
        silent_fleet in any::<bool>(),
        dry_run in prop::bool::weighted(0.2),
        last_brake in proptest::option::of((0usize..4, 0i64..400)),
    ) {
        let mut f = fleet(specs.len()).mirror_age(mirror_age);
        if let Some(ago) = changed_ago { f = f.changed(ago); }
        let labels = ["pipeline_fault", "too_many_unhealthy", "settling", "stale_mirror"];
        if let Some((label, ago)) = last_brake { f = f.braked(labels[label], ago); }
        let actions = [Restart, Reimage, Replace];
        for (i, s) in specs.iter().enumerate() {
            let id = i.to_string();
            f = match s.beat {
                Beat::None => { f.0.heartbeats.remove(&id); f }
                Beat::Up(age) => f.up(&id, age),
                Beat::Down => f.down(&id),
            };
            if s.protected { f = f.protected(&id); }
            if s.stopped { f = f.stopped(&id); }
            if let Some((step, attempt, ago, state, phase, stage, dry)) = s.incident {
                f = f.repairing(&id, actions[step], attempt, ago);
                f = f.step(&id, |inc| {
                    inc.dry_run = dry;
                    if phase == 5 {
                        *inc = inc.pending(Hold::Alone, None);
                    } else {
                        inc.phase = PHASES[phase as usize];
                    }
                    if inc.phase == Phase::Pending && inc.hold.is_none() {
                        inc.hold = Some(Hold::Busy);
                    }
                    if inc.action == Some(Replace) {
                        inc.stage = [Stage::Surge, Stage::Delete, Stage::DeleteFirst, Stage::Restore][stage as usize];
                        inc.settled_at = (inc.phase == Phase::Succeeded).then(|| NOW - Duration::seconds(ago / 2));
                    }
                });
                match state {
                    1 => f = f.incident_state(&id, State::GivenUp, ago / 2),
                    2 => f = f.incident_state(&id, State::Closed, ago / 2),
                    _ => {}
                }
            }
            if s.gone { f = f.gone(&id); }
        }
        let p = policy(&[
            ("HEALER_REPAIR_ACTIONS", "restart,reimage,replace"),
            ("HEALER_MAX_PARALLEL", &max_parallel.to_string()),
            ("HEALER_MAX_UNHEALTHY", &max_unhealthy.to_string()),
        ]);
        let brakes = Brakes {
            pipeline_fault: silent_fleet.then_some(PipelineFault { silent: 9, reporting: 10 }),
            dry_run,
            ..BRAKES
        };
        let plan = decide(&f.0, &p, brakes, NOW);
        let visible = visible(&f.0, dry_run);

        // Never two transitions of one instance in a pass.
        let mut seen = HashSet::new();
        for t in &plan.transitions {
            prop_assert!(seen.insert(t.incident.target.clone()), "two transitions for {}", t.incident.target);
        }
        let acting: Vec<&Transition> = plan.transitions.iter().filter(|t| t.step.acts()).collect();
        // Rules 1 and 2: nothing starts on a stale mirror (not read for the full resync + the
        // maximum age, or an announced change not mirrored within the maximum age), under a
        // pipeline fault or a short-circuit.
        let behind = changed_ago.is_some_and(|c| c <= mirror_age && c > 300);
        if mirror_age > 900 || behind || silent_fleet || plan.unhealthy as u32 > max_unhealthy {
            prop_assert!(acting.is_empty());
            prop_assert!(plan.paused().is_some());
        }
        // Rule 2, once the pause's evidence clears: while instances still look unhealthy, the set
        // settles for HEALER_HEARTBEAT_TIMEOUT (180 s here) before anything acts.
        let settling = last_brake.is_some_and(|(label, ago)| label < 2 || (label == 2 && ago < 180));
        if settling && plan.unhealthy > 0 {
            prop_assert!(acting.is_empty(), "acted while the set settles");
            prop_assert!(plan.paused().is_some());
        }
        // Rule 3: never more repairs in flight than allowed when one is started.
        let still_running = visible.values()
            .filter(|v| v.value.in_flight(NOW) && !plan.transitions.iter().any(|t| t.incident.target == v.value.target))
            .count();
        prop_assert!(!acting.iter().any(|t| t.step.starts()) || still_running + acting.len() <= max_parallel as usize,
            "{} running + {} acting > {}", still_running, acting.len(), max_parallel);
        // Our writes to the scale set never overlap: one kind per pass, none while one runs, and a
        // delete split from its batch goes alone.
        let writes: Vec<&&Transition> = acting.iter().filter(|t| matches!(t.call(), Some(Call::Grow | Call::Delete))).collect();
        let kinds: HashSet<Option<Call>> = writes.iter().map(|t| t.call()).collect();
        prop_assert!(kinds.len() <= 1, "two kinds of write in one pass: {:?}", kinds);
        if writes.iter().any(|t| t.alone()) {
            prop_assert!(writes.len() == 1, "a split delete shares its pass");
        }
        let write_running = visible.values().any(|v| {
            !v.value.dry_run && v.value.call_in_flight() && !v.value.timed_out(NOW)
                && matches!(v.value.call(), Some(Call::Grow | Call::Delete))
                && !plan.transitions.iter().any(|t| t.incident.target == v.value.target)
        });
        prop_assert!(!write_running || writes.is_empty(), "a write sent while ours runs");
        for t in &acting {
            let m = f.0.instances.iter().find(|m| m.instance.instance_id == t.incident.target);
            if t.call() != Some(Call::Grow) {
                // Rule 4: protected instances are never acted on; only present instances are.
                prop_assert!(m.is_some_and(|m| !m.instance.protected_from_scale_set_actions));
            }
            // A stopped instance is never restarted.
            if t.call() == Some(Call::Restart) {
                prop_assert!(m.is_some_and(|m| m.instance.power_state.as_deref() != Some("stopped")));
            }
            // Mirror evidence is only acted on when the mirror is current.
            if t.step == Step::Open {
                prop_assert!(mirror_age <= 300 || !t.reason.as_ref().is_some_and(|r| r.from_mirror()));
            }
            // Attempts never exceed the limit, and each step follows the escalation list, as the
            // instance's state allows it.
            prop_assert!(t.incident.attempt <= p.max_attempts);
            if t.step.starts() {
                let power = m.and_then(|m| m.instance.power_state.as_deref());
                prop_assert_eq!(t.incident.action, Some(p.repair_actions.step(t.incident.attempt as usize - 1).for_power_state(power)));
            }
            // A dry run marks what it decides; a live pass never continues a dry run's incident,
            // and a dry run never continues a live one.
            prop_assert_eq!(t.incident.dry_run, dry_run);
            if let Some(prev) = &t.previous {
                prop_assert!(t.step == Step::Open || prev.dry_run == dry_run);
                match t.step {
                    // Only a target without a running step is started on.
                    Step::Open | Step::Escalate => prop_assert!(!prev.in_flight(NOW) || prev.dry_run != dry_run || prev.state != State::Repairing),
                    // Sent again: ARM did not take it, or (once) its answer was lost and a mirror
                    // read after the claiming pass shows no operation on the instance since.
                    Step::Resend if prev.phase == Phase::Sending => {
                        let sent = prev.sent_at.or(prev.step_started).unwrap_or(NOW);
                        prop_assert!(NOW - sent > BRAKES.lease);
                        prop_assert!(NOW - Duration::seconds(mirror_age) > sent + BRAKES.lease);
                        prop_assert_eq!(prev.unanswered, 0);
                        prop_assert!(m.is_some_and(|m| m.instance.provisioned_at.is_none_or(|t| t < sent)));
                    }
                    Step::Resend => prop_assert_eq!(prev.phase, Phase::Pending),
                    // A delete-first whose answer was lost landed once its target is gone.
                    Step::Advance => prop_assert!(prev.phase == Phase::Succeeded
                        || (prev.phase == Phase::Sending && prev.stage == Stage::DeleteFirst && m.is_none())),
                    _ => {}
                }
                if t.step == Step::Open && prev.dry_run && !dry_run {
                    prop_assert_eq!(t.incident.attempt, 1);
                }
            }
        }
        // Rule 5: every unhealthy instance is accounted for — acted on, withheld, or under a pause.
        if plan.paused().is_none() {
            for m in &f.0.instances {
                let id = &m.instance.instance_id;
                let hb = f.0.heartbeats.get(id);
                let last_repair = visible.get(id.as_str()).and_then(|v| v.value.step_started);
                let v = judge(&m.instance, hb, History { first_seen: m.synced_at, last_repair }, &p, NOW);
                if v.is_unhealthy() {
                    let accounted = plan.transitions.iter().any(|t| &t.incident.target == id)
                        || plan.withheld.iter().any(|w| w.instance_id.as_ref() == Some(id))
                        || visible.get(id.as_str()).is_some_and(|i| i.value.state == State::Repairing);
                    prop_assert!(accounted, "unhealthy {} neither acted on nor withheld", id);
                }
            }
        }
    }
}

#[test]
fn what_the_next_mirror_pass_must_show() {
    let esc: &[(&str, &str)] = &[("HEALER_REPAIR_ACTIONS", "restart,reimage,replace")];
    #[rustfmt::skip]
    let cases: Vec<(&str, Fleet, Option<&str>)> = vec![
        ("healthy: the full resync will do", fleet(4), None),
        ("a repair is started", fleet(4).down("1"), Some("repair_started")),
        ("a repair is in flight", fleet(4).up("2", 400).repairing("2", Restart, 1, 60), Some("repair_in_flight")),
        ("mirror evidence is confirmed before acting", fleet(4).stopped("1").mirror_age(301), Some("confirm_mirror_evidence")),
        ("mirror evidence on a protected instance is not", fleet(4).stopped("1").protected("1").mirror_age(301), None),
        ("a given-up instance is not", fleet(4).down("2").stopped("2").repairing("2", Replace, 3, 2000).incident_state("2", State::GivenUp, 900), None),
        ("heartbeat evidence needs no read", fleet(4).down("1").protected("1"), None),
        ("paused sets still ask", fleet(4).stopped("1").mirror_age(400).changed(350), Some("confirm_mirror_evidence")),
    ];
    for (name, f, want) in cases {
        assert_eq!(f.decide(esc).resync.map(|r| r.label()), want, "{name}");
    }
}

/// A case of the stateful table: name, fleet, (transitions, withheld) wanted.
type StatefulCase = (
    &'static str,
    Fleet,
    (
        Vec<(&'static str, &'static str, Option<RepairAction>, u32)>,
        Vec<(Option<&'static str>, &'static str)>,
    ),
);

/// A stateful set's policy (`STATEFUL_DISKS=0`, everything in bounds).
fn stateful_policy() -> Policy {
    Settings::from_lookup(|k| match k {
        "HEALER_SCALE_SETS" => Some("/subscriptions/s/resourceGroups/r/providers/Microsoft.Compute/virtualMachineScaleSets/w[STATEFUL_DISKS=0 MAX_PARALLEL=100% MAX_UNHEALTHY=100%]".into()),
        "HEALER_STORAGE" => Some("UseDevelopmentStorage=true".into()),
        _ => None,
    })
    .unwrap()
    .scale_sets[0]
    .policy
    .clone()
}

/// On a stateful set (issue 18) a replace is the stateful replacement's: the incident starts
/// it, waits while it holds the instance whatever the deadline, closes once the instance is gone
/// after it replaced it, and escalates with its error when it failed.
#[test]
fn a_stateful_replace_is_handed_to_the_stateful_replacement() {
    use crate::operations::carry::Outcome;
    let policy = stateful_policy();
    let decide_on = |f: &Fleet| decide(&f.0, &policy, BRAKES, NOW);
    let carry = |i: &mut Incident| {
        i.stage = Stage::Carry;
        i.phase = Phase::Running;
    };
    let held = |mut f: Fleet| {
        f.0.held.insert("1".into(), "carry-1".into());
        f
    };
    let carried = |mut f: Fleet, outcome: Outcome| {
        f.0.carried.insert("1".into(), outcome);
        f
    };
    // The escalation keeps the disks first; replace is its last step, handed over for an
    // instance a slot names.
    let slotted = |mut f: Fleet| {
        f.0.slotted.insert("1".into());
        f
    };
    let plan = decide_on(&slotted(fleet(4).down("1")));
    assert_eq!(steps(&plan), vec![("1", "open", Some(Restart), 1)]);
    let plan = decide_on(&slotted(
        fleet(4).down("1").repairing("1", Reimage, 2, 1000),
    ));
    assert_eq!(steps(&plan), vec![("1", "escalate", Some(Replace), 3)]);
    assert_eq!(plan.transitions[0].incident.stage, Stage::Carry);
    assert_eq!(plan.transitions[0].call(), Some(Call::Carry));
    // One no slot names (it never had the slot's disks) has nothing to carry: a plain replace,
    // not a stateful replacement that would refuse it and leave the incident to give up.
    let plan = decide_on(&fleet(4).down("1").repairing("1", Reimage, 2, 1000));
    assert_eq!(steps(&plan), vec![("1", "escalate", Some(Replace), 3)]);
    assert_eq!(plan.transitions[0].incident.stage, Stage::Surge);
    assert_eq!(plan.transitions[0].call(), Some(Call::Grow));
    #[rustfmt::skip]
    let cases: Vec<StatefulCase> = vec![
        ("held: it waits, past its deadline too", held(fleet(4).down("1").repairing("1", Replace, 3, 5000).step("1", carry)), (vec![], vec![])),
        ("replaced, not yet mirrored gone: it waits", carried(fleet(4).up("1", 5).repairing("1", Replace, 3, 5000).step("1", carry), Outcome::Replaced), (vec![], vec![])),
        ("replaced and gone: closed as replaced", carried(fleet(4).gone("1").repairing("1", Replace, 3, 60).step("1", carry), Outcome::Replaced), (vec![("1", "removed", Some(Replace), 3)], vec![])),
        ("failed on its last attempt: given up", carried(fleet(4).down("1").repairing("1", Replace, 3, 60).step("1", carry), Outcome::Failed("attach: HTTP 409 X".into())), (vec![("1", "given_up", Some(Replace), 3)], vec![])),
        ("a healthy heartbeat meanwhile does not close it", held(fleet(4).repairing("1", Replace, 3, 60).step("1", carry)), (vec![], vec![])),
        ("another operation held the set: sent again", fleet(4).down("1").repairing("1", Replace, 3, 60).step("1", |i| { carry(i); i.phase = Phase::Pending; i.hold = Some(Hold::Busy); }), (vec![("1", "resend", Some(Replace), 3)], vec![])),
    ];
    for (name, f, (want_steps, want_withheld)) in cases {
        let plan = decide_on(&f);
        assert_eq!(steps(&plan), want_steps, "{name}: transitions");
        assert_eq!(withheld(&plan), want_withheld, "{name}: withheld");
    }
    // A failure before the last attempt escalates, with the replacement's error as evidence.
    let policy4 = Policy {
        max_attempts: 4,
        ..policy.clone()
    };
    let f = carried(
        slotted(
            fleet(4)
                .down("1")
                .repairing("1", Replace, 3, 60)
                .step("1", carry),
        ),
        Outcome::Failed("attach: HTTP 409 AttachDiskWhileBeingDetached".into()),
    );
    let plan = decide(&f.0, &policy4, BRAKES, NOW);
    assert_eq!(steps(&plan), vec![("1", "escalate", Some(Replace), 4)]);
    assert!(plan.transitions[0].evidence["carry_error"]
        .as_str()
        .unwrap()
        .contains("AttachDiskWhileBeingDetached"));
    assert_eq!(plan.transitions[0].incident.stage, Stage::Carry);
}
