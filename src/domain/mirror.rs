//! The mirror: what each watched scale set really looks like, as last read from the Compute API
//! (or updated by a Resource Manager event). Everything but `monitor-state` reads scale sets from
//! here, never from ARM.

use crate::scaleset::ScaleSetId;
use serde::Serialize;
use std::collections::BTreeMap;
use time::OffsetDateTime;

/// The Application Health extension's verdict on an instance (`vmHealth` in the instance view).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AppHealth {
    Healthy,
    Unhealthy,
    Unknown,
    Initializing,
}

impl AppHealth {
    /// Reads the status code of `vmHealth` (`HealthState/healthy`, …).
    pub fn from_code(code: &str) -> Option<Self> {
        let state = code.rsplit('/').next()?.to_ascii_lowercase();
        match state.as_str() {
            "healthy" => Some(AppHealth::Healthy),
            "unhealthy" => Some(AppHealth::Unhealthy),
            "unknown" => Some(AppHealth::Unknown),
            "initializing" => Some(AppHealth::Initializing),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            AppHealth::Healthy => "healthy",
            AppHealth::Unhealthy => "unhealthy",
            AppHealth::Unknown => "unknown",
            AppHealth::Initializing => "initializing",
        }
    }
}

/// Times as the tables keep them (microseconds): ARM reports finer ones, and comparing a fresh
/// read with a stored row must not see a change that is only precision.
pub fn at_storage_precision(t: OffsetDateTime) -> OffsetDateTime {
    t.replace_nanosecond(t.nanosecond() / 1_000 * 1_000)
        .unwrap_or(t)
}

/// One mirrored VM of a scale set.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Instance {
    pub instance_id: String,
    pub vm_id: Option<String>,
    pub computer_name: Option<String>,
    /// `Succeeded`, `Creating`, `Updating`, `Failed`, `Deleting`, …
    pub provisioning_state: Option<String>,
    /// The `PowerState/…` suffix: `running`, `stopped`, `deallocated`, `starting`, …
    pub power_state: Option<String>,
    pub health: Option<AppHealth>,
    /// When `health` last changed, as seen by the mirror (set by the sync, not by ARM).
    // Times as an operator reads them in the journal's evidence (RFC 3339), not as numbers.
    #[serde(with = "time::serde::rfc3339::option")]
    pub health_since: Option<OffsetDateTime>,
    pub latest_model_applied: Option<bool>,
    pub protected_from_scale_set_actions: bool,
    pub protected_from_scale_in: bool,
    /// A resource lock forbids deleting the VM (Flexible scale sets, whose instances are VMs of
    /// their resource group: a `CanNotDelete` or `ReadOnly` lock on the VM or its group). A delete
    /// or replace of it cannot work; restart and reimage still can (not under `ReadOnly`).
    pub delete_locked: bool,
    pub zone: Option<String>,
    #[serde(with = "time::serde::rfc3339::option")]
    pub created_at: Option<OffsetDateTime>,
    /// When the last operation on the instance ended (the `time` of its `ProvisioningState/…`
    /// status): how a call whose answer was lost is found to have landed or not.
    #[serde(with = "time::serde::rfc3339::option")]
    pub provisioned_at: Option<OffsetDateTime>,
    /// Its managed data disks: (LUN, disk resource id). What a stateful set's slot holds.
    pub data_disks: Vec<(u32, String)>,
}

/// A management lock, as Resource Manager lists a resource group's: the resource it is on (lower
/// case) and its level.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lock {
    pub scope: String,
    pub level: LockLevel,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockLevel {
    /// Nothing under it can be deleted.
    CanNotDelete,
    /// Nothing under it can be changed: no write, no delete, no action (restart, start, reimage).
    ReadOnly,
}

/// Azure's alternative to instance protection for Flexible scale sets is a resource lock
/// ("Orchestration modes API comparison": Instance protection → "ARM Lock Resource"). A lock on
/// the VM or on its resource group applies to the VM (locks are inherited by child resources):
/// `ReadOnly` protects it from every repair, `CanNotDelete` from deletion.
pub fn apply_locks(instances: &mut [Instance], set: &ScaleSetId, locks: &[Lock]) {
    let group = format!(
        "/subscriptions/{}/resourcegroups/{}",
        set.subscription, set.resource_group
    );
    for inst in instances.iter_mut() {
        let vm = format!(
            "{group}/providers/microsoft.compute/virtualmachines/{}",
            inst.instance_id
        );
        for lock in locks.iter().filter(|l| l.scope == group || l.scope == vm) {
            inst.delete_locked = true;
            if lock.level == LockLevel::ReadOnly {
                inst.protected_from_scale_set_actions = true;
            }
        }
    }
}

impl Instance {
    /// Whether the mirror should be rewritten for this instance: any observed field changed.
    pub fn differs_from(&self, other: &Instance) -> bool {
        self != other
    }
}

/// A mirrored instance with the time the mirror last confirmed it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MirroredInstance {
    pub instance: Instance,
    pub synced_at: OffsetDateTime,
}

/// What the mirror knows about a whole scale set.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScaleSetRecord {
    pub capacity: Option<i64>,
    /// `Uniform` or `Flexible`.
    pub orchestration_mode: Option<String>,
    /// Whether the platform's own automatic instance repairs are enabled on the scale set.
    pub platform_auto_repair: bool,
    /// Terminate notifications: how long an instance gets to drain before a delete takes it
    /// (`scheduledEventsProfile.terminateNotificationProfile.notBeforeTimeout`), when enabled.
    pub terminate_notice: Option<time::Duration>,
    /// The region (`westeurope`): a swap is only between sets of one region.
    pub location: Option<String>,
    /// The model's image: a custom image's id, or `platform:publisher:offer:sku:version` (a set
    /// on a platform image can never be pointed at a gallery image).
    pub image: Option<String>,
    /// When the instances were last read in full; `None` until the first successful sync.
    pub synced_at: Option<OffsetDateTime>,
    /// Why the last sync failed, if it did.
    pub sync_error: Option<String>,
    /// The Compute API asked us to back off until then (429 `Retry-After`).
    pub throttled_until: Option<OffsetDateTime>,
    /// False once the scale set is found deleted (404).
    pub exists: bool,
    /// When something last said the scale set changed (a Resource Manager event, a repair of
    /// ours): later than `synced_at`, the mirror is behind and the next pass reads the set.
    pub changed_at: Option<OffsetDateTime>,
    /// The brake holding the scale set's repairs (a reason label), if any, and since when.
    pub brake: Option<String>,
    pub brake_since: Option<OffsetDateTime>,
    /// An operator's manual brake (`handler pause`): the note they gave, and since when.
    pub operator_pause: Option<String>,
    pub operator_pause_since: Option<OffsetDateTime>,
}

impl ScaleSetRecord {
    pub fn unsynced() -> Self {
        ScaleSetRecord {
            capacity: None,
            orchestration_mode: None,
            platform_auto_repair: false,
            terminate_notice: None,
            location: None,
            image: None,
            synced_at: None,
            sync_error: None,
            throttled_until: None,
            exists: true,
            changed_at: None,
            brake: None,
            brake_since: None,
            operator_pause: None,
            operator_pause_since: None,
        }
    }
}

/// The changes that bring a stored mirror in line with what the Compute API reported.
#[derive(Debug, Default, PartialEq)]
pub struct MirrorDiff {
    /// New or changed instances.
    pub upserts: Vec<Instance>,
    /// Unchanged instances (their sync time still moves on).
    pub unchanged: Vec<String>,
    /// Instance ids stored but no longer reported: the VM is gone.
    pub removals: Vec<String>,
}

/// Compares the stored mirror with a full listing of the scale set.
pub fn diff(stored: &[MirroredInstance], observed: Vec<Instance>) -> MirrorDiff {
    let mut by_id: BTreeMap<&str, &Instance> = stored
        .iter()
        .map(|m| (m.instance.instance_id.as_str(), &m.instance))
        .collect();
    let mut out = MirrorDiff::default();
    for inst in observed {
        match by_id.remove(inst.instance_id.as_str()) {
            Some(old) if !old.differs_from(&inst) => out.unchanged.push(inst.instance_id),
            _ => out.upserts.push(inst),
        }
    }
    out.removals = by_id.into_keys().map(str::to_string).collect();
    out
}

#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    pub fn instance(id: &str) -> Instance {
        Instance {
            instance_id: id.to_string(),
            vm_id: Some(format!("vm-{id}")),
            computer_name: Some(format!("web{id:0>6}")),
            provisioning_state: Some("Succeeded".into()),
            power_state: Some("running".into()),
            health: None,
            health_since: None,
            latest_model_applied: Some(true),
            protected_from_scale_set_actions: false,
            protected_from_scale_in: false,
            delete_locked: false,
            zone: None,
            created_at: None,
            provisioned_at: None,
            data_disks: Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fixtures::instance;
    use super::*;
    use time::macros::datetime;

    fn stored(inst: Instance) -> MirroredInstance {
        MirroredInstance {
            instance: inst,
            synced_at: datetime!(2026-11-22 10:00 UTC),
        }
    }

    #[test]
    fn locks_on_the_vm_or_its_group_protect_it_and_others_do_not() {
        let set = ScaleSetId::new("s", "rg", "web");
        let group = "/subscriptions/s/resourcegroups/rg";
        let vm = |name: &str| format!("{group}/providers/microsoft.compute/virtualmachines/{name}");
        let cases: Vec<(&str, Vec<Lock>, (bool, bool))> = vec![
            ("no lock", vec![], (false, false)),
            (
                "CanNotDelete on the VM",
                vec![Lock {
                    scope: vm("web_a"),
                    level: LockLevel::CanNotDelete,
                }],
                (true, false),
            ),
            (
                "ReadOnly on the VM",
                vec![Lock {
                    scope: vm("web_a"),
                    level: LockLevel::ReadOnly,
                }],
                (true, true),
            ),
            (
                "CanNotDelete on the group",
                vec![Lock {
                    scope: group.into(),
                    level: LockLevel::CanNotDelete,
                }],
                (true, false),
            ),
            (
                "a lock on another VM",
                vec![Lock {
                    scope: vm("web_b"),
                    level: LockLevel::ReadOnly,
                }],
                (false, false),
            ),
            (
                "a lock on the scale set (not a parent of its VMs)",
                vec![Lock {
                    scope: format!(
                        "{group}/providers/microsoft.compute/virtualmachinescalesets/web"
                    ),
                    level: LockLevel::ReadOnly,
                }],
                (false, false),
            ),
            (
                "a lock in another group",
                vec![Lock {
                    scope: "/subscriptions/s/resourcegroups/other".into(),
                    level: LockLevel::ReadOnly,
                }],
                (false, false),
            ),
        ];
        for (name, locks, (delete_locked, protected)) in cases {
            let mut instances = vec![instance("web_a")];
            apply_locks(&mut instances, &set, &locks);
            assert_eq!(
                (
                    instances[0].delete_locked,
                    instances[0].protected_from_scale_set_actions
                ),
                (delete_locked, protected),
                "{name}"
            );
        }
    }

    #[test]
    fn diff_finds_new_changed_unchanged_and_vanished_instances() {
        let mut changed = instance("2");
        changed.power_state = Some("stopped".into());
        let d = diff(
            &[
                stored(instance("1")),
                stored(instance("2")),
                stored(instance("3")),
            ],
            vec![instance("1"), changed.clone(), instance("4")],
        );
        assert_eq!(d.unchanged, vec!["1".to_string()]);
        assert_eq!(d.upserts, vec![changed, instance("4")]);
        assert_eq!(d.removals, vec!["3".to_string()]);
    }

    #[test]
    fn health_codes_parse_case_insensitively() {
        assert_eq!(
            AppHealth::from_code("HealthState/healthy"),
            Some(AppHealth::Healthy)
        );
        assert_eq!(
            AppHealth::from_code("HealthState/Unhealthy"),
            Some(AppHealth::Unhealthy)
        );
        assert_eq!(AppHealth::from_code("HealthState/whatever"), None);
    }
}
