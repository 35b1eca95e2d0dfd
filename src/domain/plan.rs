//! `decide`: one scale set's observation + policy + brakes + now → a plan. Synchronous, no I/O, no
//! clock, no logging; the caller claims each transition, acts, and journals every line of the plan.
//!
//! Order of reasoning: what became of incidents (always true, whatever the brakes say); then the
//! scale-set brakes; then the steps to take — continuing steps under way, escalating those that
//! ended without working, opening new incidents — up to the parallel limit; last, the writes to the
//! scale set are kept apart, so two of ours never run at once.

use crate::heartbeat::Heartbeat;
use crate::incident::{Call, Hold, Incident, Phase, Resolution, Stage, State, Versioned};
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
    /// Instances a long-running operation holds, with the operation's id: the healer's repairs
    /// never touch them (design §7, one claim per instance).
    pub held: HashMap<String, String>,
    /// A write to the scale set (a grow or a delete) that a long-running operation has in flight:
    /// the healer's own writes wait for it, as for one of its own.
    pub operation_write: Option<Call>,
    /// How the last stateful replacement of each instance ended, for the incident that asked.
    pub carried: HashMap<String, crate::operations::carry::Outcome>,
    /// The instances a slot names (stateful sets): what the stateful replacement can carry. One no
    /// slot names has nothing to carry, and is replaced as on any set.
    pub slotted: std::collections::HashSet<String>,
}

/// Brakes and modes that are global rather than per scale set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Brakes {
    pub mirror_max_age: Duration,
    /// `HEALER_FULL_RESYNC`: a quiet scale set's mirror is only re-read this often.
    pub full_resync: Duration,
    /// Set when most of the fleet fell silent at once (see [`pipeline_fault`]).
    pub pipeline_fault: Option<PipelineFault>,
    /// `HEALER_DRY_RUN`: decide as if acting, call nothing. A live pass ignores what a dry run
    /// decided, and a dry run leaves live incidents' next steps for a live pass.
    pub dry_run: bool,
    /// How long a pass may still be sending the calls it claimed (`HEALER_PASS_DEADLINE` plus one
    /// `HEALER_CALL_TIMEOUT`): a call still `Sending` after that lost its answer or never went out.
    pub lease: Duration,
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
    pub resync: Option<ResyncReason>,
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
    /// The step before ended without working (timed out, failed, refused): take the next one.
    Escalate,
    /// Send the current step again: ARM did not take it yet (busy, stale, split from its batch).
    Resend,
    /// The next stage of a replace (surge done → delete; deleted first → restore the capacity).
    Advance,
    Close(Resolution),
    /// Every attempt failed: stop and alert.
    GiveUp,
}

impl Step {
    pub fn label(self) -> &'static str {
        match self {
            Step::Open => "open",
            Step::Escalate => "escalate",
            Step::Resend => "resend",
            Step::Advance => "advance",
            Step::Close(Resolution::Recovered) => "recovered",
            Step::Close(Resolution::Removed) => "removed",
            Step::GiveUp => "given_up",
        }
    }

    /// Whether the step calls the Compute API.
    pub fn acts(self) -> bool {
        matches!(
            self,
            Step::Open | Step::Escalate | Step::Resend | Step::Advance
        )
    }

    /// Whether the step starts a repair the parallel limit counts (a resend or an advance
    /// continues one already counted).
    pub fn starts(self) -> bool {
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

    /// The Compute call the transition makes, if it acts.
    pub fn call(&self) -> Option<Call> {
        self.step.acts().then(|| self.incident.call()).flatten()
    }

    /// Whether it must go in a call of its own (its batch was refused once). A capacity change
    /// is one write whatever it carries, so it never goes alone.
    pub fn alone(&self) -> bool {
        self.incident.hold == Some(Hold::Alone) && self.call() != Some(Call::Grow)
    }
}

/// Why the next mirror pass must read a scale set before its full resync is due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ResyncReason {
    /// A repair goes out this pass: its effect must be mirrored to be judged.
    RepairStarted,
    /// A repair is under way: the mirror follows it to its end.
    RepairInFlight,
    /// An instance is judged on the mirror's evidence (stopped, failed, unhealthy): confirmed by
    /// a fresh read before anything is done about it.
    ConfirmMirrorEvidence,
}

impl ResyncReason {
    pub fn label(self) -> &'static str {
        match self {
            ResyncReason::RepairStarted => "repair_started",
            ResyncReason::RepairInFlight => "repair_in_flight",
            ResyncReason::ConfirmMirrorEvidence => "confirm_mirror_evidence",
        }
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
    /// A pause on the fleet's own evidence (a pipeline fault, too many unhealthy) has just ended:
    /// the set is held until every instance has had `HEALER_HEARTBEAT_TIMEOUT` to report again.
    Settling {
        #[serde(with = "time::serde::rfc3339")]
        since: OffsetDateTime,
        #[serde(with = "time::serde::rfc3339")]
        until: OffsetDateTime,
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
    /// A long-running operation holds the instance (design §7).
    HeldByOperation { operation: String, reason: Reason },
    /// A resource lock forbids deleting the instance (a Flexible VM), and the repair due deletes.
    DeleteLocked {
        action: RepairAction,
        reason: Reason,
    },
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
    /// The evidence is the mirror's and older than `HEALER_MIRROR_MAX_AGE`: read again first.
    AwaitingResync {
        mirror_age_seconds: i64,
        reason: Reason,
    },
    /// A write of ours to the scale set (a capacity change, a delete) runs or goes out this pass:
    /// this one waits, so two never overlap (a scale set write preempts a running delete).
    ScaleSetBusy { call: Call, waiting_for: Call },
    /// A live incident's next step, during a dry run: it waits for a live pass.
    DryRunHolds { incident: String },
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
            WithheldReason::Settling { .. } => SETTLING,
            WithheldReason::PlatformRepairs => "platform_repairs",
            WithheldReason::Throttled { .. } => "throttled",
            WithheldReason::Protected { .. } => "protected",
            WithheldReason::HeldByOperation { .. } => "held_by_operation",
            WithheldReason::DeleteLocked { .. } => "delete_locked",
            WithheldReason::RepairInFlight { .. } => "repair_in_flight",
            WithheldReason::MaxParallel { .. } => "max_parallel",
            WithheldReason::Cooldown { .. } => "cooldown",
            WithheldReason::GivenUp { .. } => "given_up",
            WithheldReason::AwaitingResync { .. } => "awaiting_resync",
            WithheldReason::ScaleSetBusy { .. } => "scale_set_busy",
            WithheldReason::DryRunHolds { .. } => "dry_run_holds",
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
            WithheldReason::Settling { since, until } => format!(
                "the set-wide pause ended at {}; repairs resume at {} once every instance has had HEALER_HEARTBEAT_TIMEOUT to report again (a fleet recovers one heartbeat at a time)",
                stamp(*since),
                stamp(*until)
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
            WithheldReason::HeldByOperation { operation, reason } => format!(
                "{} but operation {operation} holds the instance; it is left to the operation (`handler operations`)",
                reason.describe()
            ),
            WithheldReason::DeleteLocked { action, reason } => format!(
                "{} but a resource lock forbids deleting the VM, so `{}` cannot work; lift the lock, or repair it in place (restart, reimage in HEALER_REPAIR_ACTIONS)",
                reason.describe(),
                action.as_str()
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
            WithheldReason::AwaitingResync { mirror_age_seconds, reason } => format!(
                "{} as of a mirror read {mirror_age_seconds} s ago, older than HEALER_MIRROR_MAX_AGE; confirming with a fresh read first",
                reason.describe()
            ),
            WithheldReason::ScaleSetBusy { call, waiting_for } => format!(
                "its {} waits for our {} on this scale set to end: two writes to one scale set never overlap",
                call.as_str(),
                waiting_for.as_str()
            ),
            WithheldReason::DryRunHolds { incident } => format!(
                "incident {incident} is a live repair; its next step waits until HEALER_DRY_RUN is off"
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
                | WithheldReason::Settling { .. }
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

/// The incidents a pass in this mode reasons about: a live pass does not see what a dry run
/// decided (it was never done), so switching dry run off acts at once, as attempt 1.
pub fn visible(obs: &Observation, dry_run: bool) -> HashMap<&str, &Versioned<Incident>> {
    obs.incidents
        .iter()
        .filter(|(_, v)| dry_run || !v.value.dry_run)
        .map(|(k, v)| (k.as_str(), v))
        .collect()
}

/// Every mirrored instance's verdict, by instance id.
pub fn verdicts<'a>(
    obs: &'a Observation,
    policy: &Policy,
    dry_run: bool,
    now: OffsetDateTime,
) -> HashMap<&'a str, Verdict> {
    let incidents = visible(obs, dry_run);
    let history = |m: &MirroredInstance| History {
        first_seen: m.synced_at,
        last_repair: incidents
            .get(m.instance.instance_id.as_str())
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

/// What one pass looks at, read once.
struct View<'a> {
    obs: &'a Observation,
    policy: &'a Policy,
    brakes: Brakes,
    now: OffsetDateTime,
    present: HashMap<&'a str, &'a MirroredInstance>,
    incidents: HashMap<&'a str, &'a Versioned<Incident>>,
    verdicts: HashMap<&'a str, Verdict>,
    synced_at: Option<OffsetDateTime>,
}

impl<'a> View<'a> {
    fn new(obs: &'a Observation, policy: &'a Policy, brakes: Brakes, now: OffsetDateTime) -> Self {
        View {
            obs,
            policy,
            brakes,
            now,
            present: obs
                .instances
                .iter()
                .map(|m| (m.instance.instance_id.as_str(), m))
                .collect(),
            incidents: visible(obs, brakes.dry_run),
            verdicts: verdicts(obs, policy, brakes.dry_run, now),
            synced_at: obs.record.as_ref().and_then(|r| r.synced_at),
        }
    }

    /// The row to replace to claim `id` (whatever mode wrote it), and the row to put back.
    fn claim(&self, id: &str) -> (Option<String>, Option<Incident>) {
        match self.obs.incidents.get(id) {
            Some(v) => (Some(v.version.clone()), Some(v.value.clone())),
            None => (None, None),
        }
    }

    /// The reason an incident's target is still in trouble, for the journal of its next step.
    fn reason(&self, inc: &Incident) -> Reason {
        let hb = self.obs.heartbeats.get(&inc.target);
        match self.verdicts.get(inc.target.as_str()) {
            Some(Verdict::Unhealthy(r)) | Some(Verdict::Suspect { reason: r, .. }) => r.clone(),
            // Not healthy enough to close, not judged unhealthy either (e.g. still starting):
            // the step ended without working all the same.
            _ => Reason::Silent {
                last: hb.map_or(inc.opened_at, |h| h.event_time),
                seconds: hb.map_or(0, |h| (self.now - h.event_time).whole_seconds()),
            },
        }
    }

    fn transition(&self, step: Step, v: &Versioned<Incident>, incident: Incident) -> Transition {
        let reason = step.acts().then(|| self.reason(&v.value));
        let evidence = match &reason {
            Some(r) => {
                let mut e = evidence(
                    r,
                    self.obs.heartbeats.get(&v.value.target),
                    self.present.get(v.value.target.as_str()).copied(),
                );
                if let Some(error) = &v.value.error {
                    e["error"] = serde_json::json!(error);
                }
                if let Some(why) = self.carry_error(&v.value) {
                    e["carry_error"] = serde_json::json!(why);
                }
                // A call whose answer was lost, found not to have landed (see `unanswered`).
                if v.value.phase == Phase::Sending {
                    let sent = v.value.sent_at.map(crate::journal::stamp);
                    e["lost_answer"] = if incident.unanswered > v.value.unanswered {
                        serde_json::json!({"sent_at": sent, "found": "no operation on the instance since it was sent: sent again, no attempt spent"})
                    } else {
                        serde_json::json!({"sent_at": sent, "found": "lost again and not landed: the attempt is spent"})
                    };
                }
                e
            }
            None => {
                serde_json::json!({"phase": v.value.phase.as_str(), "stage": v.value.stage.as_str(), "error": v.value.error})
            }
        };
        Transition {
            step,
            incident,
            claim: Some(v.version.clone()),
            previous: Some(v.value.clone()),
            reason,
            evidence,
        }
    }

    /// Why the stateful replacement this incident handed its step to failed, if it did.
    fn carry_error(&self, inc: &Incident) -> Option<&str> {
        match (inc.stage, self.obs.carried.get(&inc.target)) {
            (Stage::Carry, Some(crate::operations::carry::Outcome::Failed(why))) => Some(why),
            _ => None,
        }
    }

    /// A new step as this scale set takes it: on a stateful set a replace carries the disks of
    /// the instance's slot. An instance no slot names (a VM that never had the slot's disks) has
    /// nothing to carry — the stateful replacement would refuse it — and is replaced plainly.
    fn staged(&self, inc: Incident) -> Incident {
        if self.policy.stateful.is_some() && self.obs.slotted.contains(&inc.target) {
            inc.stateful()
        } else {
            inc
        }
    }

    /// How long a step of `action` has to work: a delete (or replace) of a scale set with
    /// terminate notifications first waits out the instance's drain — the platform deletes only
    /// once the VM approved its Terminate event or the notice ran out ("Terminate notification for
    /// Azure Virtual Machine Scale Set instances") — so its timeout starts after that window.
    fn step_timeout(&self, action: RepairAction) -> Duration {
        self.policy.repair_timeout
            + self
                .terminate_notice()
                .filter(|_| action.deletes())
                .unwrap_or(Duration::ZERO)
    }

    fn terminate_notice(&self) -> Option<Duration> {
        self.obs.record.as_ref().and_then(|r| r.terminate_notice)
    }

    /// The journal's word on a step that deletes an instance that drains first.
    fn drain_evidence(&self, action: RepairAction, evidence: &mut serde_json::Value) {
        if let (Some(notice), true) = (self.terminate_notice(), action.deletes()) {
            if let Some(map) = evidence.as_object_mut() {
                map.insert(
                    "drain".into(),
                    serde_json::json!(format!(
                        "terminate notification: the instance drains for up to {} s before it is deleted; the step's timeout starts after it",
                        notice.whole_seconds()
                    )),
                );
            }
        }
    }

    /// The action of attempt `attempt` (0-based) as the target's state allows it.
    fn action(&self, target: &str, attempt: usize) -> RepairAction {
        let power = self
            .present
            .get(target)
            .and_then(|m| m.instance.power_state.as_deref());
        self.policy
            .repair_actions
            .step(attempt)
            .for_power_state(power)
    }
}

/// What an incident's step needs next.
enum Next {
    /// Nothing this pass: it runs, or waits for its deadline or the mirror.
    Wait,
    /// Send again (pending), or take the next stage.
    Continue(Step, Box<Incident>),
    /// It ended without working: escalate, or give up.
    Over,
}

pub fn decide(obs: &Observation, policy: &Policy, brakes: Brakes, now: OffsetDateTime) -> Plan {
    let view = View::new(obs, policy, brakes, now);
    let mut plan = Plan {
        transitions: Vec::new(),
        withheld: Vec::new(),
        total: obs.instances.len(),
        healthy: view
            .verdicts
            .values()
            .filter(|v| **v == Verdict::Healthy)
            .count(),
        // Instances a long-running operation holds are out on purpose (being reimaged, say):
        // they do not trip the short-circuit brake, which would then hold the operation itself.
        unhealthy: view
            .verdicts
            .iter()
            .filter(|(id, v)| v.is_unhealthy() && !obs.held.contains_key(**id))
            .count(),
        next_check: None,
        resync: None,
    };
    let (continuing, escalations) = outcomes(&view, &mut plan);
    plan.resync = resync(&view, &plan);
    if let Some(why) = pause(&view, &plan) {
        plan.withheld.push(Withheld {
            instance_id: None,
            why,
        });
        return plan;
    }
    let mut in_flight = view
        .incidents
        .values()
        .filter(|v| v.value.in_flight(now))
        .filter(|v| {
            !plan
                .transitions
                .iter()
                .any(|t| t.incident.target == v.value.target)
        })
        // A step found over before its deadline (a call lost twice) is not in flight: its
        // escalation takes its place.
        .filter(|v| !escalations.iter().any(|e| e.value.target == v.value.target))
        .count();
    // Continuing steps are counted already (they are in flight); a target protected meanwhile is
    // not touched (restoring capacity touches no instance).
    for t in continuing {
        let protected = view
            .present
            .get(t.incident.target.as_str())
            .is_some_and(|m| m.instance.protected_from_scale_set_actions);
        if protected && t.call() != Some(Call::Grow) {
            plan.withheld.push(Withheld {
                instance_id: Some(t.incident.target.clone()),
                why: WithheldReason::Protected {
                    reason: view.reason(&t.incident),
                },
            });
        } else {
            plan.transitions.push(t);
        }
    }
    escalate(&view, escalations, &mut in_flight, &mut plan);
    open(&view, &mut in_flight, &mut plan);
    keep_writes_apart(&view, &mut plan);
    if plan.resync.is_none() && plan.transitions.iter().any(|t| t.step.acts()) {
        plan.resync = Some(ResyncReason::RepairStarted);
    }
    plan
}

/// What the next mirror pass must show: the effect of repairs under way, and whether mirror
/// evidence against an instance still holds. Instances we will not act on do not count, or a
/// fleet with one protected sick VM per scale set would be read in full every pass.
fn resync(view: &View, plan: &Plan) -> Option<ResyncReason> {
    // Incidents this plan closes have nothing left to show.
    let closed = |target: &str| {
        plan.transitions
            .iter()
            .any(|t| t.incident.target == target && matches!(t.step, Step::Close(_)))
    };
    let repairing = view
        .incidents
        .values()
        .any(|v| v.value.state == State::Repairing && !closed(&v.value.target));
    let to_confirm = view.obs.instances.iter().any(|m| {
        let id = m.instance.instance_id.as_str();
        let judged_on_mirror = match &view.verdicts[id] {
            Verdict::Unhealthy(r) | Verdict::Suspect { reason: r, .. } => r.from_mirror(),
            _ => false,
        };
        let given_up = view
            .incidents
            .get(id)
            .is_some_and(|v| v.value.state == State::GivenUp);
        judged_on_mirror && !m.instance.protected_from_scale_set_actions && !given_up
    });
    if repairing {
        Some(ResyncReason::RepairInFlight)
    } else if to_confirm {
        Some(ResyncReason::ConfirmMirrorEvidence)
    } else {
        None
    }
}

/// What became of each incident: closes and give-ups go straight into the plan (they are true
/// whatever the brakes say); steps to continue and incidents to escalate are returned, for after
/// the brakes.
fn outcomes<'a>(
    view: &View<'a>,
    plan: &mut Plan,
) -> (Vec<Transition>, Vec<&'a Versioned<Incident>>) {
    let mut incidents: Vec<&&Versioned<Incident>> = view.incidents.values().collect();
    incidents.sort_by(|a, b| a.value.target.cmp(&b.value.target));
    let (mut continuing, mut escalations) = (Vec::new(), Vec::new());
    for v in incidents {
        let inc = &v.value;
        if inc.state == State::Closed {
            continue;
        }
        let close = |resolution| {
            view.transition(Step::Close(resolution), v, inc.close(resolution, view.now))
        };
        let since = inc.step_started.or(inc.ended_at).unwrap_or(inc.opened_at);
        let gone = !view.present.contains_key(inc.target.as_str())
            && view.synced_at.is_some_and(|s| s > since);
        let recovered = view.present.contains_key(inc.target.as_str())
            && !inc.deleting()
            && view
                .obs
                .heartbeats
                .get(&inc.target)
                .is_some_and(|hb| hb.event_time > since)
            && view.verdicts.get(inc.target.as_str()) == Some(&Verdict::Healthy);
        let next = if gone {
            match removed(view, inc) {
                Some(next) => next,
                None => {
                    plan.transitions.push(close(Resolution::Removed));
                    continue;
                }
            }
        } else if recovered {
            plan.transitions.push(close(Resolution::Recovered));
            continue;
        } else if inc.state == State::GivenUp {
            continue;
        } else {
            step(view, inc)
        };
        let live_in_dry_run = view.brakes.dry_run && !inc.dry_run;
        // A target missing from a mirror read before its step began was removed by an event: act
        // on nothing until the next read says it is gone (then the incident closes).
        let absent = !view.present.contains_key(inc.target.as_str());
        // A target draining before a platform event (its own scheduled termination, reboot or
        // redeploy, ours included) is not repaired again meanwhile: the step waits.
        let draining = matches!(
            view.verdicts.get(inc.target.as_str()),
            Some(Verdict::Draining { .. })
        );
        let next = match next {
            Next::Continue(_, ref i) if absent && i.call() != Some(Call::Grow) => Next::Wait,
            Next::Over if absent && inc.attempt < view.policy.max_attempts => Next::Wait,
            Next::Over if draining => Next::Wait,
            other => other,
        };
        match next {
            Next::Wait => {}
            Next::Over if inc.attempt >= view.policy.max_attempts => {
                plan.transitions.push(Transition {
                    evidence: serde_json::json!({"attempts": inc.attempt, "error": inc.error, "carry_error": view.carry_error(inc)}),
                    ..view.transition(Step::GiveUp, v, inc.give_up(view.now))
                });
            }
            Next::Over | Next::Continue(..) if live_in_dry_run => {
                plan.withheld.push(Withheld {
                    instance_id: Some(inc.target.clone()),
                    why: WithheldReason::DryRunHolds {
                        incident: inc.id.clone(),
                    },
                });
            }
            Next::Over => escalations.push(*v),
            Next::Continue(step, incident) => continuing.push(view.transition(step, v, *incident)),
        }
    }
    (continuing, escalations)
}

/// For a target gone from the mirror: what remains of a replace that deleted first (restore the
/// capacity); `None` when the incident is simply over.
fn removed(view: &View, inc: &Incident) -> Option<Next> {
    if inc.state != State::Repairing || inc.timed_out(view.now) {
        return None;
    }
    match (inc.stage, inc.phase) {
        (Stage::DeleteFirst, Phase::Succeeded) => Some(Next::Continue(
            Step::Advance,
            Box::new(inc.advance(Stage::Restore)),
        )),
        // A write of ours still runs and we can learn when it ends: the incident stays open (and
        // the write counted, so no other write overlaps it) until then, or the deadline.
        (_, Phase::Running)
            if inc.operation.is_some() && matches!(inc.call(), Some(Call::Grow | Call::Delete)) =>
        {
            Some(Next::Wait)
        }
        // The delete's answer was lost, and the target is gone: it landed.
        (Stage::DeleteFirst, Phase::Sending) => Some(Next::Continue(
            Step::Advance,
            Box::new(inc.succeeded(view.now).advance(Stage::Restore)),
        )),
        (Stage::Restore, Phase::Pending) => {
            Some(Next::Continue(Step::Resend, Box::new(inc.resend())))
        }
        (Stage::Restore, Phase::Sending | Phase::Running) => Some(Next::Wait),
        _ => None,
    }
}

/// A stateful replacement's incident: it waits while the operation holds its target, whatever
/// its deadline (a copy into another zone takes hours); replaced, the mirror soon shows the
/// target gone (and the incident closes); failed, the step is over (escalate, or give up).
fn carrying(view: &View, inc: &Incident) -> Option<Next> {
    use crate::operations::carry::Outcome;
    if inc.stage != Stage::Carry || !matches!(inc.phase, Phase::Sending | Phase::Running) {
        return None;
    }
    if view.obs.held.contains_key(&inc.target) {
        return Some(Next::Wait);
    }
    let started = inc.step_started.unwrap_or(inc.opened_at);
    match view.obs.carried.get(&inc.target) {
        Some(Outcome::Replaced) => Some(Next::Wait),
        Some(Outcome::Failed(_)) if inc.phase == Phase::Running => Some(Next::Over),
        // Started (or its answer lost) and not held: the operation never began, or ended without
        // a word; the deadline decides, as for any step.
        _ if inc.timed_out(view.now) => Some(Next::Over),
        _ if inc.phase == Phase::Sending && view.now > started + view.brakes.lease => {
            Some(if inc.unanswered == 0 {
                Next::Continue(Step::Resend, Box::new(inc.unanswered_again()))
            } else {
                Next::Over
            })
        }
        _ => Some(Next::Wait),
    }
}

/// The next move of a present target's running step.
fn step(view: &View, inc: &Incident) -> Next {
    let now = view.now;
    if let Some(next) = carrying(view, inc) {
        return next;
    }
    match inc.phase {
        Phase::Failed => Next::Over,
        _ if inc.timed_out(now) => match (inc.stage, inc.phase) {
            // Deleted and restored by ARM's word: the mirror just has not caught up.
            (Stage::Restore, Phase::Succeeded) => Next::Wait,
            _ => Next::Over,
        },
        Phase::Pending => {
            // Sent again as the instance's state now allows (stopped since: started instead).
            let power = view
                .present
                .get(inc.target.as_str())
                .and_then(|m| m.instance.power_state.as_deref());
            let mut again = inc.resend();
            again.action = inc.action.map(|a| a.for_power_state(power));
            Next::Continue(Step::Resend, Box::new(again))
        }
        Phase::Sending => match inc.sent_at.or(inc.step_started) {
            Some(sent) if now > sent + view.brakes.lease => unanswered(view, inc, sent),
            _ => Next::Wait,
        },
        Phase::Running => Next::Wait,
        Phase::Succeeded => match inc.stage {
            // The new instances must be in the mirror before the broken one goes.
            Stage::Surge => {
                let mirrored = match (view.synced_at, inc.settled_at) {
                    (Some(synced), Some(settled)) => synced > settled,
                    _ => false,
                };
                if mirrored {
                    Next::Continue(Step::Advance, Box::new(inc.advance(Stage::Delete)))
                } else {
                    Next::Wait
                }
            }
            Stage::DeleteFirst => {
                Next::Continue(Step::Advance, Box::new(inc.advance(Stage::Restore)))
            }
            Stage::Act | Stage::Delete | Stage::Restore | Stage::Carry => Next::Wait,
        },
    }
}

/// A call still `Sending` after its claiming pass is surely over: its answer was lost (the call
/// may well have landed) or the pass stopped before sending it. It is never sent again blindly:
/// the instance's state, read by the mirror after that pass was over, says whether an operation
/// ran on it since. If one did, the call landed and its effect and the deadline decide. If none
/// did, it is sent again once without spending the attempt; lost and not landed a second time,
/// the attempt is spent (escalate, or give up with an alert). A grow cannot be told from someone
/// else's capacity change, so it waits for its deadline.
fn unanswered(view: &View, inc: &Incident, sent: OffsetDateTime) -> Next {
    if inc.call() == Some(Call::Grow) {
        return Next::Wait;
    }
    let read_after = view.synced_at.is_some_and(|s| s > sent + view.brakes.lease);
    let Some(m) = view.present.get(inc.target.as_str()) else {
        return Next::Wait;
    };
    if !read_after {
        return Next::Wait;
    }
    let provisioning = m
        .instance
        .provisioning_state
        .as_deref()
        .unwrap_or("succeeded")
        .to_ascii_lowercase();
    let busy = crate::verdict::operation_in_progress(&provisioning);
    let landed = m.instance.provisioned_at.is_some_and(|t| t >= sent);
    if busy || landed {
        Next::Wait
    } else if inc.unanswered == 0 {
        // Sent as the instance's state now allows (stopped since: started instead).
        let mut again = inc.unanswered_again();
        again.action = inc
            .action
            .map(|a| a.for_power_state(m.instance.power_state.as_deref()));
        Next::Continue(Step::Resend, Box::new(again))
    } else {
        Next::Over
    }
}

/// The label of [`WithheldReason::Settling`], as the scale set's row keeps it.
pub const SETTLING: &str = "settling";

/// A set-wide pause on the fleet's own evidence does not end the pass its evidence clears: a
/// fleet recovers one heartbeat at a time (each agent at its own moment of the interval), and a
/// pass in the middle would see the set under its limits and repair the instances that have not
/// reported yet — healthy VMs, after a pipeline fault. So while any instance still looks
/// unhealthy the set settles first: held until every instance has had `HEALER_HEARTBEAT_TIMEOUT`
/// to report since (the row's brake and its time carry that from pass to pass). One that is still
/// silent or DOWN then is repaired; a set found whole resumes at once.
fn settling(
    record: Option<&ScaleSetRecord>,
    policy: &Policy,
    unhealthy: usize,
    now: OffsetDateTime,
) -> Option<WithheldReason> {
    let record = record.filter(|_| unhealthy > 0)?;
    let hold = policy.heartbeat_timeout;
    match record.brake.as_deref()? {
        "pipeline_fault" | "too_many_unhealthy" if !hold.is_zero() => {
            Some(WithheldReason::Settling {
                since: now,
                until: now + hold,
            })
        }
        SETTLING => record
            .brake_since
            .filter(|since| now < *since + hold)
            .map(|since| WithheldReason::Settling {
                since,
                until: since + hold,
            }),
        _ => None,
    }
}

/// The scale-set brake in force, if any: nothing new is started while one holds. A quiet scale
/// set is only re-read every full resync, so its mirror may be that old; one with an announced
/// change must catch up within the mirror's maximum age.
fn pause(view: &View, plan: &Plan) -> Option<WithheldReason> {
    let (record, brakes, now) = (view.obs.record.as_ref(), view.brakes, view.now);
    let changed_at = record.and_then(|r| r.changed_at);
    let operator = record.and_then(|r| {
        r.operator_pause
            .clone()
            .map(|note| WithheldReason::PausedByOperator {
                note,
                since: r.operator_pause_since,
            })
    });
    operator
        .or(match view.synced_at {
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
            let max = view.policy.max_unhealthy.of(plan.total, 0);
            (plan.unhealthy as u32 > max).then_some(WithheldReason::TooManyUnhealthy {
                unhealthy: plan.unhealthy,
                total: plan.total,
                max,
            })
        })
        .or_else(|| settling(record, view.policy, plan.unhealthy, now))
        .or_else(|| {
            let platform = record.is_some_and(|r| r.platform_auto_repair);
            (platform && view.policy.platform_repairs == PlatformRepairs::Defer)
                .then_some(WithheldReason::PlatformRepairs)
        })
        .or_else(|| {
            record
                .and_then(|r| r.throttled_until)
                .filter(|until| *until > now)
                .map(|until| WithheldReason::Throttled { until })
        })
}

/// Escalations of steps that ended without working, oldest incident first, up to the parallel
/// limit.
fn escalate(
    view: &View,
    mut escalations: Vec<&Versioned<Incident>>,
    in_flight: &mut usize,
    plan: &mut Plan,
) {
    let max_parallel = view.policy.max_parallel.of(plan.total, 1);
    escalations.sort_by_key(|v| v.value.opened_at);
    for v in escalations {
        let inc = &v.value;
        let m = view.present.get(inc.target.as_str()).copied();
        let reason = view.reason(inc);
        if m.is_some_and(|m| m.instance.protected_from_scale_set_actions) {
            plan.withheld.push(Withheld {
                instance_id: Some(inc.target.clone()),
                why: WithheldReason::Protected { reason },
            });
            continue;
        }
        if *in_flight as u32 >= max_parallel {
            plan.withheld.push(Withheld {
                instance_id: Some(inc.target.clone()),
                why: WithheldReason::MaxParallel {
                    in_flight: *in_flight,
                    max: max_parallel,
                    reason,
                },
            });
            continue;
        }
        let action = view.action(&inc.target, inc.attempt as usize);
        if m.is_some_and(|m| m.instance.delete_locked) && action.deletes() {
            plan.withheld.push(Withheld {
                instance_id: Some(inc.target.clone()),
                why: WithheldReason::DeleteLocked { action, reason },
            });
            continue;
        }
        *in_flight += 1;
        let mut next = view.staged(inc.escalate(action, view.now, view.step_timeout(action)));
        next.dry_run = view.brakes.dry_run;
        let mut t = view.transition(Step::Escalate, v, next);
        view.drain_evidence(action, &mut t.evidence);
        plan.transitions.push(t);
    }
}

/// New incidents for unhealthy instances without one, in instance order, up to the parallel limit.
fn open(view: &View, in_flight: &mut usize, plan: &mut Plan) {
    let (policy, now) = (view.policy, view.now);
    let max_parallel = policy.max_parallel.of(plan.total, 1);
    let synced_at = view.synced_at;
    let mirror_age = synced_at.map(|s| now - s);
    let mirror_current = mirror_age.is_some_and(|age| age <= view.brakes.mirror_max_age);
    let mut next: Option<Duration> = None;
    for m in &view.obs.instances {
        let id = m.instance.instance_id.as_str();
        let hb = view.obs.heartbeats.get(id);
        let verdict = &view.verdicts[id];
        let created = m.instance.created_at.unwrap_or(m.synced_at);
        if let Some(d) = recheck_in(verdict, hb, created, policy, now) {
            next = Some(next.map_or(d, |n| n.min(d)));
        }
        let reason = match verdict {
            Verdict::Unhealthy(reason) => reason,
            _ => continue,
        };
        if plan.transitions.iter().any(|t| t.incident.target == id)
            || plan
                .withheld
                .iter()
                .any(|w| w.instance_id.as_deref() == Some(id))
        {
            continue;
        }
        let withhold = |why| Withheld {
            instance_id: Some(id.to_string()),
            why,
        };
        if let Some(v) = view.incidents.get(id) {
            match v.value.state {
                State::Repairing if v.value.in_flight(now) => {
                    plan.withheld.push(withhold(WithheldReason::RepairInFlight {
                        incident: v.value.id.clone(),
                        until: v.value.deadline.unwrap_or(now),
                    }));
                    continue;
                }
                // Ended but not escalated: withheld above already said why.
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
        if let Some(operation) = view.obs.held.get(id) {
            plan.withheld
                .push(withhold(WithheldReason::HeldByOperation {
                    operation: operation.clone(),
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
        if *in_flight as u32 >= max_parallel {
            plan.withheld.push(withhold(WithheldReason::MaxParallel {
                in_flight: *in_flight,
                max: max_parallel,
                reason: reason.clone(),
            }));
            continue;
        }
        let action = view.action(id, 0);
        if m.instance.delete_locked && action.deletes() {
            plan.withheld.push(withhold(WithheldReason::DeleteLocked {
                action,
                reason: reason.clone(),
            }));
            continue;
        }
        *in_flight += 1;
        let (claim, previous) = view.claim(id);
        let mut incident = view.staged(Incident::open(
            id,
            reason.label(),
            action,
            now,
            view.step_timeout(action),
        ));
        incident.dry_run = view.brakes.dry_run;
        let mut evidence = evidence(reason, hb, Some(m));
        view.drain_evidence(action, &mut evidence);
        plan.transitions.push(Transition {
            step: Step::Open,
            incident,
            claim,
            previous,
            evidence,
            reason: Some(reason.clone()),
        });
    }
    plan.next_check = next;
}

/// Keeps our writes to the scale set apart: a capacity change (`grow`) and a delete never run at
/// once, nor two of either — ARM preempts a running delete with a scale set write, and concurrent
/// deletes race for the capacity (kubernetes/autoscaler#3284). A pass sends at most one write: the
/// batched delete first (it frees what a surge added), else one delete split from its batch, else
/// the batched grow. Restarts, starts and reimages act on instances only and go out as they are.
fn keep_writes_apart(view: &View, plan: &mut Plan) {
    let is_write = |c: Option<Call>| matches!(c, Some(Call::Grow | Call::Delete));
    let running = view
        .incidents
        .values()
        // A write past its deadline is taken as over: the deadline bounds what we believe.
        .filter(|v| !v.value.dry_run && v.value.call_in_flight() && !v.value.timed_out(view.now))
        .filter(|v| {
            !plan
                .transitions
                .iter()
                .any(|t| t.incident.target == v.value.target)
        })
        .map(|v| v.value.call())
        .find(|c| is_write(*c))
        .flatten()
        .or(view.obs.operation_write.filter(|c| is_write(Some(*c))));
    let writes = || plan.transitions.iter().filter(|t| is_write(t.call()));
    // (the call that goes out, and the one target it is limited to when split from its batch)
    let chosen: Option<(Call, Option<String>)> = if running.is_some() {
        None
    } else if writes().any(|t| t.call() == Some(Call::Delete) && !t.alone()) {
        Some((Call::Delete, None))
    } else if let Some(t) = writes().find(|t| t.call() == Some(Call::Delete)) {
        Some((Call::Delete, Some(t.incident.target.clone())))
    } else if writes().any(|t| t.call() == Some(Call::Grow)) {
        Some((Call::Grow, None))
    } else {
        None
    };
    let admitted = |t: &Transition| match (&chosen, t.call()) {
        (_, c) if !is_write(c) => true,
        (Some((Call::Delete, None)), Some(Call::Delete)) => !t.alone(),
        (Some((Call::Delete, Some(only))), Some(Call::Delete)) => &t.incident.target == only,
        (Some((Call::Grow, _)), Some(Call::Grow)) => true,
        _ => false,
    };
    let waiting_for = running.or(chosen.as_ref().map(|(c, _)| *c));
    let (kept, held): (Vec<Transition>, Vec<Transition>) = std::mem::take(&mut plan.transitions)
        .into_iter()
        .partition(|t| admitted(t));
    for t in held {
        let call = t.call().unwrap_or(Call::Grow);
        plan.withheld.push(Withheld {
            instance_id: Some(t.incident.target.clone()),
            why: WithheldReason::ScaleSetBusy {
                call,
                waiting_for: waiting_for.unwrap_or(call),
            },
        });
    }
    plan.transitions = kept;
}

#[cfg(test)]
mod tests;
