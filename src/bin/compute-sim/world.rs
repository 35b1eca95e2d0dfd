//! The simulated fleet: scale sets, their VMs, long-running operations and injected faults.
//! Time moves only when a request arrives (`advance`), so tests never race a background timer.
//!
//! What it knows of Azure, and where that knowledge comes from (each behaviour has a test in
//! `tests/simulator.rs`):
//! - A write is a long-running operation: 202 (or 200 for a PATCH) with an `Azure-AsyncOperation`
//!   URL whose status is `InProgress` until it ends `Succeeded`, `Failed` or `Canceled`, with ARM's
//!   `error.code` and `error.message` (the Resource Manager asynchronous-operation contract, as the
//!   SDKs model it: AzureAsyncOperationResult { status, error }).
//! - A scale set write (PATCH/PUT) that lands while `deleteInstances` runs preempts the delete: its
//!   operation ends `Failed` with `OperationPreempted`, "Operation execution has been preempted by a
//!   more recent operation" (kubernetes/autoscaler#9505 and cloud-provider-azure's
//!   `OperationPreemptedErrorMessage`, which both retry exactly this).
//! - Restarting a stopped or deallocated VM is refused: 409 `OperationNotAllowed`, "The operation
//!   requires the VM to be running (or set to run)." (MicrosoftDocs/azure-docs#32404, and the same
//!   answer quoted in PierreBeucher/cloudypad#69).
//! - A request on an instance another operation is changing: 409 `Conflict`, "The request failed due
//!   to conflict with a concurrent request." (cloud-provider-azure's
//!   `ConcurrentRequestConflictMessage`); an instance being deleted is "not an active Virtual Machine
//!   Scale Set VM instanceId" (400 `InvalidParameter`, cloud-provider-azure's
//!   `VmssVMNotActiveErrorMessage`).
//! - The scale set carries an `etag` that changes with every write; `If-Match` with another value is
//!   412 `PreconditionFailed`, "Etag provided in if-match header "2" does not match etag "3" of
//!   resource." (cloud-provider-azure#9728; `if_match` on the SDK's update builder).
//! - A capacity above the scale set's limit is 409 `OperationNotAllowed`, "Unable to create or update
//!   VirtualMachineScaleSet 'x' as it exceeds the total limit of '100' Virtual Machine instances."
//!   (hashicorp/terraform-azurerm-nomad#6); the scale set shows `provisioningState: Updating` while
//!   a capacity change runs (cluster-autoscaler does not scale a set that is Updating, #3025).
//! - Throttling is counted per subscription (and region): "Azure Compute requests may be throttled at
//!   a subscription and on a per-region basis"; each answer carries one
//!   `x-ms-ratelimit-remaining-resource` header per policy ("There will be a separate
//!   x-ms-ratelimit-remaining-resource header for each policy", Troubleshooting API throttling
//!   errors, learn.microsoft.com).
//! - An instance view's `ProvisioningState/…` status carries the `time` the last operation on the
//!   instance ended ("Azure VM Scale Sets and Azure Resource Explorer": after
//!   `Start-AzureRmVmss -InstanceId`, `ProvisioningState/succeeded` with the time it completed).
//!   The healer finds out from it whether a call whose answer was lost landed.
//! - Flexible orchestration (`orchestrationMode: Flexible`): the instances are ordinary virtual
//!   machines, `…/providers/Microsoft.Compute/virtualMachines/<name>` with
//!   `properties.virtualMachineScaleSet.id` naming their set, named `<set>_<8 characters>`.
//!   They are listed with the VM API, filtered by `'virtualMachineScaleSet/id' eq '<id>'`
//!   (`$expand=instanceView` only together with that filter; `statusOnly=true` on the
//!   subscription-wide list), and acted on one by one with the VM API (restart, start, reimage,
//!   redeploy); only deletion stays a scale-set batch (`delete` with VM names); there is no
//!   instance protection (Azure's alternative is a resource lock). Sources: the REST spec of
//!   2024-07-01 as `azure_mgmt_compute` 0.21 generates it (`virtual_machines::list` and
//!   `list_all`: `$filter`, `$expand`, `statusOnly`), "Orchestration modes API comparison"
//!   (learn.microsoft.com: batch operations → "Invoke Single VM API", Delete → "VMSS Batch delete
//!   API", Instance protection → "ARM Lock Resource"), and cloud-provider-azure's VMSS Flex
//!   support (`ListVmssFlexVMsWithoutInstanceView` / `…WithOnlyInstanceView`).
//! - Management locks (`Microsoft.Authorization/locks`, api-version 2016-09-01) are listed per
//!   resource group with those of every resource in it; a lock's id is the locked resource's id
//!   followed by `/providers/Microsoft.Authorization/locks/<name>`, its `properties.level`
//!   `CanNotDelete` or `ReadOnly` (Management Locks REST reference, "List At Resource Group
//!   Level"). A `CanNotDelete` or `ReadOnly` lock on a VM or its group makes deleting it fail
//!   with 409 `ScopeLocked`; `ReadOnly` also refuses its actions ("Lock your resources to protect
//!   your infrastructure": locks are inherited by child resources).
//! - Model versions: a change of the scale set's model (`POST /admin/scalesets/{key}/model`, what
//!   an operator's PUT of a new image or extension does) leaves every existing instance on its old
//!   model, `latestModelApplied: false`, until the scale set's manual upgrade
//!   (`POST …/manualupgrade` with `instanceIds`, `VirtualMachineScaleSets_UpdateInstances` in the
//!   REST spec) is run on it; new instances get the latest model. A reimage keeps the instance's
//!   model ("If exact version is not provided, the OS disk is reimaged to the existing version of
//!   OS Disk", VirtualMachineScaleSetReimageParameters; "If you have the upgrade policy set to
//!   manual, any changes made to the scale set model won't be applied automatically. You need to
//!   manually trigger upgrades on each individual virtual machine", "Performing manual upgrades on
//!   Virtual Machine Scale Sets", learn.microsoft.com). A Flexible scale set's manual upgrade is in
//!   preview there and is not offered here.
//! - Terminate notifications (`virtualMachineProfile.scheduledEventsProfile.
//!   terminateNotificationProfile`, `notBeforeTimeout` PT5M–PT15M in Azure; any length here, for
//!   tests): a delete of an instance creates a `Terminate` scheduled event naming the VM
//!   (`{scale set}_{instance id}` for Uniform instances) with `NotBefore` = now + the notice, and
//!   the VM is deleted only once every event of the delete is approved (`StartRequests`) or the
//!   notice ran out. A scale-in is a delete of the instances it removes and raises theirs. Only
//!   deletes do ("all delete operations (manual delete or Autoscale-initiated scale-in) will
//!   generate a Terminate event.
//!   Other operations such as reboot, reimage, redeploy, and stop/deallocate do not", "Terminate
//!   notification for Azure Virtual Machine Scale Set instances", learn.microsoft.com); the
//!   document and the approval follow "Scheduled Events for Linux VMs" (`DocumentIncarnation`,
//!   `Events[]` with `EventId`, `EventType`, `ResourceType`, `Resources`, `EventStatus`,
//!   `NotBefore` as an HTTP date, `EventSource`). The VMs read them through the admin API, which the
//!   agent tests' IMDS stand-in serves as `/metadata/scheduledevents`.
//! - Autoscale settings (`Microsoft.Insights/autoscalesettings`, api-version 2022-10-01: listed
//!   per resource group, read, written with PUT; `properties.targetResourceUri` the scale set,
//!   `profiles[].capacity` `minimum` / `maximum` / `default` as strings, per the REST reference and
//!   the bicep types of the resource): an enabled setting keeps its target's capacity within the
//!   first profile's minimum and maximum ("Autoscale … will not scale below the minimum or above the
//!   maximum instance count", Azure Monitor autoscale overview) — here at once, where Azure
//!   evaluates every minute or so. A disabled setting holds nothing. A setting's target cannot
//!   be changed (400 `TargetResourceIdIsImmutable`, "The target resource reference is immutable.
//!   If you want to change it, please create a new autoscale setting with a different name.",
//!   quoted in Azure/Moodle#311 and MicrosoftDocs/azure-docs#28175): moving autoscale to another
//!   scale set is a new setting for it.
//! - What serves: after every request the instances serving in each set (running, UP, named by no
//!   Terminate event) are noted when they changed, `GET /admin/serving`.
//! - The model's image (`virtualMachineProfile.storageProfile.imageReference`) is a platform image
//!   or a custom one (`id`), and a PATCH may not change which: 409 `OperationNotAllowed`, "The
//!   Image type for a Virtual Machine Scale Set may not be changed." (MicrosoftDocs/azure-docs#89791
//!   and #92371, Azure/azure-powershell#11817); nor a platform image's publisher, offer or sku:
//!   409 `PropertyChangeNotAllowed`, "Changing property 'imageReference.sku' is not allowed."
//!   (Azure/azure-powershell#11911). A custom image that is not there (or not yet `Succeeded`) is
//!   404 `GalleryImageNotFound`, "The gallery image … is not available in … region."
//!   (aztfmod/terraform-azurerm-caf#852, pulumi/pulumi-aws#5129). An accepted change is a new
//!   model (instances outdated until upgraded).
//! - Snapshots, galleries, image definitions and image versions: `gallery.rs` says what it knows.
//!   Each VM's OS disk is a managed disk named as Azure names them, shown in the VM's
//!   `storageProfile.osDisk.managedDisk.id`.
//! - A request can be carried out while its answer never arrives (a connection lost after ARM
//!   accepted it): fault rules with `hangMs` hold the answer past the client's timeout.

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
    /// A Flexible scale set's VM name (`<set>_<8 characters>`); Uniform instances have none.
    pub name: Option<String>,
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
    /// When the last operation on the VM ended: the `time` of its `ProvisioningState/…` status in
    /// the instance view, as Azure reports it ("Azure VM Scale Sets and Azure Resource Explorer":
    /// after `Start-AzureRmVmss -InstanceId`, the instance view shows `ProvisioningState/succeeded`
    /// with the time the start completed).
    #[serde(with = "time::serde::rfc3339")]
    pub provisioned_at: OffsetDateTime,
    pub latest_model_applied: bool,
    /// The model version the instance runs.
    pub model_version: u64,
    pub beat: Beat,
    pub fault: Fault,
    #[serde(with = "time::serde::rfc3339::option")]
    pub maintenance_until: Option<OffsetDateTime>,
    pub sequence: i64,
    /// Its machine-specific state was cleared for a golden image (`prepare-image`).
    pub prepared: bool,
    /// Its managed data disks, by LUN.
    pub data_disks: BTreeMap<u32, crate::disks::AttachedDisk>,
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
    /// Changes with every write to the scale set (its model or its capacity).
    pub etag: u64,
    /// The most instances the scale set may have (100 with a single placement group, 1,000
    /// without).
    pub max_capacity: usize,
    /// The version of the scale set's model; an instance on an older one is not on the latest.
    pub model_version: u64,
    /// Terminate notifications: the notice a deleted instance gets, when enabled.
    pub terminate_notice: Option<Duration>,
    /// The model's `storageProfile.imageReference`: a platform image (publisher, offer, sku,
    /// version) or a custom one (`id`: a gallery image definition or version).
    pub image: serde_json::Value,
    /// A stateful set's agents (`HEALER_REQUIRE_MOUNT`) report STARTING until their VM has a
    /// data disk at each of these LUNs.
    pub require_luns: Vec<u32>,
    /// The model's data disks, (LUN, size in GB): every VM the set creates from now gets an
    /// empty managed disk of its own at each ("Create a scale set with empty data disks on each
    /// vm", VirtualMachineScaleSet_Create_WithEmptyDataDisksOnEachVm.json, azure-rest-api-specs).
    pub model_disks: Vec<(u32, u64)>,
}

/// What new scale sets run: Ubuntu 22.04 from the marketplace, as the sample deploys.
pub fn platform_image() -> serde_json::Value {
    serde_json::json!({"publisher": "Canonical", "offer": "0001-com-ubuntu-server-jammy",
                       "sku": "22_04-lts-gen2", "version": "latest"})
}

impl ScaleSet {
    pub fn flexible(&self) -> bool {
        self.orchestration_mode.eq_ignore_ascii_case("Flexible")
    }

    /// How ARM names an instance: a Flexible VM by its name, a Uniform one by its instance id.
    pub fn key_of(&self, vm: &Vm) -> String {
        match &vm.name {
            Some(name) => name.clone(),
            None => vm.instance_id.to_string(),
        }
    }

    /// The instance ARM means by `key` (a VM name in Flexible mode, case-insensitively; an
    /// instance id in Uniform mode).
    pub fn find(&self, key: &str) -> Option<u64> {
        if self.flexible() {
            self.vms
                .values()
                .find(|vm| {
                    vm.name
                        .as_deref()
                        .is_some_and(|n| n.eq_ignore_ascii_case(key))
                })
                .map(|vm| vm.instance_id)
        } else {
            key.parse::<u64>().ok().filter(|n| self.vms.contains_key(n))
        }
    }

    /// The instance's own resource id: a plain VM in Flexible mode, a scale-set VM in Uniform.
    pub fn vm_resource_id(&self, vm: &Vm) -> String {
        match &vm.name {
            Some(name) => format!(
                "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines/{name}",
                self.subscription, self.resource_group
            ),
            None => format!("{}/virtualMachines/{}", self.resource_id(), vm.instance_id),
        }
    }

    /// The instances a scale-in to `target` removes: the highest instance ids first, sparing
    /// those protected from scale-in (the default scale-in policy, without zone balancing).
    pub fn scale_in_victims(&self, target: usize) -> Vec<u64> {
        let live: Vec<u64> = self
            .vms
            .values()
            .filter(|v| v.provisioning_state != "Deleting")
            .map(|v| v.instance_id)
            .collect();
        let mut removable: Vec<u64> = live
            .iter()
            .copied()
            .filter(|id| !self.vms[id].protect_from_scale_in)
            .collect();
        removable.sort_unstable_by(|a, b| b.cmp(a));
        removable.truncate(live.len().saturating_sub(target));
        removable
    }

    /// Instances serving traffic: provisioned, running, their application UP, and not being
    /// deleted (no Terminate event names them, approved or not: they drain).
    pub fn serving(&self, scheduled: &[ScheduledEvent]) -> usize {
        self.vms
            .values()
            .filter(|v| {
                v.provisioning_state == "Succeeded"
                    && v.power_state == "running"
                    && v.beat == Beat::Up
            })
            .filter(|v| {
                let name = self.vm_name(v);
                !scheduled
                    .iter()
                    .any(|e| e.resources.iter().any(|r| r.eq_ignore_ascii_case(&name)))
            })
            .count()
    }

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

    /// The ETag as ARM sends it: a quoted string.
    /// The VM's name as IMDS and scheduled events give it: `{scale set}_{instance id}` for a
    /// Uniform instance ("Instance IDs for Azure VM scale set VMs"), its own name when Flexible.
    pub fn vm_name(&self, vm: &Vm) -> String {
        vm.name
            .clone()
            .unwrap_or_else(|| format!("{}_{}", self.name, vm.instance_id))
    }

    /// The managed OS disk of an instance (`{vm name}_OsDisk_1_{vm id without dashes}` in the
    /// set's resource group, as Azure names them).
    pub fn os_disk_id(&self, vm: &Vm) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/disks/{}_OsDisk_1_{}",
            self.subscription,
            self.resource_group,
            self.vm_name(vm),
            vm.vm_id.replace('-', "")
        )
    }

    pub fn etag_value(&self) -> String {
        format!("\"{}\"", self.etag)
    }

    fn add_vm(&mut self, now: OffsetDateTime, provisioning: &str) -> u64 {
        let id = self.next_instance;
        self.next_instance += 1;
        let zone =
            (!self.zones.is_empty()).then(|| self.zones[id as usize % self.zones.len()].clone());
        let vm_id = uuid::Uuid::new_v4().to_string();
        // Flexible VMs are named after their set and eight random characters.
        let name = self
            .flexible()
            .then(|| format!("{}_{}", self.name, &vm_id.replace('-', "")[..8]));
        self.vms.insert(
            id,
            Vm {
                instance_id: id,
                name,
                vm_id,
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
                provisioned_at: now,
                latest_model_applied: true,
                model_version: self.model_version,
                beat: Beat::Up,
                fault: Fault::Soft,
                maintenance_until: None,
                sequence: 0,
                prepared: false,
                data_disks: BTreeMap::new(),
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
    Start(Vec<u64>),
    /// Moves the VM to another host and starts it there (Flexible VMs: the VM API's redeploy).
    Redeploy(Vec<u64>),
    /// The manual upgrade: the latest model on these instances.
    Upgrade(Vec<u64>),
    Scale(usize),
    /// Stops the VM and releases its host (`deallocate`): it keeps its disks.
    Deallocate(Vec<u64>),
    /// Runs a script in the VM (`runCommand`); a script that runs `vmss-healer-agent
    /// prepare-image` clears the VM's machine-specific state.
    RunCommand(u64, String),
    /// Attaches and detaches the VM's data disks (`attachDetachDataDisks`).
    Disks(u64, crate::disks::DiskChange),
}

impl Effect {
    pub fn verb(&self) -> &'static str {
        match self {
            Effect::Delete(_) => "delete",
            Effect::Restart(_) => "restart",
            Effect::Reimage(_) => "reimage",
            Effect::Start(_) => "start",
            Effect::Redeploy(_) => "redeploy",
            Effect::Upgrade(_) => "upgrade",
            Effect::Scale(_) => "scale",
            Effect::Deallocate(_) => "deallocate",
            Effect::RunCommand(..) => "runcommand",
            // Told apart so a test can fail an attach and not the detach before it.
            Effect::Disks(_, change) if change.attach.is_empty() => "detachdatadisks",
            Effect::Disks(..) => "attachdatadisks",
        }
    }

    fn instances(&self) -> &[u64] {
        match self {
            Effect::Delete(ids)
            | Effect::Restart(ids)
            | Effect::Reimage(ids)
            | Effect::Start(ids)
            | Effect::Redeploy(ids)
            | Effect::Upgrade(ids)
            | Effect::Deallocate(ids) => ids,
            Effect::RunCommand(id, _) | Effect::Disks(id, _) => std::slice::from_ref(id),
            Effect::Scale(_) => &[],
        }
    }
}

/// How an operation ended, as its status URL reports it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "status")]
pub enum Outcome {
    InProgress,
    Succeeded,
    Failed { code: String, message: String },
    Canceled { code: String, message: String },
}

impl Outcome {
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::InProgress => "InProgress",
            Outcome::Succeeded => "Succeeded",
            Outcome::Failed { .. } => "Failed",
            Outcome::Canceled { .. } => "Canceled",
        }
    }
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
    pub outcome: Outcome,
    /// How it will end when it is due (an injected operation fault), if not `Succeeded`.
    #[serde(skip)]
    pub planned: Option<Outcome>,
    /// The provisioning state a planned failure leaves (see [`OperationFault::leaves`]).
    #[serde(skip)]
    pub leaves: Option<String>,
    /// The instances' states before the operation, put back if it fails.
    #[serde(skip)]
    before: Vec<(u64, String, String)>,
    /// The Terminate events a delete waits on (their ids), when the set has terminate
    /// notifications: it ends once all are approved or its notice ran out.
    #[serde(skip)]
    pub terminate_events: Vec<String>,
}

/// A scheduled event, as IMDS shows it to the VMs it names.
#[derive(Debug, Clone, Serialize)]
pub struct ScheduledEvent {
    pub id: String,
    pub kind: String,
    /// The VMs it affects, by name.
    pub resources: Vec<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: OffsetDateTime,
    pub approved: bool,
    /// The operation it holds back.
    pub operation: String,
}

/// A fault injected through the admin API: the next `count` matching requests fail (or, with only
/// `autoscaleTo`, first see the scale set's capacity changed by someone else).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FaultRule {
    #[serde(default)]
    pub method: Option<String>,
    #[serde(default, rename = "pathContains")]
    pub path_contains: Option<String>,
    /// The status to answer; none: the request is served after the rule's other effects.
    #[serde(default)]
    pub status: Option<u16>,
    #[serde(default, rename = "retryAfter")]
    pub retry_after: Option<u64>,
    /// ARM's error code and message for the answer (defaults by status).
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    /// Before the request is served, the scale set is scaled to this capacity, as autoscale or an
    /// operator writing between our read and our write would.
    #[serde(default, rename = "autoscaleTo")]
    pub autoscale_to: Option<usize>,
    /// The request is carried out, but its answer is held this long (longer than the client
    /// waits): a lost answer to a call that may well have landed — what a mutating call meets
    /// when the connection drops after ARM accepted it.
    #[serde(default, rename = "hangMs")]
    pub hang_ms: Option<u64>,
    #[serde(default = "one")]
    pub count: u32,
}

fn one() -> u32 {
    1
}

/// An injected end for the next operations of one kind (`delete`, `restart`, `reimage`, `start`,
/// `scale`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OperationFault {
    pub verb: String,
    /// `Failed` or `Canceled`.
    pub status: String,
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default = "one")]
    pub count: u32,
    /// The provisioning state the failed operation leaves on its instances (a failed scale-out:
    /// on the instances it was creating) — Azure's `Failed`, "represents a failed operation"
    /// (https://learn.microsoft.com/azure/virtual-machines/states-billing). None: they are as
    /// they were.
    #[serde(default)]
    pub leaves: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Call {
    pub method: String,
    pub path: String,
    pub query: String,
    pub status: u16,
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    /// The `If-Match` header the request carried, if any.
    pub if_match: Option<String>,
}

/// The read budget of one subscription's throttling policies.
pub const BUDGET_3MIN: usize = 1200;

pub struct World {
    pub sets: BTreeMap<String, ScaleSet>,
    pub operations: HashMap<String, Operation>,
    pub faults: VecDeque<FaultRule>,
    pub operation_faults: VecDeque<OperationFault>,
    pub calls: Vec<Call>,
    pub tokens: HashMap<String, OffsetDateTime>,
    pub operation_delay: Duration,
    pub page_size: usize,
    /// Overrides the remaining count of the tightest policy in `x-ms-ratelimit-remaining-resource`.
    pub rate_limit_remaining: Option<usize>,
    /// Requests served per subscription: throttling is counted per subscription, not per scale set.
    pub calls_by_subscription: HashMap<String, usize>,
    /// Subscriptions that answer 429 until then.
    pub throttled: HashMap<String, OffsetDateTime>,
    /// Resource Manager events (what the resource group's Event Grid system topic would publish)
    /// not yet delivered.
    pub resource_events: Vec<serde_json::Value>,
    /// Management locks: (the resource id they are on, as given, and the level).
    pub locks: Vec<(String, String)>,
    /// Scheduled events not yet over.
    pub scheduled: Vec<ScheduledEvent>,
    /// Autoscale settings by resource id (lower case), as ARM returns them.
    pub autoscale: BTreeMap<String, serde_json::Value>,
    /// Bumped with every change of the scheduled events (their document's `DocumentIncarnation`).
    pub incarnation: u64,
    /// How many instances of each scale set served, each time that changed (the history tests
    /// hold availability against: time moves only with requests, so this misses no moment).
    pub serving: Vec<ServingPoint>,
    /// Snapshots, galleries, image definitions and versions by resource id (lower case).
    pub artifacts: BTreeMap<String, crate::gallery::Artifact>,
    /// How the artifacts' ended operations went, by operation id.
    pub artifact_operations: HashMap<String, crate::gallery::ArtifactOperation>,
    /// How long an image version takes to be created (Azure: half an hour to hours).
    pub image_version_delay: Duration,
    /// Managed data disks by resource id (lower case).
    pub disks: BTreeMap<String, crate::disks::ManagedDisk>,
    /// What each snapshot holds (the content of the disk it copied), by id (lower case).
    pub snapshot_content: HashMap<String, String>,
    /// What PUTs set on Flexible VMs' NICs, by NIC id (lower case).
    pub nics: BTreeMap<String, crate::network::NicState>,
    /// Public IP addresses by id (lower case).
    pub public_ips: BTreeMap<String, crate::network::PublicIp>,
}

/// The instances serving in every scale set, from a moment on.
#[derive(Debug, Clone, Serialize)]
pub struct ServingPoint {
    #[serde(with = "time::serde::rfc3339")]
    pub at: OffsetDateTime,
    pub sets: BTreeMap<String, usize>,
}

/// Enough history for any test or demo; the oldest points go first.
const SERVING_HISTORY: usize = 100_000;

/// The Resource Manager events a successful operation raises, once it succeeded: (event type,
/// resource URI, operation name). A failed one raises the same with `…Failure` (see
/// [`World::fail`]).
fn announcements(set: &ScaleSet, effect: &Effect) -> Vec<(&'static str, String, String)> {
    let set_uri = set.resource_id();
    // A Flexible VM's own action is reported on the VM; a batch delete on the scale set and,
    // for each VM it removed, on the VM.
    let mut vm_events: Vec<(&'static str, String, String)> = Vec::new();
    if set.flexible() {
        let (event_type, verb) = match effect {
            Effect::Delete(_) => (DELETE, "delete"),
            Effect::Restart(_) => (ACTION, "restart/action"),
            Effect::Reimage(_) => (ACTION, "reimage/action"),
            Effect::Start(_) => (ACTION, "start/action"),
            Effect::Redeploy(_) => (ACTION, "redeploy/action"),
            Effect::Upgrade(_) => (ACTION, "manualupgrade/action"),
            Effect::Scale(_) => (WRITE, "write"),
            Effect::Deallocate(_) => (ACTION, "deallocate/action"),
            Effect::RunCommand(..) => (ACTION, "runCommand/action"),
            Effect::Disks(..) => (WRITE, "write"),
        };
        for id in effect.instances() {
            if let Some(vm) = set.vms.get(id) {
                vm_events.push((
                    event_type,
                    set.vm_resource_id(vm),
                    format!("Microsoft.Compute/virtualMachines/{verb}"),
                ));
            }
        }
    }
    // Resource Manager reports the scale set's action or write once the operation succeeds.
    let (event_type, operation) = match effect {
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
        Effect::Start(_) => (
            ACTION,
            "Microsoft.Compute/virtualMachineScaleSets/start/action",
        ),
        Effect::Redeploy(_) => (
            ACTION,
            "Microsoft.Compute/virtualMachineScaleSets/redeploy/action",
        ),
        Effect::Upgrade(_) => (
            ACTION,
            "Microsoft.Compute/virtualMachineScaleSets/manualupgrade/action",
        ),
        Effect::Scale(_) => (WRITE, "Microsoft.Compute/virtualMachineScaleSets/write"),
        Effect::Deallocate(_) => (
            ACTION,
            "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/deallocate/action",
        ),
        Effect::RunCommand(..) => (
            ACTION,
            "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/runCommand/action",
        ),
        Effect::Disks(..) => (
            WRITE,
            "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/write",
        ),
    };
    let per_vm_only = !vm_events.is_empty() && !matches!(effect, Effect::Delete(_));
    if !per_vm_only {
        vm_events.insert(0, (event_type, set_uri, operation.to_string()));
    }
    vm_events
}

pub const WRITE: &str = "Microsoft.Resources.ResourceWriteSuccess";
pub const DELETE: &str = "Microsoft.Resources.ResourceDeleteSuccess";
pub const ACTION: &str = "Microsoft.Resources.ResourceActionSuccess";

pub const PREEMPTED: &str = "OperationPreempted";
pub const PREEMPTED_MESSAGE: &str =
    "Operation execution has been preempted by a more recent operation.";

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
            operation_faults: VecDeque::new(),
            calls: Vec::new(),
            tokens: HashMap::new(),
            operation_delay,
            page_size: page_size.max(1),
            rate_limit_remaining: None,
            calls_by_subscription: HashMap::new(),
            throttled: HashMap::new(),
            resource_events: Vec::new(),
            locks: Vec::new(),
            scheduled: Vec::new(),
            incarnation: 0,
            autoscale: BTreeMap::new(),
            serving: Vec::new(),
            artifacts: BTreeMap::new(),
            artifact_operations: HashMap::new(),
            image_version_delay: operation_delay,
            disks: BTreeMap::new(),
            snapshot_content: HashMap::new(),
            nics: BTreeMap::new(),
            public_ips: BTreeMap::new(),
        }
    }

    /// Queues the Resource Manager event a successful operation on `resource_uri` raises, in the
    /// Event Grid schema of a resource group system topic.
    pub fn announce(&mut self, event_type: &str, resource_uri: &str, operation: &str) {
        self.announce_as(event_type, resource_uri, operation, "Succeeded");
    }

    /// The same, for an operation that ended with `status`.
    pub fn announce_as(
        &mut self,
        event_type: &str,
        resource_uri: &str,
        operation: &str,
        status: &str,
    ) {
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
                "status": status,
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
            etag: 1,
            max_capacity: 1000,
            model_version: 1,
            terminate_notice: None,
            image: platform_image(),
            require_luns: Vec::new(),
            model_disks: Vec::new(),
        };
        let now = OffsetDateTime::now_utc();
        for _ in 0..capacity {
            set.add_vm(now, "Succeeded");
        }
        self.sets.insert(key.clone(), set);
        key
    }

    /// A new model for the scale set (a new image, an extension changed): every instance is on an
    /// older one until upgraded. Returns the new version.
    pub fn new_model(&mut self, set_key: &str) -> Option<u64> {
        let set = self.sets.get_mut(set_key)?;
        set.model_version += 1;
        set.etag += 1;
        for vm in set.vms.values_mut() {
            vm.latest_model_applied = vm.model_version == set.model_version;
        }
        let (version, id) = (set.model_version, set.resource_id());
        self.announce(
            WRITE,
            &id,
            "Microsoft.Compute/virtualMachineScaleSets/write",
        );
        Some(version)
    }

    /// Records how many instances serve in each scale set, if that changed.
    pub fn note_serving(&mut self) {
        let sets: BTreeMap<String, usize> = self
            .sets
            .iter()
            .map(|(k, s)| (k.clone(), s.serving(&self.scheduled)))
            .collect();
        if self.serving.last().is_some_and(|p| p.sets == sets) {
            return;
        }
        if self.serving.len() >= SERVING_HISTORY {
            self.serving.remove(0);
        }
        self.serving.push(ServingPoint {
            at: OffsetDateTime::now_utc(),
            sets,
        });
    }

    /// The scheduled events an ending operation held are over.
    fn end_scheduled(&mut self, op_id: &str) {
        let before = self.scheduled.len();
        self.scheduled.retain(|e| e.operation != op_id);
        if self.scheduled.len() != before {
            self.incarnation += 1;
        }
    }

    /// The capacity range an enabled autoscale setting holds a scale set to, if one does.
    pub fn autoscale_range(&self, set: &ScaleSet) -> Option<(usize, usize)> {
        let target = set.resource_id().to_ascii_lowercase();
        self.autoscale.values().find_map(|a| {
            let p = &a["properties"];
            let on = p["enabled"].as_bool().unwrap_or(true);
            let aims = p["targetResourceUri"]
                .as_str()?
                .eq_ignore_ascii_case(&target);
            let capacity = &p["profiles"][0]["capacity"];
            let n = |k: &str| capacity[k].as_str()?.parse::<usize>().ok();
            (on && aims).then_some((n("minimum")?, n("maximum")?))
        })
    }

    /// Autoscale at work: a set outside its setting's range is scaled back into it (once nothing
    /// else changes it).
    fn enforce_autoscale(&mut self) {
        let mut scale = Vec::new();
        for (key, set) in &self.sets {
            if self.updating(key) {
                continue;
            }
            if let Some((min, max)) = self.autoscale_range(set) {
                let capacity = set.capacity();
                if capacity < min || capacity > max {
                    scale.push((key.clone(), capacity.clamp(min, max)));
                }
            }
        }
        for (key, target) in scale {
            self.start_operation(&key, Effect::Scale(target));
        }
    }

    /// Ends every operation that is due.
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
        self.finish_artifacts(false);
        self.finish_disks(false);
        self.enforce_autoscale();
    }

    /// Whether one of the scale set's operations that changes its capacity is running: ARM then
    /// shows the scale set `Updating`.
    pub fn updating(&self, set_key: &str) -> bool {
        self.operations.values().any(|op| {
            op.set_key == set_key
                && op.ended.is_none()
                && matches!(op.effect, Effect::Scale(_) | Effect::Delete(_))
        })
    }

    /// Ends one operation now: as planned (an injected fault), else `Succeeded` with its effect.
    pub fn complete(&mut self, op_id: &str) {
        let planned = match self.operations.get(op_id) {
            Some(op) if op.ended.is_none() => op.planned.clone(),
            _ => return,
        };
        match planned {
            Some(outcome) => self.fail(op_id, outcome),
            None => self.succeed(op_id),
        }
    }

    /// Ends an operation without its effect: the instances it touched are as they were.
    pub fn fail(&mut self, op_id: &str, outcome: Outcome) {
        self.end_scheduled(op_id);
        let Some(op) = self.operations.get_mut(op_id) else {
            return;
        };
        if op.ended.is_some() {
            return;
        }
        op.ended = Some(OffsetDateTime::now_utc());
        let canceled = matches!(outcome, Outcome::Canceled { .. });
        op.outcome = outcome;
        let (key, effect, before) = (op.set_key.clone(), op.effect.clone(), op.before.clone());
        let leaves = op.leaves.clone();
        let Some(set) = self.sets.get_mut(&key) else {
            return;
        };
        // Resource Manager reports the failure as it reports a success, with `…Failure` (or
        // `…Cancel`) and the status (https://learn.microsoft.com/azure/event-grid/event-schema-resource-groups).
        let announcements = announcements(set, &effect);
        let ended = OffsetDateTime::now_utc();
        for (id, provisioning, power) in before {
            if let Some(vm) = set.vms.get_mut(&id) {
                vm.provisioning_state = leaves.clone().unwrap_or(provisioning);
                vm.power_state = power;
                vm.provisioned_at = ended;
            }
        }
        if let Effect::Scale(_) = effect {
            match &leaves {
                // The instances a failed scale-out was creating stay, failed: what
                // cluster-autoscaler's Azure provider finds and deletes after a failed scale-up.
                Some(state) => {
                    for vm in set
                        .vms
                        .values_mut()
                        .filter(|v| v.provisioning_state == "Creating")
                    {
                        vm.provisioning_state = state.clone();
                        vm.provisioned_at = ended;
                    }
                }
                // Else they are not kept.
                None => set.vms.retain(|_, vm| vm.provisioning_state != "Creating"),
            }
        }
        if let Effect::Disks(n, change) = effect {
            self.settle_disks(&key, n, &change, false);
        }
        let (suffix, status) = if canceled {
            ("Cancel", "Canceled")
        } else {
            ("Failure", "Failed")
        };
        for (event_type, uri, operation) in announcements {
            let failed = format!("{}{suffix}", event_type.trim_end_matches("Success"));
            self.announce_as(&failed, &uri, &operation, status);
        }
    }

    fn succeed(&mut self, op_id: &str) {
        self.end_scheduled(op_id);
        let Some(op) = self.operations.get_mut(op_id) else {
            return;
        };
        op.ended = Some(OffsetDateTime::now_utc());
        op.outcome = Outcome::Succeeded;
        let (key, effect) = (op.set_key.clone(), op.effect.clone());
        if let Effect::Disks(n, change) = &effect {
            self.settle_disks(&key, *n, change, true);
        }
        // A deleted VM's data disks stay, unattached (`deleteOption: Detach`).
        let leaving: Vec<u64> = match (&effect, self.sets.get(&key)) {
            (Effect::Delete(ids), _) => ids.clone(),
            (Effect::Scale(target), Some(set)) if set.capacity() > *target => {
                set.scale_in_victims(*target)
            }
            _ => Vec::new(),
        };
        let released: Vec<String> = self
            .sets
            .get(&key)
            .into_iter()
            .flat_map(|s| leaving.iter().filter_map(|n| s.vms.get(n)))
            .flat_map(|vm| vm.data_disks.values().map(|a| a.key.clone()))
            .collect();
        self.release_disks(&released);
        // A Flexible VM's NIC goes with it (its public IP stays, unassociated).
        let nics: Vec<String> = self
            .sets
            .get(&key)
            .filter(|s| s.flexible())
            .into_iter()
            .flat_map(|s| {
                leaving
                    .iter()
                    .filter_map(|n| s.vms.get(n))
                    .map(|vm| crate::network::nic_id(s, vm))
            })
            .collect();
        for nic in nics {
            self.drop_nic(&nic);
        }
        let Some(set) = self.sets.get_mut(&key) else {
            return;
        };
        let announcements = announcements(set, &effect);
        match effect {
            Effect::Delete(ids) => {
                for id in ids {
                    set.vms.remove(&id);
                }
            }
            Effect::Upgrade(ids) => {
                let latest = set.model_version;
                for id in ids {
                    if let Some(vm) = set.vms.get_mut(&id) {
                        vm.power_state = "running".into();
                        vm.provisioning_state = "Succeeded".into();
                        vm.provisioned_at = OffsetDateTime::now_utc();
                        vm.model_version = latest;
                        vm.latest_model_applied = true;
                    }
                }
            }
            Effect::Start(ids) => {
                for id in ids {
                    if let Some(vm) = set.vms.get_mut(&id) {
                        vm.power_state = "running".into();
                        vm.provisioning_state = "Succeeded".into();
                        vm.provisioned_at = OffsetDateTime::now_utc();
                    }
                }
            }
            Effect::Deallocate(ids) => {
                for id in ids {
                    if let Some(vm) = set.vms.get_mut(&id) {
                        vm.power_state = "deallocated".into();
                        vm.provisioning_state = "Succeeded".into();
                        vm.provisioned_at = OffsetDateTime::now_utc();
                    }
                }
            }
            Effect::RunCommand(id, script) => {
                if let Some(vm) = set.vms.get_mut(&id) {
                    if script.contains("vmss-healer-agent prepare-image") {
                        vm.prepared = true;
                    }
                }
            }
            Effect::Disks(id, _) => {
                if let Some(vm) = set.vms.get_mut(&id) {
                    vm.provisioning_state = "Succeeded".into();
                    vm.provisioned_at = OffsetDateTime::now_utc();
                }
            }
            Effect::Restart(ids) | Effect::Reimage(ids) | Effect::Redeploy(ids) => {
                let reimage = op_effect_kind(&self.operations[op_id].effect) == "reimage";
                for id in ids {
                    if let Some(vm) = set.vms.get_mut(&id) {
                        vm.power_state = "running".into();
                        vm.provisioning_state = "Succeeded".into();
                        vm.provisioned_at = OffsetDateTime::now_utc();
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
                        vm.provisioned_at = OffsetDateTime::now_utc();
                    }
                }
                let live: Vec<u64> = set
                    .vms
                    .values()
                    .filter(|v| v.provisioning_state != "Deleting")
                    .map(|v| v.instance_id)
                    .collect();
                if live.len() > target {
                    for id in set.scale_in_victims(target) {
                        set.vms.remove(&id);
                    }
                }
            }
        }
        for (event_type, uri, operation) in announcements {
            self.announce(event_type, &uri, &operation);
        }
    }

    /// Starts an operation; its effect lands after the configured delay. A capacity change
    /// preempts the scale set's running deletes, as ARM does.
    pub fn start_operation(&mut self, set_key: &str, effect: Effect) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        let now = OffsetDateTime::now_utc();
        if let Effect::Scale(_) = effect {
            let preempted: Vec<String> = self
                .operations
                .values()
                .filter(|op| {
                    op.set_key == set_key
                        && op.ended.is_none()
                        && matches!(op.effect, Effect::Delete(_))
                })
                .map(|op| op.id.clone())
                .collect();
            for op in preempted {
                self.fail(
                    &op,
                    Outcome::Failed {
                        code: PREEMPTED.into(),
                        message: PREEMPTED_MESSAGE.into(),
                    },
                );
            }
        }
        let (planned, leaves) = self.take_operation_fault(effect.verb()).unzip();
        let leaves = leaves.flatten();
        let mut before = Vec::new();
        let mut created = Vec::new();
        // Visible at once, as ARM shows: deleting instances are marked, new ones appear creating.
        if let Some(set) = self.sets.get_mut(set_key) {
            for id in effect.instances() {
                if let Some(vm) = set.vms.get(id) {
                    before.push((*id, vm.provisioning_state.clone(), vm.power_state.clone()));
                }
            }
            match &effect {
                Effect::Delete(ids) => {
                    for id in ids {
                        if let Some(vm) = set.vms.get_mut(id) {
                            vm.provisioning_state = "Deleting".into();
                        }
                    }
                    // The delete lowers the capacity in the scale set's model.
                    set.etag += 1;
                }
                Effect::Restart(ids)
                | Effect::Reimage(ids)
                | Effect::Start(ids)
                | Effect::Redeploy(ids)
                | Effect::Upgrade(ids) => {
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
                        created.push(set.add_vm(now, "Creating"));
                    }
                    set.etag += 1;
                }
                Effect::Deallocate(ids) => {
                    for id in ids {
                        if let Some(vm) = set.vms.get_mut(id) {
                            vm.provisioning_state = "Updating".into();
                            vm.power_state = "deallocating".into();
                        }
                    }
                }
                // A script runs beside the VM's own work: its states do not change.
                Effect::RunCommand(..) => {}
                // The VM is updated; it keeps running.
                Effect::Disks(id, _) => {
                    if let Some(vm) = set.vms.get_mut(id) {
                        vm.provisioning_state = "Updating".into();
                    }
                }
            }
        }
        // A new VM comes with the model's data disks, empty.
        let model_disks = self
            .sets
            .get(set_key)
            .map(|s| s.model_disks.clone())
            .unwrap_or_default();
        for instance in &created {
            for (lun, size_gb) in &model_disks {
                self.give_empty_disk(set_key, *instance, *lun, *size_gb);
            }
        }
        // A delete under terminate notifications waits for each VM's Terminate event: approved,
        // or its notice run out. A scale-in deletes too ("all delete operations (manual delete
        // or Autoscale-initiated scale-in) will generate a Terminate event", Terminate
        // notification for Azure Virtual Machine Scale Set instances): its events name the VMs
        // the scale-in will remove.
        let mut terminate_events = Vec::new();
        let mut due = std::time::Instant::now() + self.operation_delay;
        let leaving = match (&effect, self.sets.get(set_key)) {
            (Effect::Delete(ids), _) => ids.clone(),
            (Effect::Scale(target), Some(set)) => set.scale_in_victims(*target),
            _ => Vec::new(),
        };
        if let (false, Some(set)) = (leaving.is_empty(), self.sets.get(set_key)) {
            if let Some(notice) = set.terminate_notice {
                for vm_id in &leaving {
                    let Some(vm) = set.vms.get(vm_id) else {
                        continue;
                    };
                    let event_id = uuid::Uuid::new_v4().to_string();
                    self.scheduled.push(ScheduledEvent {
                        id: event_id.clone(),
                        kind: "Terminate".into(),
                        resources: vec![set.vm_name(vm)],
                        not_before: now
                            + time::Duration::try_from(notice).unwrap_or(time::Duration::ZERO),
                        approved: false,
                        operation: id.clone(),
                    });
                    terminate_events.push(event_id);
                }
                due = due.max(std::time::Instant::now() + notice);
                self.incarnation += 1;
            }
        }
        self.operations.insert(
            id.clone(),
            Operation {
                id: id.clone(),
                set_key: set_key.into(),
                effect,
                started: now,
                due,
                ended: None,
                outcome: Outcome::InProgress,
                planned,
                leaves,
                before,
                terminate_events,
            },
        );
        if self.operation_delay.is_zero() && self.operations[&id].terminate_events.is_empty() {
            self.complete(&id);
        }
        id
    }

    /// The scheduled events document a VM reads from IMDS: the events that name it.
    pub fn scheduled_events_for(&self, vm_name: &str) -> serde_json::Value {
        let http_date = time::macros::format_description!(
            "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
        );
        let events: Vec<serde_json::Value> = self
            .scheduled
            .iter()
            .filter(|e| e.resources.iter().any(|r| r.eq_ignore_ascii_case(vm_name)))
            .map(|e| {
                serde_json::json!({
                    "EventId": e.id,
                    "EventType": e.kind,
                    "ResourceType": "VirtualMachine",
                    "Resources": e.resources,
                    // Approved, an event starts: no NotBefore any more.
                    "EventStatus": if e.approved { "Started" } else { "Scheduled" },
                    "NotBefore": if e.approved { String::new() } else { e.not_before.format(&http_date).unwrap_or_default() },
                    "Description": "Virtual machine is being deleted.",
                    "EventSource": "User",
                    "DurationInSeconds": -1,
                })
            })
            .collect();
        serde_json::json!({"DocumentIncarnation": self.incarnation, "Events": events})
    }

    /// `StartRequests`: the events are approved; a delete whose events all are goes on at once.
    /// Returns the ids that were not there.
    pub fn approve(&mut self, ids: &[String]) -> Vec<String> {
        let mut unknown = Vec::new();
        for id in ids {
            match self.scheduled.iter_mut().find(|e| &e.id == id) {
                Some(e) => e.approved = true,
                None => unknown.push(id.clone()),
            }
        }
        self.incarnation += 1;
        let ready: Vec<String> = self
            .operations
            .values()
            .filter(|op| op.ended.is_none() && !op.terminate_events.is_empty())
            .filter(|op| {
                op.terminate_events.iter().all(|t| {
                    self.scheduled
                        .iter()
                        .find(|e| &e.id == t)
                        .is_none_or(|e| e.approved)
                })
            })
            .map(|op| op.id.clone())
            .collect();
        for op in ready {
            self.complete(&op);
        }
        unknown
    }

    /// Whether a VM has a Terminate event not yet approved: it still runs, and drains.
    pub fn terminating(&self, vm_name: &str) -> Option<&ScheduledEvent> {
        self.scheduled
            .iter()
            .find(|e| !e.approved && e.resources.iter().any(|r| r.eq_ignore_ascii_case(vm_name)))
    }

    pub fn take_operation_fault(&mut self, verb: &str) -> Option<(Outcome, Option<String>)> {
        let pos = self
            .operation_faults
            .iter()
            .position(|f| f.verb.eq_ignore_ascii_case(verb))?;
        let rule = self.operation_faults[pos].clone();
        if rule.count <= 1 {
            self.operation_faults.remove(pos);
        } else {
            self.operation_faults[pos].count -= 1;
        }
        let code = rule.code.unwrap_or_else(|| "InternalOperationError".into());
        let message = rule
            .message
            .unwrap_or_else(|| "The operation failed (injected by the simulator).".into());
        let outcome = if rule.status.eq_ignore_ascii_case("canceled") {
            Outcome::Canceled { code, message }
        } else {
            Outcome::Failed { code, message }
        };
        Some((outcome, rule.leaves))
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

    /// Seconds a subscription still answers 429, if it is throttled.
    pub fn throttled_for(&self, subscription: &str) -> Option<u64> {
        let until = self.throttled.get(&subscription.to_lowercase())?;
        let left = (*until - OffsetDateTime::now_utc()).as_seconds_f64();
        (left > 0.0).then(|| left.ceil() as u64)
    }

    pub fn throttle(&mut self, subscription: &str, seconds: u64) {
        // A test may ask for an absurd Retry-After; the hold then lasts as long as a date can.
        let until = OffsetDateTime::now_utc()
            .checked_add(time::Duration::seconds(
                i64::try_from(seconds).unwrap_or(i64::MAX),
            ))
            .unwrap_or(time::PrimitiveDateTime::MAX.assume_utc());
        self.throttled.insert(subscription.to_lowercase(), until);
    }

    /// Counts a request against its subscription's budget; returns the remaining count of the
    /// tightest policy (three minutes) and of the wider one (thirty minutes).
    pub fn charge(&mut self, subscription: &str) -> (usize, usize) {
        let n = self
            .calls_by_subscription
            .entry(subscription.to_lowercase())
            .or_insert(0);
        *n += 1;
        let tight = self
            .rate_limit_remaining
            .unwrap_or_else(|| BUDGET_3MIN.saturating_sub(*n % BUDGET_3MIN));
        (tight, BUDGET_3MIN * 5 - (*n % (BUDGET_3MIN * 5)))
    }
}

pub fn op_effect_kind(effect: &Effect) -> &'static str {
    effect.verb()
}
