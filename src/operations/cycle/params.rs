//! The rolling cycle's parameters (`handler cycle <scale set> …`, issue 15), validated as a whole
//! before an operation is written: every problem is named at once, and an operation never starts
//! with parameters it cannot honour.

use crate::policy::{parse_duration, Limit};
use serde::Serialize;
use time::Duration;

/// What the cycle does to each instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    /// Reimage in place: disks and addresses stay.
    Reimage,
    /// A new instance first, then the old one deleted.
    Replace,
    /// Apply the scale set's latest model (its manual-upgrade call).
    Upgrade,
}

/// The cycle's parameters, as the operation's row keeps them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Params {
    pub action: Action,
    /// Instances per batch: a count or a share of the scale set.
    #[serde(serialize_with = "limit")]
    pub batch: Limit,
    /// Never fewer healthy instances than this share (or count) while cycling.
    #[serde(serialize_with = "limit")]
    pub min_healthy: Limit,
    /// At most this many instances added to keep `min_healthy` (none: as many as a batch).
    pub max_surge: Option<u32>,
    pub only_outdated: bool,
    /// How long a batch has to come back healthy.
    #[serde(with = "seconds")]
    pub timeout: Duration,
    #[serde(with = "seconds")]
    pub pause_between: Duration,
    pub dry_run: bool,
}

fn limit<S: serde::Serializer>(l: &Limit, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&match l {
        Limit::Count(n) => n.to_string(),
        Limit::Percent(p) => format!("{p}%"),
    })
}

mod seconds {
    pub fn serialize<S: serde::Serializer>(d: &time::Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_i64(d.whole_seconds())
    }
}

/// The command line's values, unparsed (clap hands them over as given).
#[derive(Debug, Clone, Default)]
pub struct Raw<'a> {
    pub action: Option<&'a str>,
    pub batch: Option<&'a str>,
    pub min_healthy: Option<&'a str>,
    pub max_surge: Option<&'a str>,
    pub only_outdated: bool,
    pub timeout: Option<&'a str>,
    pub pause_between: Option<&'a str>,
    pub dry_run: bool,
}

impl Params {
    /// The parameters as the operation's row keeps them (what [`parse`] produced, serialized).
    pub fn from_stored(v: &serde_json::Value) -> Result<Params, Vec<String>> {
        let text = |k: &str| v.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let seconds = |k: &str| v.get(k).and_then(|x| x.as_i64()).map(|n| format!("{n}s"));
        let (action, batch, min_healthy) = (text("action"), text("batch"), text("min_healthy"));
        let max_surge = v
            .get("max_surge")
            .and_then(|x| x.as_u64())
            .map(|n| n.to_string());
        let (timeout, pause_between) = (seconds("timeout"), seconds("pause_between"));
        if action.is_none() || batch.is_none() || min_healthy.is_none() || timeout.is_none() {
            return Err(vec![format!("stored cycle parameters are incomplete: {v}")]);
        }
        parse(&Raw {
            action: action.as_deref(),
            batch: batch.as_deref(),
            min_healthy: min_healthy.as_deref(),
            max_surge: max_surge.as_deref(),
            only_outdated: v
                .get("only_outdated")
                .and_then(|x| x.as_bool())
                .unwrap_or(false),
            timeout: timeout.as_deref(),
            pause_between: pause_between.as_deref(),
            dry_run: v.get("dry_run").and_then(|x| x.as_bool()).unwrap_or(false),
        })
    }

    /// The instances a batch takes, of a scale set of `total`: at least one.
    pub fn batch_size(&self, total: usize) -> usize {
        self.batch.of(total, 1) as usize
    }

    /// The healthy instances to keep, of a scale set of `total`: a share rounds up (80 % of one
    /// instance is one), so a single-instance set is always surged before it is cycled.
    pub fn min_healthy_of(&self, total: usize) -> usize {
        match self.min_healthy {
            Limit::Count(n) => n as usize,
            Limit::Percent(p) => ((total as f64) * p / 100.0).ceil() as usize,
        }
    }
}

/// Reads the parameters; every problem at once.
pub fn parse(raw: &Raw) -> Result<Params, Vec<String>> {
    let mut problems = Vec::new();
    let action = match raw
        .action
        .unwrap_or("reimage")
        .trim()
        .to_ascii_lowercase()
        .as_str()
    {
        "reimage" => Action::Reimage,
        "replace" => Action::Replace,
        "upgrade" => Action::Upgrade,
        other => {
            problems.push(format!(
                "--action `{other}`: expected reimage, replace or upgrade"
            ));
            Action::Reimage
        }
    };
    // A policy limit's bounds hold: a count of at least one, a share above 0% up to 100%.
    let mut share = |name: &str, value: Option<&str>, default: &str| match value
        .unwrap_or(default)
        .parse::<Limit>()
    {
        Ok(l) => Some(l),
        Err(e) => {
            problems.push(format!("{name}: {e}"));
            None
        }
    };
    let batch = share("--batch", raw.batch, "20%");
    let min_healthy = share("--min-healthy", raw.min_healthy, "80%");
    let max_surge = raw.max_surge.and_then(|m| match m.trim().parse::<u32>() {
        Ok(n) => Some(n),
        Err(_) => {
            problems.push(format!("--max-surge `{m}`: a whole number of instances"));
            None
        }
    });
    let mut duration =
        |name: &str, value: Option<&str>, default: &str, zero_ok: bool| match parse_duration(
            value.unwrap_or(default),
        ) {
            Ok(d) if d.is_zero() && !zero_ok => {
                problems.push(format!("{name}: more than zero"));
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                problems.push(format!("{name}: {e}"));
                None
            }
        };
    let timeout = duration("--timeout", raw.timeout, "30m", false);
    let pause_between = duration("--pause-between", raw.pause_between, "0s", true);
    match (batch, min_healthy, timeout, pause_between) {
        (Some(batch), Some(min_healthy), Some(timeout), Some(pause_between))
            if problems.is_empty() =>
        {
            Ok(Params {
                action,
                batch,
                min_healthy,
                max_surge,
                only_outdated: raw.only_outdated || action == Action::Upgrade,
                timeout,
                pause_between,
                dry_run: raw.dry_run,
            })
        }
        _ => Err(problems),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_follow_the_issue() {
        let p = parse(&Raw::default()).unwrap();
        assert_eq!(p.action, Action::Reimage);
        assert_eq!(p.batch, Limit::Percent(20.0));
        assert_eq!(p.min_healthy, Limit::Percent(80.0));
        assert_eq!(p.timeout, Duration::minutes(30));
        assert_eq!(p.pause_between, Duration::ZERO);
        assert!(!p.only_outdated && p.max_surge.is_none());
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["batch"], "20%");
        assert_eq!(json["timeout"], 1800);
    }

    #[test]
    fn every_problem_is_named_at_once() {
        let raw = Raw {
            action: Some("rebuild"),
            batch: Some("0"),
            min_healthy: Some("120%"),
            max_surge: Some("two"),
            timeout: Some("0s"),
            pause_between: Some("soon"),
            ..Raw::default()
        };
        let problems = parse(&raw).unwrap_err();
        for needle in [
            "--action `rebuild`",
            "--batch: must be at least 1",
            "--min-healthy: `120%`",
            "--max-surge `two`",
            "--timeout: more than zero",
            "--pause-between",
        ] {
            assert!(
                problems.iter().any(|p| p.contains(needle)),
                "{needle}: {problems:?}"
            );
        }
        assert_eq!(problems.len(), 6, "{problems:?}");
    }

    #[test]
    fn stored_parameters_read_back_as_given() {
        for raw in [
            Raw::default(),
            Raw {
                action: Some("replace"),
                batch: Some("3"),
                min_healthy: Some("50%"),
                max_surge: Some("2"),
                timeout: Some("10m"),
                pause_between: Some("30s"),
                dry_run: true,
                ..Raw::default()
            },
        ] {
            let p = parse(&raw).unwrap();
            let stored = serde_json::to_value(&p).unwrap();
            assert_eq!(Params::from_stored(&stored).unwrap(), p);
        }
        assert!(Params::from_stored(&serde_json::json!({"batch": "2"})).is_err());
    }

    #[test]
    fn shares_of_a_scale_set() {
        let p = parse(&Raw::default()).unwrap();
        // (instances, batch of 20 %, min healthy of 80 %)
        for (total, batch, keep) in [
            (20, 4, 16),
            (1, 1, 1),
            (2, 1, 2),
            (10, 2, 8),
            (1000, 200, 800),
        ] {
            assert_eq!(
                (p.batch_size(total), p.min_healthy_of(total)),
                (batch, keep),
                "{total}"
            );
        }
    }

    #[test]
    fn upgrade_cycles_only_what_is_outdated() {
        let p = parse(&Raw {
            action: Some("upgrade"),
            batch: Some("2"),
            ..Raw::default()
        })
        .unwrap();
        assert!(p.only_outdated);
        assert_eq!(p.batch, Limit::Count(2));
        let p = parse(&Raw {
            action: Some("replace"),
            min_healthy: Some("1"),
            max_surge: Some("3"),
            ..Raw::default()
        })
        .unwrap();
        assert_eq!(
            (p.action, p.min_healthy, p.max_surge),
            (Action::Replace, Limit::Count(1), Some(3))
        );
    }
}
