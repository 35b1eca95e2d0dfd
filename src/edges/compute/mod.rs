//! The Compute API edge: the only code that knows ARM. Reads scale sets and their instances for
//! the mirror, sends repairs, and follows the long-running operations they start: a 202 only
//! starts one, and its `Azure-AsyncOperation` status says how it ended.

use crate::autoscale::AutoscaleSetting;

mod disks;
mod image;
mod network;
use crate::mirror::{AppHealth, Instance, Lock, LockLevel};
use crate::scaleset::{Orchestration, ScaleSetId};
use async_trait::async_trait;
use azure_core::auth::TokenCredential;
use azure_core::error::ErrorKind;
use azure_core::{HttpClient, StatusCode};
use azure_mgmt_compute::package_2024_07_01::{models, Client};
use futures::{StreamExt, TryStreamExt};
pub use image::{ImageVersion, InstanceDisk};
pub use network::{AddressChange, InstanceAddress};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use time::format_description::well_known::Rfc3339;
use time::{Duration, OffsetDateTime};
use tracing::Instrument;
use url::Url;

const READ_RETRY_DELAY: std::time::Duration = std::time::Duration::from_millis(300);

/// Resource Manager's management locks API (`Microsoft.Authorization/locks`).
pub const LOCKS_API_VERSION: &str = "2016-09-01";
/// More pages of locks than any resource group has: a loop of `nextLink`s is cut here.
const MAX_LOCK_PAGES: usize = 50;

/// Azure Monitor's autoscale settings API (`Microsoft.Insights/autoscalesettings`).
pub const AUTOSCALE_API_VERSION: &str = "2022-10-01";
/// More pages of autoscale settings than any resource group has.
const MAX_AUTOSCALE_PAGES: usize = 50;

/// Below this many calls left in a subscription's Compute budget, passes stop reading: ARM's
/// throttle would otherwise stop us for minutes, repairs included.
pub const READ_RESERVE: i64 = 20;
const RATE_LIMIT_HEADER: &str = "x-ms-ratelimit-remaining-resource";

/// The longest back-off we honour. ARM's throttling windows are minutes long; a larger
/// `Retry-After` is a fault (or a forgery) and must neither overflow a date nor stop the healer
/// for ever.
pub const MAX_RETRY_AFTER_S: i64 = 3600;

/// The Resource Manager actions the handler performs on each watched scale set, and no other: the
/// custom role the infrastructure grants on the scale sets (`infra/`) is exactly this list.
pub const SCALE_SET_ACTIONS: &[&str] = &[
    "Microsoft.Compute/virtualMachineScaleSets/read",
    "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/read",
    "Microsoft.Compute/virtualMachineScaleSets/write",
    "Microsoft.Compute/virtualMachineScaleSets/delete/action",
    "Microsoft.Compute/virtualMachineScaleSets/reimage/action",
    "Microsoft.Compute/virtualMachineScaleSets/restart/action",
    "Microsoft.Compute/virtualMachineScaleSets/start/action",
    "Microsoft.Compute/virtualMachineScaleSets/redeploy/action",
    // A cycle's `--action upgrade` (the scale set's manual upgrade).
    "Microsoft.Compute/virtualMachineScaleSets/manualUpgrade/action",
];

/// What the handler needs on each watched resource group: reading the status of the long-running
/// operations its writes start. Azure checks it at the resource group, not the scale set ("If you
/// only have permission at the resource level, you can start the operation but you can't track its
/// status", Track asynchronous Azure operations, learn.microsoft.com).
pub const RESOURCE_GROUP_ACTIONS: &[&str] = &["Microsoft.Compute/locations/operations/read"];

/// What the handler needs on the resource group of each watched Flexible scale set: its VMs are
/// resources of the group, not of the scale set, so listing and acting on them is authorized at
/// the group. (Their deletion goes through the scale set's batch delete.)
pub const FLEXIBLE_GROUP_ACTIONS: &[&str] = &[
    "Microsoft.Compute/virtualMachines/read",
    "Microsoft.Compute/virtualMachines/restart/action",
    "Microsoft.Compute/virtualMachines/start/action",
    "Microsoft.Compute/virtualMachines/reimage/action",
    // The locks that protect Flexible VMs from being repaired (`Compute::locks`).
    "Microsoft.Authorization/locks/read",
    "Microsoft.Compute/virtualMachines/redeploy/action",
];

/// What a blue/green swap (`handler swap`) needs on the resource groups of its scale sets: the
/// autoscale setting of the old set is moved to the new one by writing a setting for the new set
/// (a setting's target cannot change) and disabling the old one; a rollback deletes a setting it
/// created. Autoscale settings are resources of a resource group, authorized there.
pub const AUTOSCALE_ACTIONS: &[&str] = &[
    "Microsoft.Insights/autoscalesettings/read",
    "Microsoft.Insights/autoscalesettings/write",
    "Microsoft.Insights/autoscalesettings/delete",
];

/// What a golden image (`handler prototype`) needs on the resource groups of its scale sets:
/// preparing and deallocating the instance, the snapshot of its OS disk, the gallery, the image
/// definition and its versions. (Pointing the model at the image is the scale set's write.)
pub const PROTOTYPE_ACTIONS: &[&str] = &[
    "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/runCommand/action",
    "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/deallocate/action",
    // Not a request of ours: Azure checks it on the disk a snapshot copies.
    "Microsoft.Compute/disks/read",
    "Microsoft.Compute/snapshots/write",
    "Microsoft.Compute/snapshots/delete",
    "Microsoft.Compute/galleries/read",
    "Microsoft.Compute/galleries/write",
    "Microsoft.Compute/galleries/images/read",
    "Microsoft.Compute/galleries/images/write",
    "Microsoft.Compute/galleries/images/versions/read",
    "Microsoft.Compute/galleries/images/versions/write",
    "Microsoft.Compute/galleries/images/versions/delete",
];

/// What a stateful replacement (issue 18) needs on the resource groups of the stateful scale sets:
/// a VM's data disks detached and attached (a Uniform instance through the scale-set VM API, a
/// Flexible VM through the VM API), and a disk moved into another zone by snapshot and copy (the
/// copy made, the original and the snapshot deleted once the new VM serves).
pub const STATEFUL_ACTIONS: &[&str] = &[
    "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/attachDetachDataDisks/action",
    "Microsoft.Compute/virtualMachines/attachDetachDataDisks/action",
    // Also checked on the disk an attach names (Azure's own roles that attach disks, e.g.
    // cloud-provider-azure's, hold it with the attach action).
    "Microsoft.Compute/disks/read",
    "Microsoft.Compute/disks/write",
    "Microsoft.Compute/disks/delete",
    "Microsoft.Compute/snapshots/write",
    "Microsoft.Compute/snapshots/delete",
    // The address of a Flexible VM (STATEFUL_ADDRESS): its NIC read and written whole, which
    // joins the NIC's subnet again and, for a public IP, the public IP.
    "Microsoft.Network/networkInterfaces/read",
    "Microsoft.Network/networkInterfaces/write",
    "Microsoft.Network/virtualNetworks/subnets/join/action",
    "Microsoft.Network/publicIPAddresses/join/action",
];

/// Every action the handler performs.
pub const REQUIRED_ACTIONS: &[&str] = &[
    SCALE_SET_ACTIONS[0],
    SCALE_SET_ACTIONS[1],
    SCALE_SET_ACTIONS[2],
    SCALE_SET_ACTIONS[3],
    SCALE_SET_ACTIONS[4],
    SCALE_SET_ACTIONS[5],
    SCALE_SET_ACTIONS[6],
    SCALE_SET_ACTIONS[7],
    SCALE_SET_ACTIONS[8],
    RESOURCE_GROUP_ACTIONS[0],
    FLEXIBLE_GROUP_ACTIONS[0],
    FLEXIBLE_GROUP_ACTIONS[1],
    FLEXIBLE_GROUP_ACTIONS[2],
    FLEXIBLE_GROUP_ACTIONS[3],
    FLEXIBLE_GROUP_ACTIONS[4],
    FLEXIBLE_GROUP_ACTIONS[5],
    AUTOSCALE_ACTIONS[0],
    AUTOSCALE_ACTIONS[1],
    AUTOSCALE_ACTIONS[2],
    PROTOTYPE_ACTIONS[0],
    PROTOTYPE_ACTIONS[1],
    PROTOTYPE_ACTIONS[2],
    PROTOTYPE_ACTIONS[3],
    PROTOTYPE_ACTIONS[4],
    PROTOTYPE_ACTIONS[5],
    PROTOTYPE_ACTIONS[6],
    PROTOTYPE_ACTIONS[7],
    PROTOTYPE_ACTIONS[8],
    PROTOTYPE_ACTIONS[9],
    PROTOTYPE_ACTIONS[10],
    PROTOTYPE_ACTIONS[11],
    STATEFUL_ACTIONS[0],
    STATEFUL_ACTIONS[1],
    STATEFUL_ACTIONS[3],
    STATEFUL_ACTIONS[4],
    STATEFUL_ACTIONS[7],
    STATEFUL_ACTIONS[8],
];

/// The action Resource Manager authorizes a request of ours by (`None`: not a request we make).
/// Lets tests hold every call the handler sends against [`REQUIRED_ACTIONS`].
pub fn required_action(method: &str, path: &str) -> Option<&'static str> {
    let path = path.to_ascii_lowercase();
    let method = method.to_ascii_uppercase();
    if method == "GET" && path.ends_with("/providers/microsoft.authorization/locks") {
        return Some(FLEXIBLE_GROUP_ACTIONS[4]);
    }
    // A stateful replacement's address: a Flexible VM's NIC.
    if let Some(rest) = path
        .split("/providers/microsoft.network/networkinterfaces/")
        .nth(1)
    {
        if rest.trim_matches('/').contains('/') {
            return None;
        }
        return match method.as_str() {
            "GET" => Some(STATEFUL_ACTIONS[7]),
            "PUT" => Some(STATEFUL_ACTIONS[8]),
            _ => None,
        };
    }
    // A stateful replacement's disks.
    if let Some(rest) = path.split("/providers/microsoft.compute/disks/").nth(1) {
        if rest.trim_matches('/').contains('/') {
            return None;
        }
        return match method.as_str() {
            "GET" => Some(STATEFUL_ACTIONS[2]),
            "PUT" => Some(STATEFUL_ACTIONS[3]),
            "DELETE" => Some(STATEFUL_ACTIONS[4]),
            _ => None,
        };
    }
    // A golden image's snapshot and gallery artifacts, by kind and depth.
    if let Some(rest) = path.split("/providers/microsoft.compute/snapshots").nth(1) {
        let named = rest
            .trim_matches('/')
            .split('/')
            .filter(|s| !s.is_empty())
            .count()
            == 1;
        return match (method.as_str(), named) {
            ("PUT", true) => Some(PROTOTYPE_ACTIONS[3]),
            ("DELETE", true) => Some(PROTOTYPE_ACTIONS[4]),
            _ => None,
        };
    }
    if let Some(rest) = path.split("/providers/microsoft.compute/galleries/").nth(1) {
        let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        let level = match segments.as_slice() {
            [_] => 0,
            [_, "images", _] => 1,
            [_, "images", _, "versions"] | [_, "images", _, "versions", _] => 2,
            _ => return None,
        };
        return match (method.as_str(), level) {
            ("GET", 0) => Some(PROTOTYPE_ACTIONS[5]),
            ("PUT", 0) => Some(PROTOTYPE_ACTIONS[6]),
            ("GET", 1) => Some(PROTOTYPE_ACTIONS[7]),
            ("PUT", 1) => Some(PROTOTYPE_ACTIONS[8]),
            ("GET", 2) => Some(PROTOTYPE_ACTIONS[9]),
            ("PUT", 2) => Some(PROTOTYPE_ACTIONS[10]),
            ("DELETE", 2) => Some(PROTOTYPE_ACTIONS[11]),
            _ => None,
        };
    }
    if path.contains("/providers/microsoft.insights/autoscalesettings") {
        return match method.as_str() {
            "GET" => Some(AUTOSCALE_ACTIONS[0]),
            "PUT" => Some(AUTOSCALE_ACTIONS[1]),
            "DELETE" => Some(AUTOSCALE_ACTIONS[2]),
            _ => None,
        };
    }
    if let Some(rest) = path.split("/providers/microsoft.compute/locations/").nth(1) {
        let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        return match (method.as_str(), segments.as_slice()) {
            ("GET", [_, "operations", _]) => Some(RESOURCE_GROUP_ACTIONS[0]),
            _ => None,
        };
    }
    let plain_vm = path
        .split_once("/providers/microsoft.compute/virtualmachines")
        .map(|(_, rest)| rest)
        .filter(|rest| rest.is_empty() || rest.starts_with('/'));
    if let Some(rest) = plain_vm {
        // A Flexible scale set's VMs: the group's VM list, or one VM's action.
        let segments: Vec<&str> = rest.split('/').filter(|s| !s.is_empty()).collect();
        return match (method.as_str(), segments.as_slice()) {
            ("GET", []) | ("GET", [_]) | ("GET", [_, "instanceview"]) => {
                Some(FLEXIBLE_GROUP_ACTIONS[0])
            }
            ("POST", [_, "restart"]) => Some(FLEXIBLE_GROUP_ACTIONS[1]),
            ("POST", [_, "start"]) => Some(FLEXIBLE_GROUP_ACTIONS[2]),
            ("POST", [_, "reimage"]) => Some(FLEXIBLE_GROUP_ACTIONS[3]),
            ("POST", [_, "redeploy"]) => Some(FLEXIBLE_GROUP_ACTIONS[5]),
            ("POST", [_, "attachdetachdatadisks"]) => Some(STATEFUL_ACTIONS[1]),
            _ => None,
        };
    }
    let rest = path
        .split("/providers/microsoft.compute/virtualmachinescalesets/")
        .nth(1)?;
    let mut segments = rest.split('/').filter(|s| !s.is_empty());
    let _name = segments.next()?;
    let tail: Vec<&str> = segments.collect();
    let action = match (method.as_str(), tail.as_slice()) {
        ("GET", []) => REQUIRED_ACTIONS[0],
        ("GET", ["virtualmachines"])
        | ("GET", ["virtualmachines", _])
        | ("GET", ["virtualmachines", _, "instanceview"]) => REQUIRED_ACTIONS[1],
        ("PATCH", []) | ("PUT", []) => REQUIRED_ACTIONS[2],
        ("POST", ["delete"]) => REQUIRED_ACTIONS[3],
        ("POST", ["reimage"]) => REQUIRED_ACTIONS[4],
        ("POST", ["restart"]) => REQUIRED_ACTIONS[5],
        ("POST", ["start"]) => REQUIRED_ACTIONS[6],
        ("POST", ["redeploy"]) => SCALE_SET_ACTIONS[7],
        ("POST", ["manualupgrade"]) => SCALE_SET_ACTIONS[8],
        ("POST", ["virtualmachines", _, "runcommand"]) => PROTOTYPE_ACTIONS[0],
        ("POST", ["virtualmachines", _, "deallocate"]) => PROTOTYPE_ACTIONS[1],
        ("POST", ["virtualmachines", _, "attachdetachdatadisks"]) => STATEFUL_ACTIONS[0],
        _ => return None,
    };
    Some(action)
}

/// ARM's answer to a request it did not carry out: status, `error.code` and `error.message`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArmError {
    pub status: u16,
    pub code: String,
    pub message: String,
}

impl std::fmt::Display for ArmError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "HTTP {} {}: {}", self.status, self.code, self.message)
    }
}

/// Why a Compute call failed, in the terms a caller branches on.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ComputeError {
    #[error("throttled by the Compute API; retry after {retry_after_s} s")]
    Throttled { retry_after_s: i64 },
    /// Another operation is changing the resource (409 `Conflict`, or the scale set is
    /// `Updating`): the same request can work later.
    #[error("busy: {0}")]
    Busy(ArmError),
    /// The scale set changed since it was read (412 on `If-Match`).
    #[error("the scale set changed since it was read: {0}")]
    Stale(ArmError),
    /// ARM refused the request itself (a 4xx other than 408/409 `Conflict`/412/429, including 409
    /// `OperationNotAllowed`): sending it again unchanged will not help.
    #[error("refused: {0}")]
    Refused(ArmError),
    #[error("not found: {0}")]
    NotFound(String),
    #[error("not authorized: {0}")]
    Unauthorized(String),
    /// A server error: the request was answered and not carried out.
    #[error("Compute API unavailable: {0}")]
    Transient(String),
    /// No answer came (connection lost, timeout): whether a write landed is unknown.
    #[error("no answer from the Compute API: {0}")]
    NoAnswer(String),
    #[error("Compute API call failed: {0}")]
    Failed(String),
}

impl ComputeError {
    pub fn label(&self) -> &'static str {
        match self {
            ComputeError::Throttled { .. } => "throttled",
            ComputeError::Busy(_) => "busy",
            ComputeError::Stale(_) => "stale",
            ComputeError::Refused(_) => "refused",
            ComputeError::NotFound(_) => "not_found",
            ComputeError::Unauthorized(_) => "unauthorized",
            ComputeError::Transient(_) => "transient",
            ComputeError::NoAnswer(_) => "no_answer",
            ComputeError::Failed(_) => "failed",
        }
    }

    /// ARM's error, when ARM answered with one.
    pub fn arm(&self) -> Option<&ArmError> {
        match self {
            ComputeError::Busy(e) | ComputeError::Stale(e) | ComputeError::Refused(e) => Some(e),
            _ => None,
        }
    }
}

/// An ISO 8601 duration of the kind ARM uses for timeouts (`PT5M`, `PT1H30M`, `PT90S`).
pub fn iso_duration(text: &str) -> Option<time::Duration> {
    let rest = text.trim().strip_prefix("PT")?;
    let (mut total, mut number) = (0i64, String::new());
    for c in rest.chars() {
        match c {
            '0'..='9' => number.push(c),
            'H' | 'M' | 'S' => {
                let n: i64 = number.parse().ok()?;
                number.clear();
                total += n * match c {
                    'H' => 3600,
                    'M' => 60,
                    _ => 1,
                };
            }
            _ => return None,
        }
    }
    (number.is_empty() && !rest.is_empty()).then_some(time::Duration::seconds(total))
}

/// What the scale set itself looks like.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ScaleSetInfo {
    /// The scale set's resource id as ARM spells it (the Flexible VM list filters by it).
    pub id: Option<String>,
    pub capacity: Option<i64>,
    pub orchestration_mode: Option<String>,
    pub platform_auto_repair: bool,
    /// The version of the scale set, for `If-Match`.
    pub etag: Option<String>,
    pub provisioning_state: Option<String>,
    /// Terminate notifications, when enabled: the notice an instance gets before a delete.
    pub terminate_notice: Option<time::Duration>,
    /// The region, as ARM spells it (`westeurope`).
    pub location: Option<String>,
    /// The model's image: a gallery image's id, or `publisher:offer:sku:version` of a platform
    /// image (a scale set cannot change from one kind to the other).
    pub image: Option<ImageRef>,
}

/// A scale set model's image reference.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageRef {
    /// A gallery image definition (the latest version) or version, or a managed image, by id.
    Custom(String),
    /// A marketplace image: `publisher:offer:sku:version`.
    Platform(String),
}

impl ScaleSetInfo {
    pub fn orchestration(&self) -> Orchestration {
        Orchestration::parse(self.orchestration_mode.as_deref())
    }
}

/// How a long-running operation is followed: ARM's `Azure-AsyncOperation` status resource (a body
/// with `status`), or, failing that, the `Location` URL (202 while it runs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OperationKind {
    AsyncOperation,
    Location,
}

impl OperationKind {
    pub fn as_str(self) -> &'static str {
        match self {
            OperationKind::AsyncOperation => "async_operation",
            OperationKind::Location => "location",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "async_operation" => Some(OperationKind::AsyncOperation),
            "location" => Some(OperationKind::Location),
            _ => None,
        }
    }
}

/// Where to read how a long-running operation went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct OperationRef {
    pub url: String,
    pub kind: OperationKind,
}

/// A long-running operation the Compute API accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    /// Its status URL; `None` when ARM gave none we can follow (the deadline then decides).
    pub operation: Option<OperationRef>,
}

/// A capacity change: what the fresh read said, and what was asked for.
#[derive(Debug, Clone, PartialEq)]
pub struct Grown {
    pub accepted: Accepted,
    pub from: i64,
    pub to: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum OperationState {
    InProgress,
    Succeeded,
    Failed,
    Canceled,
}

/// How a long-running operation stands.
#[derive(Debug, Clone, PartialEq)]
pub struct OperationStatus {
    pub state: OperationState,
    /// When ARM says it ended (its `endTime`), if it did and said so.
    pub ended_at: Option<OffsetDateTime>,
    pub error: Option<ArmError>,
    /// What a finished command wrote to its standard output (a Run Command's result, read from
    /// its `Location`).
    pub output: Option<String>,
}

/// Throttling and volume, observed on every raw response before the SDK turns errors into values
/// (the SDK's errors do not keep headers such as `Retry-After`, and its header map keeps one value
/// per name while Compute sends one `x-ms-ratelimit-remaining-resource` header per policy).
/// Compute throttles per subscription and region, so both are kept per subscription.
#[derive(Debug, Default)]
pub struct Observed {
    calls: AtomicU64,
    by_subscription: Mutex<HashMap<String, Budget>>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Budget {
    /// The tightest policy's remaining count on the last answer, if it said.
    remaining: Option<i64>,
    throttled_until: Option<OffsetDateTime>,
}

impl Observed {
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    fn with<T>(&self, f: impl FnOnce(&mut HashMap<String, Budget>) -> T) -> T {
        let mut map = self
            .by_subscription
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&mut map)
    }

    /// The smallest remaining count of any throttling policy on the subscription's last answer.
    pub fn remaining_budget(&self, subscription: &str) -> Option<i64> {
        self.with(|m| m.get(&subscription.to_ascii_lowercase())?.remaining)
    }

    /// Until when the Compute API asked us to leave the subscription alone.
    pub fn throttled_until(&self, subscription: &str) -> Option<OffsetDateTime> {
        self.with(|m| m.get(&subscription.to_ascii_lowercase())?.throttled_until)
    }

    /// Every subscription throttled beyond `now`, with until when.
    pub fn throttled(&self, now: OffsetDateTime) -> Vec<(String, OffsetDateTime)> {
        self.with(|m| {
            m.iter()
                .filter_map(|(s, b)| {
                    b.throttled_until
                        .filter(|u| *u > now)
                        .map(|u| (s.clone(), u))
                })
                .collect()
        })
    }

    fn record(&self, subscription: &str, remaining: Option<i64>, backoff_s: Option<i64>) {
        self.with(|m| {
            let budget = m.entry(subscription.to_ascii_lowercase()).or_default();
            if remaining.is_some() {
                budget.remaining = remaining;
            }
            if let Some(secs) = backoff_s {
                let until =
                    OffsetDateTime::now_utc() + Duration::seconds(secs.clamp(0, MAX_RETRY_AFTER_S));
                budget.throttled_until =
                    Some(budget.throttled_until.map_or(until, |u| u.max(until)));
            }
        });
    }
}

/// The subscription a Resource Manager URL addresses, lower case.
fn subscription_of(url: &Url) -> String {
    let mut segments = url.path_segments().into_iter().flatten();
    while let Some(s) = segments.next() {
        if s.eq_ignore_ascii_case("subscriptions") {
            return segments.next().unwrap_or_default().to_ascii_lowercase();
        }
    }
    String::new()
}

/// The smallest count across every `x-ms-ratelimit-remaining-resource` value: each is
/// `Policy;count`, several may share one header, and each policy may come in a header of its own.
fn tightest_budget<'a>(values: impl Iterator<Item = &'a str>) -> Option<i64> {
    values
        .flat_map(|v| v.split(','))
        .filter_map(|b| b.rsplit(';').next()?.trim().parse::<i64>().ok())
        .min()
}

/// The HTTP transport under the Compute client: sends with reqwest, as azure_core's own transport
/// does, but reads throttling headers from the raw answer, where repeated headers are still there.
#[derive(Debug)]
struct ObservingTransport {
    inner: reqwest::Client,
    observed: Arc<Observed>,
}

#[async_trait]
impl HttpClient for ObservingTransport {
    async fn execute_request(
        &self,
        request: &azure_core::Request,
    ) -> azure_core::Result<azure_core::Response> {
        let url = request.url().clone();
        let method = reqwest::Method::from_bytes(request.method().as_ref().as_bytes())
            .map_err(|e| azure_core::Error::full(ErrorKind::DataConversion, e, "bad method"))?;
        let mut builder = self.inner.request(method, url.clone());
        for (name, value) in request.headers().iter() {
            builder = builder.header(name.as_str(), value.as_str());
        }
        let body = match request.body() {
            azure_core::Body::Bytes(bytes) => bytes.clone(),
            azure_core::Body::SeekableStream(_) => {
                return Err(azure_core::Error::message(
                    ErrorKind::Other,
                    "streamed request bodies are never sent to the Compute API",
                ))
            }
        };
        let operation = required_action(request.method().as_ref(), url.path()).unwrap_or("other");
        // A dependency in Application Insights; the query (api-version, filters) is left out.
        let span = tracing::info_span!(
            "compute",
            otel.name = %format!("{} {operation}", request.method().as_ref()),
            otel.kind = "client",
            http.request.method = %request.method().as_ref(),
            server.address = url.host_str().unwrap_or(""),
            url.full = %format!("{}{}", url.origin().ascii_serialization(), url.path()),
            http.response.status_code = tracing::field::Empty,
        );
        let sent = builder.body(body).send().instrument(span.clone()).await;
        let response = match sent {
            Ok(r) => r,
            Err(e) => {
                crate::telemetry::compute_call(operation, None);
                return Err(azure_core::Error::full(
                    ErrorKind::Io,
                    e,
                    "failed to execute the Compute request",
                ));
            }
        };
        self.observed.calls.fetch_add(1, Ordering::Relaxed);
        let status = response.status();
        span.record("http.response.status_code", status.as_u16());
        crate::telemetry::compute_call(operation, Some(status.as_u16()));
        let raw = response.headers();
        let remaining = tightest_budget(
            raw.get_all(RATE_LIMIT_HEADER)
                .iter()
                .filter_map(|v| v.to_str().ok()),
        );
        let retry_after = raw
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(|s| i64::try_from(s).unwrap_or(i64::MAX).min(MAX_RETRY_AFTER_S));
        // A 429 always means back off (60 s when unsaid); a 503 only when it says for how long.
        let backoff = match status.as_u16() {
            429 => Some(retry_after.unwrap_or(60).max(1)),
            503 => retry_after,
            _ => None,
        };
        if backoff.is_some() {
            crate::telemetry::throttled(&subscription_of(&url));
        }
        self.observed
            .record(&subscription_of(&url), remaining, backoff);
        let headers: HashMap<azure_core::headers::HeaderName, azure_core::headers::HeaderValue> =
            raw.iter()
                .filter_map(|(k, v)| {
                    Some((
                        azure_core::headers::HeaderName::from(k.as_str().to_owned()),
                        azure_core::headers::HeaderValue::from(v.to_str().ok()?.to_owned()),
                    ))
                })
                .collect();
        let status = StatusCode::try_from(status.as_u16()).map_err(|_| {
            azure_core::Error::message(ErrorKind::DataConversion, "invalid HTTP status")
        })?;
        Ok(azure_core::Response::new(
            status,
            headers.into(),
            Box::pin(response.bytes_stream().map_err(|e| {
                azure_core::Error::full(ErrorKind::Io, e, "reading the Compute answer")
            })),
        ))
    }
}

#[derive(Clone)]
pub struct Compute {
    client: Client,
    observed: Arc<Observed>,
    /// Operation status reads go around the generated client (it has no such call).
    transport: Arc<ObservingTransport>,
    credential: Arc<dyn TokenCredential>,
    endpoint: Url,
}

impl std::fmt::Debug for Compute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compute")
            .field("endpoint", &self.endpoint.as_str())
            .field("observed", &self.observed)
            .finish()
    }
}

impl Compute {
    /// `call_timeout` bounds each request (`HEALER_CALL_TIMEOUT`): a pass must fit its deadline,
    /// and a write without an answer by then has an unknown outcome.
    pub fn new(
        endpoint: &Url,
        credential: Arc<dyn TokenCredential>,
        call_timeout: std::time::Duration,
    ) -> anyhow::Result<Self> {
        let observed = Arc::new(Observed::default());
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5).min(call_timeout))
            .timeout(call_timeout)
            .build()?;
        let transport = Arc::new(ObservingTransport {
            inner: http,
            observed: observed.clone(),
        });
        let client = Client::builder(credential.clone())
            .endpoint(endpoint.clone())
            // ARM's Retry-After is minutes long: never sleep on it inside a call. Throttling is
            // recorded and carried to later passes instead.
            .retry(azure_core::RetryOptions::none())
            .transport(azure_core::TransportOptions::new(transport.clone()))
            .build()?;
        Ok(Compute {
            client,
            observed,
            transport,
            credential,
            endpoint: endpoint.clone(),
        })
    }

    pub fn observed(&self) -> &Observed {
        &self.observed
    }

    fn classify(&self, what: &str, subscription: &str, e: azure_core::Error) -> ComputeError {
        let message = format!("{what}: {e}");
        let arm = |status: StatusCode| {
            let http = e.as_http_error();
            ArmError {
                status: u16::from(status),
                code: http
                    .and_then(|h| h.error_code())
                    .unwrap_or("Unknown")
                    .to_string(),
                message: http
                    .and_then(|h| h.error_message())
                    .map(|m| format!("{what}: {m}"))
                    .unwrap_or_else(|| what.to_string()),
            }
        };
        match e.kind() {
            ErrorKind::HttpResponse { status, .. } => match *status {
                StatusCode::TooManyRequests => ComputeError::Throttled {
                    retry_after_s: self
                        .observed
                        .throttled_until(subscription)
                        .map(|t| (t - OffsetDateTime::now_utc()).whole_seconds().max(1))
                        .unwrap_or(60),
                },
                StatusCode::NotFound => ComputeError::NotFound(message),
                StatusCode::Unauthorized | StatusCode::Forbidden => {
                    ComputeError::Unauthorized(message)
                }
                StatusCode::PreconditionFailed => ComputeError::Stale(arm(*status)),
                // 409 is two things: a concurrent request (try later) or an operation the
                // resource's state forbids (OperationNotAllowed: never as it stands).
                StatusCode::Conflict => {
                    let error = arm(*status);
                    if error.code.eq_ignore_ascii_case("OperationNotAllowed") {
                        ComputeError::Refused(error)
                    } else {
                        ComputeError::Busy(error)
                    }
                }
                s if u16::from(s) >= 500 || s == StatusCode::RequestTimeout => {
                    ComputeError::Transient(message)
                }
                s if u16::from(s) >= 400 => ComputeError::Refused(arm(s)),
                _ => ComputeError::Failed(message),
            },
            ErrorKind::Io => ComputeError::NoAnswer(message),
            ErrorKind::Credential => ComputeError::Unauthorized(message),
            _ => ComputeError::Failed(message),
        }
    }

    /// Runs an idempotent read, retrying once after a transient failure: one 5xx should not
    /// cost a whole timer period of staleness. Throttling is never retried here.
    async fn read<T, F, Fut>(&self, call: F) -> Result<T, ComputeError>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<T, ComputeError>>,
    {
        match call().await {
            Err(ComputeError::Transient(why) | ComputeError::NoAnswer(why)) => {
                tracing::warn!(error = %why, "transient Compute API failure on a read; retrying once");
                tokio::time::sleep(READ_RETRY_DELAY).await;
                call().await
            }
            other => other,
        }
    }

    pub async fn scale_set(&self, id: &ScaleSetId) -> Result<ScaleSetInfo, ComputeError> {
        self.read(|| self.scale_set_once(id)).await
    }

    async fn scale_set_once(&self, id: &ScaleSetId) -> Result<ScaleSetInfo, ComputeError> {
        let response = self
            .client
            .virtual_machine_scale_sets_client()
            .get(&id.resource_group, &id.name, &id.subscription)
            .send()
            .await
            .map_err(|e| self.classify("get scale set", &id.subscription, e))?;
        let header_etag = response
            .as_raw_response()
            .headers()
            .get_optional_string(&azure_core::headers::ETAG);
        let vmss = response
            .into_body()
            .await
            .map_err(|e| self.classify("get scale set", &id.subscription, e))?;
        let props = vmss.properties.as_ref();
        Ok(ScaleSetInfo {
            id: vmss.resource.id.clone(),
            capacity: vmss.sku.as_ref().and_then(|s| s.capacity),
            orchestration_mode: props
                .and_then(|p| p.orchestration_mode.as_ref())
                .and_then(|m| serde_json::to_value(m).ok())
                .and_then(|v| v.as_str().map(str::to_string)),
            platform_auto_repair: props
                .and_then(|p| p.automatic_repairs_policy.as_ref())
                .and_then(|a| a.enabled)
                .unwrap_or(false),
            etag: vmss.etag.clone().or(header_etag),
            provisioning_state: props.and_then(|p| p.provisioning_state.clone()),
            terminate_notice: props
                .and_then(|p| p.virtual_machine_profile.as_ref())
                .and_then(|v| v.scheduled_events_profile.as_ref())
                .and_then(|s| s.terminate_notification_profile.as_ref())
                .filter(|t| t.enable.unwrap_or(false))
                .and_then(|t| t.not_before_timeout.as_deref())
                .and_then(iso_duration),
            location: Some(vmss.resource.location.to_ascii_lowercase()).filter(|l| !l.is_empty()),
            image: props
                .and_then(|p| p.virtual_machine_profile.as_ref())
                .and_then(|v| v.storage_profile.as_ref())
                .and_then(|s| s.image_reference.as_ref())
                .and_then(|i| {
                    let id = i.sub_resource.id.clone().filter(|id| !id.is_empty());
                    match id {
                        Some(id) => Some(ImageRef::Custom(id)),
                        None => Some(ImageRef::Platform(format!(
                            "{}:{}:{}:{}",
                            i.publisher.as_deref()?,
                            i.offer.as_deref()?,
                            i.sku.as_deref()?,
                            i.version.as_deref().unwrap_or("latest")
                        ))),
                    }
                }),
        })
    }

    /// Every instance of the scale set, with its instance view, following `nextLink` to the end:
    /// Uniform instances through the scale-set VM list, Flexible VMs through the VM list of the
    /// set's resource group filtered by the set, with their instance views (one paged list
    /// either way; docs/benchmarks.md compares the alternatives).
    pub async fn instances(
        &self,
        id: &ScaleSetId,
        info: &ScaleSetInfo,
    ) -> Result<Vec<Instance>, ComputeError> {
        match info.orchestration() {
            Orchestration::Uniform => self.read(|| self.instances_once(id)).await,
            Orchestration::Flexible => {
                let arm_id = info.id.clone().unwrap_or_else(|| id.resource_id());
                self.read(|| self.flexible_instances_once(id, &arm_id))
                    .await
            }
        }
    }

    async fn flexible_instances_once(
        &self,
        id: &ScaleSetId,
        arm_id: &str,
    ) -> Result<Vec<Instance>, ComputeError> {
        // The one filter the VM list takes, as cloud-provider-azure sends it; `$expand` is only
        // allowed with it (REST spec 2024-07-01, `virtual_machines::list`).
        let mut pages = self
            .client
            .virtual_machines_client()
            .list(&id.resource_group, &id.subscription)
            .filter(format!("'virtualMachineScaleSet/id' eq '{arm_id}'"))
            .expand("instanceView")
            .into_stream();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.classify("list VMs", &id.subscription, e))?;
            out.extend(
                page.value
                    .into_iter()
                    // The filter is the server's; membership is checked here too.
                    .filter(|vm| member_of(vm, arm_id))
                    .filter_map(to_flexible_instance),
            );
        }
        Ok(out)
    }

    /// The management locks of the scale set's resource group and of everything in it (one
    /// paged list: Resource Manager's locks at resource group level,
    /// `Microsoft.Authorization/locks`, api-version 2016-09-01). What protection is to a Uniform
    /// instance, a lock is to a Flexible one.
    pub async fn locks(&self, id: &ScaleSetId) -> Result<Vec<Lock>, ComputeError> {
        self.read(|| self.locks_once(id)).await
    }

    async fn locks_once(&self, id: &ScaleSetId) -> Result<Vec<Lock>, ComputeError> {
        let pages = self
            .list_pages(
                "list resource locks",
                &format!(
                    "subscriptions/{}/resourceGroups/{}/providers/Microsoft.Authorization/locks?api-version={LOCKS_API_VERSION}",
                    id.subscription, id.resource_group
                ),
                MAX_LOCK_PAGES,
            )
            .await
            // A lock list that is not there says nothing of the scale set, which the mirror
            // would otherwise take for deleted.
            .map_err(|e| match e {
                ComputeError::NotFound(why) => ComputeError::Failed(why),
                other => other,
            })?;
        Ok(pages.iter().flat_map(parse_locks).collect())
    }

    /// The autoscale settings of a resource group (one paged list; Azure Monitor's
    /// "Autoscale Settings - List By Resource Group", api-version 2022-10-01).
    pub async fn autoscale_settings(
        &self,
        subscription: &str,
        resource_group: &str,
    ) -> Result<Vec<AutoscaleSetting>, ComputeError> {
        let path = format!(
            "subscriptions/{subscription}/resourceGroups/{resource_group}/providers/Microsoft.Insights/autoscalesettings?api-version={AUTOSCALE_API_VERSION}"
        );
        let pages = self
            .read(|| self.list_pages("list autoscale settings", &path, MAX_AUTOSCALE_PAGES))
            .await?;
        Ok(pages
            .into_iter()
            .flat_map(|mut page| match page["value"].take() {
                serde_json::Value::Array(items) => items,
                _ => Vec::new(),
            })
            .filter_map(AutoscaleSetting::from_arm)
            .collect())
    }

    /// Creates or replaces an autoscale setting (PUT; synchronous: 200 or 201 with the resource).
    pub async fn put_autoscale(
        &self,
        subscription: &str,
        resource_group: &str,
        name: &str,
        body: &serde_json::Value,
    ) -> Result<(), ComputeError> {
        let path = autoscale_path(subscription, resource_group, name);
        self.call_json(
            "write autoscale setting",
            azure_core::Method::Put,
            &path,
            Some(body),
        )
        .await
        .map(|_| ())
    }

    /// Deletes an autoscale setting (a swap's rollback, of one it created).
    pub async fn delete_autoscale(
        &self,
        subscription: &str,
        resource_group: &str,
        name: &str,
    ) -> Result<(), ComputeError> {
        let path = autoscale_path(subscription, resource_group, name);
        self.call_json(
            "delete autoscale setting",
            azure_core::Method::Delete,
            &path,
            None,
        )
        .await
        .map(|_| ())
    }

    /// Every page of a Resource Manager list, following `nextLink` only on the Resource Manager
    /// endpoint (as for operation status URLs), at most `max_pages`.
    async fn list_pages(
        &self,
        what: &str,
        path: &str,
        max_pages: usize,
    ) -> Result<Vec<serde_json::Value>, ComputeError> {
        let mut next = path.to_string();
        let mut pages = Vec::new();
        for _ in 0..max_pages {
            let page = self
                .call_json(what, azure_core::Method::Get, &next, None)
                .await?;
            let link = page["nextLink"].as_str().and_then(|u| self.follow_url(u));
            pages.push(page);
            match link {
                Some(url) => next = url.to_string(),
                None => return Ok(pages),
            }
        }
        Err(ComputeError::Failed(format!(
            "{what}: more than {max_pages} pages"
        )))
    }

    /// One Resource Manager request outside the Compute SDK, on the same transport (throttling
    /// observed, the call counted) with the same credential: a path under the endpoint, or a URL
    /// on it. Answers the JSON body; an error is classified as the SDK's are.
    pub(super) async fn call_json(
        &self,
        what: &str,
        method: azure_core::Method,
        path_or_url: &str,
        body: Option<&serde_json::Value>,
    ) -> Result<serde_json::Value, ComputeError> {
        let url = match self.follow_url(path_or_url) {
            Some(url) => url,
            None => self
                .endpoint
                .join(path_or_url.trim_start_matches('/'))
                .map_err(|e| ComputeError::Failed(format!("{what}: {e}")))?,
        };
        let subscription = subscription_of(&url);
        let scope = format!("{}/.default", self.endpoint.as_str().trim_end_matches('/'));
        let token = self
            .credential
            .get_token(&[scope.as_str()])
            .await
            .map_err(|e| self.classify(what, &subscription, e))?;
        let mut request = azure_core::Request::new(url, method);
        request.insert_header(
            azure_core::headers::AUTHORIZATION,
            format!("Bearer {}", token.token.secret()),
        );
        if let Some(body) = body {
            request.insert_header(azure_core::headers::CONTENT_TYPE, "application/json");
            request.set_body(body.to_string());
        }
        let response = self
            .transport
            .execute_request(&request)
            .await
            .map_err(|e| self.classify(what, &subscription, e))?;
        let status = u16::from(response.status());
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| self.classify(what, &subscription, e))?;
        let answer: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        if (200..300).contains(&status) {
            return Ok(answer);
        }
        let error = ArmError {
            status,
            code: answer["error"]["code"].as_str().unwrap_or("").to_string(),
            message: answer["error"]["message"]
                .as_str()
                .unwrap_or("")
                .chars()
                .take(500)
                .collect(),
        };
        Err(match status {
            429 => ComputeError::Throttled {
                retry_after_s: self
                    .observed
                    .throttled_until(&subscription)
                    .map(|t| (t - OffsetDateTime::now_utc()).whole_seconds().max(1))
                    .unwrap_or(60),
            },
            404 => ComputeError::NotFound(format!("{what}: {error}")),
            401 | 403 => ComputeError::Unauthorized(format!("{what}: {error}")),
            412 => ComputeError::Stale(error),
            409 if !error.code.eq_ignore_ascii_case("OperationNotAllowed") => {
                ComputeError::Busy(error)
            }
            s if s >= 500 || s == 408 => ComputeError::Transient(format!("{what}: {error}")),
            _ => ComputeError::Refused(error),
        })
    }

    async fn instances_once(&self, id: &ScaleSetId) -> Result<Vec<Instance>, ComputeError> {
        let mut pages = self
            .client
            .virtual_machine_scale_set_v_ms_client()
            .list(&id.resource_group, &id.name, &id.subscription)
            .expand("instanceView")
            .into_stream();
        let mut out = Vec::new();
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| self.classify("list instances", &id.subscription, e))?;
            out.extend(page.value.into_iter().filter_map(to_instance));
        }
        Ok(out)
    }

    pub async fn delete_instances(
        &self,
        id: &ScaleSetId,
        instance_ids: &[String],
    ) -> Result<Accepted, ComputeError> {
        let response = self
            .client
            .virtual_machine_scale_sets_client()
            .delete_instances(
                &id.resource_group,
                &id.name,
                models::VirtualMachineScaleSetVmInstanceRequiredIDs::new(instance_ids.to_vec()),
                &id.subscription,
            )
            .send()
            .await
            .map_err(|e| self.classify("delete instances", &id.subscription, e))?;
        Ok(self.accepted(response.as_raw_response()))
    }

    pub async fn restart_instances(
        &self,
        id: &ScaleSetId,
        instance_ids: &[String],
        mode: Orchestration,
    ) -> Result<Accepted, ComputeError> {
        match mode {
            Orchestration::Uniform => self.power(id, instance_ids, Power::Restart).await,
            Orchestration::Flexible => self.vm_action(id, instance_ids, VmAction::Restart).await,
        }
    }

    /// Starts stopped or deallocated instances (a restart of one is refused by Azure).
    pub async fn start_instances(
        &self,
        id: &ScaleSetId,
        instance_ids: &[String],
        mode: Orchestration,
    ) -> Result<Accepted, ComputeError> {
        match mode {
            Orchestration::Uniform => self.power(id, instance_ids, Power::Start).await,
            Orchestration::Flexible => self.vm_action(id, instance_ids, VmAction::Start).await,
        }
    }

    /// Moves instances to other hosts and starts them there (a fault of the host, not the VM).
    pub async fn redeploy_instances(
        &self,
        id: &ScaleSetId,
        instance_ids: &[String],
        mode: Orchestration,
    ) -> Result<Accepted, ComputeError> {
        match mode {
            Orchestration::Uniform => self.power(id, instance_ids, Power::Redeploy).await,
            Orchestration::Flexible => self.vm_action(id, instance_ids, VmAction::Redeploy).await,
        }
    }

    /// A Flexible scale set's VM is acted on with the VM API, one VM per call ("Orchestration
    /// modes API comparison": restart, start, reimage → "Invoke Single VM API"); the VM lives
    /// in its scale set's resource group.
    async fn vm_action(
        &self,
        id: &ScaleSetId,
        names: &[String],
        action: VmAction,
    ) -> Result<Accepted, ComputeError> {
        let [name] = names else {
            return Err(ComputeError::Failed(format!(
                "{} VMs in one call: a Flexible scale set's VMs are acted on one per call",
                names.len()
            )));
        };
        let vms = self.client.virtual_machines_client();
        let (rg, sub) = (&id.resource_group, &id.subscription);
        let sent = match action {
            VmAction::Restart => vms
                .restart(rg, name, sub)
                .send()
                .await
                .map(|r| r.into_raw_response()),
            VmAction::Start => vms
                .start(rg, name, sub)
                .send()
                .await
                .map(|r| r.into_raw_response()),
            VmAction::Reimage => vms
                .reimage(rg, name, sub)
                .send()
                .await
                .map(|r| r.into_raw_response()),
            VmAction::Redeploy => vms
                .redeploy(rg, name, sub)
                .send()
                .await
                .map(|r| r.into_raw_response()),
        };
        let response = sent.map_err(|e| self.classify(action.what(), sub, e))?;
        Ok(self.accepted(&response))
    }

    async fn power(
        &self,
        id: &ScaleSetId,
        instance_ids: &[String],
        power: Power,
    ) -> Result<Accepted, ComputeError> {
        let mut ids = models::VirtualMachineScaleSetVmInstanceIDs::new();
        ids.instance_ids = instance_ids.to_vec();
        let client = self.client.virtual_machine_scale_sets_client();
        let (what, sent) = match power {
            Power::Restart => (
                "restart instances",
                client
                    .restart(&id.resource_group, &id.name, &id.subscription)
                    .vm_instance_i_ds(ids)
                    .send()
                    .await
                    .map(|r| r.into_raw_response()),
            ),
            Power::Start => (
                "start instances",
                client
                    .start(&id.resource_group, &id.name, &id.subscription)
                    .vm_instance_i_ds(ids)
                    .send()
                    .await
                    .map(|r| r.into_raw_response()),
            ),
            Power::Redeploy => (
                "redeploy instances",
                client
                    .redeploy(&id.resource_group, &id.name, &id.subscription)
                    .vm_instance_i_ds(ids)
                    .send()
                    .await
                    .map(|r| r.into_raw_response()),
            ),
        };
        let response = sent.map_err(|e| self.classify(what, &id.subscription, e))?;
        Ok(self.accepted(&response))
    }

    pub async fn reimage_instances(
        &self,
        id: &ScaleSetId,
        instance_ids: &[String],
        mode: Orchestration,
    ) -> Result<Accepted, ComputeError> {
        if mode == Orchestration::Flexible {
            return self.vm_action(id, instance_ids, VmAction::Reimage).await;
        }
        let mut params = models::VirtualMachineScaleSetReimageParameters::new();
        params.instance_ids = instance_ids.to_vec();
        let response = self
            .client
            .virtual_machine_scale_sets_client()
            .reimage(&id.resource_group, &id.name, &id.subscription)
            .vm_scale_set_reimage_input(params)
            .send()
            .await
            .map_err(|e| self.classify("reimage instances", &id.subscription, e))?;
        Ok(self.accepted(response.as_raw_response()))
    }

    /// Brings instances to the scale set's latest model (`manualupgrade`, the REST spec's
    /// `VirtualMachineScaleSets_UpdateInstances`): what a scale set with a manual upgrade policy
    /// needs after its model changed. Uniform only (a Flexible set's is in preview).
    pub async fn upgrade_instances(
        &self,
        id: &ScaleSetId,
        instance_ids: &[String],
    ) -> Result<Accepted, ComputeError> {
        let response = self
            .client
            .virtual_machine_scale_sets_client()
            .update_instances(
                &id.resource_group,
                &id.name,
                models::VirtualMachineScaleSetVmInstanceRequiredIDs::new(instance_ids.to_vec()),
                &id.subscription,
            )
            .send()
            .await
            .map_err(|e| self.classify("upgrade instances", &id.subscription, e))?;
        Ok(self.accepted(response.as_raw_response()))
    }

    /// Adds `n` instances: reads the scale set afresh and raises its capacity by `n` from what it
    /// is now, with `If-Match` on the version read, so a change by autoscale or an operator in
    /// between is never overwritten (412 ⇒ [`ComputeError::Stale`]). A scale set that is already
    /// changing is left alone ([`ComputeError::Busy`]), as cluster-autoscaler does.
    pub async fn grow(&self, id: &ScaleSetId, n: u32) -> Result<Grown, ComputeError> {
        self.resize(id, "grow scale set", |from| Ok(from + i64::from(n)))
            .await
    }

    /// Sets the capacity to `to`, reading the scale set afresh and writing with `If-Match` on it.
    /// With `expect`, a capacity that is not that any more (autoscale or an operator changed it
    /// since it was decided on) is refused (`CapacityChanged`): nothing is written.
    pub async fn set_capacity(
        &self,
        id: &ScaleSetId,
        to: u32,
        expect: Option<u32>,
    ) -> Result<Grown, ComputeError> {
        self.resize(id, "set scale set capacity", |from| match expect {
            Some(e) if i64::from(e) != from => Err(ComputeError::Refused(ArmError {
                status: 409,
                code: "CapacityChanged".into(),
                message: format!("the capacity is {from}, not the {e} it was decided on"),
            })),
            _ => Ok(i64::from(to)),
        })
        .await
    }

    async fn resize(
        &self,
        id: &ScaleSetId,
        what: &str,
        to: impl FnOnce(i64) -> Result<i64, ComputeError>,
    ) -> Result<Grown, ComputeError> {
        let info = self.scale_set(id).await?;
        if info
            .provisioning_state
            .as_deref()
            .is_some_and(|p| p.eq_ignore_ascii_case("updating"))
        {
            return Err(ComputeError::Busy(ArmError {
                status: 200,
                code: "ScaleSetUpdating".into(),
                message: "the scale set is Updating: another change of it runs".into(),
            }));
        }
        let (Some(from), Some(etag)) = (info.capacity, info.etag) else {
            return Err(ComputeError::Failed(
                "the scale set reported no capacity or no ETag; a capacity change without If-Match could override a concurrent one".into(),
            ));
        };
        let to = to(from)?;
        let mut update = models::VirtualMachineScaleSetUpdate::new();
        update.sku = Some(models::Sku {
            name: None,
            tier: None,
            capacity: Some(to),
        });
        let response = self
            .client
            .virtual_machine_scale_sets_client()
            .update(&id.resource_group, &id.name, update, &id.subscription)
            .if_match(etag)
            .send()
            .await
            .map_err(|e| self.classify(what, &id.subscription, e))?;
        Ok(Grown {
            accepted: self.accepted(response.as_raw_response()),
            from,
            to,
        })
    }

    /// Reads how a long-running operation stands. The URL came from ARM's answer, so it is only
    /// followed on the Resource Manager endpoint itself: our token never goes anywhere else.
    pub async fn operation_status(
        &self,
        operation: &OperationRef,
    ) -> Result<OperationStatus, ComputeError> {
        let url = self.follow_url(&operation.url).ok_or_else(|| {
            ComputeError::Failed(format!(
                "operation URL {} is not on the Resource Manager endpoint {}",
                operation.url, self.endpoint
            ))
        })?;
        let subscription = subscription_of(&url);
        let what = "read operation status";
        let scope = format!("{}/.default", self.endpoint.as_str().trim_end_matches('/'));
        let token = self
            .credential
            .get_token(&[scope.as_str()])
            .await
            .map_err(|e| self.classify(what, &subscription, e))?;
        let mut request = azure_core::Request::new(url, azure_core::Method::Get);
        request.insert_header(
            azure_core::headers::AUTHORIZATION,
            format!("Bearer {}", token.token.secret()),
        );
        let response = self
            .transport
            .execute_request(&request)
            .await
            .map_err(|e| self.classify(what, &subscription, e))?;
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| self.classify(what, &subscription, e))?;
        parse_operation_status(operation.kind, u16::from(status), &body).map_err(|e| match e {
            StatusError::Http(status, error) => match status {
                429 => ComputeError::Throttled {
                    retry_after_s: self
                        .observed
                        .throttled_until(&subscription)
                        .map(|t| (t - OffsetDateTime::now_utc()).whole_seconds().max(1))
                        .unwrap_or(60),
                },
                404 => ComputeError::NotFound(format!("{what}: {error}")),
                s if s >= 500 => ComputeError::Transient(format!("{what}: {error}")),
                _ => ComputeError::Refused(error),
            },
            StatusError::Unreadable(why) => ComputeError::Failed(format!("{what}: {why}")),
        })
    }

    /// The URL if it is on our Resource Manager endpoint (same scheme, host and port).
    fn follow_url(&self, raw: &str) -> Option<Url> {
        let url = Url::parse(raw).ok()?;
        (url.scheme() == self.endpoint.scheme()
            && url.host_str() == self.endpoint.host_str()
            && url.port_or_known_default() == self.endpoint.port_or_known_default())
        .then_some(url)
    }

    fn accepted(&self, response: &azure_core::Response) -> Accepted {
        let header = |name: &'static str| {
            response
                .headers()
                .get_optional_string(&azure_core::headers::HeaderName::from_static(name))
        };
        let operation = header("azure-asyncoperation")
            .map(|url| (url, OperationKind::AsyncOperation))
            .or_else(|| header("location").map(|url| (url, OperationKind::Location)));
        let operation = match operation {
            Some((url, kind)) if self.follow_url(&url).is_some() => {
                Some(OperationRef { url, kind })
            }
            Some((url, _)) => {
                tracing::warn!(operation = %url, "ignored an operation URL outside the Resource Manager endpoint; the repair deadline decides instead");
                None
            }
            None => None,
        };
        Accepted { operation }
    }
}

#[derive(Clone, Copy)]
enum Power {
    Restart,
    Start,
    Redeploy,
}

/// What the VM API is asked to do to one Flexible VM.
#[derive(Debug, Clone, Copy)]
enum VmAction {
    Restart,
    Start,
    Reimage,
    Redeploy,
}

impl VmAction {
    fn what(self) -> &'static str {
        match self {
            VmAction::Restart => "restart VM",
            VmAction::Start => "start VM",
            VmAction::Reimage => "reimage VM",
            VmAction::Redeploy => "redeploy VM",
        }
    }
}

enum StatusError {
    Http(u16, ArmError),
    Unreadable(String),
}

/// Reads an operation status answer. `Azure-AsyncOperation`: a body whose `status` is
/// `InProgress`, `Succeeded`, `Failed` or `Canceled` (any other value: still running), with
/// `error.code` / `error.message` when it failed. `Location`: 202 while it runs, 200 or 204 once done.
fn parse_operation_status(
    kind: OperationKind,
    status: u16,
    body: &[u8],
) -> Result<OperationStatus, StatusError> {
    let json: serde_json::Value = serde_json::from_slice(body).unwrap_or(serde_json::Value::Null);
    let error = |fallback_code: &str| {
        let e = json.get("error").unwrap_or(&json);
        ArmError {
            status,
            code: e
                .get("code")
                .and_then(|c| c.as_str())
                .unwrap_or(fallback_code)
                .to_string(),
            message: e
                .get("message")
                .and_then(|m| m.as_str())
                .unwrap_or("")
                .chars()
                .take(1024)
                .collect(),
        }
    };
    // A `Location` of an operation that failed answers with the operation's own error, a 4xx
    // (ARM's asynchronous operations: the final GET returns the failure) — unlike a URL that is
    // gone (404), a throttle (429) or a server error, which are the poll's.
    if kind == OperationKind::Location
        && (400..500).contains(&status)
        && ![404, 408, 429].contains(&status)
    {
        return Ok(OperationStatus {
            state: OperationState::Failed,
            ended_at: None,
            error: Some(error("Failed")),
            output: None,
        });
    }
    if status >= 400 {
        return Err(StatusError::Http(status, error("Unknown")));
    }
    let ended_at = json
        .get("endTime")
        .and_then(|t| t.as_str())
        .and_then(|t| OffsetDateTime::parse(t, &Rfc3339).ok());
    if kind == OperationKind::Location {
        return Ok(match status {
            202 => OperationStatus {
                state: OperationState::InProgress,
                ended_at: None,
                error: None,
                output: None,
            },
            _ => OperationStatus {
                state: OperationState::Succeeded,
                ended_at,
                error: None,
                // A RunCommandResult: `ComponentStatus/StdOut/…` carries the output.
                output: json["value"].as_array().and_then(|statuses| {
                    statuses
                        .iter()
                        .find(|s| {
                            s["code"]
                                .as_str()
                                .is_some_and(|c| c.starts_with("ComponentStatus/StdOut"))
                        })
                        .and_then(|s| s["message"].as_str())
                        .map(|m| m.chars().take(4096).collect())
                }),
            },
        });
    }
    let Some(state) = json.get("status").and_then(|s| s.as_str()) else {
        return Err(StatusError::Unreadable(format!(
            "HTTP {status} without a status in its body"
        )));
    };
    let state = match state.to_ascii_lowercase().as_str() {
        "succeeded" => OperationState::Succeeded,
        "failed" => OperationState::Failed,
        "canceled" | "cancelled" => OperationState::Canceled,
        _ => OperationState::InProgress,
    };
    let error = matches!(state, OperationState::Failed | OperationState::Canceled).then(|| {
        error(if state == OperationState::Canceled {
            "Canceled"
        } else {
            "Failed"
        })
    });
    Ok(OperationStatus {
        state,
        ended_at,
        error,
        output: None,
    })
}

/// Converts an ARM scale-set VM into a mirrored instance; `None` without an instance id.
/// The management locks of a page of Resource Manager's lock list: each lock's id is the id of
/// the resource it is on, followed by `/providers/Microsoft.Authorization/locks/<name>`. A lock of
/// an unknown level is taken as `ReadOnly`, the stricter.
fn autoscale_path(subscription: &str, resource_group: &str, name: &str) -> String {
    format!(
        "subscriptions/{subscription}/resourceGroups/{resource_group}/providers/Microsoft.Insights/autoscalesettings/{name}?api-version={AUTOSCALE_API_VERSION}"
    )
}

fn parse_locks(page: &serde_json::Value) -> Vec<Lock> {
    const MARK: &str = "/providers/microsoft.authorization/locks/";
    page["value"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|l| {
            let id = l["id"].as_str()?.to_ascii_lowercase();
            let scope = id.split_once(MARK)?.0.trim_end_matches('/').to_string();
            let level = match l["properties"]["level"].as_str() {
                Some(level) if level.eq_ignore_ascii_case("CanNotDelete") => {
                    LockLevel::CanNotDelete
                }
                _ => LockLevel::ReadOnly,
            };
            Some(Lock { scope, level })
        })
        .collect()
}

/// Whether a listed VM belongs to the scale set (`properties.virtualMachineScaleSet.id`).
fn member_of(vm: &models::VirtualMachine, arm_id: &str) -> bool {
    vm.properties
        .as_ref()
        .and_then(|p| p.virtual_machine_scale_set.as_ref())
        .and_then(|s| s.id.as_deref())
        .is_some_and(|set| {
            set.trim_end_matches('/')
                .eq_ignore_ascii_case(arm_id.trim_end_matches('/'))
        })
}

/// A Flexible scale set's VM: keyed by its name in lower case (design §3); no instance
/// protection (Azure's alternative is a resource lock) and no model version to be behind on.
pub fn to_flexible_instance(vm: models::VirtualMachine) -> Option<Instance> {
    let instance_id = vm.resource.name.as_deref()?.to_ascii_lowercase();
    if instance_id.is_empty() {
        return None;
    }
    let props = vm.properties;
    let view = props.as_ref().and_then(|p| p.instance_view.as_ref());
    let statuses = view.map(|v| v.statuses.as_slice()).unwrap_or_default();
    Some(Instance {
        instance_id,
        vm_id: props
            .as_ref()
            .and_then(|p| p.vm_id.clone())
            .map(|v| v.to_ascii_lowercase()),
        computer_name: props
            .as_ref()
            .and_then(|p| p.os_profile.as_ref())
            .and_then(|o| o.computer_name.clone())
            .or_else(|| view.and_then(|v| v.computer_name.clone())),
        provisioning_state: props.as_ref().and_then(|p| p.provisioning_state.clone()),
        power_state: status_after(statuses, "PowerState/"),
        health: health_of(view.and_then(|v| v.vm_health.as_ref())),
        health_since: None,
        latest_model_applied: None,
        protected_from_scale_set_actions: false,
        protected_from_scale_in: false,
        delete_locked: false,
        zone: vm.zones.first().cloned(),
        created_at: props
            .as_ref()
            .and_then(|p| p.time_created)
            .map(crate::mirror::at_storage_precision),
        provisioned_at: provisioned_at(statuses),
        data_disks: props
            .as_ref()
            .and_then(|p| p.storage_profile.as_ref())
            .map(|s| data_disks(&s.data_disks))
            .unwrap_or_default(),
    })
}

/// A VM's managed data disks as (LUN, disk id); disks being detached are not its any more.
fn data_disks(disks: &[models::DataDisk]) -> Vec<(u32, String)> {
    disks
        .iter()
        .filter(|d| d.to_be_detached != Some(true))
        .filter_map(|d| {
            let lun = u32::try_from(d.lun).ok()?;
            let id = d.managed_disk.as_ref()?.sub_resource.id.clone()?;
            Some((lun, id))
        })
        .collect()
}

/// The rest of the first status code that starts with `prefix` (`PowerState/running` → `running`).
fn status_after(statuses: &[models::InstanceViewStatus], prefix: &str) -> Option<String> {
    statuses
        .iter()
        .filter_map(|s| s.code.as_deref())
        .find_map(|c| c.strip_prefix(prefix).map(str::to_string))
}

fn health_of(health: Option<&models::VirtualMachineHealthStatus>) -> Option<AppHealth> {
    health
        .and_then(|h| h.status.as_ref())
        .and_then(|s| s.code.as_deref())
        .and_then(AppHealth::from_code)
}

/// When the last operation on the instance ended: the time of its `ProvisioningState/…` status.
fn provisioned_at(statuses: &[models::InstanceViewStatus]) -> Option<OffsetDateTime> {
    statuses
        .iter()
        .find(|s| {
            s.code
                .as_deref()
                .is_some_and(|c| c.starts_with("ProvisioningState/"))
        })
        .and_then(|s| s.time)
        .map(crate::mirror::at_storage_precision)
}

pub fn to_instance(vm: models::VirtualMachineScaleSetVm) -> Option<Instance> {
    let instance_id = vm.instance_id?.to_ascii_lowercase();
    let props = vm.properties;
    let view = props.as_ref().and_then(|p| p.instance_view.as_ref());
    let statuses = view.map(|v| v.statuses.as_slice()).unwrap_or_default();
    let protection = props.as_ref().and_then(|p| p.protection_policy.as_ref());
    Some(Instance {
        instance_id,
        vm_id: props
            .as_ref()
            .and_then(|p| p.vm_id.clone())
            .map(|v| v.to_ascii_lowercase()),
        computer_name: props
            .as_ref()
            .and_then(|p| p.os_profile.as_ref())
            .and_then(|o| o.computer_name.clone())
            .or_else(|| view.and_then(|v| v.computer_name.clone())),
        provisioning_state: props.as_ref().and_then(|p| p.provisioning_state.clone()),
        power_state: status_after(statuses, "PowerState/"),
        health: health_of(view.and_then(|v| v.vm_health.as_ref())),
        health_since: None,
        latest_model_applied: props.as_ref().and_then(|p| p.latest_model_applied),
        protected_from_scale_set_actions: protection
            .and_then(|p| p.protect_from_scale_set_actions)
            .unwrap_or(false),
        protected_from_scale_in: protection
            .and_then(|p| p.protect_from_scale_in)
            .unwrap_or(false),
        delete_locked: false,
        zone: vm.zones.first().cloned(),
        created_at: props
            .as_ref()
            .and_then(|p| p.time_created)
            .map(crate::mirror::at_storage_precision),
        provisioned_at: provisioned_at(statuses),
        data_disks: props
            .as_ref()
            .and_then(|p| p.storage_profile.as_ref())
            .map(|s| data_disks(&s.data_disks))
            .unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arm_timeouts_read_as_iso_8601_durations() {
        for (text, seconds) in [
            ("PT5M", Some(300)),
            ("PT15M", Some(900)),
            ("PT1H30M", Some(5400)),
            ("PT90S", Some(90)),
        ] {
            assert_eq!(
                iso_duration(text).map(|d| d.whole_seconds()),
                seconds,
                "{text}"
            );
        }
        for bad in ["5M", "PT", "PT5", "PT5X", "P1D"] {
            assert_eq!(iso_duration(bad), None, "{bad}");
        }
    }

    #[test]
    fn each_request_maps_to_the_action_resource_manager_checks() {
        let set = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/web";
        let vms = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines";
        let cases = [
            ("GET", set.to_string(), Some(REQUIRED_ACTIONS[0])),
            (
                "GET",
                format!("{set}/virtualMachines"),
                Some(REQUIRED_ACTIONS[1]),
            ),
            (
                "GET",
                format!("{set}/virtualMachines/3"),
                Some(REQUIRED_ACTIONS[1]),
            ),
            ("PATCH", set.to_string(), Some(REQUIRED_ACTIONS[2])),
            ("POST", format!("{set}/delete"), Some(REQUIRED_ACTIONS[3])),
            ("POST", format!("{set}/reimage"), Some(REQUIRED_ACTIONS[4])),
            ("POST", format!("{set}/restart"), Some(REQUIRED_ACTIONS[5])),
            ("POST", format!("{set}/start"), Some(REQUIRED_ACTIONS[6])),
            (
                "POST",
                format!("{set}/redeploy"),
                Some(SCALE_SET_ACTIONS[7]),
            ),
            (
                "POST",
                format!("{vms}/web_1a2b3c4d/redeploy"),
                Some(FLEXIBLE_GROUP_ACTIONS[5]),
            ),
            (
                "GET",
                "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Authorization/locks".into(),
                Some(FLEXIBLE_GROUP_ACTIONS[4]),
            ),
            (
                "GET",
                "/subscriptions/s/providers/Microsoft.Compute/locations/westeurope/operations/1"
                    .into(),
                Some(RESOURCE_GROUP_ACTIONS[0]),
            ),
            // A Flexible scale set's VMs, at their resource group.
            ("GET", vms.to_string(), Some(FLEXIBLE_GROUP_ACTIONS[0])),
            (
                "POST",
                format!("{vms}/web_1a2b3c4d/restart"),
                Some(FLEXIBLE_GROUP_ACTIONS[1]),
            ),
            (
                "POST",
                format!("{vms}/web_1a2b3c4d/start"),
                Some(FLEXIBLE_GROUP_ACTIONS[2]),
            ),
            (
                "POST",
                format!("{vms}/web_1a2b3c4d/reimage"),
                Some(FLEXIBLE_GROUP_ACTIONS[3]),
            ),
            // A swap's autoscale settings, at their resource group.
            (
                "GET",
                "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Insights/autoscalesettings"
                    .into(),
                Some(AUTOSCALE_ACTIONS[0]),
            ),
            (
                "PUT",
                "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Insights/autoscalesettings/as-web"
                    .into(),
                Some(AUTOSCALE_ACTIONS[1]),
            ),
            (
                "DELETE",
                "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Insights/autoscalesettings/as-web"
                    .into(),
                Some(AUTOSCALE_ACTIONS[2]),
            ),
            // Requests we never make are not covered: deleting the scale set or a VM, powering
            // off.
            ("DELETE", set.to_string(), None),
            ("DELETE", format!("{vms}/web_1a2b3c4d"), None),
            ("POST", format!("{set}/poweroff"), None),
            ("POST", format!("{vms}/web_1a2b3c4d/poweroff"), None),
        ];
        for (method, path, want) in cases {
            assert_eq!(required_action(method, &path), want, "{method} {path}");
        }
    }

    #[test]
    fn the_tightest_budget_across_every_header_and_policy_wins() {
        let headers = [
            "Microsoft.Compute/GetVMScaleSet3Min;7",
            "Microsoft.Compute/GetVMScaleSet30Min;900",
        ];
        assert_eq!(tightest_budget(headers.iter().copied()), Some(7));
        assert_eq!(
            tightest_budget(
                ["Microsoft.Compute/PutVM3Min;237,Microsoft.Compute/PutVM30Min;1188"].into_iter()
            ),
            Some(237),
            "several policies in one header"
        );
        assert_eq!(tightest_budget(["garbage"].into_iter()), None);
    }

    #[test]
    fn operation_statuses_read_as_arm_writes_them() {
        use OperationKind::*;
        let read = |kind, status, body: &str| match parse_operation_status(
            kind,
            status,
            body.as_bytes(),
        ) {
            Ok(s) => Ok((s.state, s.error.map(|e| e.code), s.ended_at.is_some())),
            Err(StatusError::Http(s, e)) => Err(format!("{s} {}", e.code)),
            Err(StatusError::Unreadable(w)) => Err(w),
        };
        assert_eq!(
            read(AsyncOperation, 200, r#"{"status":"InProgress"}"#),
            Ok((OperationState::InProgress, None, false))
        );
        assert_eq!(
            read(
                AsyncOperation,
                200,
                r#"{"status":"Succeeded","endTime":"2026-11-22T10:00:00Z"}"#
            ),
            Ok((OperationState::Succeeded, None, true))
        );
        assert_eq!(
            read(
                AsyncOperation,
                200,
                r#"{"status":"Failed","error":{"code":"OperationPreempted","message":"m"}}"#
            ),
            Ok((
                OperationState::Failed,
                Some("OperationPreempted".into()),
                false
            ))
        );
        assert_eq!(
            read(AsyncOperation, 200, r#"{"status":"Canceled"}"#),
            Ok((OperationState::Canceled, Some("Canceled".into()), false))
        );
        assert_eq!(
            read(AsyncOperation, 200, r#"{"status":"Deleting"}"#),
            Ok((OperationState::InProgress, None, false)),
            "unknown: still running"
        );
        assert!(read(AsyncOperation, 200, "not json").is_err());
        assert_eq!(
            read(
                AsyncOperation,
                404,
                r#"{"error":{"code":"OperationNotFound"}}"#
            ),
            Err("404 OperationNotFound".into())
        );
        assert_eq!(
            read(Location, 202, ""),
            Ok((OperationState::InProgress, None, false))
        );
        assert_eq!(
            read(Location, 204, ""),
            Ok((OperationState::Succeeded, None, false))
        );
        // A failed operation's Location answers with its error ("Azure Resource Manager
        // asynchronous operations": the final GET returns the operation's failure status).
        assert_eq!(
            read(
                Location,
                409,
                r#"{"error":{"code":"AttachDiskWhileBeingDetached","message":"Cannot attach"}}"#
            ),
            Ok((
                OperationState::Failed,
                Some("AttachDiskWhileBeingDetached".into()),
                false
            ))
        );
        // …but not a URL that is gone, a throttle or a server error: those are the poll's.
        for status in [404, 429, 500] {
            assert!(read(Location, status, "{}").is_err(), "{status}");
        }
    }

    /// A credential that must never be asked: a token handed out would be a token sent.
    #[derive(Debug, Default)]
    struct Untouchable(std::sync::atomic::AtomicBool);

    #[async_trait]
    impl TokenCredential for Untouchable {
        async fn get_token(&self, _: &[&str]) -> azure_core::Result<azure_core::auth::AccessToken> {
            self.0.store(true, Ordering::SeqCst);
            Err(azure_core::Error::message(
                ErrorKind::Credential,
                "no token in this test",
            ))
        }
        async fn clear_cache(&self) -> azure_core::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn status_urls_off_the_resource_manager_endpoint_never_get_our_token() {
        let credential = Arc::new(Untouchable::default());
        let arm = Url::parse("https://management.azure.com").unwrap();
        let compute =
            Compute::new(&arm, credential.clone(), std::time::Duration::from_secs(30)).unwrap();
        for foreign in [
            "https://attacker.example/subscriptions/s/providers/Microsoft.Compute/locations/x/operations/1",
            "http://management.azure.com/subscriptions/s/providers/Microsoft.Compute/locations/x/operations/1",
            "https://management.azure.com:8443/subscriptions/s/operations/1",
            "https://management.azure.com.attacker.example/operations/1",
            "not a url",
        ] {
            let op = OperationRef {
                url: foreign.into(),
                kind: OperationKind::AsyncOperation,
            };
            let e = compute.operation_status(&op).await.unwrap_err();
            assert!(e.to_string().contains("not on the Resource Manager endpoint"), "{foreign}: {e}");
        }
        assert!(
            !credential.0.load(Ordering::SeqCst),
            "no token was asked for"
        );
        assert!(compute
            .follow_url("https://MANAGEMENT.azure.com/subscriptions/s/providers/Microsoft.Compute/locations/x/operations/1?api-version=2024-07-01")
            .is_some());
    }

    #[test]
    fn subscriptions_are_read_from_any_arm_url() {
        let url = Url::parse("https://management.azure.com/subscriptions/ABC/providers/Microsoft.Compute/locations/x/operations/1").unwrap();
        assert_eq!(subscription_of(&url), "abc");
        assert_eq!(subscription_of(&Url::parse("https://x/other").unwrap()), "");
    }
}
