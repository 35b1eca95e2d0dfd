//! The simulator's own API: build fleets, break VMs, inject faults, read the call log, and make the
//! VMs publish heartbeats. Not part of ARM; never authenticated.

use crate::arm::vm_json;
use crate::world::{Beat, Fault, FaultRule, OperationFault};
use crate::Shared;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post, put};
use axum::{Json, Router};
use futures::StreamExt;
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/admin/scalesets", post(create_set))
        .route("/admin/scalesets/{key}", get(show_set).delete(delete_set))
        .route("/admin/scalesets/{key}/capacity", put(set_capacity))
        .route("/admin/scalesets/{key}/model", post(new_model))
        .route(
            "/admin/scheduledevents",
            get(scheduled_events).post(approve_events),
        )
        .route("/admin/scalesets/{key}/vms/{id}", patch(patch_vm))
        .route("/admin/scalesets/{key}/vms/{id}/poweroff", post(power_off))
        .route("/admin/faults", post(add_fault).delete(clear_faults))
        .route("/admin/calls", get(calls).delete(clear_calls))
        .route("/admin/operations", get(operations))
        .route("/admin/operations/complete", post(complete_operations))
        .route("/admin/operations/delay", put(set_operation_delay))
        .route("/admin/operation-faults", post(add_operation_fault))
        .route("/admin/throttle", put(throttle))
        .route("/admin/heartbeats", post(send_heartbeats))
        .route(
            "/admin/resource-events",
            get(pending_resource_events)
                .post(send_resource_events)
                .delete(clear_resource_events),
        )
        .route("/admin/ratelimit", put(set_rate_limit))
        .route("/admin/locks", post(add_lock).delete(clear_locks))
        .route("/admin/serving", get(serving))
        .route("/admin/artifacts", get(artifacts))
        .route("/admin/disks", get(disks))
        .route("/admin/network", get(network))
        .route("/admin/artifacts/complete", post(complete_artifacts))
        .route("/admin/artifacts/delay", put(set_artifact_delay))
}

fn yes() -> bool {
    true
}

fn not_found(what: &str) -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({"error": format!("{what} not found")})),
    )
        .into_response()
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewSet {
    subscription: String,
    resource_group: String,
    name: String,
    capacity: usize,
    #[serde(default = "default_location")]
    location: String,
    #[serde(default)]
    zones: Vec<String>,
    #[serde(default = "default_mode")]
    orchestration_mode: String,
    #[serde(default)]
    automatic_repairs: bool,
    /// How long ago the VMs were created (a fleet that has been running a while).
    #[serde(default)]
    age_seconds: i64,
    /// The scale set's instance limit (1,000 by default).
    #[serde(default)]
    max_capacity: Option<usize>,
    /// Terminate notifications with this notice (Azure takes 5 to 15 minutes; tests take seconds).
    #[serde(default)]
    terminate_notification_seconds: Option<u64>,
    /// The model's image reference (default: a marketplace Ubuntu).
    #[serde(default)]
    image_reference: Option<Value>,
    /// Each first VM gets its own managed data disk at these LUNs, in its zone, with data on it
    /// (a stateful set as deployed); later VMs get none.
    #[serde(default)]
    data_disks: Vec<NewDataDisk>,
    /// Those disks are in the model too: every VM the set creates later gets an empty one of its
    /// own at each LUN (the first VMs' disks hold their data).
    #[serde(default)]
    model_disks: bool,
    /// Whether the stand-in agents wait for those disks (`HEALER_REQUIRE_MOUNT`), reporting
    /// STARTING until theirs is attached (default); false: they report as if they had none.
    #[serde(default = "yes")]
    require_mount: bool,
    /// Each first VM (Flexible) gets a public IP of its own on its NIC.
    #[serde(default)]
    public_ips: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewDataDisk {
    lun: u32,
    #[serde(default = "default_disk_size")]
    size_gb: u64,
}

fn default_disk_size() -> u64 {
    64
}

fn default_location() -> String {
    "westeurope".into()
}

fn default_mode() -> String {
    "Uniform".into()
}

async fn create_set(State(s): State<Shared>, Json(n): Json<NewSet>) -> Response {
    let mut w = s.world.lock().await;
    let key = w.create_set(
        &n.subscription,
        &n.resource_group,
        &n.name,
        n.capacity,
        &n.location,
        n.zones,
        &n.orchestration_mode,
        n.automatic_repairs,
    );
    if let (Some(max), Some(set)) = (n.max_capacity, w.sets.get_mut(&key)) {
        set.max_capacity = max;
    }
    if let Some(set) = w.sets.get_mut(&key) {
        set.terminate_notice = n
            .terminate_notification_seconds
            .map(std::time::Duration::from_secs);
        if let Some(image) = n.image_reference {
            set.image = image;
        }
    }
    let instances: Vec<u64> = w
        .sets
        .get(&key)
        .map(|s| s.vms.keys().copied().collect())
        .unwrap_or_default();
    for instance in instances {
        for d in &n.data_disks {
            w.give_data_disk(&key, instance, d.lun, d.size_gb);
        }
    }
    if let Some(set) = w.sets.get_mut(&key).filter(|_| n.require_mount) {
        set.require_luns = n.data_disks.iter().map(|d| d.lun).collect();
    }
    if let Some(set) = w.sets.get_mut(&key).filter(|_| n.model_disks) {
        set.model_disks = n.data_disks.iter().map(|d| (d.lun, d.size_gb)).collect();
    }
    if n.public_ips {
        let vms: Vec<(u64, String)> = w
            .sets
            .get(&key)
            .map(|s| {
                s.vms
                    .values()
                    .map(|vm| (vm.instance_id, s.key_of(vm)))
                    .collect()
            })
            .unwrap_or_default();
        for (instance, name) in vms {
            w.give_public_ip(&key, instance, &format!("{name}-pip"));
        }
    }
    let created = OffsetDateTime::now_utc() - time::Duration::seconds(n.age_seconds);
    for vm in w
        .sets
        .get_mut(&key)
        .into_iter()
        .flat_map(|s| s.vms.values_mut())
    {
        vm.time_created = created;
        vm.provisioned_at = created;
    }
    let id = w.sets[&key].resource_id();
    w.announce(
        crate::world::WRITE,
        &id,
        "Microsoft.Compute/virtualMachineScaleSets/write",
    );
    (StatusCode::CREATED, Json(json!({"key": key, "id": id}))).into_response()
}

async fn show_set(State(s): State<Shared>, Path(key): Path<String>) -> Response {
    let mut w = s.world.lock().await;
    w.advance();
    match w.sets.get(&key.to_lowercase()) {
        Some(set) => Json(json!({
            "id": set.resource_id(),
            "capacity": set.capacity(),
            "vms": set.vms.values().collect::<Vec<_>>(),
        }))
        .into_response(),
        None => not_found("scale set"),
    }
}

async fn delete_set(State(s): State<Shared>, Path(key): Path<String>) -> Response {
    let mut w = s.world.lock().await;
    match w.sets.remove(&key.to_lowercase()) {
        Some(set) => {
            w.announce(
                crate::world::DELETE,
                &set.resource_id(),
                "Microsoft.Compute/virtualMachineScaleSets/delete",
            );
            StatusCode::NO_CONTENT.into_response()
        }
        None => not_found("scale set"),
    }
}

#[derive(Deserialize)]
struct Capacity {
    capacity: usize,
}

async fn set_capacity(
    State(s): State<Shared>,
    Path(key): Path<String>,
    Json(c): Json<Capacity>,
) -> Response {
    let mut w = s.world.lock().await;
    let key = key.to_lowercase();
    if !w.sets.contains_key(&key) {
        return not_found("scale set");
    }
    let op = w.start_operation(&key, crate::world::Effect::Scale(c.capacity));
    Json(json!({"operation": op})).into_response()
}

#[derive(Deserialize)]
struct ForVm {
    vm: String,
}

/// The scheduled events document one VM reads from IMDS (`?vm=<its name>`).
async fn scheduled_events(State(s): State<Shared>, Query(q): Query<ForVm>) -> Response {
    let mut w = s.world.lock().await;
    w.advance();
    Json(w.scheduled_events_for(&q.vm)).into_response()
}

/// A VM's `StartRequests`, as IMDS takes them: each named event approved.
async fn approve_events(State(s): State<Shared>, Json(body): Json<Value>) -> Response {
    let ids: Vec<String> = body["StartRequests"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|r| r["EventId"].as_str().map(str::to_string))
        .collect();
    if ids.is_empty() {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "StartRequests with at least one EventId expected"})),
        )
            .into_response();
    }
    let unknown = s.world.lock().await.approve(&ids);
    if unknown.is_empty() {
        StatusCode::OK.into_response()
    } else {
        (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": format!("unknown EventId {}", unknown.join(", "))})),
        )
            .into_response()
    }
}

/// A new model for the scale set: what an operator's update of its image or extensions does.
async fn new_model(State(s): State<Shared>, Path(key): Path<String>) -> Response {
    let mut w = s.world.lock().await;
    match w.new_model(&key.to_lowercase()) {
        Some(version) => Json(json!({"modelVersion": version})).into_response(),
        None => not_found("scale set"),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct VmPatch {
    health: Option<Option<String>>,
    power_state: Option<String>,
    provisioning_state: Option<String>,
    protect_from_scale_set_actions: Option<bool>,
    protect_from_scale_in: Option<bool>,
    beat: Option<Beat>,
    fault: Option<Fault>,
    maintenance_until: Option<String>,
}

async fn patch_vm(
    State(s): State<Shared>,
    Path((key, id)): Path<(String, u64)>,
    Json(p): Json<VmPatch>,
) -> Response {
    let mut w = s.world.lock().await;
    let Some(set) = w.sets.get_mut(&key.to_lowercase()) else {
        return not_found("scale set");
    };
    let Some(vm) = set.vms.get_mut(&id) else {
        return not_found("instance");
    };
    if let Some(h) = p.health {
        vm.health = h;
    }
    if let Some(v) = p.power_state {
        vm.power_state = v;
    }
    if let Some(v) = p.provisioning_state {
        vm.provisioning_state = v;
    }
    // Protection is set through ARM (a PUT of the instance), so it raises an event; health, power
    // and provisioning changes here stand for the platform and the guest, which raise none.
    let protection_changed =
        p.protect_from_scale_set_actions.is_some() || p.protect_from_scale_in.is_some();
    if let Some(v) = p.protect_from_scale_set_actions {
        vm.protect_from_scale_set_actions = v;
    }
    if let Some(v) = p.protect_from_scale_in {
        vm.protect_from_scale_in = v;
    }
    if let Some(v) = p.beat {
        vm.beat = v;
    }
    if let Some(v) = p.fault {
        vm.fault = v;
    }
    if let Some(v) = p.maintenance_until {
        match OffsetDateTime::parse(&v, &Rfc3339) {
            Ok(t) => vm.maintenance_until = Some(t),
            Err(e) => {
                return (
                    StatusCode::BAD_REQUEST,
                    Json(json!({"error": format!("maintenanceUntil: {e}")})),
                )
                    .into_response()
            }
        }
    }
    let set = &w.sets[&key.to_lowercase()];
    let body = if set.flexible() {
        crate::arm::flexible_vm_json(set, &set.vms[&id], true, false)
    } else {
        vm_json(set, &set.vms[&id], true)
    };
    if protection_changed {
        let uri = format!("{}/virtualMachines/{id}", set.resource_id());
        w.announce(
            crate::world::WRITE,
            &uri,
            "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/write",
        );
    }
    Json(body).into_response()
}

/// An operator powers a VM off through Resource Manager (`powerOff`, not a deallocation): it stops,
/// and RM reports the action on the VM once done — `…/virtualMachineScaleSets/virtualMachines/
/// powerOff/action` for a Uniform instance, `…/virtualMachines/powerOff/action` for a Flexible VM
/// (https://learn.microsoft.com/azure/event-grid/event-schema-resource-groups: action events name
/// the operation in `data.operationName`). A patch of `powerState` stands for the platform or the
/// guest, which raise no event.
async fn power_off(State(s): State<Shared>, Path((key, id)): Path<(String, u64)>) -> Response {
    let mut w = s.world.lock().await;
    let Some(set) = w.sets.get_mut(&key.to_lowercase()) else {
        return not_found("scale set");
    };
    let flexible = set.flexible();
    let Some(vm) = set.vms.get_mut(&id) else {
        return not_found("instance");
    };
    vm.power_state = "stopped".into();
    let set = &w.sets[&key.to_lowercase()];
    let vm = &set.vms[&id];
    let (uri, operation) = if flexible {
        (
            set.vm_resource_id(vm),
            "Microsoft.Compute/virtualMachines/powerOff/action",
        )
    } else {
        (
            format!("{}/virtualMachines/{id}", set.resource_id()),
            "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/powerOff/action",
        )
    };
    w.announce(crate::world::ACTION, &uri, operation);
    Json(json!({"resourceUri": uri})).into_response()
}

#[derive(Deserialize)]
struct RateLimit {
    /// The budget to report; null returns to the default countdown.
    remaining: Option<usize>,
}

async fn set_rate_limit(State(s): State<Shared>, Json(r): Json<RateLimit>) -> Response {
    s.world.lock().await.rate_limit_remaining = r.remaining;
    StatusCode::NO_CONTENT.into_response()
}

async fn add_fault(State(s): State<Shared>, Json(rule): Json<FaultRule>) -> Response {
    s.world.lock().await.faults.push_back(rule);
    StatusCode::NO_CONTENT.into_response()
}

async fn clear_faults(State(s): State<Shared>) -> Response {
    s.world.lock().await.faults.clear();
    StatusCode::NO_CONTENT.into_response()
}

async fn calls(State(s): State<Shared>) -> Response {
    Json(json!(s.world.lock().await.calls)).into_response()
}

async fn clear_calls(State(s): State<Shared>) -> Response {
    s.world.lock().await.calls.clear();
    StatusCode::NO_CONTENT.into_response()
}

/// Every operation so far, with how it ended.
async fn operations(State(s): State<Shared>) -> Response {
    let mut w = s.world.lock().await;
    w.advance();
    let mut list: Vec<&crate::world::Operation> = w.operations.values().collect();
    list.sort_by_key(|o| o.started);
    Json(json!(list)).into_response()
}

#[derive(Deserialize)]
struct Delay {
    ms: u64,
}

/// How long operations started from now on take (0: they end at once).
async fn set_operation_delay(State(s): State<Shared>, Json(d): Json<Delay>) -> Response {
    s.world.lock().await.operation_delay = std::time::Duration::from_millis(d.ms);
    StatusCode::NO_CONTENT.into_response()
}

async fn add_operation_fault(State(s): State<Shared>, Json(f): Json<OperationFault>) -> Response {
    if !["failed", "canceled"].contains(&f.status.to_ascii_lowercase().as_str()) {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": "status must be Failed or Canceled"})),
        )
            .into_response();
    }
    s.world.lock().await.operation_faults.push_back(f);
    StatusCode::NO_CONTENT.into_response()
}

#[derive(Deserialize)]
struct Throttle {
    subscription: String,
    seconds: u64,
}

/// Throttles a whole subscription: every ARM request for it answers 429 until then.
async fn throttle(State(s): State<Shared>, Json(t): Json<Throttle>) -> Response {
    s.world.lock().await.throttle(&t.subscription, t.seconds);
    StatusCode::NO_CONTENT.into_response()
}

async fn complete_operations(State(s): State<Shared>) -> Response {
    let mut w = s.world.lock().await;
    let open: Vec<String> = w
        .operations
        .values()
        .filter(|o| o.ended.is_none())
        .map(|o| o.id.clone())
        .collect();
    for id in &open {
        w.complete(id);
    }
    w.finish_disks(true);
    Json(json!({"completed": open.len()})).into_response()
}

#[derive(Deserialize, Default)]
pub struct HeartbeatRound {
    /// The handler's base URL; defaults to the one given on the command line.
    target: Option<String>,
}

/// Builds one round of heartbeat invocations: what every live, publishing VM would send now.
pub async fn heartbeat_round(s: &Shared) -> Vec<Value> {
    let mut w = s.world.lock().await;
    w.advance();
    let now = OffsetDateTime::now_utc();
    let stamp = |t: OffsetDateTime| t.format(&Rfc3339).unwrap_or_default();
    let mut out = Vec::new();
    // A VM with a Terminate event pending still runs, and its agent drains: DRAINING until the
    // event's NotBefore, then the event approved (the stand-in agents drain at once).
    let mut draining: BTreeMap<(String, u64), (String, OffsetDateTime)> = BTreeMap::new();
    for (key, set) in &w.sets {
        for vm in set.vms.values() {
            if let Some(e) = w.terminating(&set.vm_name(vm)) {
                draining.insert((key.clone(), vm.instance_id), (e.id.clone(), e.not_before));
            }
        }
    }
    let mut approvals = Vec::new();
    // A disk that was never written (a model's empty disk) has no filesystem: nothing mounts.
    let blank: std::collections::BTreeSet<String> = w
        .disks
        .iter()
        .filter(|(_, d)| d.content.is_empty())
        .map(|(k, _)| k.clone())
        .collect();
    for (key, set) in w.sets.iter_mut() {
        let subjects: BTreeMap<u64, String> = set
            .vms
            .values()
            .map(|vm| (vm.instance_id, set.vm_resource_id(vm)))
            .collect();
        for vm in set.vms.values_mut() {
            let drain = draining.get(&(key.clone(), vm.instance_id));
            // The agent's HEALER_REQUIRE_MOUNT: no data disk, no application.
            let unmounted: Vec<u32> = set
                .require_luns
                .iter()
                .copied()
                .filter(|lun| {
                    vm.data_disks
                        .get(lun)
                        .is_none_or(|d| blank.contains(&d.key))
                })
                .collect();
            let live = (vm.provisioning_state == "Succeeded" || drain.is_some())
                && vm.power_state == "running";
            if !live || vm.beat == Beat::Silent {
                continue;
            }
            vm.sequence += 1;
            let mut data = json!({
                "vmId": vm.vm_id,
                "computerName": vm.computer_name,
                "sequence": vm.sequence,
            });
            match vm.beat {
                _ if drain.is_some() => {
                    if let Some((event, not_before)) = drain.cloned() {
                        data["status"] = json!("DRAINING");
                        data["until"] = json!(stamp(not_before));
                        approvals.push(event);
                    }
                }
                Beat::Up if !unmounted.is_empty() => {
                    data["status"] = json!("STARTING");
                    data["detail"] = json!(format!(
                        "waiting for its data disk (LUN {unmounted:?}) to be mounted (HEALER_REQUIRE_MOUNT)"
                    ));
                }
                Beat::Up => data["status"] = json!("UP"),
                Beat::Down => {
                    data["status"] = json!("DOWN");
                    data["detail"] = json!("health check failed: connection refused on :8080");
                }
                Beat::Maintenance => {
                    data["status"] = json!("MAINTENANCE");
                    data["until"] = json!(stamp(
                        vm.maintenance_until
                            .unwrap_or(now + time::Duration::minutes(30))
                    ));
                }
                Beat::Silent => unreachable!("filtered above"),
            }
            let event = json!({
                "id": uuid::Uuid::new_v4().to_string(),
                "topic": "/subscriptions/sim/resourceGroups/sim/providers/Microsoft.EventGrid/topics/heartbeats",
                // The VM's resource id, as the agent reads it from IMDS: a scale-set VM in
                // Uniform mode, a plain VM in Flexible mode (design §2).
                "subject": subjects[&vm.instance_id],
                "eventType": "VmssHealer.Heartbeat",
                "eventTime": stamp(now),
                "dataVersion": "1",
                "metadataVersion": "1",
                "data": data,
            });
            out.push(json!({
                "Data": {"event": event},
                "Metadata": {"sys": {"MethodName": "monitor-events", "UtcNow": stamp(now),
                                      "RandGuid": uuid::Uuid::new_v4().to_string()}},
            }));
        }
    }
    if !approvals.is_empty() {
        w.approve(&approvals);
    }
    out
}

/// The Resource Manager events raised so far and not yet delivered.
async fn pending_resource_events(State(s): State<Shared>) -> Response {
    let mut w = s.world.lock().await;
    w.advance();
    Json(json!(w.resource_events)).into_response()
}

async fn clear_resource_events(State(s): State<Shared>) -> Response {
    s.world.lock().await.resource_events.clear();
    StatusCode::NO_CONTENT.into_response()
}

/// Delivers the pending Resource Manager events, as the system topic's subscription would.
async fn send_resource_events(
    State(s): State<Shared>,
    body: Option<Json<HeartbeatRound>>,
) -> Response {
    let Some(target) = delivery_target(&s, body) else {
        return no_target();
    };
    let round = resource_event_round(&s).await;
    let (sent, failed) = deliver(&s.http, &target, s.delivery, round).await;
    Json(json!({"sent": sent, "failed": failed})).into_response()
}

/// Where a round goes: the request's `target`, else the one given on the command line.
fn delivery_target(s: &Shared, body: Option<Json<HeartbeatRound>>) -> Option<String> {
    body.and_then(|Json(b)| b.target)
        .or_else(|| s.heartbeat_target.clone())
}

fn no_target() -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({"error": "no target: pass {\"target\": \"http://127.0.0.1:PORT\"} or start with --heartbeat-target"})),
    )
        .into_response()
}

/// Takes the pending Resource Manager events as `monitor-events` invocations.
pub async fn resource_event_round(s: &Shared) -> Vec<Value> {
    let mut w = s.world.lock().await;
    w.advance();
    let now = OffsetDateTime::now_utc()
        .format(&Rfc3339)
        .unwrap_or_default();
    std::mem::take(&mut w.resource_events)
        .into_iter()
        .map(|event| {
            json!({
                "Data": {"event": event},
                "Metadata": {"sys": {"MethodName": "monitor-events", "UtcNow": now,
                                      "RandGuid": uuid::Uuid::new_v4().to_string()}},
            })
        })
        .collect()
}

/// How heartbeats reach the healer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// As the Functions host invokes a custom handler: `POST {target}/monitor-events` with the
    /// invocation envelope (the tests and the demo run the handler without a host).
    Handler,
    /// As Event Grid delivers to a Functions host: `POST {target}` with a JSON array of events and
    /// `aeg-event-type: Notification` (the target being the host's
    /// `/runtime/webhooks/eventgrid?functionName=monitor-events`).
    EventGrid,
}

/// Delivers heartbeat invocations; returns (sent, failed).
pub async fn deliver(
    client: &reqwest::Client,
    target: &str,
    delivery: Delivery,
    invocations: Vec<Value>,
) -> (usize, usize) {
    let results: Vec<bool> = futures::stream::iter(invocations)
        .map(|invocation| {
            let request = match delivery {
                Delivery::Handler => client
                    .post(format!("{}/monitor-events", target.trim_end_matches('/')))
                    .json(&invocation),
                Delivery::EventGrid => client
                    .post(target)
                    .header("aeg-event-type", "Notification")
                    .json(&json!([invocation["Data"]["event"]])),
            };
            async move {
                request
                    .send()
                    .await
                    .map(|r| r.status().is_success())
                    .unwrap_or(false)
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let ok = results.iter().filter(|r| **r).count();
    (ok, results.len() - ok)
}

async fn send_heartbeats(State(s): State<Shared>, body: Option<Json<HeartbeatRound>>) -> Response {
    let Some(target) = delivery_target(&s, body) else {
        return no_target();
    };
    let round = heartbeat_round(&s).await;
    let (sent, failed) = deliver(&s.http, &target, s.delivery, round).await;
    Json(json!({"sent": sent, "failed": failed})).into_response()
}

#[derive(Deserialize)]
struct NewLock {
    /// The resource id the lock is on (a VM, a resource group, …).
    scope: String,
    /// `CanNotDelete` or `ReadOnly`.
    level: String,
}

/// An operator locks a resource (through ARM, so Resource Manager reports the lock's write).
async fn add_lock(State(s): State<Shared>, Json(l): Json<NewLock>) -> Response {
    let mut w = s.world.lock().await;
    w.locks
        .push((l.scope.trim_end_matches('/').to_string(), l.level));
    StatusCode::CREATED.into_response()
}

async fn clear_locks(State(s): State<Shared>) -> Response {
    s.world.lock().await.locks.clear();
    StatusCode::NO_CONTENT.into_response()
}

/// How many instances served in each scale set, each time that changed, oldest first.
async fn serving(State(s): State<Shared>) -> Response {
    Json(json!(s.world.lock().await.serving)).into_response()
}

/// Snapshots, galleries, image definitions and versions, by id.
async fn artifacts(State(s): State<Shared>) -> Response {
    let mut w = s.world.lock().await;
    w.advance();
    Json(json!(w.artifacts)).into_response()
}

/// Every managed data disk: its zone, the VM it is attached to (`managedBy`), whether a detach
/// runs, and what is written on it — what tests hold "never on two VMs, never orphaned" against.
async fn disks(State(s): State<Shared>) -> Response {
    let mut w = s.world.lock().await;
    w.advance();
    let luns: BTreeMap<String, u32> = w
        .sets
        .values()
        .flat_map(|s| s.vms.values())
        .flat_map(|vm| vm.data_disks.iter().map(|(lun, a)| (a.key.clone(), *lun)))
        .collect();
    let list: Vec<Value> = w
        .disks
        .iter()
        .map(|(key, d)| {
            let mut v = json!(d);
            v["lun"] = json!(luns.get(key));
            v
        })
        .collect();
    Json(json!(list)).into_response()
}

/// Every public IP with the NIC (and so the VM) that holds it, and every NIC a PUT changed.
async fn network(State(s): State<Shared>) -> Response {
    let w = s.world.lock().await;
    Json(json!({"publicIps": w.public_ips, "nics": w.nics})).into_response()
}

/// Ends every snapshot's and image version's operation now, as planned.
async fn complete_artifacts(State(s): State<Shared>) -> Response {
    s.world.lock().await.finish_artifacts(true);
    StatusCode::NO_CONTENT.into_response()
}

/// How long image versions started from now on take.
async fn set_artifact_delay(State(s): State<Shared>, Json(d): Json<Delay>) -> Response {
    s.world.lock().await.image_version_delay = std::time::Duration::from_millis(d.ms);
    StatusCode::NO_CONTENT.into_response()
}
