//! The healing policy of one scale set: thresholds and repair actions, validated at startup so
//! that deciding can never fail on configuration.

use serde::Serialize;
use std::fmt;
use std::str::FromStr;
use time::Duration;

/// What a repair does to an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RepairAction {
    /// Delete the instance and leave capacity to autoscale (the classic behaviour).
    Delete,
    /// Delete the instance, then restore the scale set's capacity.
    Replace,
    /// Reimage the instance's OS disk in place.
    Reimage,
    /// Restart the instance.
    Restart,
    /// Start a stopped or deallocated instance (Azure refuses to restart one).
    Start,
    /// Move the instance to another host and start it there: for faults of the host, not the VM.
    Redeploy,
}

impl RepairAction {
    /// Whether the repair deletes the instance (a lock against deletion stops it).
    pub fn deletes(self) -> bool {
        matches!(self, RepairAction::Delete | RepairAction::Replace)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            RepairAction::Delete => "delete",
            RepairAction::Replace => "replace",
            RepairAction::Reimage => "reimage",
            RepairAction::Restart => "restart",
            RepairAction::Redeploy => "redeploy",
            RepairAction::Start => "start",
        }
    }

    /// Whether the instance is gone once the action has worked.
    pub fn removes_instance(self) -> bool {
        matches!(self, RepairAction::Delete | RepairAction::Replace)
    }

    /// The action as the instance's state allows it: a stopped or deallocated instance is started,
    /// never restarted (Azure answers 409 `OperationNotAllowed`, "The operation requires the VM to
    /// be running").
    pub fn for_power_state(self, power_state: Option<&str>) -> Self {
        let stopped = power_state.is_some_and(|p| {
            ["stopped", "deallocated", "deallocating"].contains(&p.to_ascii_lowercase().as_str())
        });
        match self {
            RepairAction::Restart if stopped => RepairAction::Start,
            other => other,
        }
    }
}

impl fmt::Display for RepairAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for RepairAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "delete" => Ok(RepairAction::Delete),
            "replace" => Ok(RepairAction::Replace),
            "reimage" => Ok(RepairAction::Reimage),
            "restart" => Ok(RepairAction::Restart),
            "start" => Ok(RepairAction::Start),
            "redeploy" => Ok(RepairAction::Redeploy),
            other => Err(format!(
                "unknown repair action `{other}` (expected delete, replace, reimage, restart, start or redeploy)"
            )),
        }
    }
}

/// An escalation list: each step is tried in order until the instance recovers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Escalation(Vec<RepairAction>);

impl Escalation {
    pub fn steps(&self) -> &[RepairAction] {
        &self.0
    }

    /// The action of attempt `n` (0-based); attempts past the list repeat its last step.
    pub fn step(&self, attempt: usize) -> RepairAction {
        self.0[attempt.min(self.0.len() - 1)]
    }
}

impl Escalation {
    /// The escalation of a stateful set: what keeps the instance's disks and address (a repair
    /// in place) before what replaces it. A `replace` with no step in place before it gets
    /// `restart,reimage` in front; any other list is kept as the operator wrote it.
    pub fn keeping_state(&self) -> Escalation {
        match self.0.iter().position(|a| *a == RepairAction::Replace) {
            Some(0) => Escalation(vec![
                RepairAction::Restart,
                RepairAction::Reimage,
                RepairAction::Replace,
            ]),
            _ => self.clone(),
        }
    }
}

impl FromStr for Escalation {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let steps = s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(RepairAction::from_str)
            .collect::<Result<Vec<_>, _>>()?;
        if steps.is_empty() {
            return Err("no repair action given".into());
        }
        if let Some(pos) = steps.iter().position(|a| a.removes_instance()) {
            if pos + 1 != steps.len() {
                return Err(format!(
                    "`{}` removes the instance, so it can only be the last step",
                    steps[pos]
                ));
            }
        }
        Ok(Escalation(steps))
    }
}

impl fmt::Display for Escalation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.0.iter().map(|a| a.as_str()).collect();
        f.write_str(&names.join(","))
    }
}

/// A bound given either as a count of instances or as a share of the scale set.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub enum Limit {
    Count(u32),
    Percent(f64),
}

impl Limit {
    /// The bound for a scale set of `total` instances, never below `floor`.
    pub fn of(self, total: usize, floor: u32) -> u32 {
        let raw = match self {
            Limit::Count(n) => n,
            Limit::Percent(p) => ((total as f64) * p / 100.0).floor() as u32,
        };
        raw.max(floor)
    }
}

impl FromStr for Limit {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if let Some(p) = s.strip_suffix('%') {
            let p: f64 = p
                .trim()
                .parse()
                .map_err(|_| format!("`{s}` is not a percentage"))?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(format!("`{s}` must be above 0% and at most 100%"));
            }
            Ok(Limit::Percent(p))
        } else {
            let n: u32 = s
                .parse()
                .map_err(|_| format!("`{s}` is neither a count nor a percentage like `10%`"))?;
            if n == 0 {
                return Err("must be at least 1".into());
            }
            Ok(Limit::Count(n))
        }
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::Count(n) => write!(f, "{n}"),
            Limit::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// What to do on a scale set whose platform automatic repairs are also enabled: two healers acting
/// on one instance is a known failure, so by default we leave it to the platform.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PlatformRepairs {
    /// Report it and repair nothing on that scale set.
    Defer,
    /// Report it and repair anyway.
    Act,
}

impl FromStr for PlatformRepairs {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "defer" => Ok(PlatformRepairs::Defer),
            "act" => Ok(PlatformRepairs::Act),
            other => Err(format!("`{other}` is neither defer nor act")),
        }
    }
}

/// Thresholds and actions for one scale set: the global defaults with the set's overrides.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Policy {
    pub heartbeat_timeout: Duration,
    pub startup_timeout: Duration,
    pub grace_period: Duration,
    pub down_for: Duration,
    pub repair_actions: Escalation,
    pub repair_timeout: Duration,
    pub max_attempts: u32,
    pub max_parallel: Limit,
    pub max_unhealthy: Limit,
    pub platform_repairs: PlatformRepairs,
    /// The least proof of identity a heartbeat needs to be believed at all: a forged DOWN deletes
    /// a healthy VM, a forged UP hides a broken one, and a forged old reading makes a new VM look
    /// silent.
    pub down_proof: crate::heartbeat::Proof,
    /// The longest a MAINTENANCE heartbeat exempts its VM, from when it was sent, whatever its
    /// `until` says (a forged or mistaken far-future `until` never exempts a VM for ever).
    pub max_maintenance: Duration,
    /// What follows an instance's slot across a replacement, on a stateful set.
    pub stateful: Option<crate::slot::Stateful>,
}

/// Parses a duration in seconds: `180`, `180s`, `3m` or `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, "s"),
    };
    let n: i64 = digits
        .parse()
        .map_err(|_| format!("`{s}` is not a duration (seconds, or a number with s, m or h)"))?;
    let seconds = match unit.trim() {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => {
            return Err(format!(
                "`{s}` is not a duration (seconds, or a number with s, m or h)"
            ))
        }
    };
    Ok(Duration::seconds(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escalations_parse_and_keep_removal_last() {
        let e: Escalation = "restart, reimage,REPLACE".parse().unwrap();
        assert_eq!(
            e.steps(),
            &[
                RepairAction::Restart,
                RepairAction::Reimage,
                RepairAction::Replace
            ]
        );
        assert_eq!(e.step(0), RepairAction::Restart);
        assert_eq!(e.step(7), RepairAction::Replace);
        assert_eq!(e.to_string(), "restart,reimage,replace");
        assert!("delete,restart"
            .parse::<Escalation>()
            .unwrap_err()
            .contains("last step"));
        assert!("".parse::<Escalation>().is_err());
        assert!("reboot"
            .parse::<Escalation>()
            .unwrap_err()
            .contains("reboot"));
    }

    #[test]
    fn a_stateful_set_keeps_state_before_it_replaces() {
        for (given, want) in [
            ("replace", "restart,reimage,replace"),
            ("reimage,replace", "reimage,replace"),
            ("restart,reimage,replace", "restart,reimage,replace"),
            ("restart", "restart"),
            ("reimage", "reimage"),
        ] {
            let e: Escalation = given.parse().unwrap();
            assert_eq!(e.keeping_state().to_string(), want, "{given}");
        }
    }

    #[test]
    fn a_stopped_instance_is_started_not_restarted() {
        for (action, power, want) in [
            (
                RepairAction::Restart,
                Some("deallocated"),
                RepairAction::Start,
            ),
            (RepairAction::Restart, Some("Stopped"), RepairAction::Start),
            (
                RepairAction::Restart,
                Some("running"),
                RepairAction::Restart,
            ),
            (RepairAction::Restart, None, RepairAction::Restart),
            (
                RepairAction::Reimage,
                Some("stopped"),
                RepairAction::Reimage,
            ),
            (
                RepairAction::Replace,
                Some("deallocated"),
                RepairAction::Replace,
            ),
        ] {
            assert_eq!(action.for_power_state(power), want, "{action} on {power:?}");
        }
    }

    #[test]
    fn limits_scale_with_the_fleet_and_respect_the_floor() {
        let ten: Limit = "10%".parse().unwrap();
        assert_eq!(ten.of(20, 1), 2);
        assert_eq!(ten.of(5, 1), 1);
        assert_eq!(ten.of(0, 0), 0);
        assert_eq!("3".parse::<Limit>().unwrap().of(1000, 1), 3);
        for bad in ["0", "0%", "101%", "ten", "-1"] {
            assert!(bad.parse::<Limit>().is_err(), "{bad}");
        }
    }

    #[test]
    fn durations_accept_seconds_and_units() {
        assert_eq!(parse_duration("180").unwrap(), Duration::seconds(180));
        assert_eq!(parse_duration("3m").unwrap(), Duration::seconds(180));
        assert_eq!(parse_duration("1h").unwrap(), Duration::seconds(3600));
        assert_eq!(parse_duration("45s").unwrap(), Duration::seconds(45));
        for bad in ["", "abc", "5d", "-3"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
