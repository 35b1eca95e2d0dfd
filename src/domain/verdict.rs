//! Is this instance healthy, and if not, why — and if not yet, when to look again. Pure: the clock
//! is passed in. Weighs all the evidence together: the VM's own heartbeat, the platform's view
//! (provisioning and power state), and the Application Health extension.

use crate::heartbeat::{Heartbeat, Status};
use crate::mirror::{AppHealth, Instance};
use crate::policy::Policy;
use serde::Serialize;
use time::{Duration, OffsetDateTime};

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    Healthy,
    /// Planned work announced by the VM: not judged until then.
    Maintenance {
        #[serde(with = "time::serde::rfc3339")]
        until: OffsetDateTime,
    },
    /// The platform will terminate, reboot or redeploy the VM (a scheduled event), and it drains
    /// meanwhile: never a fault, never repaired, until well after the event's `NotBefore`.
    Draining {
        #[serde(with = "time::serde::rfc3339")]
        until: OffsetDateTime,
    },
    /// Too early to judge: new and quiet within the startup timeout, or being provisioned.
    Starting,
    /// Evidence of trouble that does not count yet; it counts at `until` if it persists.
    Suspect {
        reason: Reason,
        #[serde(with = "time::serde::rfc3339")]
        until: OffsetDateTime,
    },
    Unhealthy(Reason),
}

impl Verdict {
    pub fn is_unhealthy(&self) -> bool {
        matches!(self, Verdict::Unhealthy(_))
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Reason {
    /// The VM itself reports DOWN, since `since`.
    ReportedDown {
        #[serde(with = "time::serde::rfc3339")]
        since: OffsetDateTime,
    },
    /// The VM stopped publishing.
    Silent {
        #[serde(with = "time::serde::rfc3339")]
        last: OffsetDateTime,
        seconds: i64,
    },
    /// The VM never published within the startup timeout.
    NeverReported { seconds_since_creation: i64 },
    /// The VM reports STARTING past the startup timeout (counted from its creation or our last
    /// repair): its application never started.
    NeverStarted { seconds: i64 },
    /// The platform failed to provision the instance.
    ProvisioningFailed,
    /// The instance is stopped or deallocated though nothing of ours asked for it.
    Stopped { power_state: String },
    /// The Application Health extension reports the instance unhealthy (or unknown).
    AppUnhealthy {
        state: AppHealth,
        #[serde(with = "time::serde::rfc3339")]
        since: OffsetDateTime,
    },
}

impl Reason {
    pub fn label(&self) -> &'static str {
        match self {
            Reason::ReportedDown { .. } => "reported_down",
            Reason::Silent { .. } => "silent",
            Reason::NeverReported { .. } => "never_reported",
            Reason::NeverStarted { .. } => "never_started",
            Reason::ProvisioningFailed => "provisioning_failed",
            Reason::Stopped { .. } => "stopped",
            Reason::AppUnhealthy { .. } => "app_unhealthy",
        }
    }

    /// Whether the evidence is the mirror's (what the Compute API reported at the last read) rather
    /// than the VM's own heartbeats: such a verdict is only as current as the mirror.
    pub fn from_mirror(&self) -> bool {
        matches!(
            self,
            Reason::ProvisioningFailed | Reason::Stopped { .. } | Reason::AppUnhealthy { .. }
        )
    }

    pub fn describe(&self) -> String {
        match self {
            Reason::ReportedDown { .. } => "the instance reported DOWN".into(),
            Reason::Silent { seconds, .. } => format!("no heartbeat for {seconds} s"),
            Reason::NeverReported {
                seconds_since_creation,
            } => format!("no heartbeat since creation {seconds_since_creation} s ago"),
            Reason::NeverStarted { seconds } => format!(
                "the instance reports STARTING {seconds} s after it was created or repaired, past HEALER_STARTUP_TIMEOUT: its application never started"
            ),
            Reason::ProvisioningFailed => "provisioning failed".into(),
            Reason::Stopped { power_state } => format!("the instance is {power_state}"),
            Reason::AppUnhealthy { state, .. } => {
                format!(
                    "the Application Health extension reports {}",
                    state.as_str()
                )
            }
        }
    }
}

/// What the judge knows about an instance besides its own rows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct History {
    /// When the mirror first saw the instance (stands in for an unknown creation time).
    pub first_seen: OffsetDateTime,
    /// When we last repaired it, if we did.
    pub last_repair: Option<OffsetDateTime>,
}

const PROVISIONING_IN_PROGRESS: [&str; 4] = ["creating", "updating", "deleting", "migrating"];

/// Whether a provisioning state (lower case) says an operation runs on the instance.
pub fn operation_in_progress(provisioning: &str) -> bool {
    PROVISIONING_IN_PROGRESS.contains(&provisioning)
}
const STOPPED: [&str; 3] = ["stopped", "deallocated", "deallocating"];

/// The heartbeat, if it proves what the policy requires. One that proves less was refused when it
/// arrived; it can only be stored from before the policy was raised, and it is no evidence of
/// anything — not of life, not of trouble, not of when the VM last spoke.
fn believed<'a>(heartbeat: Option<&'a Heartbeat>, policy: &Policy) -> Option<&'a Heartbeat> {
    heartbeat.filter(|hb| hb.proof() >= policy.down_proof)
}

/// When a VM that last spoke with `hb` counts as silent. The VM's clock is believed only up to
/// when we received the reading (a clock ahead would stretch its liveness), and a VM is never
/// silent before its startup timeout: a reading dated just after creation must not have a booting
/// VM judged sooner than if it had said nothing.
fn silent_after(hb: &Heartbeat, created: OffsetDateTime, policy: &Policy) -> OffsetDateTime {
    let last = hb.event_time.min(hb.received_at);
    (last + policy.heartbeat_timeout).max(created + policy.startup_timeout)
}

/// Judges one instance.
pub fn judge(
    instance: &Instance,
    heartbeat: Option<&Heartbeat>,
    history: History,
    policy: &Policy,
    now: OffsetDateTime,
) -> Verdict {
    let heartbeat = believed(heartbeat, policy);
    let provisioning = instance
        .provisioning_state
        .as_deref()
        .unwrap_or("succeeded")
        .to_ascii_lowercase();
    if provisioning == "failed" {
        return Verdict::Unhealthy(Reason::ProvisioningFailed);
    }
    if PROVISIONING_IN_PROGRESS.contains(&provisioning.as_str()) {
        return Verdict::Starting;
    }

    let created = instance.created_at.unwrap_or(history.first_seen);
    // After creation or one of our repairs, an instance gets time to settle before DOWN counts.
    let grace_until = [Some(created), history.last_repair]
        .into_iter()
        .flatten()
        .map(|t| t + policy.grace_period)
        .max()
        .unwrap_or(created);
    let unless_in_grace = |reason: Reason, counts_from: OffsetDateTime| {
        let until = grace_until.max(counts_from);
        if now < until {
            Verdict::Suspect { reason, until }
        } else {
            Verdict::Unhealthy(reason)
        }
    };

    // A VM the platform is about to terminate, reboot or redeploy says so (its scheduled event):
    // what follows — stopped, deallocated, silent — is the platform's doing, not a fault, until
    // well after the event's time (a grace period past it, then the usual rules). A far-future
    // `until` exempts no longer than the policy allows.
    if let Some(hb) = heartbeat {
        if let Status::Draining { until } = hb.status {
            let until = until.min(hb.event_time + policy.max_maintenance);
            if now < until + policy.grace_period {
                return Verdict::Draining { until };
            }
        }
    }

    // What the platform says outranks what the VM says of itself: a stopped or failed VM is
    // judged even during its announced maintenance.
    if let Some(power) = instance.power_state.as_deref() {
        if STOPPED.contains(&power) {
            return unless_in_grace(
                Reason::Stopped {
                    power_state: power.to_string(),
                },
                now,
            );
        }
    }
    if let Some(hb) = heartbeat {
        if let Status::Maintenance { until } = hb.status {
            // A far-future `until` (forged, or a typo) exempts no longer than the policy allows.
            let until = until.min(hb.event_time + policy.max_maintenance);
            if until > now {
                return Verdict::Maintenance { until };
            }
        }
    }

    match heartbeat {
        Some(hb) if hb.status == Status::Down => {
            let since = hb.down_since.unwrap_or(hb.event_time);
            return unless_in_grace(Reason::ReportedDown { since }, since + policy.down_for);
        }
        Some(hb) => {
            if now > silent_after(hb, created, policy) {
                let last = hb.event_time.min(hb.received_at);
                return Verdict::Unhealthy(Reason::Silent {
                    last,
                    seconds: (now - last).whole_seconds(),
                });
            }
        }
        None => {
            let age = now - created;
            if age > policy.startup_timeout {
                return Verdict::Unhealthy(Reason::NeverReported {
                    seconds_since_creation: age.whole_seconds(),
                });
            }
        }
    }

    if heartbeat.is_some_and(|hb| hb.status == Status::Starting) {
        let started = history.last_repair.map_or(created, |r| r.max(created));
        let age = now - started;
        if age > policy.startup_timeout {
            return Verdict::Unhealthy(Reason::NeverStarted {
                seconds: age.whole_seconds(),
            });
        }
        return Verdict::Starting;
    }

    if let Some(state @ (AppHealth::Unhealthy | AppHealth::Unknown)) = instance.health {
        let since = instance.health_since.unwrap_or(history.first_seen);
        return unless_in_grace(
            Reason::AppUnhealthy { state, since },
            since + policy.grace_period,
        );
    }
    if heartbeat.is_none() {
        return Verdict::Starting;
    }
    Verdict::Healthy
}

/// When this verdict could change by the clock alone (the next-check hint), one second late so
/// the deadline has surely passed.
pub fn recheck_in(
    verdict: &Verdict,
    heartbeat: Option<&Heartbeat>,
    created: OffsetDateTime,
    policy: &Policy,
    now: OffsetDateTime,
) -> Option<Duration> {
    match verdict {
        Verdict::Healthy => {
            believed(heartbeat, policy).map(|hb| silent_after(hb, created, policy) - now)
        }
        Verdict::Starting => Some(created + policy.startup_timeout - now),
        Verdict::Maintenance { until } | Verdict::Suspect { until, .. } => Some(*until - now),
        Verdict::Draining { until } => Some(*until + policy.grace_period - now),
        Verdict::Unhealthy(_) => None,
    }
    .map(|d| d.max(Duration::ZERO) + Duration::SECOND)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::heartbeat::Origin;
    use crate::mirror::fixtures::instance;
    use crate::scaleset::ScaleSetId;
    use crate::settings::Settings;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-22 12:00 UTC);

    pub(crate) fn policy() -> Policy {
        Settings::from_lookup(|k| match k {
            "HEALER_SCALE_SETS" => Some(
                "/subscriptions/s/resourceGroups/r/providers/Microsoft.Compute/virtualMachineScaleSets/w".into(),
            ),
            "HEALER_STORAGE" => Some("UseDevelopmentStorage=true".into()),
            _ => None,
        })
        .unwrap()
        .defaults
    }

    fn secs(n: i64) -> Duration {
        Duration::seconds(n)
    }

    fn hb(status: Status, age_s: i64) -> Heartbeat {
        Heartbeat {
            target: ScaleSetId::new("s", "r", "w").instance("1"),
            status,
            event_time: NOW - secs(age_s),
            received_at: NOW - secs(age_s),
            sequence: None,
            vm_id: None,
            computer_name: None,
            detail: None,
            origin: Origin::Agent,
            event_id: "e".into(),
            down_since: None,
            attested: false,
            attestation: None,
        }
    }

    /// A DOWN from a legacy Prunella agent: identified by computer name only.
    fn prunella_down(age_s: i64) -> Heartbeat {
        Heartbeat {
            origin: Origin::Prunella,
            down_since: Some(NOW - secs(600)),
            ..hb(Status::Down, age_s)
        }
    }

    fn prunella(status: Status, age_s: i64) -> Heartbeat {
        Heartbeat {
            origin: Origin::Prunella,
            ..hb(status, age_s)
        }
    }

    /// Received `age_s` ago from a VM whose clock was `ahead_s` ahead.
    fn ahead(status: Status, age_s: i64, ahead_s: i64) -> Heartbeat {
        Heartbeat {
            event_time: NOW - secs(age_s) + secs(ahead_s),
            ..hb(status, age_s)
        }
    }

    fn down_for(streak_s: i64) -> Heartbeat {
        Heartbeat {
            down_since: Some(NOW - secs(streak_s)),
            ..hb(Status::Down, 5)
        }
    }

    /// An instance created an hour ago (well past every grace), with optional changes.
    fn old(change: impl FnOnce(&mut Instance)) -> Instance {
        let mut i = instance("1");
        i.created_at = Some(NOW - Duration::hours(1));
        change(&mut i);
        i
    }

    #[test]
    fn verdict_table() {
        let p = policy();
        let quiet = History {
            first_seen: NOW - Duration::hours(1),
            last_repair: None,
        };
        let just_repaired = History {
            last_repair: Some(NOW - secs(100)),
            ..quiet
        };
        let until = NOW + Duration::minutes(10);
        let far_future = time::macros::datetime!(9999-12-31 23:59:59 UTC);
        let fresh = |i: &mut Instance| i.created_at = Some(NOW - secs(100));
        let app = |state: AppHealth, since_s: i64| {
            move |i: &mut Instance| {
                i.health = Some(state);
                i.health_since = Some(NOW - secs(since_s));
            }
        };
        #[rustfmt::skip]
        let cases: Vec<(&str, Instance, Option<Heartbeat>, History, Verdict)> = vec![
            ("recent UP", old(|_| ()), Some(hb(Status::Up, 30)), quiet, Verdict::Healthy),
            ("UP at the timeout edge", old(|_| ()), Some(hb(Status::Up, 180)), quiet, Verdict::Healthy),
            ("UP gone silent", old(|_| ()), Some(hb(Status::Up, 181)), quiet,
                Verdict::Unhealthy(Reason::Silent { last: NOW - secs(181), seconds: 181 })),
            ("DOWN long enough", old(|_| ()), Some(down_for(60)), quiet,
                Verdict::Unhealthy(Reason::ReportedDown { since: NOW - secs(60) })),
            ("DOWN not yet for HEALER_DOWN_FOR", old(|_| ()), Some(down_for(20)), quiet,
                Verdict::Suspect { reason: Reason::ReportedDown { since: NOW - secs(20) }, until: NOW + secs(40) }),
            ("DOWN within grace after creation", old(fresh), Some(down_for(90)), quiet,
                Verdict::Suspect { reason: Reason::ReportedDown { since: NOW - secs(90) }, until: NOW + secs(200) }),
            ("DOWN within grace after a repair", old(|_| ()), Some(down_for(90)), just_repaired,
                Verdict::Suspect { reason: Reason::ReportedDown { since: NOW - secs(90) }, until: NOW + secs(200) }),
            ("in maintenance", old(|_| ()), Some(hb(Status::Maintenance { until }, 5)), quiet, Verdict::Maintenance { until }),
            ("a stopped VM is judged whatever MAINTENANCE says", old(|i| i.power_state = Some("deallocated".into())),
                Some(hb(Status::Maintenance { until }, 5)), quiet, Verdict::Unhealthy(Reason::Stopped { power_state: "deallocated".into() })),
            ("a failed VM is judged whatever MAINTENANCE says", old(|i| i.provisioning_state = Some("Failed".into())),
                Some(hb(Status::Maintenance { until }, 5)), quiet, Verdict::Unhealthy(Reason::ProvisioningFailed)),
            ("MAINTENANCE until year 9999 is capped from when it was sent", old(|_| ()),
                Some(hb(Status::Maintenance { until: far_future }, 60)), quiet, Verdict::Maintenance { until: NOW - secs(60) + p.max_maintenance }),
            ("… and once the cap has passed the VM is judged again", old(|_| ()),
                Some(hb(Status::Maintenance { until: far_future }, 5 * 3600)), quiet,
                Verdict::Unhealthy(Reason::Silent { last: NOW - secs(5 * 3600), seconds: 5 * 3600 })),
            ("maintenance over and silent", old(|_| ()), Some(hb(Status::Maintenance { until: NOW - secs(1) }, 600)), quiet,
                Verdict::Unhealthy(Reason::Silent { last: NOW - secs(600), seconds: 600 })),
            ("draining: never a fault", old(|_| ()), Some(hb(Status::Draining { until: NOW + secs(120) }, 5)), quiet,
                Verdict::Draining { until: NOW + secs(120) }),
            ("draining and deallocated by its own event: the platform's doing", old(|i| i.power_state = Some("deallocated".into())),
                Some(hb(Status::Draining { until: NOW - secs(60) }, 200)), quiet, Verdict::Draining { until: NOW - secs(60) }),
            ("draining and silent within the grace past NotBefore", old(|_| ()), Some(hb(Status::Draining { until: NOW - secs(299) }, 900)), quiet,
                Verdict::Draining { until: NOW - secs(299) }),
            ("… still there well after NotBefore: judged again", old(|_| ()), Some(hb(Status::Draining { until: NOW - secs(301) }, 900)), quiet,
                Verdict::Unhealthy(Reason::Silent { last: NOW - secs(900), seconds: 900 })),
            ("DRAINING until year 9999 exempts no longer than the cap", old(|_| ()),
                Some(hb(Status::Draining { until: far_future }, 5 * 3600)), quiet,
                Verdict::Unhealthy(Reason::Silent { last: NOW - secs(5 * 3600), seconds: 5 * 3600 })),
            ("new and quiet", old(fresh), None, quiet, Verdict::Starting),
            ("never reported", old(|_| ()), None, quiet, Verdict::Unhealthy(Reason::NeverReported { seconds_since_creation: 3600 })),
            ("provisioning failed", old(|i| i.provisioning_state = Some("Failed".into())), Some(hb(Status::Up, 5)), quiet,
                Verdict::Unhealthy(Reason::ProvisioningFailed)),
            ("being updated", old(|i| i.provisioning_state = Some("Updating".into())), Some(hb(Status::Up, 900)), quiet, Verdict::Starting),
            ("unexpectedly deallocated", old(|i| i.power_state = Some("deallocated".into())), Some(hb(Status::Up, 30)), quiet,
                Verdict::Unhealthy(Reason::Stopped { power_state: "deallocated".into() })),
            ("app health unhealthy past grace", old(app(AppHealth::Unhealthy, 400)), Some(hb(Status::Up, 5)), quiet,
                Verdict::Unhealthy(Reason::AppUnhealthy { state: AppHealth::Unhealthy, since: NOW - secs(400) })),
            ("app health unknown within grace", old(app(AppHealth::Unknown, 100)), Some(hb(Status::Up, 5)), quiet,
                Verdict::Suspect { reason: Reason::AppUnhealthy { state: AppHealth::Unknown, since: NOW - secs(100) }, until: NOW + secs(200) }),
            ("hung VM with a healthy extension is still caught", old(app(AppHealth::Healthy, 4000)), Some(hb(Status::Up, 600)), quiet,
                Verdict::Unhealthy(Reason::Silent { last: NOW - secs(600), seconds: 600 })),
            // A reading that proves less than the policy requires (stored before the policy was
            // raised) is no evidence at all: judged as if the VM had said nothing.
            ("DOWN proven by no more than a name", old(|_| ()), Some(prunella_down(5)), quiet,
                Verdict::Unhealthy(Reason::NeverReported { seconds_since_creation: 3600 })),
            ("… on a new VM", old(fresh), Some(prunella_down(5)), quiet, Verdict::Starting),
            ("an UP proven by a name does not keep a broken VM alive", old(|i| { i.created_at = Some(NOW - secs(500)); app(AppHealth::Unhealthy, 400)(i) }), Some(prunella(Status::Up, 5)), quiet,
                Verdict::Unhealthy(Reason::AppUnhealthy { state: AppHealth::Unhealthy, since: NOW - secs(400) })),
            ("… nor date a new one back to look silent", old(fresh), Some(prunella(Status::Up, 800_000_000)), quiet, Verdict::Starting),
            ("a reading just after creation does not make a booting VM silent early", old(fresh), Some(hb(Status::Up, 99)), quiet, Verdict::Healthy),
            ("… it is silent at the startup timeout", old(|i| i.created_at = Some(NOW - secs(601))), Some(hb(Status::Up, 600)), quiet,
                Verdict::Unhealthy(Reason::Silent { last: NOW - secs(600), seconds: 600 })),
            ("a clock ahead does not stretch liveness", old(|_| ()), Some(ahead(Status::Up, 181, 240)), quiet,
                Verdict::Unhealthy(Reason::Silent { last: NOW - secs(181), seconds: 181 })),
            // STARTING (design §2): the VM runs, its application waits (for its data disk, say):
            // never healthy; judged by the startup timeout like a VM that never reported, counted
            // from its creation or our last repair of it.
            ("STARTING on a new VM is not healthy", old(fresh), Some(hb(Status::Starting, 5)), quiet, Verdict::Starting),
            ("STARTING past the startup timeout", old(|_| ()), Some(hb(Status::Starting, 5)), quiet,
                Verdict::Unhealthy(Reason::NeverStarted { seconds: 3600 })),
            ("STARTING after a repair, within the startup timeout", old(|_| ()), Some(hb(Status::Starting, 5)), just_repaired, Verdict::Starting),
            ("STARTING gone silent", old(|_| ()), Some(hb(Status::Starting, 181)), just_repaired,
                Verdict::Unhealthy(Reason::Silent { last: NOW - secs(181), seconds: 181 })),
        ];
        for (name, inst, heartbeat, history, want) in cases {
            assert_eq!(
                judge(&inst, heartbeat.as_ref(), history, &p, NOW),
                want,
                "{name}"
            );
        }
        // Where the operator accepts computer names as proof, a Prunella DOWN counts.
        let by_name = Policy {
            down_proof: crate::heartbeat::Proof::Name,
            ..p
        };
        assert_eq!(
            judge(&old(|_| ()), Some(&prunella_down(5)), quiet, &by_name, NOW),
            Verdict::Unhealthy(Reason::ReportedDown {
                since: NOW - secs(600)
            })
        );
    }

    #[test]
    fn recheck_is_when_the_deadline_passes() {
        let p = policy();
        let beat = hb(Status::Up, 100);
        let history = History {
            first_seen: NOW - Duration::hours(1),
            last_repair: None,
        };
        let v = judge(&old(|_| ()), Some(&beat), history, &p, NOW);
        assert_eq!(
            recheck_in(&v, Some(&beat), NOW - Duration::hours(1), &p, NOW),
            Some(secs(81))
        );
        // A VM in its first minutes is not looked at again before its startup timeout.
        assert_eq!(
            recheck_in(&v, Some(&beat), NOW - secs(60), &p, NOW),
            Some(secs(541))
        );
        let v = judge(&old(|_| ()), Some(&down_for(20)), history, &p, NOW);
        assert_eq!(recheck_in(&v, None, NOW, &p, NOW), Some(secs(41)));
    }
}
