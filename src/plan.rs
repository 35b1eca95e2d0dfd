//! `decide`: one scale set's observation + policy + now → a plan. Synchronous, no I/O, no clock,
//! no logging; the caller acts on the plan and journals every line of it.

use crate::heartbeat::Heartbeat;
use crate::journal::{Entry, EntryKind};
use crate::mirror::{MirroredInstance, ScaleSetRecord};
use crate::policy::{Policy, RepairAction};
use crate::verdict::{judge, recheck_in, Reason, Verdict};
use serde::Serialize;
use std::collections::HashMap;
use time::{Duration, OffsetDateTime};

/// Everything `decide` may look at for one scale set, read from the tables.
#[derive(Debug, Clone)]
pub struct Observation {
    pub record: Option<ScaleSetRecord>,
    pub instances: Vec<MirroredInstance>,
    pub heartbeats: HashMap<String, Heartbeat>,
    /// Recent journal rows of the scale set (at least the last `repair_timeout`), newest first.
    pub journal: Vec<Entry>,
}

/// Settings that are global rather than per scale set.
#[derive(Debug, Clone, Copy)]
pub struct Brakes {
    pub mirror_max_age: Duration,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub repairs: Vec<PlannedRepair>,
    pub withheld: Vec<Withheld>,
    /// Earlier repairs whose effect is now visible.
    pub outcomes: Vec<Outcome>,
    pub healthy: usize,
    /// When something could next change by the clock alone.
    pub next_check: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlannedRepair {
    pub instance_id: String,
    pub incident: String,
    pub action: RepairAction,
    pub attempt: u32,
    pub reason: Reason,
    pub evidence: serde_json::Value,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Withheld {
    /// `None` when the whole scale set is withheld.
    pub instance_id: Option<String>,
    pub why: WithheldReason,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "why", rename_all = "snake_case")]
pub enum WithheldReason {
    /// The scale set has never been mirrored.
    NoMirror,
    /// The mirror is older than `HEALER_MIRROR_MAX_AGE`.
    StaleMirror { age_seconds: i64, max_seconds: i64 },
    /// The instance is protected from scale set actions.
    Protected { reason: Reason },
    /// A repair of this instance is already in flight.
    RepairInFlight {
        #[serde(with = "time::serde::rfc3339")]
        since: OffsetDateTime,
        incident: String,
    },
}

impl WithheldReason {
    pub fn label(&self) -> &'static str {
        match self {
            WithheldReason::NoMirror => "no_mirror",
            WithheldReason::StaleMirror { .. } => "stale_mirror",
            WithheldReason::Protected { .. } => "protected",
            WithheldReason::RepairInFlight { .. } => "repair_in_flight",
        }
    }

    pub fn describe(&self) -> String {
        match self {
            WithheldReason::NoMirror => "the scale set has not been mirrored yet".into(),
            WithheldReason::StaleMirror { age_seconds, max_seconds } => format!(
                "the mirror is {age_seconds} s old, older than HEALER_MIRROR_MAX_AGE ({max_seconds} s)"
            ),
            WithheldReason::Protected { reason } => format!(
                "{} but the instance is protected from scale set actions",
                reason.describe()
            ),
            WithheldReason::RepairInFlight { incident, .. } => {
                format!("repair of incident {incident} is still in flight")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Outcome {
    pub instance_id: String,
    pub incident: String,
    pub action: RepairAction,
    pub attempt: u32,
    pub result: OutcomeResult,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeResult {
    /// The instance is gone from the mirror after a delete or replace.
    Removed,
    /// The instance is healthy again after a restart or reimage.
    Recovered,
    /// The repair did not take effect within `HEALER_REPAIR_TIMEOUT`.
    TimedOut,
}

impl OutcomeResult {
    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeResult::Removed => "removed",
            OutcomeResult::Recovered => "recovered",
            OutcomeResult::TimedOut => "timed_out",
        }
    }
}

/// The repair whose outcome is not yet known, per instance.
fn open_repairs(journal: &[Entry]) -> HashMap<&str, &Entry> {
    let mut closed: HashMap<&str, ()> = HashMap::new();
    let mut open = HashMap::new();
    // Newest first: an outcome seen before its repair closes that incident.
    for e in journal {
        match e.kind {
            EntryKind::Outcome => {
                closed.insert(e.incident.as_str(), ());
            }
            EntryKind::Repair
                if (e.outcome == "requested" || e.outcome == "dry_run")
                    && !closed.contains_key(e.incident.as_str()) =>
            {
                open.entry(e.instance_id.as_str()).or_insert(e);
            }
            _ => {}
        }
    }
    open
}

pub fn decide(obs: &Observation, policy: &Policy, brakes: Brakes, now: OffsetDateTime) -> Plan {
    let mut plan = Plan {
        repairs: Vec::new(),
        withheld: Vec::new(),
        outcomes: Vec::new(),
        healthy: 0,
        next_check: None,
    };
    let open = open_repairs(&obs.journal);

    // Outcomes first: they only read the mirror, and are true whatever the brakes say.
    let present: HashMap<&str, &MirroredInstance> = obs
        .instances
        .iter()
        .map(|m| (m.instance.instance_id.as_str(), m))
        .collect();
    let synced_at = obs.record.as_ref().and_then(|r| r.synced_at);
    for (instance_id, repair) in &open {
        let Some(action) = repair.action else {
            continue;
        };
        let gone = !present.contains_key(instance_id) && synced_at.is_some_and(|s| s > repair.at);
        let recovered = !action.removes_instance()
            && present.get(instance_id).is_some_and(|m| {
                let hb = obs.heartbeats.get(*instance_id);
                hb.is_some_and(|hb| hb.event_time > repair.at)
                    && judge(&m.instance, hb, m.synced_at, policy, now) == Verdict::Healthy
            });
        let result = if gone && action.removes_instance() {
            Some(OutcomeResult::Removed)
        } else if recovered {
            Some(OutcomeResult::Recovered)
        } else if now - repair.at > policy.repair_timeout {
            Some(OutcomeResult::TimedOut)
        } else {
            None
        };
        if let Some(result) = result {
            plan.outcomes.push(Outcome {
                instance_id: instance_id.to_string(),
                incident: repair.incident.clone(),
                action,
                attempt: repair.attempt,
                result,
            });
        }
    }
    plan.outcomes
        .sort_by(|a, b| a.instance_id.cmp(&b.instance_id));

    let Some(synced_at) = synced_at else {
        plan.withheld.push(Withheld {
            instance_id: None,
            why: WithheldReason::NoMirror,
        });
        return plan;
    };
    let age = now - synced_at;
    if age > brakes.mirror_max_age {
        plan.withheld.push(Withheld {
            instance_id: None,
            why: WithheldReason::StaleMirror {
                age_seconds: age.whole_seconds(),
                max_seconds: brakes.mirror_max_age.whole_seconds(),
            },
        });
        return plan;
    }

    let mut next: Option<Duration> = None;
    for m in &obs.instances {
        let inst = &m.instance;
        let hb = obs.heartbeats.get(&inst.instance_id);
        let verdict = judge(inst, hb, m.synced_at, policy, now);
        if let Some(d) = recheck_in(
            &verdict,
            hb,
            inst.created_at.unwrap_or(m.synced_at),
            policy,
            now,
        ) {
            next = Some(next.map_or(d, |n| n.min(d)));
        }
        let Verdict::Unhealthy(reason) = verdict else {
            if verdict == Verdict::Healthy {
                plan.healthy += 1;
            }
            continue;
        };
        if let Some(repair) = open.get(inst.instance_id.as_str()) {
            let timed_out = plan.outcomes.iter().any(|o| o.incident == repair.incident);
            if !timed_out {
                plan.withheld.push(Withheld {
                    instance_id: Some(inst.instance_id.clone()),
                    why: WithheldReason::RepairInFlight {
                        since: repair.at,
                        incident: repair.incident.clone(),
                    },
                });
                continue;
            }
        }
        if inst.protected_from_scale_set_actions {
            plan.withheld.push(Withheld {
                instance_id: Some(inst.instance_id.clone()),
                why: WithheldReason::Protected { reason },
            });
            continue;
        }
        let (incident, attempt) = match open.get(inst.instance_id.as_str()) {
            Some(prev) => (prev.incident.clone(), prev.attempt + 1),
            None => (crate::journal::incident_id(&inst.instance_id, now), 1),
        };
        plan.repairs.push(PlannedRepair {
            evidence: serde_json::json!({
                "verdict": &reason,
                "heartbeat": hb,
                "instance": inst,
            }),
            instance_id: inst.instance_id.clone(),
            incident,
            action: policy.repair_actions.step(attempt as usize - 1),
            attempt,
            reason,
        });
    }
    plan.next_check = next;
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heartbeat::{Origin, Status};
    use crate::mirror::fixtures::instance;
    use crate::scaleset::ScaleSetId;
    use crate::settings::Settings;
    use proptest::prelude::*;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-22 12:00 UTC);
    const BRAKES: Brakes = Brakes {
        mirror_max_age: Duration::seconds(300),
    };

    fn policy(actions: &str) -> Policy {
        let mut p = Settings::from_lookup(|k| match k {
            "HEALER_SCALE_SETS" => Some("/subscriptions/s/resourceGroups/r/providers/Microsoft.Compute/virtualMachineScaleSets/w".into()),
            "HEALER_STORAGE" => Some("UseDevelopmentStorage=true".into()),
            _ => None,
        })
        .unwrap()
        .defaults;
        p.repair_actions = actions.parse().unwrap();
        p
    }

    fn set() -> ScaleSetId {
        ScaleSetId::new("s", "r", "w")
    }

    /// A fleet of `n` instances, mirrored 30 s ago, each with an UP heartbeat 10 s old.
    struct Fleet(Observation);

    fn fleet(n: usize) -> Fleet {
        let mut obs = Observation {
            record: Some(ScaleSetRecord {
                synced_at: Some(NOW - Duration::seconds(30)),
                ..ScaleSetRecord::unsynced()
            }),
            instances: Vec::new(),
            heartbeats: HashMap::new(),
            journal: Vec::new(),
        };
        for i in 0..n {
            let id = i.to_string();
            obs.instances.push(MirroredInstance {
                instance: instance(&id),
                synced_at: NOW - Duration::hours(2),
            });
            obs.heartbeats.insert(id.clone(), beat(&id, Status::Up, 10));
        }
        Fleet(obs)
    }

    fn beat(id: &str, status: Status, age_s: i64) -> Heartbeat {
        Heartbeat {
            target: set().instance(id),
            status,
            event_time: NOW - Duration::seconds(age_s),
            received_at: NOW - Duration::seconds(age_s),
            sequence: None,
            vm_id: Some(format!("vm-{id}")),
            computer_name: None,
            detail: None,
            origin: Origin::Agent,
            event_id: "e".into(),
            down_since: None,
        }
    }

    impl Fleet {
        fn down(mut self, id: &str) -> Self {
            self.0
                .heartbeats
                .insert(id.into(), beat(id, Status::Down, 5));
            self
        }
        fn up_at(mut self, id: &str, age_s: i64) -> Self {
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
        fn gone(mut self, id: &str) -> Self {
            self.0.instances.retain(|m| m.instance.instance_id != id);
            self
        }
        fn mirror_age(mut self, secs: i64) -> Self {
            self.0.record.as_mut().unwrap().synced_at = Some(NOW - Duration::seconds(secs));
            self
        }
        fn never_synced(mut self) -> Self {
            self.0.record = None;
            self
        }
        fn repaired(mut self, id: &str, action: RepairAction, ago_s: i64, outcome: &str) -> Self {
            self.0.journal.push(Entry {
                scale_set: set(),
                instance_id: id.into(),
                at: NOW - Duration::seconds(ago_s),
                incident: format!("{id}-inc"),
                kind: EntryKind::Repair,
                action: Some(action),
                attempt: 1,
                outcome: outcome.into(),
                reason: String::new(),
                evidence: serde_json::Value::Null,
                dry_run: false,
            });
            self
        }
        fn decide(&self, actions: &str) -> Plan {
            decide(&self.0, &policy(actions), BRAKES, NOW)
        }
    }

    fn repaired(plan: &Plan) -> Vec<(&str, RepairAction, u32)> {
        plan.repairs
            .iter()
            .map(|r| (r.instance_id.as_str(), r.action, r.attempt))
            .collect()
    }

    fn withheld(plan: &Plan) -> Vec<(Option<&str>, &'static str)> {
        plan.withheld
            .iter()
            .map(|w| (w.instance_id.as_deref(), w.why.label()))
            .collect()
    }

    fn outcomes(plan: &Plan) -> Vec<(&str, OutcomeResult)> {
        plan.outcomes
            .iter()
            .map(|o| (o.instance_id.as_str(), o.result))
            .collect()
    }

    use RepairAction::*;

    #[test]
    fn decision_table() {
        struct Case {
            name: &'static str,
            fleet: Fleet,
            actions: &'static str,
            repairs: Vec<(&'static str, RepairAction, u32)>,
            withheld: Vec<(Option<&'static str>, &'static str)>,
            outcomes: Vec<(&'static str, OutcomeResult)>,
        }
        let cases = vec![
            Case {
                name: "healthy fleet",
                fleet: fleet(4),
                actions: "delete",
                repairs: vec![],
                withheld: vec![],
                outcomes: vec![],
            },
            Case {
                name: "one DOWN",
                fleet: fleet(4).down("2"),
                actions: "delete",
                repairs: vec![("2", Delete, 1)],
                withheld: vec![],
                outcomes: vec![],
            },
            Case {
                name: "one silent",
                fleet: fleet(4).up_at("1", 400),
                actions: "replace",
                repairs: vec![("1", Replace, 1)],
                withheld: vec![],
                outcomes: vec![],
            },
            Case {
                name: "protected",
                fleet: fleet(4).down("3").protected("3"),
                actions: "delete",
                repairs: vec![],
                withheld: vec![(Some("3"), "protected")],
                outcomes: vec![],
            },
            Case {
                name: "repair in flight",
                fleet: fleet(4).down("2").repaired("2", Restart, 60, "requested"),
                actions: "restart,replace",
                repairs: vec![],
                withheld: vec![(Some("2"), "repair_in_flight")],
                outcomes: vec![],
            },
            Case {
                name: "repair timed out escalates",
                fleet: fleet(4).down("2").repaired("2", Restart, 1000, "requested"),
                actions: "restart,replace",
                repairs: vec![("2", Replace, 2)],
                withheld: vec![],
                outcomes: vec![("2", OutcomeResult::TimedOut)],
            },
            Case {
                name: "deleted instance is gone",
                fleet: fleet(4).gone("2").repaired("2", Delete, 60, "requested"),
                actions: "delete",
                repairs: vec![],
                withheld: vec![],
                outcomes: vec![("2", OutcomeResult::Removed)],
            },
            Case {
                name: "restart recovered",
                fleet: fleet(4)
                    .up_at("2", 5)
                    .repaired("2", Restart, 60, "requested"),
                actions: "restart",
                repairs: vec![],
                withheld: vec![],
                outcomes: vec![("2", OutcomeResult::Recovered)],
            },
            Case {
                name: "throttled repair is decided again",
                fleet: fleet(4).down("2").repaired("2", Delete, 60, "throttled"),
                actions: "delete",
                repairs: vec![("2", Delete, 1)],
                withheld: vec![],
                outcomes: vec![],
            },
            Case {
                name: "stale mirror",
                fleet: fleet(4).down("1").mirror_age(301),
                actions: "delete",
                repairs: vec![],
                withheld: vec![(None, "stale_mirror")],
                outcomes: vec![],
            },
            Case {
                name: "never mirrored",
                fleet: fleet(4).down("1").never_synced(),
                actions: "delete",
                repairs: vec![],
                withheld: vec![(None, "no_mirror")],
                outcomes: vec![],
            },
        ];
        for c in cases {
            let plan = c.fleet.decide(c.actions);
            assert_eq!(repaired(&plan), c.repairs, "{}: repairs", c.name);
            assert_eq!(withheld(&plan), c.withheld, "{}: withheld", c.name);
            assert_eq!(outcomes(&plan), c.outcomes, "{}: outcomes", c.name);
        }
    }

    #[test]
    fn the_next_check_is_the_nearest_deadline() {
        let plan = fleet(3).up_at("1", 170).decide("delete");
        assert_eq!(
            plan.next_check,
            Some(Duration::seconds(11)),
            "heartbeat timeout 180 s - 170 s + 1 s"
        );
        assert_eq!(plan.healthy, 3);
    }

    #[derive(Debug, Clone)]
    enum Beat {
        None,
        Up(i64),
        Down,
    }

    fn arb_instance() -> impl Strategy<Value = (Beat, bool, Option<(i64, bool)>)> {
        (
            prop_oneof![
                Just(Beat::None),
                (0i64..1000).prop_map(Beat::Up),
                Just(Beat::Down)
            ],
            any::<bool>(),
            proptest::option::of((0i64..2000, any::<bool>())),
        )
    }

    proptest! {
        #[test]
        fn repairs_only_target_unhealthy_unprotected_idle_instances(
            fleet_spec in proptest::collection::vec(arb_instance(), 0..40),
            mirror_age in 0i64..600,
        ) {
            let mut f = fleet(fleet_spec.len()).mirror_age(mirror_age);
            for (i, (b, protected, repair)) in fleet_spec.iter().enumerate() {
                let id = i.to_string();
                f = match b {
                    Beat::None => { f.0.heartbeats.remove(&id); f }
                    Beat::Up(age) => f.up_at(&id, *age),
                    Beat::Down => f.down(&id),
                };
                if *protected { f = f.protected(&id); }
                if let Some((ago, done)) = repair {
                    f = f.repaired(&id, Restart, *ago, if *done { "throttled" } else { "requested" });
                }
            }
            let p = policy("restart,replace");
            let plan = decide(&f.0, &p, BRAKES, NOW);
            if mirror_age > 300 {
                prop_assert!(plan.repairs.is_empty());
            }
            let mut seen = std::collections::HashSet::new();
            for r in &plan.repairs {
                prop_assert!(seen.insert(r.instance_id.clone()), "repaired twice: {}", r.instance_id);
                let m = f.0.instances.iter().find(|m| m.instance.instance_id == r.instance_id).unwrap();
                prop_assert!(!m.instance.protected_from_scale_set_actions);
                let v = judge(&m.instance, f.0.heartbeats.get(&r.instance_id), m.synced_at, &p, NOW);
                prop_assert!(matches!(v, Verdict::Unhealthy(_)), "{:?}", v);
                let (_, _, repair) = &fleet_spec[r.instance_id.parse::<usize>().unwrap()];
                if let Some((ago, false)) = repair {
                    prop_assert!(*ago > p.repair_timeout.whole_seconds(), "a repair in flight was repeated");
                }
            }
            let instance_rows = plan.withheld.iter().filter(|w| w.instance_id.is_some()).count();
            prop_assert!(plan.repairs.len() + instance_rows + plan.healthy <= fleet_spec.len());
        }
    }
}
