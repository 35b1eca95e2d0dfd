//! Application settings (design §4): read from the environment once at startup, validated as a
//! whole so that a misconfiguration is reported with every problem at once.

use crate::policy::{parse_duration, Escalation, Limit, PlatformRepairs, Policy};
use crate::scaleset::ScaleSetId;
use serde::Serialize;
use std::fmt;
use time::Duration;
use url::Url;

/// One documented setting. The README's settings table is checked against this list by a test.
#[derive(Debug, Clone, Copy)]
pub struct SettingDoc {
    pub name: &'static str,
    pub default: &'static str,
    pub meaning: &'static str,
}

pub const SCALE_SETS: &str = "HEALER_SCALE_SETS";
pub const STORAGE: &str = "HEALER_STORAGE";
pub const ARM_ENDPOINT: &str = "HEALER_ARM_ENDPOINT";
pub const HEARTBEAT_TIMEOUT: &str = "HEALER_HEARTBEAT_TIMEOUT";
pub const STARTUP_TIMEOUT: &str = "HEALER_STARTUP_TIMEOUT";
pub const GRACE_PERIOD: &str = "HEALER_GRACE_PERIOD";
pub const DOWN_FOR: &str = "HEALER_DOWN_FOR";
pub const REPAIR_ACTIONS: &str = "HEALER_REPAIR_ACTIONS";
pub const REPAIR_TIMEOUT: &str = "HEALER_REPAIR_TIMEOUT";
pub const MAX_ATTEMPTS: &str = "HEALER_MAX_ATTEMPTS";
pub const MAX_PARALLEL: &str = "HEALER_MAX_PARALLEL";
pub const MAX_UNHEALTHY: &str = "HEALER_MAX_UNHEALTHY";
pub const MIRROR_MAX_AGE: &str = "HEALER_MIRROR_MAX_AGE";
pub const FULL_RESYNC: &str = "HEALER_FULL_RESYNC";
pub const JOURNAL_DAYS: &str = "HEALER_JOURNAL_DAYS";
pub const PLATFORM_REPAIRS: &str = "HEALER_PLATFORM_REPAIRS";
pub const DOWN_PROOF: &str = "HEALER_DOWN_PROOF";
pub const MAX_MAINTENANCE: &str = "HEALER_MAX_MAINTENANCE";
pub const STATEFUL_DISKS: &str = "HEALER_STATEFUL_DISKS";
pub const STATEFUL_ADDRESS: &str = "HEALER_STATEFUL_ADDRESS";
pub const STATEFUL_ZONE_COPY: &str = "HEALER_STATEFUL_ZONE_COPY";
pub const ATTESTATION_CA: &str = "HEALER_ATTESTATION_CA";
pub const DRY_RUN: &str = "HEALER_DRY_RUN";
pub const EVENT_REPAIRS: &str = "HEALER_EVENT_REPAIRS";
pub const WEBHOOK_URL: &str = "HEALER_WEBHOOK_URL";
pub const STATUS_SCHEDULE: &str = "HEALER_STATUS_SCHEDULE";
pub const STATE_SCHEDULE: &str = "HEALER_STATE_SCHEDULE";
pub const PASS_DEADLINE: &str = "HEALER_PASS_DEADLINE";
pub const CALL_TIMEOUT: &str = "HEALER_CALL_TIMEOUT";
pub const HANDLER_PORT: &str = "FUNCTIONS_CUSTOMHANDLER_PORT";
pub const WEBJOBS_STORAGE: &str = "AzureWebJobsStorage";

pub const CATALOG: &[SettingDoc] = &[
    SettingDoc { name: SCALE_SETS, default: "(required)", meaning: "VMSS resource ids, separated by `,` `;` or white space; per-set overrides in brackets after an id, e.g. `…/virtualMachineScaleSets/web[REPAIR_ACTIONS=restart,replace MAX_PARALLEL=2]`" },
    SettingDoc { name: STORAGE, default: "`AzureWebJobsStorage`", meaning: "a connection string (`UseDevelopmentStorage=true`, account name + key, or with `TableEndpoint`), or identity-based: `HEALER_STORAGE__tableServiceUri` or `HEALER_STORAGE__accountName` (+ `HEALER_STORAGE__clientId`); unset, the host's `AzureWebJobsStorage` (or its `__tableServiceUri` / `__accountName`) is used" },
    SettingDoc { name: ARM_ENDPOINT, default: "`https://management.azure.com`", meaning: "Resource Manager base URL (the local simulator's URL in development)" },
    SettingDoc { name: HEARTBEAT_TIMEOUT, default: "`180` s", meaning: "silent this long ⇒ unhealthy" },
    SettingDoc { name: STARTUP_TIMEOUT, default: "`600` s", meaning: "a new instance must send its first heartbeat within this" },
    SettingDoc { name: GRACE_PERIOD, default: "`300` s", meaning: "after creation or a repair, DOWN is not acted on yet" },
    SettingDoc { name: DOWN_FOR, default: "`60` s", meaning: "DOWN must persist this long before it counts" },
    SettingDoc { name: REPAIR_ACTIONS, default: "`replace`", meaning: "one of `delete` (leave capacity to autoscale), `replace` (add a new instance first, then delete the broken one), `reimage`, `restart`, `start`, `redeploy` (move it to another host), or an escalation list such as `restart,reimage,replace`; a `restart` of a stopped or deallocated instance is sent as `start`" },
    SettingDoc { name: REPAIR_TIMEOUT, default: "`900` s", meaning: "a repaired instance must be healthy within this, else next step" },
    SettingDoc { name: MAX_ATTEMPTS, default: "`3`", meaning: "repairs of one incident before giving up and alerting" },
    SettingDoc { name: MAX_PARALLEL, default: "`10%`", meaning: "repairs in flight per scale set (count or percent, at least 1)" },
    SettingDoc { name: MAX_UNHEALTHY, default: "`40%`", meaning: "above this share unhealthy, a scale set's repairs pause (short-circuit)" },
    SettingDoc { name: PLATFORM_REPAIRS, default: "`defer`", meaning: "on a scale set with the platform's automatic instance repairs enabled: `defer` (report it, repair nothing there) or `act` (report it, repair anyway)" },
    SettingDoc { name: MAX_MAINTENANCE, default: "`4h`", meaning: "the longest a MAINTENANCE (or DRAINING) heartbeat exempts its VM, counted from when it was sent, whatever its `until` says; a stopped or failed VM is judged even during maintenance" },
    SettingDoc { name: STATEFUL_DISKS, default: "(none; per scale set)", meaning: "a stateful set (per-set override only, `[STATEFUL_DISKS=0,1]`): the LUNs of the data disks that belong to an instance's slot. A replacement carries them to the new VM (same disks, same LUNs) before the broken one is deleted, and restart and reimage are tried first (an escalation that starts with `replace` becomes `restart,reimage,replace`); `delete` is refused" },
    SettingDoc { name: STATEFUL_ADDRESS, default: "`none`", meaning: "per-set override only: the address that follows the slot: `public-ip` (the public IP on the VM's NIC: moved to the new VM before it must come up) or `private-ip` (its private address, made static on the new VM once the broken VM's NIC is gone); Flexible scale sets only (a Uniform set's NICs belong to its model): on a Uniform set the handler refuses to start" },
    SettingDoc { name: STATEFUL_ZONE_COPY, default: "`true`", meaning: "per-set override only: when the new VM lands in another zone than the slot's disks, copy them there by snapshot (slow, journaled); `false` refuses such a replacement with the reason" },
    SettingDoc { name: DOWN_PROOF, default: "`vmid`", meaning: "the least proof of identity any heartbeat (UP, DOWN or MAINTENANCE) needs to be believed: `vmid` (its vmId matches the mirror), `attested` (an IMDS attested document the platform signed for it, checked against `HEALER_ATTESTATION_CA`) or `name` (a computer name is enough: legacy Prunella agents, only while migrating a scale set — anyone who knows a VM's hostname can then have it repaired or keep it from being repaired). A heartbeat proving less is refused (`insufficient_proof`) and never changes how the VM is judged" },
    SettingDoc { name: ATTESTATION_CA, default: "(none)", meaning: "PEM certificates (inline, or a file path relative to the app) of the CAs that issue IMDS's `metadata.azure.com` signing certificate; set, heartbeats carrying an IMDS attested document are checked (an invalid one is rejected, a valid one proves `attested`)" },
    SettingDoc { name: MIRROR_MAX_AGE, default: "`300` s", meaning: "a change announced by an event or a repair must be mirrored within this, and evidence from the mirror (stopped, failed provisioning, Application Health) must be this fresh, or no repair is decided; a quiet scale set's mirror may be `HEALER_FULL_RESYNC` older" },
    SettingDoc { name: JOURNAL_DAYS, default: "`90`", meaning: "journal rows (table `repairs`) are kept this many days: older ones are deleted by `monitor-state` when it reads a scale set in full (every `HEALER_FULL_RESYNC`), at most 1,000 per set each time, never an open incident (`0`: kept for ever)" },
    SettingDoc { name: FULL_RESYNC, default: "`600` s", meaning: "every scale set is read in full at least this often, the safety net for changes no Resource Manager event announced; between full reads `monitor-state` reads only scale sets that changed, failed or have repairs in flight (`0`: read every set every pass)" },
    SettingDoc { name: EVENT_REPAIRS, default: "`true`", meaning: "evaluate a scale set the moment its evidence changes: a DOWN heartbeat whose streak has lasted `HEALER_DOWN_FOR` has `monitor-events` decide and act on that one set at once (every brake and claim rule as in `monitor-status`; a burst coalesces into one evaluation per set at a time), instead of waiting for the next timer pass; so does a Resource Manager event of a failed operation or a powered-off VM, after a fresh read of the set; `false`: only the timer repairs" },
    SettingDoc { name: DRY_RUN, default: "`false`", meaning: "decide and journal, but do not act; what a dry run decided never holds back a live pass" },
    SettingDoc { name: PASS_DEADLINE, default: "`150` s", meaning: "how long one `monitor-status` or `monitor-state` pass may run: what does not fit is left to the next pass and journaled (`pass_deadline`). Must leave room inside `functionTimeout` of host.json (5 min): the handler refuses to start otherwise" },
    SettingDoc { name: CALL_TIMEOUT, default: "`30` s", meaning: "the longest one Compute API request may take; a write without an answer by then has an unknown outcome, found out from the instance's state on later passes and never sent blindly again" },
    SettingDoc { name: WEBHOOK_URL, default: "(none)", meaning: "JSON POST on repair, give-up, pause and an operation that stops for the operator. Optional, so never fatal: an unusable value (an unresolved Key Vault reference, not an http(s) URL) is reported at startup and by `handler status`, and the handler runs without alerts" },
    SettingDoc { name: crate::telemetry::CONNECTION_STRING, default: "(none)", meaning: "set by the Function App: traces, logs and metrics are exported to this Application Insights resource (OpenTelemetry; metrics `healer.*`, read by the alerts and the workbook in `infra/monitoring.bicep`). Optional, so never fatal: an unusable value is reported at startup and by `handler status`, and the host still records the log lines" },
    SettingDoc { name: crate::telemetry::AUTHENTICATION_STRING, default: "(none)", meaning: "`Authorization=AAD`: uploads carry a Microsoft Entra token of the app's system-assigned identity (needs `Monitoring Metrics Publisher` on the resource), for resources that refuse instrumentation keys; the host reads the same setting" },
    SettingDoc { name: STATUS_SCHEDULE, default: "`0 */1 * * * *`", meaning: "NCRONTAB schedule of `monitor-status`, referenced from its function.json as `%HEALER_STATUS_SCHEDULE%`" },
    SettingDoc { name: STATE_SCHEDULE, default: "`30 */1 * * * *`", meaning: "NCRONTAB schedule of `monitor-state`, referenced from its function.json as `%HEALER_STATE_SCHEDULE%`" },
    SettingDoc { name: HANDLER_PORT, default: "`8080`", meaning: "set by the Functions host: the port the handler listens on (127.0.0.1 only)" },
];

/// Where the tables live.
#[derive(Debug, Clone, PartialEq)]
pub enum StorageSettings {
    /// A storage connection string (also `UseDevelopmentStorage=true`).
    ConnectionString(String),
    /// Identity-based: the table service URI, reached with the app's managed identity.
    Identity {
        table_service_uri: Url,
        client_id: Option<String>,
    },
}

/// One watched scale set with its effective policy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WatchedScaleSet {
    pub id: ScaleSetId,
    pub policy: Policy,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub scale_sets: Vec<WatchedScaleSet>,
    pub storage: StorageSettings,
    pub arm_endpoint: Url,
    pub mirror_max_age: Duration,
    /// The slow safety-net interval: every scale set is read in full at least this often.
    pub full_resync: Duration,
    /// How long journal rows are kept; `None`: for ever.
    pub journal_days: Option<u32>,
    /// Trust anchors for IMDS attested documents, if configured.
    pub attestation: Option<crate::attestation::Trust>,
    pub dry_run: bool,
    /// `HEALER_EVENT_REPAIRS`: evidence that arrives by event is acted on at once.
    pub event_repairs: bool,
    pub webhook_url: Option<Url>,
    /// Where traces, logs and metrics are exported, if anywhere.
    pub telemetry: Option<crate::telemetry::Target>,
    pub status_schedule: String,
    pub state_schedule: String,
    pub port: u16,
    /// Optional settings that could not be used, and what runs without them: reported at startup
    /// and by `handler status`, never fatal.
    pub warnings: Vec<String>,
    /// How long one timer pass may run; see [`PASS_DEADLINE`].
    pub pass_deadline: Duration,
    /// The longest one Compute API request may take.
    pub call_timeout: Duration,
    /// The global policy, before per-set overrides.
    pub defaults: Policy,
}

/// Every problem found in the settings, reported together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct SettingsErrors(pub Vec<String>);

impl fmt::Display for SettingsErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "invalid configuration ({} problem{}):",
            self.0.len(),
            if self.0.len() == 1 { "" } else { "s" }
        )?;
        for p in &self.0 {
            writeln!(f, "  - {p}")?;
        }
        Ok(())
    }
}

impl Settings {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, SettingsErrors> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// Reads settings through `lookup`, so tests can pass a map instead of the process environment.
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, SettingsErrors> {
        let get = |name: &str| lookup(name).filter(|v| !v.trim().is_empty());
        let mut problems = Vec::new();

        let defaults = Policy {
            heartbeat_timeout: duration(
                get(HEARTBEAT_TIMEOUT),
                "180",
                HEARTBEAT_TIMEOUT,
                &mut problems,
            ),
            startup_timeout: duration(get(STARTUP_TIMEOUT), "600", STARTUP_TIMEOUT, &mut problems),
            grace_period: wait(get(GRACE_PERIOD), "300", GRACE_PERIOD, &mut problems),
            down_for: wait(get(DOWN_FOR), "60", DOWN_FOR, &mut problems),
            repair_actions: value(
                get(REPAIR_ACTIONS),
                "replace",
                REPAIR_ACTIONS,
                &mut problems,
            ),
            repair_timeout: duration(get(REPAIR_TIMEOUT), "900", REPAIR_TIMEOUT, &mut problems),
            max_attempts: attempts(get(MAX_ATTEMPTS), MAX_ATTEMPTS, &mut problems),
            max_parallel: value(get(MAX_PARALLEL), "10%", MAX_PARALLEL, &mut problems),
            max_unhealthy: value(get(MAX_UNHEALTHY), "40%", MAX_UNHEALTHY, &mut problems),
            platform_repairs: value(
                get(PLATFORM_REPAIRS),
                "defer",
                PLATFORM_REPAIRS,
                &mut problems,
            ),
            down_proof: value(get(DOWN_PROOF), "vmid", DOWN_PROOF, &mut problems),
            max_maintenance: duration(get(MAX_MAINTENANCE), "4h", MAX_MAINTENANCE, &mut problems),
            stateful: None,
        };
        for name in [STATEFUL_DISKS, STATEFUL_ADDRESS, STATEFUL_ZONE_COPY] {
            if get(name).is_some() {
                problems.push(format!(
                    "{name} is a per-scale-set override only (which disks and address follow an instance belong to one set): give it in brackets after the set's id in {SCALE_SETS}"
                ));
            }
        }

        let scale_sets = match get(SCALE_SETS) {
            None => {
                problems.push(format!(
                    "{SCALE_SETS} is required: the resource ids of the scale sets to watch"
                ));
                Vec::new()
            }
            Some(raw) => parse_scale_sets(&raw, &defaults, &mut problems),
        };

        let storage = storage(&get, &mut problems);
        let arm_endpoint = url_setting(
            Some(get(ARM_ENDPOINT).unwrap_or_else(|| "https://management.azure.com".into())),
            ARM_ENDPOINT,
            &mut problems,
        )
        .unwrap_or_else(|| Url::parse("https://management.azure.com").expect("constant URL"));
        let mirror_max_age = duration(get(MIRROR_MAX_AGE), "300", MIRROR_MAX_AGE, &mut problems);
        let full_resync = wait(get(FULL_RESYNC), "600", FULL_RESYNC, &mut problems);
        let journal_days = journal_days(get(JOURNAL_DAYS), &mut problems);
        let attestation = get(ATTESTATION_CA).and_then(|raw| {
            let pem = if raw.contains("-----BEGIN") {
                Ok(raw)
            } else {
                std::fs::read_to_string(raw.trim())
                    .map_err(|e| format!("{ATTESTATION_CA}: cannot read `{}`: {e}", raw.trim()))
            };
            match pem.and_then(|pem| {
                crate::attestation::Trust::from_pem(&pem)
                    .map_err(|e| format!("{ATTESTATION_CA}: {e}"))
            }) {
                Ok(trust) => Some(trust),
                Err(problem) => {
                    problems.push(problem);
                    None
                }
            }
        });
        let wants_attestation = std::iter::once(&defaults)
            .chain(scale_sets.iter().map(|s| &s.policy))
            .any(|p| p.down_proof == crate::heartbeat::Proof::Attested);
        if wants_attestation && attestation.is_none() && get(ATTESTATION_CA).is_none() {
            problems.push(format!(
                "{DOWN_PROOF}=attested needs {ATTESTATION_CA}: without trust anchors no heartbeat can prove it"
            ));
        }
        let flag = |name: &str, default: bool, problems: &mut Vec<String>| match get(name)
            .map(|v| v.trim().to_ascii_lowercase())
        {
            None => default,
            Some(v) if ["true", "1", "yes"].contains(&v.as_str()) => true,
            Some(v) if ["false", "0", "no"].contains(&v.as_str()) => false,
            Some(v) => {
                problems.push(format!("{name}: `{v}` is not true or false"));
                default
            }
        };
        let dry_run = flag(DRY_RUN, false, &mut problems);
        let event_repairs = flag(EVENT_REPAIRS, true, &mut problems);
        // Optional: a webhook that cannot be used means no alerts, never no healer.
        let mut warnings = Vec::new();
        let webhook_url = match get(WEBHOOK_URL) {
            Some(raw) if raw.trim_start().starts_with("@Microsoft.KeyVault(") => {
                warnings.push(format!(
                    "{WEBHOOK_URL} is a Key Vault reference the platform has not resolved (the app's identity needs `Key Vault Secrets User` on the vault; references are re-read about daily, or at a restart): alerts are not sent until it resolves"
                ));
                None
            }
            raw => {
                let mut webhook_problems = Vec::new();
                let url = url_setting(raw, WEBHOOK_URL, &mut webhook_problems);
                warnings.extend(
                    webhook_problems
                        .into_iter()
                        .map(|p| format!("{p}; alerts are not sent")),
                );
                url
            }
        };
        // Optional too: without it the host still records every line, only as text.
        let telemetry = match get(crate::telemetry::CONNECTION_STRING) {
            None => None,
            Some(raw) if raw.trim_start().starts_with("@Microsoft.KeyVault(") => {
                warnings.push(format!(
                    "{} is a Key Vault reference the platform has not resolved: traces and metrics are not exported until it resolves",
                    crate::telemetry::CONNECTION_STRING
                ));
                None
            }
            Some(raw) => {
                match crate::telemetry::Target::parse(
                    &raw,
                    get(crate::telemetry::AUTHENTICATION_STRING).as_deref(),
                ) {
                    Ok(target) => Some(target),
                    Err(problem) => {
                        warnings.push(format!(
                            "{problem}; traces and metrics are not exported (the host still records the log lines)"
                        ));
                        None
                    }
                }
            }
        };
        let status_schedule = schedule(get(STATUS_SCHEDULE), STATUS_SCHEDULE, &mut problems);
        let state_schedule = schedule(
            get(STATE_SCHEDULE).or_else(|| Some("30 */1 * * * *".into())),
            STATE_SCHEDULE,
            &mut problems,
        );
        let port = match get(HANDLER_PORT) {
            None => 8080,
            Some(p) => p.trim().parse::<u16>().unwrap_or_else(|_| {
                problems.push(format!("{HANDLER_PORT}: `{p}` is not a TCP port"));
                0
            }),
        };

        let pass_deadline = duration(get(PASS_DEADLINE), "150", PASS_DEADLINE, &mut problems);
        let call_timeout = duration(get(CALL_TIMEOUT), "30", CALL_TIMEOUT, &mut problems);
        if call_timeout.is_positive()
            && pass_deadline.is_positive()
            && call_timeout * 2 > pass_deadline
        {
            problems.push(format!(
                "{CALL_TIMEOUT} ({} s) must be at most half of {PASS_DEADLINE} ({} s): a pass must fit a read and a write",
                call_timeout.whole_seconds(),
                pass_deadline.whole_seconds()
            ));
        }

        if !problems.is_empty() {
            return Err(SettingsErrors(problems));
        }
        Ok(Settings {
            scale_sets,
            storage: storage.expect("storage is Some when no problem was recorded"),
            arm_endpoint,
            mirror_max_age,
            full_resync,
            journal_days,
            attestation,
            dry_run,
            event_repairs,
            webhook_url,
            telemetry,
            status_schedule,
            state_schedule,
            port,
            warnings,
            pass_deadline,
            call_timeout,
            defaults,
        })
    }

    /// How long a pass may still be sending the calls it claimed: its deadline and one call.
    pub fn lease(&self) -> Duration {
        self.pass_deadline + self.call_timeout
    }

    /// Checks the pass deadline against the Functions host's `functionTimeout` (host.json's
    /// `hh:mm:ss`): a pass the host abandons leaves its work half done. The deadline plus one call
    /// and the final writes must fit.
    pub fn check_function_timeout(&self, host_json: &str) -> Result<(), String> {
        let host: serde_json::Value =
            serde_json::from_str(host_json).map_err(|e| format!("host.json is not JSON: {e}"))?;
        let Some(raw) = host.get("functionTimeout").and_then(|v| v.as_str()) else {
            // The default on the Consumption plan is 5 minutes, the least of all plans.
            return self.fits(Duration::minutes(5), "the default functionTimeout (5 min)");
        };
        let timeout = parse_timespan(raw)
            .ok_or_else(|| format!("host.json functionTimeout `{raw}` is not hh:mm:ss"))?;
        self.fits(timeout, &format!("host.json functionTimeout ({raw})"))
    }

    fn fits(&self, timeout: Duration, what: &str) -> Result<(), String> {
        let needed = self.pass_deadline + self.call_timeout + FINAL_WRITES;
        if needed > timeout {
            return Err(format!(
                "{PASS_DEADLINE} ({} s) + {CALL_TIMEOUT} ({} s) + {} s for the final writes is more than {what}: the host would abandon passes half done",
                self.pass_deadline.whole_seconds(),
                self.call_timeout.whole_seconds(),
                FINAL_WRITES.whole_seconds()
            ));
        }
        Ok(())
    }

    /// The watched scale set with this id, if any.
    pub fn scale_set(&self, id: &ScaleSetId) -> Option<&WatchedScaleSet> {
        self.scale_sets.iter().find(|s| &s.id == id)
    }
}

/// What a pass may still need after its deadline: its last table writes.
const FINAL_WRITES: Duration = Duration::seconds(30);

/// `hh:mm:ss` (host.json's TimeSpan), or `-1` for no limit.
fn parse_timespan(raw: &str) -> Option<Duration> {
    if raw.trim() == "-1" {
        return Some(Duration::MAX);
    }
    let parts: Vec<i64> = raw
        .trim()
        .split(':')
        .map(|p| p.parse::<i64>().ok().filter(|n| *n >= 0))
        .collect::<Option<_>>()?;
    match parts.as_slice() {
        [h, m, s] => Some(Duration::seconds(h * 3600 + m * 60 + s)),
        _ => None,
    }
}

fn duration(
    raw: Option<String>,
    default: &str,
    name: &str,
    problems: &mut Vec<String>,
) -> Duration {
    let raw = raw.unwrap_or_else(|| default.to_string());
    match parse_duration(&raw) {
        Ok(d) if d.is_positive() => d,
        Ok(_) => {
            problems.push(format!("{name}: must be above zero"));
            Duration::ZERO
        }
        Err(e) => {
            problems.push(format!("{name}: {e}"));
            Duration::ZERO
        }
    }
}

/// A wait that may be zero (act at once), unlike the timeouts.
fn wait(raw: Option<String>, default: &str, name: &str, problems: &mut Vec<String>) -> Duration {
    let raw = raw.unwrap_or_else(|| default.to_string());
    parse_duration(&raw).unwrap_or_else(|e| {
        problems.push(format!("{name}: {e}"));
        Duration::ZERO
    })
}

fn value<T: std::str::FromStr<Err = String>>(
    raw: Option<String>,
    default: &str,
    name: &str,
    problems: &mut Vec<String>,
) -> T {
    let raw = raw.unwrap_or_else(|| default.to_string());
    raw.parse::<T>().unwrap_or_else(|e| {
        problems.push(format!("{name}: {e}"));
        default
            .parse::<T>()
            .unwrap_or_else(|_| unreachable!("defaults parse"))
    })
}

/// Days of journal to keep: a whole number (`0`: for ever), at most a century.
fn journal_days(raw: Option<String>, problems: &mut Vec<String>) -> Option<u32> {
    let Some(v) = raw else {
        return Some(90);
    };
    match v.trim().parse::<u32>() {
        Ok(0) => None,
        Ok(n) if n <= 36_500 => Some(n),
        _ => {
            problems.push(format!(
                "{JOURNAL_DAYS}: `{v}` is not a whole number of days from 0 (keep for ever) to 36500"
            ));
            Some(90)
        }
    }
}

fn attempts(raw: Option<String>, name: &str, problems: &mut Vec<String>) -> u32 {
    match raw {
        None => 3,
        Some(v) => match v.trim().parse::<u32>() {
            Ok(n) if n >= 1 => n,
            _ => {
                problems.push(format!("{name}: `{v}` is not a whole number of at least 1"));
                3
            }
        },
    }
}

/// Settings (and variables the platform sets) whose values are or contain secrets: storage keys
/// and SAS tokens, a webhook URL's token, the managed identity endpoint's header.
const SECRET_VALUES: [&str; 5] = [
    STORAGE,
    WEBJOBS_STORAGE,
    WEBHOOK_URL,
    "IDENTITY_HEADER",
    "MSI_SECRET",
];

/// Registers the configured secrets with [`crate::secret`], so that no output quotes them.
pub fn register_secrets(get: impl Fn(&str) -> Option<String>) {
    for name in SECRET_VALUES {
        if let Some(value) = get(name) {
            crate::secret::register(&value);
        }
    }
}

fn url_setting(raw: Option<String>, name: &str, problems: &mut Vec<String>) -> Option<Url> {
    let raw = raw?;
    match Url::parse(raw.trim()) {
        Ok(u) if u.scheme() == "https" || u.scheme() == "http" => Some(u),
        Ok(u) => {
            problems.push(format!(
                "{name}: `{}` has scheme `{}`, expected https",
                crate::secret::redact(&raw),
                u.scheme()
            ));
            None
        }
        Err(e) => {
            problems.push(format!(
                "{name}: `{}` is not a URL ({e})",
                crate::secret::redact(&raw)
            ));
            None
        }
    }
}

/// NCRONTAB as the Functions host reads it: six fields (with seconds), or a `hh:mm:ss` TimeSpan.
fn schedule(raw: Option<String>, name: &str, problems: &mut Vec<String>) -> String {
    let raw = raw.unwrap_or_else(|| "0 */1 * * * *".to_string());
    let fields: Vec<&str> = raw.split_whitespace().collect();
    let is_timespan = fields.len() == 1
        && raw.trim().split(':').count() == 3
        && raw
            .trim()
            .split(':')
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
    let field_ok = |f: &&str| {
        f.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '*' | '/' | ',' | '-'))
    };
    if !(is_timespan || (fields.len() == 6 && fields.iter().all(field_ok))) {
        problems.push(format!(
            "{name}: `{raw}` is not an NCRONTAB expression with six fields ({{second}} {{minute}} {{hour}} {{day}} {{month}} {{day-of-week}}), e.g. `0 */1 * * * *`"
        ));
    }
    raw.trim().to_string()
}

fn storage(
    get: &impl Fn(&str) -> Option<String>,
    problems: &mut Vec<String>,
) -> Option<StorageSettings> {
    for prefix in [STORAGE, WEBJOBS_STORAGE] {
        if let Some(cs) = get(prefix) {
            if !cs.contains('=') {
                problems.push(format!(
                    "{prefix}: not a connection string (expected `Key=Value;…` pairs such as `UseDevelopmentStorage=true`)"
                ));
                return None;
            }
            if let Some(problem) = crate::state::connection_string_problem(cs.trim()) {
                problems.push(format!("{prefix}: {problem}"));
                return None;
            }
            return Some(StorageSettings::ConnectionString(cs.trim().to_string()));
        }
        let client_id = get(&format!("{prefix}__clientId")).map(|s| s.trim().to_string());
        if let Some(uri) = get(&format!("{prefix}__tableServiceUri")) {
            return match Url::parse(uri.trim()) {
                Ok(table_service_uri) => Some(StorageSettings::Identity {
                    table_service_uri,
                    client_id,
                }),
                Err(e) => {
                    problems.push(format!(
                        "{prefix}__tableServiceUri: `{uri}` is not a URL ({e})"
                    ));
                    None
                }
            };
        }
        if let Some(account) = get(&format!("{prefix}__accountName")) {
            let account = account.trim();
            if !account
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
                || !(3..=24).contains(&account.len())
            {
                problems.push(format!(
                    "{prefix}__accountName: `{account}` is not a storage account name (3-24 lower-case letters and digits)"
                ));
                return None;
            }
            return Url::parse(&format!("https://{account}.table.core.windows.net"))
                .ok()
                .map(|table_service_uri| StorageSettings::Identity {
                    table_service_uri,
                    client_id,
                });
        }
    }
    problems.push(format!(
        "no table storage configured: set {STORAGE} (or {WEBJOBS_STORAGE}) to a connection string, or {STORAGE}__tableServiceUri / {STORAGE}__accountName for identity-based access"
    ));
    None
}

/// Splits `HEALER_SCALE_SETS` on `,` `;` and white space, except inside `[…]` override blocks.
fn split_entries(raw: &str) -> Result<Vec<String>, String> {
    let mut entries = Vec::new();
    let mut current = String::new();
    let mut depth = 0u32;
    for c in raw.chars() {
        match c {
            '[' => {
                depth += 1;
                current.push(c);
            }
            ']' => {
                if depth == 0 {
                    return Err("`]` without a matching `[`".into());
                }
                depth -= 1;
                current.push(c);
            }
            c if depth == 0 && (c == ',' || c == ';' || c.is_whitespace()) => {
                if !current.is_empty() {
                    entries.push(std::mem::take(&mut current));
                }
            }
            c => current.push(c),
        }
    }
    if depth != 0 {
        return Err("`[` without a matching `]`".into());
    }
    if !current.is_empty() {
        entries.push(current);
    }
    Ok(entries)
}

fn parse_scale_sets(
    raw: &str,
    defaults: &Policy,
    problems: &mut Vec<String>,
) -> Vec<WatchedScaleSet> {
    let entries = match split_entries(raw) {
        Ok(e) => e,
        Err(e) => {
            problems.push(format!("{SCALE_SETS}: {e}"));
            return Vec::new();
        }
    };
    let mut sets: Vec<WatchedScaleSet> = Vec::new();
    for entry in entries {
        let (id_part, overrides) = match entry.split_once('[') {
            Some((id, rest)) => (id, Some(rest.trim_end_matches(']'))),
            None => (entry.as_str(), None),
        };
        let id = match ScaleSetId::parse(id_part) {
            Ok(id) => id,
            Err(e) => {
                problems.push(format!("{SCALE_SETS}: {e}"));
                continue;
            }
        };
        if sets.iter().any(|s| s.id == id) {
            problems.push(format!(
                "{SCALE_SETS}: `{}` is listed twice",
                id.resource_id()
            ));
            continue;
        }
        let mut policy = defaults.clone();
        if let Some(overrides) = overrides {
            apply_overrides(&id, overrides, &mut policy, problems);
        }
        sets.push(WatchedScaleSet { id, policy });
    }
    if sets.is_empty() && problems.is_empty() {
        problems.push(format!("{SCALE_SETS}: no scale set resource id found"));
    }
    sets
}

fn apply_overrides(id: &ScaleSetId, raw: &str, policy: &mut Policy, problems: &mut Vec<String>) {
    // A stateful override that could not be read still makes the set stateful (its other rules
    // are checked), but not "carrying nothing" on top of its own problem.
    let mut unreadable_stateful = false;
    for pair in raw
        .split(|c: char| c.is_whitespace() || c == ';')
        .filter(|p| !p.is_empty())
    {
        let Some((key, val)) = pair.split_once('=') else {
            problems.push(format!(
                "{SCALE_SETS}: override `{pair}` for {id} is not KEY=VALUE"
            ));
            continue;
        };
        let key = key.trim().to_ascii_uppercase();
        let name = if key.starts_with("HEALER_") {
            key.clone()
        } else {
            format!("HEALER_{key}")
        };
        let label = format!("{SCALE_SETS} override {name} for {id}");
        let val = Some(val.to_string());
        match name.as_str() {
            HEARTBEAT_TIMEOUT => policy.heartbeat_timeout = duration(val, "", &label, problems),
            STARTUP_TIMEOUT => policy.startup_timeout = duration(val, "", &label, problems),
            GRACE_PERIOD => policy.grace_period = wait(val, "", &label, problems),
            DOWN_FOR => policy.down_for = wait(val, "", &label, problems),
            REPAIR_TIMEOUT => policy.repair_timeout = duration(val, "", &label, problems),
            REPAIR_ACTIONS => {
                policy.repair_actions = value::<Escalation>(val, "replace", &label, problems)
            }
            MAX_ATTEMPTS => policy.max_attempts = attempts(val, &label, problems),
            MAX_PARALLEL => policy.max_parallel = value::<Limit>(val, "10%", &label, problems),
            MAX_UNHEALTHY => policy.max_unhealthy = value::<Limit>(val, "40%", &label, problems),
            PLATFORM_REPAIRS => {
                policy.platform_repairs = value::<PlatformRepairs>(val, "defer", &label, problems)
            }
            DOWN_PROOF => {
                policy.down_proof = value::<crate::heartbeat::Proof>(val, "vmid", &label, problems)
            }
            MAX_MAINTENANCE => policy.max_maintenance = duration(val, "", &label, problems),
            STATEFUL_DISKS => match crate::slot::parse_luns(val.as_deref().unwrap_or("")) {
                Ok(luns) => stateful(policy).luns = luns,
                Err(e) => {
                    stateful(policy);
                    unreadable_stateful = true;
                    problems.push(format!("{label}: {e}"))
                }
            },
            STATEFUL_ADDRESS => match val.as_deref().unwrap_or("").parse::<crate::slot::Address>() {
                Ok(address) => stateful(policy).address = address,
                Err(e) => {
                    stateful(policy);
                    unreadable_stateful = true;
                    problems.push(format!("{label}: {e}"))
                }
            },
            STATEFUL_ZONE_COPY => match val.as_deref().map(|v| v.trim().to_ascii_lowercase()) {
                Some(v) if v == "true" => stateful(policy).zone_copy = true,
                Some(v) if v == "false" => stateful(policy).zone_copy = false,
                other => {
                    stateful(policy);
                    unreadable_stateful = true;
                    problems.push(format!(
                        "{label}: `{}` is not true or false",
                        other.unwrap_or_default()
                    ))
                }
            },
            _ => problems.push(format!(
                "{SCALE_SETS}: `{key}` for {id} cannot be overridden per scale set (allowed: HEARTBEAT_TIMEOUT, STARTUP_TIMEOUT, GRACE_PERIOD, DOWN_FOR, REPAIR_ACTIONS, REPAIR_TIMEOUT, MAX_ATTEMPTS, MAX_PARALLEL, MAX_UNHEALTHY, PLATFORM_REPAIRS, DOWN_PROOF, MAX_MAINTENANCE, STATEFUL_DISKS, STATEFUL_ADDRESS, STATEFUL_ZONE_COPY)"
            )),
        }
    }
    if let Some(s) = &policy.stateful {
        if !s.carries_anything() && !unreadable_stateful {
            problems.push(format!(
                "{SCALE_SETS}: the stateful policy of {id} carries nothing: give STATEFUL_DISKS (LUNs) or STATEFUL_ADDRESS"
            ));
        }
        if policy
            .repair_actions
            .steps()
            .contains(&crate::policy::RepairAction::Delete)
        {
            problems.push(format!(
                "{SCALE_SETS}: {id} is stateful, and `delete` in its REPAIR_ACTIONS would leave its slot's disks with no instance to carry them to: use replace"
            ));
        }
        policy.repair_actions = policy.repair_actions.keeping_state();
    }
}

/// The set's stateful policy, begun with the defaults (no disk, no address, zone copy allowed)
/// by the first of its overrides.
fn stateful(policy: &mut Policy) -> &mut crate::slot::Stateful {
    policy.stateful.get_or_insert(crate::slot::Stateful {
        luns: Vec::new(),
        address: crate::slot::Address::None,
        zone_copy: true,
    })
}

/// The README's settings table, generated from [`CATALOG`] (`handler --settings-table`).
pub fn markdown_table() -> String {
    let mut out = String::from("| setting | default | meaning |\n|---|---|---|\n");
    for s in CATALOG {
        out.push_str(&format!(
            "| `{}` | {} | {} |\n",
            s.name, s.default, s.meaning
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::RepairAction;
    use std::collections::HashMap;

    const WEB: &str =
        "/subscriptions/s1/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/web";
    const API: &str =
        "/subscriptions/s1/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/api";

    fn load(pairs: &[(&str, &str)]) -> Result<Settings, SettingsErrors> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        Settings::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn minimal_settings_take_the_documented_defaults() {
        let s = load(&[
            (SCALE_SETS, WEB),
            (WEBJOBS_STORAGE, "UseDevelopmentStorage=true"),
        ])
        .unwrap();
        assert_eq!(s.scale_sets.len(), 1);
        assert_eq!(s.defaults.heartbeat_timeout, Duration::seconds(180));
        assert_eq!(s.defaults.startup_timeout, Duration::seconds(600));
        assert_eq!(s.defaults.grace_period, Duration::seconds(300));
        assert_eq!(s.defaults.down_for, Duration::seconds(60));
        assert_eq!(s.defaults.repair_actions.steps(), &[RepairAction::Replace]);
        assert_eq!(s.defaults.repair_timeout, Duration::seconds(900));
        assert_eq!(s.defaults.max_attempts, 3);
        assert_eq!(s.defaults.max_parallel, Limit::Percent(10.0));
        assert_eq!(s.defaults.max_unhealthy, Limit::Percent(40.0));
        assert_eq!(s.mirror_max_age, Duration::seconds(300));
        assert_eq!(s.journal_days, Some(90));
        let base = [
            (SCALE_SETS, WEB),
            (WEBJOBS_STORAGE, "UseDevelopmentStorage=true"),
        ];
        for (raw, want) in [("0", None), ("7", Some(7)), (" 365 ", Some(365))] {
            let s = load(&[base[0], base[1], (JOURNAL_DAYS, raw)]).unwrap();
            assert_eq!(s.journal_days, want, "{raw}");
        }
        for raw in ["-1", "36501", "90d"] {
            let err = load(&[base[0], base[1], (JOURNAL_DAYS, raw)]).unwrap_err();
            assert!(err.to_string().contains(JOURNAL_DAYS), "{raw}: {err}");
        }
        assert_eq!(s.full_resync, Duration::seconds(600));
        assert!(!s.dry_run);
        assert_eq!(s.webhook_url, None);
        assert_eq!(s.status_schedule, "0 */1 * * * *");
        assert_eq!(s.arm_endpoint.as_str(), "https://management.azure.com/");
        assert_eq!(s.port, 8080);
        assert_eq!(s.pass_deadline, Duration::seconds(150));
        assert_eq!(s.call_timeout, Duration::seconds(30));
        assert_eq!(
            s.storage,
            StorageSettings::ConnectionString("UseDevelopmentStorage=true".into())
        );
    }

    #[test]
    fn a_pass_must_fit_the_hosts_function_timeout() {
        let base = [
            (SCALE_SETS, WEB),
            (WEBJOBS_STORAGE, "UseDevelopmentStorage=true"),
        ];
        let defaults = load(&base).unwrap();
        // The repository's own host.json, as deployed.
        let ours = include_str!("../../host.json");
        assert_eq!(defaults.check_function_timeout(ours), Ok(()));
        assert_eq!(
            defaults.check_function_timeout("{}"),
            Ok(()),
            "the 5 min default"
        );
        let long = load(&[base[0], base[1], (PASS_DEADLINE, "280")]).unwrap();
        let err = long.check_function_timeout(ours).unwrap_err();
        assert!(err.contains("HEALER_PASS_DEADLINE (280 s)"), "{err}");
        assert_eq!(
            long.check_function_timeout(r#"{"functionTimeout": "00:10:00"}"#),
            Ok(())
        );
        assert!(long
            .check_function_timeout(r#"{"functionTimeout": "ten minutes"}"#)
            .is_err());
        let err = load(&[base[0], base[1], (CALL_TIMEOUT, "100")]).unwrap_err();
        assert!(err.0.iter().any(|p| p.contains("at most half")), "{err}");
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = load(&[
            (HEARTBEAT_TIMEOUT, "soon"),
            (REPAIR_ACTIONS, "delete,restart"),
            (MAX_PARALLEL, "0"),
            (DRY_RUN, "maybe"),
            (STATUS_SCHEDULE, "every minute"),
            (HANDLER_PORT, "99999"),
            (FULL_RESYNC, "-5m"),
            (JOURNAL_DAYS, "a year"),
        ])
        .unwrap_err();
        let text = err.to_string();
        for needle in [
            SCALE_SETS,
            "no table storage configured",
            HEARTBEAT_TIMEOUT,
            REPAIR_ACTIONS,
            MAX_PARALLEL,
            DRY_RUN,
            STATUS_SCHEDULE,
            HANDLER_PORT,
            FULL_RESYNC,
            JOURNAL_DAYS,
        ] {
            assert!(text.contains(needle), "missing {needle} in:\n{text}");
        }
        assert_eq!(err.0.len(), 10, "{text}");
    }

    #[test]
    fn an_unusable_optional_setting_is_a_warning_not_a_stop() {
        let base = [
            (SCALE_SETS, WEB),
            (WEBJOBS_STORAGE, "UseDevelopmentStorage=true"),
        ];
        for (value, says) in [
            (
                "@Microsoft.KeyVault(SecretUri=https://kv.vault.azure.net/secrets/hook/)",
                "Key Vault reference",
            ),
            ("not a url", "is not a URL"),
            ("ftp://hooks.example/x", "expected https"),
        ] {
            let s = load(&[base[0], base[1], (WEBHOOK_URL, value)]).unwrap();
            assert_eq!(s.webhook_url, None, "{value}");
            assert_eq!(s.warnings.len(), 1, "{value}");
            assert!(
                s.warnings[0].contains(says) && s.warnings[0].contains("alerts are not sent"),
                "{}",
                s.warnings[0]
            );
        }
        let s = load(&[base[0], base[1], (WEBHOOK_URL, "https://hooks.example/x")]).unwrap();
        assert!(s.webhook_url.is_some() && s.warnings.is_empty());
    }

    #[test]
    fn down_proof_defaults_to_vmid_and_is_overridable_per_set() {
        use crate::heartbeat::Proof;
        let raw = format!("{WEB}[DOWN_PROOF=name] {API}");
        let s = load(&[(SCALE_SETS, &raw), (STORAGE, "UseDevelopmentStorage=true")]).unwrap();
        assert_eq!(s.defaults.down_proof, Proof::VmId);
        assert_eq!(s.scale_sets[0].policy.down_proof, Proof::Name);
        assert_eq!(s.scale_sets[1].policy.down_proof, Proof::VmId);
        let err = load(&[
            (SCALE_SETS, WEB),
            (STORAGE, "UseDevelopmentStorage=true"),
            (DOWN_PROOF, "trust-me"),
        ])
        .unwrap_err();
        assert!(
            err.to_string().contains("HEALER_DOWN_PROOF: `trust-me`"),
            "{err}"
        );
    }

    #[test]
    fn attestation_needs_trust_anchors_that_load() {
        let base = [(SCALE_SETS, WEB), (STORAGE, "UseDevelopmentStorage=true")];
        let with = |extra: &[(&'static str, &'static str)]| {
            let mut all = base.to_vec();
            all.extend_from_slice(extra);
            load(&all)
        };
        let err = with(&[(DOWN_PROOF, "attested")]).unwrap_err();
        assert!(
            err.to_string().contains("needs HEALER_ATTESTATION_CA"),
            "{err}"
        );
        let err = with(&[(ATTESTATION_CA, "/no/such/bundle.pem")]).unwrap_err();
        assert!(
            err.to_string()
                .contains("cannot read `/no/such/bundle.pem`"),
            "{err}"
        );
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/attestation/trusted-ca.pem"
        );
        let s = with(&[(ATTESTATION_CA, path), (DOWN_PROOF, "attested")]).unwrap();
        assert_eq!(s.attestation.map(|t| t.len()), Some(1));
        assert_eq!(s.defaults.down_proof, crate::heartbeat::Proof::Attested);
    }

    #[test]
    fn scale_sets_split_on_any_separator_and_take_overrides() {
        let raw = format!("{WEB}[REPAIR_ACTIONS=restart,replace max_parallel=2];\n {API}");
        let s = load(&[(SCALE_SETS, &raw), (STORAGE, "UseDevelopmentStorage=true")]).unwrap();
        assert_eq!(s.scale_sets.len(), 2);
        let web = &s.scale_sets[0];
        assert_eq!(web.id.name, "web");
        assert_eq!(
            web.policy.repair_actions.steps(),
            &[RepairAction::Restart, RepairAction::Replace]
        );
        assert_eq!(web.policy.max_parallel, Limit::Count(2));
        assert_eq!(s.scale_sets[1].policy, s.defaults);
    }

    #[test]
    fn a_stateful_set_keeps_state_first_and_its_mistakes_are_all_named() {
        let raw = format!(
            "{WEB}[STATEFUL_DISKS=1,0 STATEFUL_ADDRESS=public-ip STATEFUL_ZONE_COPY=false] {API}"
        );
        let s = load(&[(SCALE_SETS, &raw), (STORAGE, "UseDevelopmentStorage=true")]).unwrap();
        let web = &s.scale_sets[0].policy;
        assert_eq!(
            web.stateful,
            Some(crate::slot::Stateful {
                luns: vec![0, 1],
                address: crate::slot::Address::PublicIp,
                zone_copy: false
            })
        );
        assert_eq!(
            web.repair_actions.to_string(),
            "restart,reimage,replace",
            "restart and reimage keep the disks: they come first"
        );
        assert_eq!(s.scale_sets[1].policy.stateful, None);
        assert_eq!(s.scale_sets[1].policy.repair_actions.to_string(), "replace");

        let raw = format!(
            "{WEB}[STATEFUL_DISKS=64 REPAIR_ACTIONS=restart,delete] {API}[STATEFUL_ADDRESS=elastic STATEFUL_ZONE_COPY=maybe]"
        );
        let err = load(&[
            (SCALE_SETS, &raw),
            (STORAGE, "UseDevelopmentStorage=true"),
            (STATEFUL_DISKS, "0"),
        ])
        .unwrap_err();
        let text = err.to_string();
        for needle in [
            "LUN 64 is out of range",
            "`delete` in its REPAIR_ACTIONS",
            "`elastic` is not an address",
            "`maybe` is not true or false",
            "HEALER_STATEFUL_DISKS is a per-scale-set override only",
        ] {
            assert!(text.contains(needle), "{needle}: {text}");
        }
        assert!(!text.contains("carries nothing"), "{text}");
        let raw = format!("{WEB}[STATEFUL_ZONE_COPY=true]");
        let err = load(&[(SCALE_SETS, &raw), (STORAGE, "UseDevelopmentStorage=true")]).unwrap_err();
        assert!(err.to_string().contains("carries nothing"), "{err}");
    }

    #[test]
    fn bad_scale_set_entries_are_each_named() {
        let raw = format!("{WEB},{WEB} /subscriptions/x {API}[COLOUR=blue] {API}[MAX_ATTEMPTS=0");
        let err = load(&[(SCALE_SETS, &raw), (STORAGE, "UseDevelopmentStorage=true")]).unwrap_err();
        assert_eq!(err.0.len(), 1, "unbalanced brackets stop the parse: {err}");
        let raw = format!("{WEB},{WEB} /subscriptions/x {API}[COLOUR=blue]");
        let err = load(&[(SCALE_SETS, &raw), (STORAGE, "UseDevelopmentStorage=true")]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("listed twice"), "{text}");
        assert!(text.contains("/subscriptions/x"), "{text}");
        assert!(text.contains("COLOUR"), "{text}");
    }

    #[test]
    fn identity_based_storage_is_recognised() {
        let s = load(&[
            (SCALE_SETS, WEB),
            ("HEALER_STORAGE__accountName", "healerstate"),
            ("HEALER_STORAGE__clientId", "abc"),
        ])
        .unwrap();
        assert_eq!(
            s.storage,
            StorageSettings::Identity {
                table_service_uri: Url::parse("https://healerstate.table.core.windows.net")
                    .unwrap(),
                client_id: Some("abc".into())
            }
        );
        let s = load(&[
            (SCALE_SETS, WEB),
            (
                "AzureWebJobsStorage__tableServiceUri",
                "https://x.table.core.windows.net",
            ),
        ])
        .unwrap();
        assert!(matches!(
            s.storage,
            StorageSettings::Identity {
                client_id: None,
                ..
            }
        ));
        let err = load(&[
            (SCALE_SETS, WEB),
            ("HEALER_STORAGE__accountName", "Bad_Name"),
        ])
        .unwrap_err();
        assert!(err.to_string().contains("accountName"));
    }
}
