//! `decide`: one scale set's observation + policy + brakes + now → a plan. Synchronous, no I/O, no
//! clock, no logging; the caller claims each transition, acts, and journals every line of the plan.
//!
//! Order of reasoning: what became of running incidents (always true, whatever the brakes say);
//! then the scale-set brakes; then, per instance, whether to open or escalate an incident, up to
//! the parallel limit.

use crate::heartbeat::Heartbeat;
use crate::incident::{Incident, Resolution, State, Versioned};
use crate::journal::stamp;
use crate::mirror::{MirroredInstance, ScaleSetRecord};
use crate::policy::{PlatformRepairs, Policy, RepairAction};
use crate::verdict::{judge, recheck_in, History, Reason, Verdict};
use serde::Serialize;
use std::collections::HashMap;
use time::{Duration, OffsetDateTime};

/// Everything `decide` may look at for one scale set, read from the tables.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    pub record: Option<ScaleSetRecord>,
    pub instances: Vec<MirroredInstance>,
    pub heartbeats: HashMap<String, Heartbeat>,
    /// The incident row of each instance that has one, with its version (the claim token).
    pub incidents: HashMap<String, Versioned<Incident>>,
}

/// Brakes that are global rather than per scale set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Brakes {
    pub mirror_max_age: Duration,
    /// `HEALER_FULL_RESYNC`: a quiet scale set's mirror is only re-read this often.
    pub full_resync: Duration,
    /// Set when most of the fleet fell silent at once (see [`pipeline_fault`]).
    pub pipeline_fault: Option<PipelineFault>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PipelineFault {
    pub silent: usize,
    pub reporting: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Plan {
    pub transitions: Vec<Transition>,
    pub withheld: Vec<Withheld>,
    pub total: usize,
    pub healthy: usize,
    pub unhealthy: usize,
    /// When something could next change by the clock alone.
    #[serde(skip)]
    pub next_check: Option<Duration>,
    /// Why the next mirror pass should read this scale set rather than wait for its full resync:
    /// a repair's effect must be seen, or mirror evidence confirmed before acting on it.
    pub resync: Option<&'static str>,
}

impl Plan {
    /// The scale-set-wide brake in force, if any.
    pub fn paused(&self) -> Option<&WithheldReason> {
        self.withheld
            .iter()
            .find(|w| w.instance_id.is_none())
            .map(|w| &w.why)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Open an incident and take its first repair step.
    Open,
    /// The step before did not work in time: take the next one.
    Escalate,
    Close(Resolution),
    /// Every attempt failed: stop and alert.
    GiveUp,
}

impl Step {
    pub fn label(self) -> &'static str {
        match self {
            Step::Open => "open",
            Step::Escalate => "escalate",
            Step::Close(Resolution::Recovered) => "recovered",
            Step::Close(Resolution::Removed) => "removed",
            Step::GiveUp => "given_up",
        }
    }

    /// Whether the step calls the Compute API.
    pub fn acts(self) -> bool {
        matches!(self, Step::Open | Step::Escalate)
    }
}

/// A change of one incident: claimed by replacing the row at `claim` (or inserting it if `None`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Transition {
    pub step: Step,
    pub incident: Incident,
    #[serde(skip)]
    pub claim: Option<String>,
    /// The row as it was read, to put back if the step could not be carried out.
    #[serde(skip)]
    pub previous: Option<Incident>,
    pub reason: Option<Reason>,
    pub evidence: serde_json::Value,
}

impl Transition {
    pub fn action(&self) -> Option<RepairAction> {
        self.incident.action
    }
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
    /// An operator paused the scale set (`handler pause`).
    PausedByOperator {
        note: String,
        #[serde(with = "time::serde::rfc3339::option")]
        since: Option<OffsetDateTime>,
    },
    /// The scale set has never been mirrored.
    NoMirror,
    /// The mirror has not been read for `HEALER_FULL_RESYNC` + `HEALER_MIRROR_MAX_AGE`.
    StaleMirror { age_seconds: i64, max_seconds: i64 },
    /// A change was announced (an event, a repair) and not mirrored within `HEALER_MIRROR_MAX_AGE`.
    MirrorBehind {
        behind_seconds: i64,
        max_seconds: i64,
    },
    /// Most of the fleet fell silent at once: the heartbeat pipeline is broken, not the VMs.
    PipelineFault { silent: usize, reporting: usize },
    /// More of the scale set is unhealthy than `HEALER_MAX_UNHEALTHY` allows.
    TooManyUnhealthy {
        unhealthy: usize,
        total: usize,
        max: u32,
    },
    /// The platform's automatic repairs are on and the policy defers to them.
    PlatformRepairs,
    /// The Compute API asked us to back off (429 `Retry-After`) until then.
    Throttled {
        #[serde(with = "time::serde::rfc3339")]
        until: OffsetDateTime,
    },
    /// The instance is protected from scale set actions.
    Protected { reason: Reason },
    /// A repair of this instance is in flight until its deadline.
    RepairInFlight {
        incident: String,
        #[serde(with = "time::serde::rfc3339")]
        until: OffsetDateTime,
    },
    /// `HEALER_MAX_PARALLEL` repairs are already in flight.
    MaxParallel {
        in_flight: usize,
        max: u32,
        reason: Reason,
    },
    /// Recently repaired: left to settle before another repair.
    Cooldown {
        #[serde(with = "time::serde::rfc3339")]
        until: OffsetDateTime,
        reason: Reason,
    },
    /// Its incident was given up; nothing more until it recovers or is removed.
    GivenUp { incident: String },
    /// The only evidence is a DOWN from a source with less proof of identity than
    /// `HEALER_DOWN_PROOF` asks.
    UnprovenDown {
        reason: Reason,
        proof: crate::heartbeat::Proof,
        required: crate::heartbeat::Proof,
    },
    /// The evidence is the mirror's and older than `HEALER_MIRROR_MAX_AGE`: read again first.
    AwaitingResync {
        mirror_age_seconds: i64,
        reason: Reason,
    },
}

impl WithheldReason {
    pub fn label(&self) -> &'static str {
        match self {
            WithheldReason::PausedByOperator { .. } => "paused_by_operator",
            WithheldReason::NoMirror => "no_mirror",
            WithheldReason::StaleMirror { .. } | WithheldReason::MirrorBehind { .. } => {
                "stale_mirror"
            }
            WithheldReason::PipelineFault { .. } => "pipeline_fault",
            WithheldReason::TooManyUnhealthy { .. } => "too_many_unhealthy",
            WithheldReason::PlatformRepairs => "platform_repairs",
            WithheldReason::Throttled { .. } => "throttled",
            WithheldReason::Protected { .. } => "protected",
            WithheldReason::RepairInFlight { .. } => "repair_in_flight",
            WithheldReason::MaxParallel { .. } => "max_parallel",
            WithheldReason::Cooldown { .. } => "cooldown",
            WithheldReason::GivenUp { .. } => "given_up",
            WithheldReason::AwaitingResync { .. } => "awaiting_resync",
            WithheldReason::UnprovenDown { .. } => "unproven_down",
        }
    }

    pub fn describe(&self) -> String {
        match self {
            WithheldReason::PausedByOperator { note, since } => format!(
                "paused by an operator{}: {note}; `handler resume` lifts it",
                since.map(|s| format!(" since {}", stamp(s))).unwrap_or_default()
            ),
            WithheldReason::NoMirror => "the scale set has not been mirrored yet".into(),
            WithheldReason::StaleMirror { age_seconds, max_seconds } => format!(
                "the mirror was last read {age_seconds} s ago, longer than HEALER_FULL_RESYNC + HEALER_MIRROR_MAX_AGE ({max_seconds} s)"
            ),
            WithheldReason::MirrorBehind { behind_seconds, max_seconds } => format!(
                "a change announced {behind_seconds} s ago is not mirrored yet, longer than HEALER_MIRROR_MAX_AGE ({max_seconds} s)"
            ),
            WithheldReason::PipelineFault { silent, reporting } => format!(
                "{silent} of {reporting} reporting instances fell silent at once: a heartbeat pipeline fault, not a fleet fault; all repairs paused until heartbeats return"
            ),
            WithheldReason::TooManyUnhealthy { unhealthy, total, max } => format!(
                "{unhealthy} of {total} instances unhealthy, more than HEALER_MAX_UNHEALTHY allows ({max}); repairs paused"
            ),
            WithheldReason::PlatformRepairs => {
                "the platform's automatic repairs are enabled on this scale set and HEALER_PLATFORM_REPAIRS=defer".into()
            }
            WithheldReason::Throttled { until } => {
                format!("the Compute API is throttling this scale set until {}", stamp(*until))
            }
            WithheldReason::Protected { reason } => format!(
                "{} but the instance is protected from scale set actions",
                reason.describe()
            ),
            WithheldReason::RepairInFlight { incident, until } => {
                format!("repair of incident {incident} is in flight until {}", stamp(*until))
            }
            WithheldReason::MaxParallel { in_flight, max, reason } => format!(
                "{} but {in_flight} repairs are in flight, HEALER_MAX_PARALLEL allows {max}",
                reason.describe()
            ),
            WithheldReason::Cooldown { until, reason } => {
                format!("{} but the instance was repaired recently; cooling down until {}", reason.describe(), stamp(*until))
            }
            WithheldReason::GivenUp { incident } => {
                format!("incident {incident} was given up; waiting for the instance to recover or be removed")
            }
            WithheldReason::UnprovenDown { reason, proof, required } => format!(
                "{} but its source proved only `{}`, less than HEALER_DOWN_PROOF={}; a DOWN like that is not enough on its own",
                reason.describe(),
                proof.as_str(),
                required.as_str()
            ),
            WithheldReason::AwaitingResync { mirror_age_seconds, reason } => format!(
                "{} as of a mirror read {mirror_age_seconds} s ago, older than HEALER_MIRROR_MAX_AGE; confirming with a fresh read first",
                reason.describe()
            ),
        }
    }

    /// Set-wide brakes whose every pass is journaled (per-instance repeats are only logged).
    pub fn is_pause(&self) -> bool {
        matches!(
            self,
            WithheldReason::PausedByOperator { .. }
                | WithheldReason::NoMirror
                | WithheldReason::StaleMirror { .. }
                | WithheldReason::MirrorBehind { .. }
                | WithheldReason::PipelineFault { .. }
                | WithheldReason::TooManyUnhealthy { .. }
                | WithheldReason::PlatformRepairs
                | WithheldReason::Throttled { .. }
        )
    }
}

/// Fleet-wide: most instances that report heartbeats fell silent. More than half of them, and at
/// least two (one silent VM is a VM problem).
pub fn pipeline_fault(
    sets: &[(&Observation, &Policy)],
    now: OffsetDateTime,
) -> Option<PipelineFault> {
    let (mut silent, mut reporting) = (0, 0);
    for (obs, policy) in sets {
        for m in &obs.instances {
            if let Some(hb) = obs.heartbeats.get(&m.instance.instance_id) {
                reporting += 1;
                if now - hb.event_time > policy.heartbeat_timeout {
                    silent += 1;
                }
            }
        }
    }
    (silent >= 2 && silent * 2 > reporting).then_some(PipelineFault { silent, reporting })
}

fn evidence(
    reason: &Reason,
    hb: Option<&Heartbeat>,
    m: Option<&MirroredInstance>,
) -> serde_json::Value {
    serde_json::json!({"verdict": reason, "heartbeat": hb, "instance": m.map(|m| &m.instance)})
}

/// Every mirrored instance's verdict, by instance id.
pub fn verdicts<'a>(
    obs: &'a Observation,
    policy: &Policy,
    now: OffsetDateTime,
) -> HashMap<&'a str, Verdict> {
    let history = |m: &MirroredInstance| History {
        first_seen: m.synced_at,
        last_repair: obs
            .incidents
            .get(&m.instance.instance_id)
            .and_then(|i| i.value.step_started),
    };
    obs.instances
        .iter()
        .map(|m| {
            let id = m.instance.instance_id.as_str();
            (
                id,
                judge(&m.instance, obs.heartbeats.get(id), history(m), policy, now),
            )
        })
        .collect()
}

pub fn decide(obs: &Observation, policy: &Policy, brakes: Brakes, now: OffsetDateTime) -> Plan {
    let present: HashMap<&str, &MirroredInstance> = obs
        .instances
        .iter()
        .map(|m| (m.instance.instance_id.as_str(), m))
        .collect();
    let synced_at = obs.record.as_ref().and_then(|r| r.synced_at);
    let verdicts = verdicts(obs, policy, now);

    let mut plan = Plan {
        transitions: Vec::new(),
        withheld: Vec::new(),
        total: obs.instances.len(),
        healthy: verdicts
            .values()
            .filter(|v| **v == Verdict::Healthy)
            .count(),
        unhealthy: verdicts.values().filter(|v| v.is_unhealthy()).count(),
        next_check: None,
        resync: None,
    };
    let mirror_age = synced_at.map(|s| now - s);
    let mirror_current = mirror_age.is_some_and(|age| age <= brakes.mirror_max_age);

    // What the next mirror pass must show: the effect of repairs under way, and whether mirror
    // evidence against an instance still holds. Instances we will not act on do not count, or a
    // fleet with one protected sick VM per scale set would be read in full every pass.
    let repairing = obs
        .incidents
        .values()
        .any(|v| v.value.state == State::Repairing);
    let to_confirm = obs.instances.iter().any(|m| {
        let id = m.instance.instance_id.as_str();
        let judged_on_mirror = match &verdicts[id] {
            Verdict::Unhealthy(r) | Verdict::Suspect { reason: r, .. } => r.from_mirror(),
            _ => false,
        };
        let given_up = obs
            .incidents
            .get(id)
            .is_some_and(|v| v.value.state == State::GivenUp);
        judged_on_mirror && !m.instance.protected_from_scale_set_actions && !given_up
    });
    plan.resync = if repairing {
        Some("repair_in_flight")
    } else if to_confirm {
        Some("confirm_mirror_evidence")
    } else {
        None
    };

    // 1. Outcomes of incidents, in target order so the plan is deterministic.
    let mut incidents: Vec<&Versioned<Incident>> = obs.incidents.values().collect();
    incidents.sort_by(|a, b| a.value.target.cmp(&b.value.target));
    let mut escalations = Vec::new();
    for v in &incidents {
        let inc = &v.value;
        let close = |resolution| Transition {
            step: Step::Close(resolution),
            incident: inc.close(resolution, now),
            claim: Some(v.version.clone()),
            previous: Some(inc.clone()),
            reason: None,
            evidence: serde_json::Value::Null,
        };
        let since = inc.step_started.or(inc.ended_at).unwrap_or(inc.opened_at);
        match inc.state {
            State::Closed => continue,
            State::Repairing | State::GivenUp => {
                let gone = !present.contains_key(inc.target.as_str())
                    && synced_at.is_some_and(|s| s > since);
                let recovered = present.get(inc.target.as_str()).is_some_and(|_| {
                    let hb = obs.heartbeats.get(&inc.target);
                    hb.is_some_and(|hb| hb.event_time > since)
                        && verdicts.get(inc.target.as_str()) == Some(&Verdict::Healthy)
                });
                if gone {
                    plan.transitions.push(close(Resolution::Removed));
                } else if recovered {
                    plan.transitions.push(close(Resolution::Recovered));
                } else if inc.state == State::Repairing && !inc.in_flight(now) {
                    if inc.attempt >= policy.max_attempts {
                        plan.transitions.push(Transition {
                            step: Step::GiveUp,
                            incident: inc.give_up(now),
                            claim: Some(v.version.clone()),
                            previous: Some(inc.clone()),
                            reason: None,
                            evidence: serde_json::json!({"attempts": inc.attempt}),
                        });
                    } else {
                        escalations.push(*v);
                    }
                }
            }
        }
    }
    let settled: std::collections::HashSet<String> = plan
        .transitions
        .iter()
        .map(|t| t.incident.target.clone())
        .collect();

    // 2. Scale-set brakes: nothing new is started while one holds.
    // A quiet scale set is only re-read every full resync, so its mirror may be that old; one with
    // an announced change must catch up within the mirror's maximum age.
    let changed_at = obs.record.as_ref().and_then(|r| r.changed_at);
    let operator = obs.record.as_ref().and_then(|r| {
        r.operator_pause
            .clone()
            .map(|note| WithheldReason::PausedByOperator {
                note,
                since: r.operator_pause_since,
            })
    });
    let pause = operator
        .or(match synced_at {
            None => Some(WithheldReason::NoMirror),
            Some(s) if now - s > brakes.full_resync + brakes.mirror_max_age => {
                Some(WithheldReason::StaleMirror {
                    age_seconds: (now - s).whole_seconds(),
                    max_seconds: (brakes.full_resync + brakes.mirror_max_age).whole_seconds(),
                })
            }
            Some(s) => changed_at
                .filter(|c| *c >= s && now - *c > brakes.mirror_max_age)
                .map(|c| WithheldReason::MirrorBehind {
                    behind_seconds: (now - c).whole_seconds(),
                    max_seconds: brakes.mirror_max_age.whole_seconds(),
                }),
        })
        .or_else(|| {
            brakes
                .pipeline_fault
                .map(|f| WithheldReason::PipelineFault {
                    silent: f.silent,
                    reporting: f.reporting,
                })
        })
        .or_else(|| {
            let max = policy.max_unhealthy.of(plan.total, 0);
            (plan.unhealthy as u32 > max).then_some(WithheldReason::TooManyUnhealthy {
                unhealthy: plan.unhealthy,
                total: plan.total,
                max,
            })
        })
        .or_else(|| {
            let platform = obs.record.as_ref().is_some_and(|r| r.platform_auto_repair);
            (platform && policy.platform_repairs == PlatformRepairs::Defer)
                .then_some(WithheldReason::PlatformRepairs)
        })
        .or_else(|| {
            obs.record
                .as_ref()
                .and_then(|r| r.throttled_until)
                .filter(|until| *until > now)
                .map(|until| WithheldReason::Throttled { until })
        });
    if let Some(why) = pause {
        plan.withheld.push(Withheld {
            instance_id: None,
            why,
        });
        return plan;
    }

    // 3. Candidates: escalations of timed-out steps first (oldest incident first), then new
    //    incidents in instance order.
    let max_parallel = policy.max_parallel.of(plan.total, 1);
    let mut in_flight = obs
        .incidents
        .values()
        .filter(|v| v.value.in_flight(now) && !settled.contains(&v.value.target))
        .count();
    escalations.sort_by_key(|v| v.value.opened_at);
    for v in escalations {
        let inc = &v.value;
        let m = present.get(inc.target.as_str()).copied();
        let hb = obs.heartbeats.get(&inc.target);
        let reason = match verdicts.get(inc.target.as_str()) {
            Some(Verdict::Unhealthy(r)) | Some(Verdict::Suspect { reason: r, .. }) => r.clone(),
            // Not healthy enough to close, not judged unhealthy either (e.g. still starting):
            // the step timed out all the same.
            _ => Reason::Silent {
                last: hb.map_or(inc.opened_at, |h| h.event_time),
                seconds: hb.map_or(0, |h| (now - h.event_time).whole_seconds()),
            },
        };
        if m.is_some_and(|m| m.instance.protected_from_scale_set_actions) {
            plan.withheld.push(Withheld {
                instance_id: Some(inc.target.clone()),
                why: WithheldReason::Protected { reason },
            });
            continue;
        }
        if in_flight as u32 >= max_parallel {
            plan.withheld.push(Withheld {
                instance_id: Some(inc.target.clone()),
                why: WithheldReason::MaxParallel {
                    in_flight,
                    max: max_parallel,
                    reason,
                },
            });
            continue;
        }
        in_flight += 1;
        let action = policy.repair_actions.step(inc.attempt as usize);
        plan.transitions.push(Transition {
            step: Step::Escalate,
            incident: inc.escalate(action, now, policy.repair_timeout),
            claim: Some(v.version.clone()),
            previous: Some(inc.clone()),
            evidence: evidence(&reason, hb, m),
            reason: Some(reason),
        });
    }

    let mut next: Option<Duration> = None;
    for m in &obs.instances {
        let id = m.instance.instance_id.as_str();
        let hb = obs.heartbeats.get(id);
        let verdict = &verdicts[id];
        let created = m.instance.created_at.unwrap_or(m.synced_at);
        if let Some(d) = recheck_in(verdict, hb, created, policy, now) {
            next = Some(next.map_or(d, |n| n.min(d)));
        }
        let reason = match verdict {
            Verdict::Unhealthy(reason) => reason,
            Verdict::Unproven(reason) => {
                plan.withheld.push(Withheld {
                    instance_id: Some(id.to_string()),
                    why: WithheldReason::UnprovenDown {
                        reason: reason.clone(),
                        proof: hb.map_or(crate::heartbeat::Proof::Name, |h| h.proof()),
                        required: policy.down_proof,
                    },
                });
                continue;
            }
            _ => continue,
        };
        let existing = obs.incidents.get(id);
        if settled.contains(id) || plan.transitions.iter().any(|t| t.incident.target == id) {
            continue;
        }
        let withhold = |why| Withheld {
            instance_id: Some(id.to_string()),
            why,
        };
        if let Some(v) = existing {
            match v.value.state {
                State::Repairing if v.value.in_flight(now) => {
                    plan.withheld.push(withhold(WithheldReason::RepairInFlight {
                        incident: v.value.id.clone(),
                        until: v.value.deadline.unwrap_or(now),
                    }));
                    continue;
                }
                // Timed out but not escalated: withheld above already said why.
                State::Repairing => continue,
                State::GivenUp => {
                    plan.withheld.push(withhold(WithheldReason::GivenUp {
                        incident: v.value.id.clone(),
                    }));
                    continue;
                }
                State::Closed => {
                    let until = v.value.ended_at.unwrap_or(now) + policy.grace_period;
                    if now < until {
                        plan.withheld.push(withhold(WithheldReason::Cooldown {
                            until,
                            reason: reason.clone(),
                        }));
                        continue;
                    }
                }
            }
        }
        if m.instance.protected_from_scale_set_actions {
            plan.withheld.push(withhold(WithheldReason::Protected {
                reason: reason.clone(),
            }));
            continue;
        }
        if reason.from_mirror() && !mirror_current {
            plan.withheld.push(withhold(WithheldReason::AwaitingResync {
                mirror_age_seconds: mirror_age.map_or(0, |a| a.whole_seconds()),
                reason: reason.clone(),
            }));
            continue;
        }
        if in_flight as u32 >= max_parallel {
            plan.withheld.push(withhold(WithheldReason::MaxParallel {
                in_flight,
                max: max_parallel,
                reason: reason.clone(),
            }));
            continue;
        }
        in_flight += 1;
        plan.transitions.push(Transition {
            step: Step::Open,
            incident: Incident::open(
                id,
                reason.label(),
                policy.repair_actions.step(0),
                now,
                policy.repair_timeout,
            ),
            claim: existing.map(|v| v.version.clone()),
            previous: existing.map(|v| v.value.clone()),
            evidence: evidence(reason, hb, Some(m)),
            reason: Some(reason.clone()),
        });
    }
    plan.next_check = next;
    if plan.resync.is_none()
        && plan
            .transitions
            .iter()
            .any(|t| matches!(t.step, Step::Open | Step::Escalate))
    {
        plan.resync = Some("repair_started");
    }
    plan
}

#[cfg(test)]
mod tests;
