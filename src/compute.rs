//! The Compute API edge: the only code that knows ARM. Reads scale sets and their instances for
//! the mirror, and sends repairs. Long-running operations are fired (`send()`, 202) and never
//! awaited: a later timer pass sees their effect in the mirror.

use crate::mirror::{AppHealth, Instance};
use crate::scaleset::ScaleSetId;
use async_trait::async_trait;
use azure_core::auth::TokenCredential;
use azure_core::error::ErrorKind;
use azure_core::{HttpClient, StatusCode};
use azure_mgmt_compute::package_2024_07_01::{models, Client};
use futures::StreamExt;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use time::{Duration, OffsetDateTime};
use url::Url;

const READ_RETRY_DELAY: std::time::Duration = std::time::Duration::from_millis(300);

/// The Resource Manager actions the handler performs, and no other: the custom role the
/// infrastructure grants on the watched scale sets (`infra/`) is exactly this list.
pub const REQUIRED_ACTIONS: &[&str] = &[
    "Microsoft.Compute/virtualMachineScaleSets/read",
    "Microsoft.Compute/virtualMachineScaleSets/virtualMachines/read",
    "Microsoft.Compute/virtualMachineScaleSets/write",
    "Microsoft.Compute/virtualMachineScaleSets/delete/action",
    "Microsoft.Compute/virtualMachineScaleSets/reimage/action",
    "Microsoft.Compute/virtualMachineScaleSets/restart/action",
];

/// The action Resource Manager authorizes a request of ours by (`None`: not a request we make).
/// Lets tests hold every call the handler sends against [`REQUIRED_ACTIONS`].
pub fn required_action(method: &str, path: &str) -> Option<&'static str> {
    let path = path.to_ascii_lowercase();
    let rest = path
        .split("/providers/microsoft.compute/virtualmachinescalesets/")
        .nth(1)?;
    let mut segments = rest.split('/').filter(|s| !s.is_empty());
    let _name = segments.next()?;
    let tail: Vec<&str> = segments.collect();
    let action = match (method.to_ascii_uppercase().as_str(), tail.as_slice()) {
        ("GET", []) => REQUIRED_ACTIONS[0],
        ("GET", ["virtualmachines"]) | ("GET", ["virtualmachines", _]) => REQUIRED_ACTIONS[1],
        ("PATCH", []) | ("PUT", []) => REQUIRED_ACTIONS[2],
        ("POST", ["delete"]) => REQUIRED_ACTIONS[3],
        ("POST", ["reimage"]) => REQUIRED_ACTIONS[4],
        ("POST", ["restart"]) => REQUIRED_ACTIONS[5],
        _ => return None,
    };
    Some(action)
}

/// Why a Compute call failed, in the terms a caller branches on.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ComputeError {
    #[error("throttled by the Compute API; retry after {retry_after_s} s")]
    Throttled { retry_after_s: i64 },
    #[error("not found: {0}")]
    NotFound(String),
    #[error("not authorized: {0}")]
    Unauthorized(String),
    #[error("Compute API unavailable: {0}")]
    Transient(String),
    #[error("Compute API call failed: {0}")]
    Failed(String),
}

impl ComputeError {
    pub fn label(&self) -> &'static str {
        match self {
            ComputeError::Throttled { .. } => "throttled",
            ComputeError::NotFound(_) => "not_found",
            ComputeError::Unauthorized(_) => "unauthorized",
            ComputeError::Transient(_) => "transient",
            ComputeError::Failed(_) => "failed",
        }
    }
}

/// What the scale set itself looks like.
#[derive(Debug, Clone, PartialEq)]
pub struct ScaleSetInfo {
    pub capacity: Option<i64>,
    pub orchestration_mode: Option<String>,
    pub platform_auto_repair: bool,
}

/// A long-running operation the Compute API accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct Accepted {
    /// The `Azure-AsyncOperation` URL, journaled so an operator can follow it.
    pub operation: Option<String>,
}

/// Throttling and volume, observed on every raw response before the SDK turns errors into values
/// (the SDK's errors do not keep headers such as `Retry-After`).
#[derive(Debug, Default)]
pub struct Observed {
    calls: AtomicU64,
    /// Lowest `x-ms-ratelimit-remaining-resource` count seen on the last response, -1 if none.
    remaining: AtomicI64,
    throttled_until: Mutex<Option<OffsetDateTime>>,
}

impl Observed {
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    pub fn remaining_budget(&self) -> Option<i64> {
        let r = self.remaining.load(Ordering::Relaxed);
        (r >= 0).then_some(r)
    }

    pub fn throttled_until(&self) -> Option<OffsetDateTime> {
        self.throttled_until.lock().ok().and_then(|g| *g)
    }
}

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
        let response = self.inner.execute_request(request).await?;
        self.observed.calls.fetch_add(1, Ordering::Relaxed);
        let headers = response.headers();
        if let Some(v) = headers.get_optional_str(&azure_core::headers::HeaderName::from_static(
            "x-ms-ratelimit-remaining-resource",
        )) {
            // `Bucket;count,Bucket;count`: the tightest bucket is what matters.
            let min = v
                .split(',')
                .filter_map(|b| b.rsplit(';').next()?.trim().parse::<i64>().ok())
                .min();
            if let Some(m) = min {
                self.observed.remaining.store(m, Ordering::Relaxed);
            }
        }
        let retry_after = headers
            .get_optional_str(&azure_core::headers::RETRY_AFTER)
            .and_then(|v| v.trim().parse::<i64>().ok());
        // A 429 always means back off (60 s when unsaid); a 503 only when it says for how long.
        let backoff = match response.status() {
            StatusCode::TooManyRequests => Some(retry_after.unwrap_or(60)),
            StatusCode::ServiceUnavailable => retry_after,
            _ => None,
        };
        if let Some(secs) = backoff {
            if let Ok(mut g) = self.observed.throttled_until.lock() {
                let until = OffsetDateTime::now_utc() + Duration::seconds(secs);
                *g = Some(g.map_or(until, |old| old.max(until)));
            }
        }
        Ok(response)
    }
}

#[derive(Clone)]
pub struct Compute {
    client: Client,
    observed: Arc<Observed>,
}

impl std::fmt::Debug for Compute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compute")
            .field("observed", &self.observed)
            .finish()
    }
}

impl Compute {
    pub fn new(endpoint: &Url, credential: Arc<dyn TokenCredential>) -> anyhow::Result<Self> {
        let observed = Arc::new(Observed::default());
        let http = reqwest::Client::builder()
            .connect_timeout(std::time::Duration::from_secs(5))
            .timeout(std::time::Duration::from_secs(60))
            .build()?;
        let transport = ObservingTransport {
            inner: http,
            observed: observed.clone(),
        };
        let client = Client::builder(credential)
            .endpoint(endpoint.clone())
            // ARM's Retry-After is minutes long: never sleep on it inside a call. Throttling is
            // recorded and carried to later passes instead.
            .retry(azure_core::RetryOptions::none())
            .transport(azure_core::TransportOptions::new(Arc::new(transport)))
            .build()?;
        Ok(Compute { client, observed })
    }

    pub fn observed(&self) -> &Observed {
        &self.observed
    }

    fn classify(&self, what: &str, e: azure_core::Error) -> ComputeError {
        let message = format!("{what}: {e}");
        match e.kind() {
            ErrorKind::HttpResponse { status, .. } => match *status {
                StatusCode::TooManyRequests => ComputeError::Throttled {
                    retry_after_s: self
                        .observed
                        .throttled_until()
                        .map(|t| (t - OffsetDateTime::now_utc()).whole_seconds().max(1))
                        .unwrap_or(60),
                },
                StatusCode::NotFound => ComputeError::NotFound(message),
                StatusCode::Unauthorized | StatusCode::Forbidden => {
                    ComputeError::Unauthorized(message)
                }
                s if u16::from(s) >= 500 || s == StatusCode::RequestTimeout => {
                    ComputeError::Transient(message)
                }
                _ => ComputeError::Failed(message),
            },
            ErrorKind::Io => ComputeError::Transient(message),
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
            Err(ComputeError::Transient(why)) => {
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
        let vmss = self
            .client
            .virtual_machine_scale_sets_client()
            .get(&id.resource_group, &id.name, &id.subscription)
            .await
            .map_err(|e| self.classify("get scale set", e))?;
        let props = vmss.properties.as_ref();
        Ok(ScaleSetInfo {
            capacity: vmss.sku.as_ref().and_then(|s| s.capacity),
            orchestration_mode: props
                .and_then(|p| p.orchestration_mode.as_ref())
                .and_then(|m| serde_json::to_value(m).ok())
                .and_then(|v| v.as_str().map(str::to_string)),
            platform_auto_repair: props
                .and_then(|p| p.automatic_repairs_policy.as_ref())
                .and_then(|a| a.enabled)
                .unwrap_or(false),
        })
    }

    /// Every instance of the scale set, with its instance view, following `nextLink` to the end.
    pub async fn instances(&self, id: &ScaleSetId) -> Result<Vec<Instance>, ComputeError> {
        self.read(|| self.instances_once(id)).await
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
            let page = page.map_err(|e| self.classify("list instances", e))?;
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
            .map_err(|e| self.classify("delete instances", e))?;
        Ok(accepted(response.as_raw_response()))
    }

    pub async fn restart_instances(
        &self,
        id: &ScaleSetId,
        instance_ids: &[String],
    ) -> Result<Accepted, ComputeError> {
        let mut ids = models::VirtualMachineScaleSetVmInstanceIDs::new();
        ids.instance_ids = instance_ids.to_vec();
        let response = self
            .client
            .virtual_machine_scale_sets_client()
            .restart(&id.resource_group, &id.name, &id.subscription)
            .vm_instance_i_ds(ids)
            .send()
            .await
            .map_err(|e| self.classify("restart instances", e))?;
        Ok(accepted(response.as_raw_response()))
    }

    pub async fn reimage_instances(
        &self,
        id: &ScaleSetId,
        instance_ids: &[String],
    ) -> Result<Accepted, ComputeError> {
        let mut params = models::VirtualMachineScaleSetReimageParameters::new();
        params.instance_ids = instance_ids.to_vec();
        let response = self
            .client
            .virtual_machine_scale_sets_client()
            .reimage(&id.resource_group, &id.name, &id.subscription)
            .vm_scale_set_reimage_input(params)
            .send()
            .await
            .map_err(|e| self.classify("reimage instances", e))?;
        Ok(accepted(response.as_raw_response()))
    }

    /// Sets the scale set's capacity (used by `replace` to restore what a delete took away).
    pub async fn set_capacity(
        &self,
        id: &ScaleSetId,
        capacity: i64,
    ) -> Result<Accepted, ComputeError> {
        let mut update = models::VirtualMachineScaleSetUpdate::new();
        update.sku = Some(models::Sku {
            name: None,
            tier: None,
            capacity: Some(capacity),
        });
        let response = self
            .client
            .virtual_machine_scale_sets_client()
            .update(&id.resource_group, &id.name, update, &id.subscription)
            .send()
            .await
            .map_err(|e| self.classify("set capacity", e))?;
        Ok(accepted(response.as_raw_response()))
    }
}

fn accepted(response: &azure_core::Response) -> Accepted {
    let header = azure_core::headers::HeaderName::from_static("azure-asyncoperation");
    Accepted {
        operation: response.headers().get_optional_string(&header),
    }
}

/// Converts an ARM scale-set VM into a mirrored instance; `None` without an instance id.
pub fn to_instance(vm: models::VirtualMachineScaleSetVm) -> Option<Instance> {
    let instance_id = vm.instance_id?.to_ascii_lowercase();
    let props = vm.properties;
    let view = props.as_ref().and_then(|p| p.instance_view.as_ref());
    let status = |prefix: &str| {
        view.and_then(|v| {
            v.statuses
                .iter()
                .filter_map(|s| s.code.as_deref())
                .find_map(|c| c.strip_prefix(prefix).map(str::to_string))
        })
    };
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
        power_state: status("PowerState/"),
        health: view
            .and_then(|v| v.vm_health.as_ref())
            .and_then(|h| h.status.as_ref())
            .and_then(|s| s.code.as_deref())
            .and_then(AppHealth::from_code),
        health_since: None,
        latest_model_applied: props.as_ref().and_then(|p| p.latest_model_applied),
        protected_from_scale_set_actions: protection
            .and_then(|p| p.protect_from_scale_set_actions)
            .unwrap_or(false),
        protected_from_scale_in: protection
            .and_then(|p| p.protect_from_scale_in)
            .unwrap_or(false),
        zone: vm.zones.first().cloned(),
        created_at: props
            .as_ref()
            .and_then(|p| p.time_created)
            .map(crate::mirror::at_storage_precision),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_request_maps_to_the_action_resource_manager_checks() {
        let set = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/web";
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
            // Requests we never make are not covered: deleting the scale set, powering off.
            ("DELETE", set.to_string(), None),
            ("POST", format!("{set}/poweroff"), None),
            (
                "GET",
                "/subscriptions/s/providers/Microsoft.Compute/locations/x/operations/1".into(),
                None,
            ),
        ];
        for (method, path, want) in cases {
            assert_eq!(required_action(method, &path), want, "{method} {path}");
        }
    }
}
