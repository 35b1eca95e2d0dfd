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
            EntryKind::Repair if e.outcome == "requested" || e.outcome == "dry_run" => {
                if !closed.contains_key(e.incident.as_str()) {
                    open.entry(e.instance_id.as_str()).or_insert(e);
                }
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
        let result = if gone && action.removes_instance() {
            Some(OutcomeResult::Removed)
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
