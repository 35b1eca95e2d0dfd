//! The simulated fleet: scale sets, their VMs, long-running operations and injected faults.
//! Time moves only when a request arrives (`advance`), so tests never race a background timer.

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::Duration;
use time::OffsetDateTime;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Beat {
    /// The agent publishes UP.
    Up,
    /// The agent publishes DOWN.
    Down,
    /// The agent publishes nothing (a hung VM or a broken agent).
    Silent,
    /// The agent publishes MAINTENANCE until `maintenance_until`.
    Maintenance,
}

/// Whether a fault survives a restart or reimage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Fault {
    /// Cleared by a restart or reimage (the common case).
    #[default]
    Soft,
    /// Survives a restart, cleared by a reimage.
    Disk,
    /// Survives restart and reimage: only replacing the VM helps.
    Hard,
}

#[derive(Debug, Clone, Serialize)]
pub struct Vm {
    pub instance_id: u64,
    pub vm_id: String,
    pub computer_name: String,
    pub provisioning_state: String,
    pub power_state: String,
    pub health: Option<String>,
    pub protect_from_scale_in: bool,
    pub protect_from_scale_set_actions: bool,
    pub zone: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub time_created: OffsetDateTime,
    pub latest_model_applied: bool,
    pub beat: Beat,
    pub fault: Fault,
    #[serde(with = "time::serde::rfc3339::option")]
    pub maintenance_until: Option<OffsetDateTime>,
    pub sequence: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct ScaleSet {
    pub subscription: String,
    pub resource_group: String,
    pub name: String,
    pub location: String,
    pub orchestration_mode: String,
    pub automatic_repairs: bool,
    pub sku: String,
    pub zones: Vec<String>,
    pub vms: BTreeMap<u64, Vm>,
    pub next_instance: u64,
}

impl ScaleSet {
    pub fn capacity(&self) -> usize {
        self.vms
            .values()
            .filter(|v| v.provisioning_state != "Deleting")
            .count()
    }

    pub fn resource_id(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachineScaleSets/{}",
            self.subscription, self.resource_group, self.name
        )
    }

    fn add_vm(&mut self, now: OffsetDateTime, provisioning: &str) -> u64 {
        let id = self.next_instance;
        self.next_instance += 1;
        let zone =
            (!self.zones.is_empty()).then(|| self.zones[id as usize % self.zones.len()].clone());
        self.vms.insert(
            id,
            Vm {
                instance_id: id,
                vm_id: uuid::Uuid::new_v4().to_string(),
                computer_name: format!("{}{}", computer_prefix(&self.name), base36_6(id)),
                provisioning_state: provisioning.into(),
                power_state: if provisioning == "Succeeded" {
                    "running"
                } else {
                    "starting"
                }
                .into(),
                health: None,
                protect_from_scale_in: false,
                protect_from_scale_set_actions: false,
                zone,
                time_created: now,
                latest_model_applied: true,
                beat: Beat::Up,
                fault: Fault::Soft,
                maintenance_until: None,
                sequence: 0,
            },
        );
        id
    }
}

/// VMSS computer names are a prefix of the scale set name plus six base-36 digits.
fn computer_prefix(name: &str) -> String {
    name.chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(9)
        .collect::<String>()
        .to_lowercase()
}

pub fn base36_6(mut n: u64) -> String {
    const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut out = [b'0'; 6];
    for slot in out.iter_mut().rev() {
        *slot = DIGITS[(n % 36) as usize];
        n /= 36;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[derive(Debug, Clone, Serialize)]
pub enum Effect {
    Delete(Vec<u64>),
    Restart(Vec<u64>),
    Reimage(Vec<u64>),
    Scale(usize),
}

#[derive(Debug, Clone, Serialize)]
pub struct Operation {
    pub id: String,
    pub set_key: String,
    pub effect: Effect,
    #[serde(with = "time::serde::rfc3339")]
    pub started: OffsetDateTime,
    #[serde(skip)]
    pub due: std::time::Instant,
    #[serde(with = "time::serde::rfc3339::option")]
    pub ended: Option<OffsetDateTime>,
}

/// A fault injected through the admin API: the next `count` matching requests fail.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FaultRule {
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default, rename = "pathContains")]
    pub path_contains: Option<String>,
    pub status: u16,
    #[serde(default, rename = "retryAfter")]
    pub retry_after: Option<u64>,
    #[serde(default = "one")]
    pub count: u32,
}

fn one() -> u32 {
    1
}

#[derive(Debug, Clone, Serialize)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub query: String,
    pub status: u16,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
}

pub struct World {
    pub sets: BTreeMap<String, ScaleSet>,
    pub operations: HashMap<String, Operation>,
    pub faults: VecDeque<FaultRule>,
    pub calls: Vec<Call>,
    pub tokens: HashMap<String, OffsetDateTime>,
    pub operation_delay: Duration,
    pub page_size: usize,
    /// Overrides the read budget reported in `x-ms-ratelimit-remaining-resource`.
    pub rate_limit_remaining: Option<usize>,
    /// Resource Manager events (what the resource group's Event Grid system topic would publish)
    /// not yet delivered.
    pub resource_events: Vec<serde_json::Value>,
}

pub const WRITE: &str = "Microsoft.Resources.ResourceWriteSuccess";
pub const DELETE: &str = "Microsoft.Resources.ResourceDeleteSuccess";
pub const ACTION: &str = "Microsoft.Resources.ResourceActionSuccess";

pub fn set_key(sub: &str, rg: &str, name: &str) -> String {
    format!(
        "{}:{}:{}",
        sub.to_lowercase(),
        rg.to_lowercase(),
        name.to_lowercase()
    )
}

impl World {
    pub fn new(operation_delay: Duration, page_size: usize) -> Self {
        World {
            sets: BTreeMap::new(),
            operations: HashMap::new(),
            faults: VecDeque::new(),
            calls: Vec::new(),
            tokens: HashMap::new(),
            operation_delay,
            page_size: page_size.max(1),
            rate_limit_remaining: None,
            resource_events: Vec::new(),
        }
    }

    /// Queues the Resource Manager event a successful operation on `resource_uri` raises, in the
    /// Event Grid schema of a resource group system topic.
    pub fn announce(&mut self, event_type: &str, resource_uri: &str, operation: &str) {
        let Some((topic, _)) = resource_uri.split_once("/providers/") else {
            return;
        };
        let subscription = topic.split('/').nth(2).unwrap_or_default().to_string();
        let now = OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        self.resource_events.push(serde_json::json!({
            "id": uuid::Uuid::new_v4().to_string(),
            "topic": topic,
            "subject": resource_uri,
            "eventType": event_type,
            "eventTime": now,
            "dataVersion": "2",
            "metadataVersion": "1",
            "data": {
                "resourceProvider": "Microsoft.Compute",
                "resourceUri": resource_uri,
                "operationName": operation,
                "status": "Succeeded",
                "subscriptionId": subscription,
                "tenantId": "00000000-0000-0000-0000-00000000beef",
                "correlationId": uuid::Uuid::new_v4().to_string(),
            },
        }));
    }

    #[allow(clippy::too_many_arguments)]
    pub fn create_set(
        &mut self,
        sub: &str,
        rg: &str,
        name: &str,
        capacity: usize,
        location: &str,
        zones: Vec<String>,
        orchestration_mode: &str,
        automatic_repairs: bool,
    ) -> String {
        let key = set_key(sub, rg, name);
        let mut set = ScaleSet {
            subscription: sub.into(),
            resource_group: rg.into(),
            name: name.into(),
            location: location.into(),
            orchestration_mode: orchestration_mode.into(),
            automatic_repairs,
            sku: "Standard_D2s_v5".into(),
            zones,
            vms: BTreeMap::new(),
            next_instance: 0,
        };
        let now = OffsetDateTime::now_utc();
        for _ in 0..capacity {
            set.add_vm(now, "Succeeded");
        }
        self.sets.insert(key.clone(), set);
        key
    }

    /// Completes every operation that is due.
    pub fn advance(&mut self) {
        let now = std::time::Instant::now();
        let due: Vec<String> = self
            .operations
            .values()
            .filter(|op| op.ended.is_none() && op.due <= now)
            .map(|op| op.id.clone())
            .collect();
        for id in due {
            self.complete(&id);
        }
    }

    /// Completes one operation now, applying its effect.
    pub fn complete(&mut self, op_id: &str) {
        let Some(op) = self.operations.get_mut(op_id) else {
            return;
        };
        if op.ended.is_some() {
            return;
        }
        op.ended = Some(OffsetDateTime::now_utc());
        let (key, effect) = (op.set_key.clone(), op.effect.clone());
        let Some(set) = self.sets.get_mut(&key) else {
            return;
        };
        let set_uri = set.resource_id();
        // Resource Manager reports the scale set's action or write once the operation succeeds.
        let (event_type, operation) = match &effect {
            Effect::Delete(_) => (
                ACTION,
                "Microsoft.Compute/virtualMachineScaleSets/delete/action",
            ),
            Effect::Restart(_) => (
                ACTION,
                "Microsoft.Compute/virtualMachineScaleSets/restart/action",
            ),
            Effect::Reimage(_) => (
                ACTION,
                "Microsoft.Compute/virtualMachineScaleSets/reimage/action",
            ),
            Effect::Scale(_) => (WRITE, "Microsoft.Compute/virtualMachineScaleSets/write"),
        };
        let now = OffsetDateTime::now_utc();
        match effect {
            Effect::Delete(ids) => {
                for id in ids {
                    set.vms.remove(&id);
                }
            }
            Effect::Restart(ids) | Effect::Reimage(ids) => {
                let reimage = matches!(op_effect_kind(&self.operations[op_id].effect), "reimage");
                for id in ids {
                    if let Some(vm) = set.vms.get_mut(&id) {
                        vm.power_state = "running".into();
                        vm.provisioning_state = "Succeeded".into();
                        let healed = match vm.fault {
                            Fault::Soft => true,
                            Fault::Disk => reimage,
                            Fault::Hard => false,
                        };
                        if healed && matches!(vm.beat, Beat::Down | Beat::Silent) {
                            vm.beat = Beat::Up;
                            if vm.health.is_some() {
                                vm.health = Some("healthy".into());
                            }
                        }
                    }
                }
            }
            Effect::Scale(target) => {
                for vm in set.vms.values_mut() {
                    if vm.provisioning_state == "Creating" {
                        vm.provisioning_state = "Succeeded".into();
                        vm.power_state = "running".into();
                    }
                }
                let live: Vec<u64> = set
                    .vms
                    .values()
                    .filter(|v| v.provisioning_state != "Deleting")
                    .map(|v| v.instance_id)
                    .collect();
                if live.len() > target {
                    // Scale-in removes the highest instance ids first, sparing protected ones.
                    let mut removable: Vec<u64> = live
                        .iter()
                        .copied()
                        .filter(|id| !set.vms[id].protect_from_scale_in)
                        .collect();
                    removable.sort_unstable_by(|a, b| b.cmp(a));
                    for id in removable.into_iter().take(live.len() - target) {
                        set.vms.remove(&id);
                    }
                }
                let _ = now;
            }
        }
        self.announce(event_type, &set_uri, operation);
    }

    /// Starts an operation; its effect lands after the configured delay.
    pub fn start_operation(&mut self, set_key: &str, effect: Effect) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        let now = OffsetDateTime::now_utc();
        // Visible at once, as ARM shows: deleting instances are marked, new ones appear creating.
        if let Some(set) = self.sets.get_mut(set_key) {
            match &effect {
                Effect::Delete(ids) => {
                    for id in ids {
                        if let Some(vm) = set.vms.get_mut(id) {
                            vm.provisioning_state = "Deleting".into();
                        }
                    }
                }
                Effect::Restart(ids) | Effect::Reimage(ids) => {
                    for id in ids {
                        if let Some(vm) = set.vms.get_mut(id) {
                            vm.provisioning_state = "Updating".into();
                            vm.power_state = "starting".into();
                        }
                    }
                }
                Effect::Scale(target) => {
                    let live = set.capacity();
                    for _ in live..*target {
                        set.add_vm(now, "Creating");
                    }
                }
            }
        }
        self.operations.insert(
            id.clone(),
            Operation {
                id: id.clone(),
                set_key: set_key.into(),
                effect,
                started: now,
                due: std::time::Instant::now() + self.operation_delay,
                ended: None,
            },
        );
        if self.operation_delay.is_zero() {
            self.complete(&id);
        }
        id
    }

    /// The first injected fault matching this request, consumed.
    pub fn take_fault(&mut self, method: &str, path: &str) -> Option<FaultRule> {
        let pos = self.faults.iter().position(|f| {
            f.method
                .as_deref()
                .is_none_or(|m| m.eq_ignore_ascii_case(method))
                && f.path_contains
                    .as_deref()
                    .is_none_or(|p| path.to_lowercase().contains(&p.to_lowercase()))
        })?;
        let rule = self.faults[pos].clone();
        if rule.count <= 1 {
            self.faults.remove(pos);
        } else {
            self.faults[pos].count -= 1;
        }
        Some(rule)
    }
}

pub fn op_effect_kind(effect: &Effect) -> &'static str {
    match effect {
        Effect::Delete(_) => "delete",
        Effect::Restart(_) => "restart",
        Effect::Reimage(_) => "reimage",
        Effect::Scale(_) => "scale",
    }
}
