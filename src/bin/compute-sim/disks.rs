//! Managed data disks: what carrying a stateful instance's data to its replacement needs of Azure
//! (issue 18). A disk is a resource of a resource group that lives in at most one zone and is
//! attached to at most one VM, at a LUN.
//!
//! What it knows of Azure, and where from (each with a test in `tests/simulator.rs`):
//! - Disks are the disk resource provider's (api-version `2024-03-02`, as for snapshots): `PUT`
//!   with `creationData.createOption` `Empty` (`diskSizeGB`) or `Copy` (`sourceResourceId`: a
//!   snapshot or a disk), `zones: ["2"]` for a zonal disk; `managedBy` names the VM it is attached
//!   to and `properties.diskState` says `Attached` or `Unattached` (Disks - Get).
//! - A zonal disk cannot be copied into another zone: "The resource '…' in an availability zone
//!   cannot be copied from the source '…' in a different availability zone."
//!   (Azure/azure-sdk-for-java#11759) — a snapshot is not zonal, so a disk moves zones by snapshot
//!   and copy.
//! - Data disks are attached and detached on a running VM by `attachDetachDataDisks`
//!   (VirtualMachineScaleSetVM_AttachDetachDataDisks_MaximumSet_Gen.json, api-version 2024-07-01;
//!   the VM API's twin for Flexible VMs): `dataDisksToAttach[{lun, diskId, caching}]`,
//!   `dataDisksToDetach[{diskId, detachOption}]`; `202` with a `Location` (202 while it runs, 200
//!   with the VM's `storageProfile` once done, the operation's error once failed).
//! - Refusals, as Azure words them (MicrosoftDocs "Understand common error messages when you
//!   manage virtual machines in Azure"; jenkins-infra/azure#1406):
//!   - a disk owned by another VM: 409 `ConflictingUserInput`, "Disk '{0}' cannot be attached as
//!     the disk is already owned by VM '{1}'.";
//!   - a disk being detached: 409 `AttachDiskWhileBeingDetached`, "Cannot attach data disk '{0}'
//!     to VM '{1}' because the disk is currently being detached. …";
//!   - a LUN in use: 400 `InvalidParameter`, "A disk at LUN {0} already exists.";
//!   - another zone: 400 `BadRequest`, "Disk {id} cannot be attached to the VM because it is not
//!     in the same zone as the VM. VM zone: '1'. Disk zone: '2'.";
//!   - deleting an attached disk: 409 `OperationNotAllowed` (the simulator's wording);
//!   - detaching a disk the VM does not have: 400 `InvalidParameter` (wording not found in
//!     Azure's documentation: the simulator's).
//! - Deleting a VM keeps its data disks: an attached data disk's `deleteOption` defaults to
//!   `Detach` (Virtual Machines - Create Or Update, `DataDisk.deleteOption`), so they become
//!   unattached.
//!
//! Each disk carries `content`, what its VM wrote on it, so tests can see a copy carries the data.

use crate::arm::{arm_error, json_ok};
use crate::world::{Outcome, ScaleSet, Vm, World};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{json, Value};
use time::OffsetDateTime;

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ManagedDisk {
    pub id: String,
    pub name: String,
    pub location: String,
    pub zone: Option<String>,
    pub size_gb: u64,
    /// The VM it is attached to (or being attached to), by resource id.
    pub managed_by: Option<String>,
    /// A detach from `managed_by` runs.
    pub detaching: bool,
    /// What its VM wrote on it.
    pub content: String,
    pub provisioning_state: String,
    /// The operation creating it, while it runs.
    #[serde(skip)]
    pub creating: Option<(String, OffsetDateTime, std::time::Instant)>,
}

/// One VM's data disks to attach (LUN, disk key, caching) and detach (disk keys).
#[derive(Debug, Clone, Serialize, Default)]
pub struct DiskChange {
    pub attach: Vec<(u32, String, String)>,
    pub detach: Vec<String>,
}

pub fn disk_id(sub: &str, rg: &str, name: &str) -> String {
    format!("/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/disks/{name}")
}

fn json_of(d: &ManagedDisk) -> Value {
    let mut v = json!({
        "id": d.id,
        "name": d.name,
        "type": "Microsoft.Compute/disks",
        "location": d.location,
        "sku": {"name": "Premium_LRS", "tier": "Premium"},
        "properties": {
            "diskSizeGB": d.size_gb,
            "provisioningState": d.provisioning_state,
            "diskState": if d.managed_by.is_some() { "Attached" } else { "Unattached" },
        },
    });
    if let Some(vm) = &d.managed_by {
        v["managedBy"] = json!(vm);
    }
    if let Some(z) = &d.zone {
        v["zones"] = json!([z]);
    }
    v
}

/// A data disk as its VM holds it.
#[derive(Debug, Clone, Serialize)]
pub struct AttachedDisk {
    /// The disk's key in [`World::disks`] (its id in lower case).
    pub key: String,
    pub id: String,
    pub name: String,
    pub size_gb: u64,
}

impl AttachedDisk {
    fn of(d: &ManagedDisk) -> Self {
        AttachedDisk {
            key: d.id.to_ascii_lowercase(),
            id: d.id.clone(),
            name: d.name.clone(),
            size_gb: d.size_gb,
        }
    }
}

/// The data disks of a VM as its `storageProfile.dataDisks` shows them.
pub fn data_disks_json(vm: &Vm) -> Value {
    let disks: Vec<Value> = vm
        .data_disks
        .iter()
        .map(|(lun, d)| {
            json!({
                "lun": lun,
                "name": d.name,
                "createOption": "Attach",
                "caching": "ReadWrite",
                "deleteOption": "Detach",
                "diskSizeGB": d.size_gb,
                "managedDisk": {"id": d.id, "storageAccountType": "Premium_LRS"},
            })
        })
        .collect();
    json!(disks)
}

/// Serves `…/providers/Microsoft.Compute/disks/{name}`; `None` for other paths.
pub fn handle(
    world: &mut World,
    base: &str,
    method: &Method,
    segs: &[&str],
    l: &[&str],
    body: &Value,
) -> Option<Response> {
    let ["subscriptions", _, "resourcegroups", _, "providers", "microsoft.compute", "disks", _] = l
    else {
        return None;
    };
    let (sub, rg, name) = (segs[1], segs[3], segs[7]);
    let id = disk_id(sub, rg, name);
    let key = id.to_ascii_lowercase();
    Some(match *method {
        Method::GET => match world.disks.get(&key) {
            Some(d) => json_ok(json_of(d)),
            None => not_found(&id),
        },
        Method::PUT => put(world, base, sub, &id, name, body),
        Method::DELETE => match world.disks.get(&key) {
            None => StatusCode::NO_CONTENT.into_response(),
            Some(d) if d.managed_by.is_some() => arm_error(
                StatusCode::CONFLICT,
                "OperationNotAllowed",
                format!(
                    "Disk {} is attached to VM {}: detach it before deleting it.",
                    d.name,
                    d.managed_by.clone().unwrap_or_default()
                ),
            ),
            Some(_) => {
                world.disks.remove(&key);
                StatusCode::OK.into_response()
            }
        },
        _ => arm_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{method} is not supported on '{id}' by the simulator."),
        ),
    })
}

fn not_found(id: &str) -> Response {
    arm_error(
        StatusCode::NOT_FOUND,
        "ResourceNotFound",
        format!("The Resource '{id}' was not found."),
    )
}

fn put(world: &mut World, base: &str, sub: &str, id: &str, name: &str, body: &Value) -> Response {
    let key = id.to_ascii_lowercase();
    if world.disks.contains_key(&key) {
        return arm_error(
            StatusCode::CONFLICT,
            "OperationNotAllowed",
            format!("Disk {name} already exists: the simulator does not update disks."),
        );
    }
    let data = &body["properties"]["creationData"];
    let zone = body["zones"]
        .as_array()
        .and_then(|z| z.first())
        .and_then(Value::as_str)
        .map(str::to_string);
    let (size_gb, content) = match data["createOption"].as_str() {
        Some("Empty") => (
            body["properties"]["diskSizeGB"].as_u64().unwrap_or(32),
            String::new(),
        ),
        Some("Copy") => {
            let source = data["sourceResourceId"].as_str().unwrap_or_default();
            let skey = source.to_ascii_lowercase();
            if let Some(d) = world.disks.get(&skey) {
                if d.zone.is_some() && d.zone != zone {
                    return arm_error(
                        StatusCode::BAD_REQUEST,
                        "BadRequest",
                        format!("The resource '{name}' in an availability zone cannot be copied from the source '{source}' in a different availability zone."),
                    );
                }
                (d.size_gb, d.content.clone())
            } else if let Some(content) = world.snapshot_content.get(&skey) {
                (32, content.clone())
            } else {
                return arm_error(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    format!("Resource {source} is not found."),
                );
            }
        }
        _ => {
            return arm_error(
                StatusCode::BAD_REQUEST,
                "InvalidParameter",
                "the simulator makes disks Empty or by Copy of a snapshot or disk",
            )
        }
    };
    let op = uuid::Uuid::new_v4().to_string();
    let location = body["location"]
        .as_str()
        .unwrap_or("westeurope")
        .to_string();
    let disk = ManagedDisk {
        id: id.to_string(),
        name: name.to_string(),
        location: location.clone(),
        zone,
        size_gb,
        managed_by: None,
        detaching: false,
        content,
        provisioning_state: "Updating".into(),
        creating: Some((
            op.clone(),
            OffsetDateTime::now_utc(),
            std::time::Instant::now() + world.operation_delay,
        )),
    };
    let answer_body = json_of(&disk);
    world.disks.insert(key, disk);
    let mut answer = json_ok(answer_body);
    *answer.status_mut() = StatusCode::ACCEPTED;
    let url = format!(
        "{base}/subscriptions/{sub}/providers/Microsoft.Compute/locations/{location}/operations/{op}?api-version={}",
        crate::arm::API_VERSION
    );
    if let Ok(v) = HeaderValue::from_str(&url) {
        answer.headers_mut().insert("azure-asyncoperation", v);
    }
    if world.operation_delay.is_zero() {
        world.finish_disks(true);
    }
    answer
}

/// Why Azure would refuse this change of the VM's data disks, if it would.
#[allow(clippy::result_large_err)]
pub fn refuse(
    world: &World,
    set: &ScaleSet,
    vm: &Vm,
    body: &Value,
) -> Result<DiskChange, Response> {
    let vm_id = set.vm_resource_id(vm);
    let vm_name = set.key_of(vm);
    let bad = |code: &str, message: String| Err(arm_error(StatusCode::BAD_REQUEST, code, message));
    if vm.provisioning_state == "Deleting" {
        return Err(arm_error(
            StatusCode::CONFLICT,
            "Conflict",
            "The request failed due to conflict with a concurrent request.",
        ));
    }
    let mut change = DiskChange::default();
    for d in body["dataDisksToDetach"].as_array().into_iter().flatten() {
        let raw = d["diskId"].as_str().unwrap_or_default();
        let key = raw.to_ascii_lowercase();
        if !vm.data_disks.values().any(|a| a.key == key) {
            return bad(
                "InvalidParameter",
                format!("Data disk with diskId '{raw}' is not attached to VM '{vm_name}'."),
            );
        }
        change.detach.push(key);
    }
    for d in body["dataDisksToAttach"].as_array().into_iter().flatten() {
        let raw = d["diskId"].as_str().unwrap_or_default();
        let key = raw.to_ascii_lowercase();
        let Some(lun) = d["lun"].as_u64().and_then(|l| u32::try_from(l).ok()) else {
            return bad("InvalidParameter", "lun is required, 0 to 63".into());
        };
        let Some(disk) = world.disks.get(&key) else {
            return Err(arm_error(
                StatusCode::NOT_FOUND,
                "NotFound",
                format!("Resource {raw} is not found."),
            ));
        };
        if disk.detaching {
            return Err(arm_error(
                StatusCode::CONFLICT,
                "AttachDiskWhileBeingDetached",
                format!("Cannot attach data disk '{}' to VM '{vm_name}' because the disk is currently being detached. Please wait until the disk is completely detached and then try again.", disk.name),
            ));
        }
        if let Some(owner) = &disk.managed_by {
            if !owner.eq_ignore_ascii_case(&vm_id) {
                return Err(arm_error(
                    StatusCode::CONFLICT,
                    "ConflictingUserInput",
                    format!(
                        "Disk '{}' cannot be attached as the disk is already owned by VM '{owner}'.",
                        disk.id
                    ),
                ));
            }
        }
        let lun_taken = vm
            .data_disks
            .get(&lun)
            .is_some_and(|a| !change.detach.contains(&a.key))
            || change.attach.iter().any(|(l, _, _)| *l == lun);
        if lun_taken {
            return bad(
                "InvalidParameter",
                format!("A disk at LUN {lun} already exists."),
            );
        }
        if disk.zone.is_some() && disk.zone != vm.zone {
            return bad(
                "BadRequest",
                format!(
                    "Disk {} cannot be attached to the VM because it is not in the same zone as the VM. VM zone: '{}'. Disk zone: '{}'.",
                    disk.id,
                    vm.zone.clone().unwrap_or_default(),
                    disk.zone.clone().unwrap_or_default()
                ),
            );
        }
        let caching = d["caching"].as_str().unwrap_or("None").to_string();
        change.attach.push((lun, key, caching));
    }
    if change.attach.is_empty() && change.detach.is_empty() {
        return bad(
            "InvalidParameter",
            "dataDisksToAttach or dataDisksToDetach must name a disk".into(),
        );
    }
    Ok(change)
}

impl World {
    /// Ends the disk creations that are due (all of them with `all`).
    pub fn finish_disks(&mut self, all: bool) {
        let now = std::time::Instant::now();
        for d in self.disks.values_mut() {
            let Some((op, started, due)) = d.creating.clone() else {
                continue;
            };
            if !all && due > now {
                continue;
            }
            d.creating = None;
            d.provisioning_state = "Succeeded".into();
            self.artifact_operations.insert(
                op,
                crate::gallery::ArtifactOperation {
                    started,
                    ended: Some(OffsetDateTime::now_utc()),
                    outcome: Outcome::Succeeded,
                },
            );
        }
    }

    /// A disk creation still running, for the operation status endpoint.
    pub fn disk_operation(&self, op: &str) -> Option<crate::gallery::ArtifactOperation> {
        self.disks
            .values()
            .filter_map(|d| d.creating.as_ref())
            .find(|(id, _, _)| id == op)
            .map(|(_, started, _)| crate::gallery::ArtifactOperation {
                started: *started,
                ended: None,
                outcome: Outcome::InProgress,
            })
    }

    /// A new empty disk in the VM's zone attached at `lun`, with `content` written on it (a
    /// stateful VM as deployed).
    pub fn give_data_disk(&mut self, set_key: &str, instance: u64, lun: u32, size_gb: u64) {
        self.new_attached_disk(set_key, instance, lun, size_gb, "data", true);
    }

    /// The empty disk a scale set's model gives each VM it creates at `lun`: no filesystem, so
    /// nothing to mount until the VM formats it (Azure names them `{vm}_disk{n}_{id}`; the
    /// simulator `{vm}-model-{lun}`).
    pub fn give_empty_disk(&mut self, set_key: &str, instance: u64, lun: u32, size_gb: u64) {
        self.new_attached_disk(set_key, instance, lun, size_gb, "model", false);
    }

    fn new_attached_disk(
        &mut self,
        set_key: &str,
        instance: u64,
        lun: u32,
        size_gb: u64,
        kind: &str,
        written: bool,
    ) {
        let Some(set) = self.sets.get(set_key) else {
            return;
        };
        let Some(vm) = set.vms.get(&instance) else {
            return;
        };
        let name = format!("{}-{kind}-{lun}", set.vm_name(vm));
        let id = disk_id(&set.subscription, &set.resource_group, &name);
        let disk = ManagedDisk {
            id: id.clone(),
            name: name.clone(),
            location: set.location.clone(),
            zone: vm.zone.clone(),
            size_gb,
            managed_by: Some(set.vm_resource_id(vm)),
            detaching: false,
            content: if written {
                format!("data written by {}", set.vm_name(vm))
            } else {
                String::new()
            },
            provisioning_state: "Succeeded".into(),
            creating: None,
        };
        let attached = AttachedDisk::of(&disk);
        self.disks.insert(id.to_ascii_lowercase(), disk);
        if let Some(vm) = self
            .sets
            .get_mut(set_key)
            .and_then(|s| s.vms.get_mut(&instance))
        {
            vm.data_disks.insert(lun, attached);
        }
    }

    /// A change of data disks accepted: the disks to attach are the VM's from now (no other VM
    /// may take them), those to detach are being detached.
    pub fn reserve_disks(&mut self, owner: &str, change: &DiskChange) {
        for (_, key, _) in &change.attach {
            if let Some(d) = self.disks.get_mut(key) {
                d.managed_by = Some(owner.to_string());
            }
        }
        for key in &change.detach {
            if let Some(d) = self.disks.get_mut(key) {
                d.detaching = true;
            }
        }
    }

    /// The change of data disks done (`ok`) or failed (every disk as it was).
    pub fn settle_disks(&mut self, set_key: &str, instance: u64, change: &DiskChange, ok: bool) {
        for (lun, key, _) in &change.attach {
            let attached = self.disks.get(key).map(AttachedDisk::of);
            if ok {
                if let (Some(vm), Some(a)) = (
                    self.sets
                        .get_mut(set_key)
                        .and_then(|s| s.vms.get_mut(&instance)),
                    attached,
                ) {
                    vm.data_disks.insert(*lun, a);
                }
            } else if let Some(d) = self.disks.get_mut(key) {
                d.managed_by = None;
            }
        }
        for key in &change.detach {
            if let Some(d) = self.disks.get_mut(key) {
                d.detaching = false;
                if ok {
                    d.managed_by = None;
                }
            }
            if ok {
                if let Some(vm) = self
                    .sets
                    .get_mut(set_key)
                    .and_then(|s| s.vms.get_mut(&instance))
                {
                    vm.data_disks.retain(|_, a| a.key != *key);
                }
            }
        }
    }

    /// A deleted VM's data disks stay, unattached (`deleteOption: Detach`).
    pub fn release_disks(&mut self, keys: &[String]) {
        for key in keys {
            if let Some(d) = self.disks.get_mut(key) {
                d.managed_by = None;
                d.detaching = false;
            }
        }
    }
}

/// What an attach/detach's `Location` answers: 202 while it runs, the VM's storage profile once
/// done, the operation's error once failed.
pub fn location_result(world: &World, op: &crate::world::Operation) -> Response {
    // (the VM as it is now: its data disks after the change)
    match &op.outcome {
        Outcome::InProgress => StatusCode::ACCEPTED.into_response(),
        Outcome::Succeeded => {
            let profile = world
                .sets
                .get(&op.set_key)
                .and_then(|s| {
                    let crate::world::Effect::Disks(n, _) = &op.effect else {
                        return None;
                    };
                    s.vms.get(n)
                })
                .map(|vm| json!({"dataDisks": data_disks_json(vm)}))
                .unwrap_or_else(|| json!({"dataDisks": []}));
            json_ok(profile)
        }
        Outcome::Failed { code, message } | Outcome::Canceled { code, message } => {
            arm_error(StatusCode::CONFLICT, code, message.clone())
        }
    }
}
