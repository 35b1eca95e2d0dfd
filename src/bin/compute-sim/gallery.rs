//! Snapshots, Azure Compute Galleries, image definitions and image versions: what capturing a
//! golden image from a known-good instance needs of Azure (issue 17). Each is a resource of a
//! resource group, created with PUT and, where Azure takes its time, followed as a long-running
//! operation — an image version for half an hour to hours, here `image_version_delay`.
//!
//! What it knows of Azure, and where from (each with a test in `tests/simulator.rs`):
//! - api-versions as `azure_mgmt_compute` 0.21's 2024-07-01 package sends them: snapshots are the
//!   disk resource provider's (`2024-03-02`), galleries, images and versions the gallery
//!   provider's (`2023-07-03`).
//! - A snapshot copies a managed disk: `creationData.createOption: "Copy"` with
//!   `sourceResourceId` the disk (Snapshots - Create Or Update, "Create a snapshot by copying a
//!   disk"); a source that is not there is 404 `NotFound`.
//! - An image definition needs `osType`, `osState` and `identifier` (`publisher`, `offer`,
//!   `sku`); `hyperVGeneration` is `V1` or `V2`, `architecture` `x64` or `Arm64` (Gallery Images -
//!   Create Or Update; the `galleries/images` template reference). Its gallery must exist.
//! - An image version's name "needs to follow semantic version name pattern: The allowed
//!   characters are digit and period. Digits must be within the range of a 32-bit integer.
//!   Format: <MajorVersion>.<MinorVersion>.<Patch>" (GalleryImageVersions, the SDK reference);
//!   its `storageProfile.source.id` (or `osDiskImage.source.id`) names the snapshot, disk or VM it
//!   is made from; `publishingProfile.targetRegions[]` the regions, replica counts and
//!   `storageAccountType` (`Standard_LRS`, `Standard_ZRS`, `Premium_LRS`). It is `Creating` until
//!   its operation ends, then `Succeeded` (or `Failed`, with the operation's error).
//! - Deleting a version is a long-running operation too.

use crate::arm::{arm_error, json_ok};
use crate::world::{Outcome, World};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{json, Value};
use time::OffsetDateTime;

pub const DISK_API_VERSION: &str = "2024-03-02";
pub const GALLERY_API_VERSION: &str = "2023-07-03";

/// A resource the gallery and disk providers keep, as ARM returns it, with the operation that
/// creates (or deletes) it.
#[derive(Debug, Clone, Serialize)]
pub struct Artifact {
    pub id: String,
    pub resource: Value,
    /// The operation in flight on it, if any.
    #[serde(skip)]
    pub pending: Option<Pending>,
}

#[derive(Debug, Clone)]
pub struct Pending {
    pub op: String,
    pub started: OffsetDateTime,
    pub due: std::time::Instant,
    pub deleting: bool,
    pub planned: Option<Outcome>,
}

/// How one of the artifacts' operations stands, for the operation status endpoint.
#[derive(Debug, Clone)]
pub struct ArtifactOperation {
    pub started: OffsetDateTime,
    pub ended: Option<OffsetDateTime>,
    pub outcome: Outcome,
}

/// The api-version a path of these providers takes, if it is one of theirs.
pub fn api_version(lower_path: &str) -> Option<&'static str> {
    if lower_path.contains("/providers/microsoft.compute/snapshots")
        || lower_path.contains("/providers/microsoft.compute/disks/")
    {
        Some(DISK_API_VERSION)
    } else if lower_path.contains("/providers/microsoft.compute/galleries") {
        Some(GALLERY_API_VERSION)
    } else {
        None
    }
}

/// Serves `…/providers/Microsoft.Compute/{snapshots|galleries}/…`; `None` for other paths.
pub fn handle(
    world: &mut World,
    base: &str,
    method: &Method,
    segs: &[&str],
    l: &[&str],
    body: &Value,
) -> Option<Response> {
    let ["subscriptions", _, "resourcegroups", _, "providers", "microsoft.compute", kind @ ("snapshots" | "galleries"), rest @ ..] =
        l
    else {
        return None;
    };
    let (sub, rg) = (segs[1], segs[3]);
    let id = format!("/{}", segs.join("/"));
    let key = id.to_ascii_lowercase();
    Some(match (*kind, rest, method) {
        (_, [_, ..], &Method::GET) if rest.len() % 2 == 1 => get(world, &key, &id),
        // A list: the versions of an image definition.
        ("galleries", [_, "images", _, "versions"], &Method::GET) => {
            let prefix = format!("{key}/");
            let value: Vec<&Value> = world
                .artifacts
                .iter()
                .filter(|(k, _)| k.starts_with(&prefix) && !k[prefix.len()..].contains('/'))
                .map(|(_, a)| &a.resource)
                .collect();
            json_ok(json!({ "value": value }))
        }
        ("snapshots", [name], &Method::PUT) => put_snapshot(world, base, sub, &id, name, body),
        ("galleries", [name], &Method::PUT) => {
            put_plain(world, &id, name, "Microsoft.Compute/galleries", body)
        }
        ("galleries", [_, "images", name], &Method::PUT) => put_image(world, &id, name, body),
        ("galleries", [_, "images", _, "versions", name], &Method::PUT) => {
            put_version(world, base, sub, &id, name, body)
        }
        ("galleries", [_, "images", _, "versions", _], &Method::DELETE)
        | ("snapshots", [_], &Method::DELETE) => delete(world, base, sub, &key, rg),
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

fn get(world: &World, key: &str, id: &str) -> Response {
    match world.artifacts.get(key) {
        Some(a) => json_ok(a.resource.clone()),
        None => not_found(id),
    }
}

/// The resource as ARM returns it: the body with its id, name, type and a provisioning state.
fn resource(id: &str, name: &str, kind: &str, body: &Value, state: &str) -> Value {
    let mut r = body.clone();
    r["id"] = json!(id);
    r["name"] = json!(name);
    r["type"] = json!(kind);
    r["properties"]["provisioningState"] = json!(state);
    r
}

fn parent_exists(world: &World, id: &str, levels: usize) -> bool {
    let mut parent = id.to_ascii_lowercase();
    for _ in 0..levels {
        match parent.rfind('/') {
            Some(i) => parent.truncate(i),
            None => return false,
        }
    }
    world.artifacts.contains_key(&parent)
}

fn put_plain(world: &mut World, id: &str, name: &str, kind: &str, body: &Value) -> Response {
    let key = id.to_ascii_lowercase();
    let created = !world.artifacts.contains_key(&key);
    let r = resource(id, name, kind, body, "Succeeded");
    world.artifacts.insert(
        key,
        Artifact {
            id: id.to_string(),
            resource: r.clone(),
            pending: None,
        },
    );
    let mut answer = json_ok(r);
    if created {
        *answer.status_mut() = StatusCode::CREATED;
    }
    answer
}

fn invalid(message: impl Into<String>) -> Response {
    arm_error(StatusCode::BAD_REQUEST, "InvalidParameter", message)
}

fn put_image(world: &mut World, id: &str, name: &str, body: &Value) -> Response {
    if !parent_exists(world, id, 2) {
        return not_found(&id[..id.to_ascii_lowercase().rfind("/images/").unwrap_or(0)]);
    }
    let p = &body["properties"];
    let mut problems = Vec::new();
    if !matches!(p["osType"].as_str(), Some("Linux" | "Windows")) {
        problems.push("osType must be Linux or Windows");
    }
    if !matches!(p["osState"].as_str(), Some("Generalized" | "Specialized")) {
        problems.push("osState must be Generalized or Specialized");
    }
    if ["publisher", "offer", "sku"]
        .iter()
        .any(|k| p["identifier"][k].as_str().is_none_or(str::is_empty))
    {
        problems.push("identifier needs publisher, offer and sku");
    }
    if !p["hyperVGeneration"].is_null()
        && !matches!(p["hyperVGeneration"].as_str(), Some("V1" | "V2"))
    {
        problems.push("hyperVGeneration must be V1 or V2");
    }
    if !p["architecture"].is_null() && !matches!(p["architecture"].as_str(), Some("x64" | "Arm64"))
    {
        problems.push("architecture must be x64 or Arm64");
    }
    if !problems.is_empty() {
        return invalid(problems.join("; "));
    }
    put_plain(world, id, name, "Microsoft.Compute/galleries/images", body)
}

/// A version name as Azure takes it: three numbers of 32 bits, separated by periods.
pub fn valid_version_name(name: &str) -> bool {
    let parts: Vec<&str> = name.split('.').collect();
    parts.len() == 3
        && parts.iter().all(|p| {
            !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()) && p.parse::<i32>().is_ok()
        })
}

fn put_snapshot(
    world: &mut World,
    base: &str,
    sub: &str,
    id: &str,
    name: &str,
    body: &Value,
) -> Response {
    let data = &body["properties"]["creationData"];
    if data["createOption"].as_str() != Some("Copy") {
        return invalid(
            "the simulator makes snapshots by copying a disk: creationData.createOption Copy",
        );
    }
    let source = data["sourceResourceId"].as_str().unwrap_or_default();
    // A data disk's snapshot holds what was written on it.
    if let Some(d) = world.disks.get(&source.to_ascii_lowercase()) {
        let content = d.content.clone();
        world
            .snapshot_content
            .insert(id.to_ascii_lowercase(), content);
    } else if world.disk_of(source).is_none() {
        return arm_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("Resource {source} is not found."),
        );
    }
    let delay = world.operation_delay;
    let location = body["location"]
        .as_str()
        .unwrap_or("westeurope")
        .to_string();
    let r = resource(id, name, "Microsoft.Compute/snapshots", body, "Updating");
    start(world, base, sub, &location, id, r, delay, "snapshot")
}

fn put_version(
    world: &mut World,
    base: &str,
    sub: &str,
    id: &str,
    name: &str,
    body: &Value,
) -> Response {
    if !valid_version_name(name) {
        return invalid(format!(
            "The gallery image version name '{name}' is invalid: the allowed characters are digit and period, digits within the range of a 32-bit integer, format <MajorVersion>.<MinorVersion>.<Patch>."
        ));
    }
    if !parent_exists(world, id, 2) {
        return not_found(&id[..id.to_ascii_lowercase().rfind("/versions/").unwrap_or(0)]);
    }
    let storage = &body["properties"]["storageProfile"];
    let source = storage["source"]["id"]
        .as_str()
        .or_else(|| storage["osDiskImage"]["source"]["id"].as_str())
        .unwrap_or_default();
    let known = world.artifacts.contains_key(&source.to_ascii_lowercase())
        || world.disk_of(source).is_some();
    if !known {
        return invalid(format!(
            "The source {source:?} of the image version is not a snapshot, disk or virtual machine that exists."
        ));
    }
    for region in body["properties"]["publishingProfile"]["targetRegions"]
        .as_array()
        .into_iter()
        .flatten()
    {
        if let Some(t) = region["storageAccountType"].as_str() {
            if !matches!(t, "Standard_LRS" | "Standard_ZRS" | "Premium_LRS") {
                return invalid(format!(
                    "storageAccountType {t} is not one of Standard_LRS, Standard_ZRS, Premium_LRS"
                ));
            }
        }
    }
    let delay = world.image_version_delay;
    let location = body["location"]
        .as_str()
        .unwrap_or("westeurope")
        .to_string();
    let mut r = resource(
        id,
        name,
        "Microsoft.Compute/galleries/images/versions",
        body,
        "Creating",
    );
    r["properties"]["publishingProfile"]["publishedDate"] = json!(OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default());
    start(world, base, sub, &location, id, r, delay, "imageversion")
}

/// Stores the resource as it is while its operation runs, and answers 201 with the operation.
#[allow(clippy::too_many_arguments)]
fn start(
    world: &mut World,
    base: &str,
    sub: &str,
    location: &str,
    id: &str,
    resource: Value,
    delay: std::time::Duration,
    verb: &str,
) -> Response {
    let op = uuid::Uuid::new_v4().to_string();
    let planned = world.take_operation_fault(verb).map(|(outcome, _)| outcome);
    world.artifacts.insert(
        id.to_ascii_lowercase(),
        Artifact {
            id: id.to_string(),
            resource: resource.clone(),
            pending: Some(Pending {
                op: op.clone(),
                started: OffsetDateTime::now_utc(),
                due: std::time::Instant::now() + delay,
                deleting: false,
                planned,
            }),
        },
    );
    let mut answer = json_ok(resource);
    *answer.status_mut() = StatusCode::CREATED;
    async_headers(&mut answer, base, sub, location, &op);
    if delay.is_zero() {
        world.finish(vec![id.to_ascii_lowercase()]);
    }
    answer
}

fn delete(world: &mut World, base: &str, sub: &str, key: &str, _rg: &str) -> Response {
    let Some(a) = world.artifacts.get_mut(key) else {
        return StatusCode::NO_CONTENT.into_response();
    };
    let op = uuid::Uuid::new_v4().to_string();
    let location = a.resource["location"]
        .as_str()
        .unwrap_or("westeurope")
        .to_string();
    a.resource["properties"]["provisioningState"] = json!("Deleting");
    a.pending = Some(Pending {
        op: op.clone(),
        started: OffsetDateTime::now_utc(),
        due: std::time::Instant::now() + world.operation_delay,
        deleting: true,
        planned: None,
    });
    let mut answer = StatusCode::ACCEPTED.into_response();
    async_headers(&mut answer, base, sub, &location, &op);
    if world.operation_delay.is_zero() {
        world.finish(vec![key.to_string()]);
    }
    answer
}

fn async_headers(r: &mut Response, base: &str, sub: &str, location: &str, op: &str) {
    let url = format!(
        "{base}/subscriptions/{sub}/providers/Microsoft.Compute/locations/{location}/operations/{op}?api-version={}",
        crate::arm::API_VERSION
    );
    if let Ok(v) = HeaderValue::from_str(&url) {
        r.headers_mut().insert("azure-asyncoperation", v);
    }
}

impl World {
    /// Ends the artifacts' operations that are due (all of them with `all`): a version or snapshot
    /// is `Succeeded` (or `Failed` as planned), a deletion removes it.
    pub fn finish_artifacts(&mut self, all: bool) {
        let now = std::time::Instant::now();
        let due: Vec<String> = self
            .artifacts
            .iter()
            .filter(|(_, a)| a.pending.as_ref().is_some_and(|p| all || p.due <= now))
            .map(|(k, _)| k.clone())
            .collect();
        self.finish(due);
    }

    fn finish(&mut self, due: Vec<String>) {
        for key in due {
            let Some(a) = self.artifacts.get_mut(&key) else {
                continue;
            };
            let Some(p) = a.pending.take() else {
                continue;
            };
            let outcome = p.planned.clone().unwrap_or(Outcome::Succeeded);
            self.artifact_operations.insert(
                p.op.clone(),
                ArtifactOperation {
                    started: p.started,
                    ended: Some(OffsetDateTime::now_utc()),
                    outcome: outcome.clone(),
                },
            );
            if p.deleting {
                self.artifacts.remove(&key);
                continue;
            }
            let state = match outcome {
                Outcome::Succeeded => "Succeeded",
                _ => "Failed",
            };
            a.resource["properties"]["provisioningState"] = json!(state);
        }
    }

    /// How an artifact's operation stands: running ones from the artifact, ended ones remembered.
    pub fn artifact_operation(&self, op: &str) -> Option<ArtifactOperation> {
        if let Some(done) = self.artifact_operations.get(op) {
            return Some(done.clone());
        }
        if let Some(creating) = self.disk_operation(op) {
            return Some(creating);
        }
        self.artifacts
            .values()
            .filter_map(|a| a.pending.as_ref())
            .find(|p| p.op == op)
            .map(|p| ArtifactOperation {
                started: p.started,
                ended: None,
                outcome: Outcome::InProgress,
            })
    }

    /// The VM whose OS disk this is, as `(set key, instance id)`.
    pub fn disk_of(&self, disk_id: &str) -> Option<(String, u64)> {
        self.sets.iter().find_map(|(k, s)| {
            s.vms
                .values()
                .find(|vm| s.os_disk_id(vm).eq_ignore_ascii_case(disk_id))
                .map(|vm| (k.clone(), vm.instance_id))
        })
    }
}
