//! Is this instance healthy, and if not, why — from the mirror and its last heartbeat only.
//! Pure: the clock is passed in.

use crate::heartbeat::{Heartbeat, Status};
use crate::mirror::Instance;
use crate::policy::Policy;
use serde::Serialize;
use time::{Duration, OffsetDateTime};

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "verdict", rename_all = "snake_case")]
pub enum Verdict {
    Healthy,
    /// Not judged: planned work until the given time.
    Maintenance {
        #[serde(with = "time::serde::rfc3339")]
        until: OffsetDateTime,
    },
    /// No evidence yet, still within the startup timeout.
    Starting,
    Unhealthy(Reason),
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "reason", rename_all = "snake_case")]
pub enum Reason {
    /// The VM itself reported DOWN.
    ReportedDown {
        #[serde(with = "time::serde::rfc3339")]
        at: OffsetDateTime,
    },
    /// The VM stopped publishing.
    Silent {
        #[serde(with = "time::serde::rfc3339")]
        last: OffsetDateTime,
        seconds: i64,
    },
    /// The VM never published within the startup timeout.
    NeverReported { seconds_since_creation: i64 },
}

impl Reason {
    pub fn describe(&self) -> String {
        match self {
            Reason::ReportedDown { .. } => "the instance reported DOWN".into(),
            Reason::Silent { seconds, .. } => format!("no heartbeat for {seconds} s"),
            Reason::NeverReported {
                seconds_since_creation,
            } => format!("no heartbeat since creation {seconds_since_creation} s ago"),
        }
    }
}

/// Judges one instance. `first_seen` stands in for the creation time when ARM did not report one.
pub fn judge(
    instance: &Instance,
    heartbeat: Option<&Heartbeat>,
    first_seen: OffsetDateTime,
    policy: &Policy,
    now: OffsetDateTime,
) -> Verdict {
    match heartbeat {
        Some(hb) => match hb.status {
            Status::Maintenance { until } if until > now => Verdict::Maintenance { until },
            Status::Down => Verdict::Unhealthy(Reason::ReportedDown { at: hb.event_time }),
            _ => {
                let silent = now - hb.event_time;
                if silent > policy.heartbeat_timeout {
                    Verdict::Unhealthy(Reason::Silent {
                        last: hb.event_time,
                        seconds: silent.whole_seconds(),
                    })
                } else {
                    Verdict::Healthy
                }
            }
        },
        None => {
            let age = now - instance.created_at.unwrap_or(first_seen);
            if age > policy.startup_timeout {
                Verdict::Unhealthy(Reason::NeverReported {
                    seconds_since_creation: age.whole_seconds(),
                })
            } else {
                Verdict::Starting
            }
        }
    }
}

/// When this verdict could change by the clock alone (for logs and the next-check hint).
pub fn recheck_in(
    verdict: &Verdict,
    heartbeat: Option<&Heartbeat>,
    created: OffsetDateTime,
    policy: &Policy,
    now: OffsetDateTime,
) -> Option<Duration> {
    match verdict {
        Verdict::Healthy => heartbeat.map(|hb| hb.event_time + policy.heartbeat_timeout - now),
        Verdict::Starting => Some(created + policy.startup_timeout - now),
        Verdict::Maintenance { until } => Some(*until - now),
        Verdict::Unhealthy(_) => None,
    }
    .map(|d| d + Duration::SECOND)
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

    fn policy() -> Policy {
        Settings::from_lookup(|k| match k {
            "HEALER_SCALE_SETS" => Some("/subscriptions/s/resourceGroups/r/providers/Microsoft.Compute/virtualMachineScaleSets/w".into()),
            "HEALER_STORAGE" => Some("UseDevelopmentStorage=true".into()),
            _ => None,
        })
        .unwrap()
        .defaults
    }

    fn hb(status: Status, age_s: i64) -> Heartbeat {
        Heartbeat {
            target: ScaleSetId::new("s", "r", "w").instance("1"),
            status,
            event_time: NOW - Duration::seconds(age_s),
            received_at: NOW - Duration::seconds(age_s),
            sequence: None,
            vm_id: None,
            computer_name: None,
            detail: None,
            origin: Origin::Agent,
            event_id: "e".into(),
            down_since: None,
        }
    }

    #[test]
    fn verdict_table() {
        let p = policy();
        let created_long_ago = NOW - Duration::hours(1);
        let mut fresh = instance("1");
        fresh.created_at = Some(NOW - Duration::seconds(100));
        let old = instance("1");
        let until = NOW + Duration::minutes(10);
        let cases: Vec<(&str, &Instance, Option<Heartbeat>, Verdict)> = vec![
            (
                "recent UP",
                &old,
                Some(hb(Status::Up, 30)),
                Verdict::Healthy,
            ),
            (
                "UP at the timeout edge",
                &old,
                Some(hb(Status::Up, 180)),
                Verdict::Healthy,
            ),
            (
                "UP gone silent",
                &old,
                Some(hb(Status::Up, 181)),
                Verdict::Unhealthy(Reason::Silent {
                    last: NOW - Duration::seconds(181),
                    seconds: 181,
                }),
            ),
            (
                "DOWN",
                &old,
                Some(hb(Status::Down, 5)),
                Verdict::Unhealthy(Reason::ReportedDown {
                    at: NOW - Duration::seconds(5),
                }),
            ),
            (
                "in maintenance",
                &old,
                Some(hb(Status::Maintenance { until }, 5)),
                Verdict::Maintenance { until },
            ),
            (
                "maintenance over and silent",
                &old,
                Some(hb(
                    Status::Maintenance {
                        until: NOW - Duration::seconds(1),
                    },
                    600,
                )),
                Verdict::Unhealthy(Reason::Silent {
                    last: NOW - Duration::seconds(600),
                    seconds: 600,
                }),
            ),
            ("new and quiet", &fresh, None, Verdict::Starting),
            (
                "never reported",
                &old,
                None,
                Verdict::Unhealthy(Reason::NeverReported {
                    seconds_since_creation: 3600,
                }),
            ),
        ];
        for (name, inst, heartbeat, want) in cases {
            let got = judge(inst, heartbeat.as_ref(), created_long_ago, &p, NOW);
            assert_eq!(got, want, "{name}");
        }
    }

    #[test]
    fn recheck_is_when_the_deadline_passes() {
        let p = policy();
        let beat = hb(Status::Up, 100);
        let v = judge(&instance("1"), Some(&beat), NOW, &p, NOW);
        assert_eq!(
            recheck_in(&v, Some(&beat), NOW, &p, NOW),
            Some(Duration::seconds(81))
        );
    }
}
