//! The shared table-storage state layer (design §3). The only code that knows table names, keys,
//! property names and ETags; everything above it speaks in domain types.

mod heartbeats;
mod instances;
mod operations;
mod repairs;
mod scalesets;
mod slots;
pub mod table;

use crate::compute::{ArmError, OperationKind, OperationRef};
use crate::heartbeat::{Heartbeat, Origin, Status};
use crate::incident::{Hold, Incident, Phase, Resolution, Stage, State, Versioned};
use crate::journal::{Entry, EntryKind};
use crate::mirror::{AppHealth, Instance, MirroredInstance, ScaleSetRecord};
use crate::policy::RepairAction;
use crate::scaleset::ScaleSetId;
use crate::settings::StorageSettings;
use anyhow::{bail, Context};
use azure_core::auth::TokenCredential;
use azure_data_tables::clients::TableServiceClientBuilder;
use azure_storage::{CloudLocation, ConnectionString, StorageCredentials};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use table::{quote, Entity, Row, RowError, Table};
pub use table::{StoreError, MAX_BATCH};
use time::OffsetDateTime;

pub const INSTANCES: &str = "instances";
pub const HEARTBEATS: &str = "heartbeats";
pub const REPAIRS: &str = "repairs";
pub const SCALESETS: &str = "scalesets";
pub const OPERATIONS: &str = "operations";
pub const SLOTS: &str = "slots";
const SCALESET_PARTITION: &str = "scaleset";
const INCIDENT_PREFIX: &str = "incident:";

/// Handles to the four tables, plus what this process remembers to save requests.
#[derive(Debug, Clone)]
pub struct Store {
    instances: Table,
    heartbeats: Table,
    repairs: Table,
    scalesets: Table,
    operations: Table,
    slots: Table,
    requests: Arc<AtomicU64>,
    /// The last heartbeat this process wrote or read per instance, with its ETag: a newer reading
    /// is then one conditional write. The cache may lag the table (other workers write too) but
    /// never runs ahead of it, so the ETag check keeps every write correct.
    last_heartbeat: PerInstance<StoredHeartbeat>,
    /// Mirrored identities (vmId, computer name) for heartbeat checks, briefly.
    identities: PerInstance<(Instance, Instant)>,
}

/// A process-local cache keyed by (scale set key, instance id).
type PerInstance<V> = Arc<Mutex<HashMap<(String, String), V>>>;

/// How long a mirrored identity is trusted without re-reading it.
const IDENTITY_TTL: Duration = Duration::from_secs(60);
/// Caches are cleared past this many entries (about 100 MB of the largest fleet's state).
const CACHE_LIMIT: usize = 250_000;

/// A stored heartbeat with the ETag it was read at, for conditional replacement.
#[derive(Debug, Clone)]
pub struct StoredHeartbeat {
    pub heartbeat: Heartbeat,
    pub etag: String,
}

/// How a write of a heartbeat went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeartbeatWrite {
    Stored,
    /// An equal or newer reading was already stored.
    Ignored,
}

/// Rows that could not be read back, skipped and reported rather than failing a whole pass.
#[derive(Debug, Default)]
pub struct Skipped(pub Vec<RowError>);

impl Store {
    /// Connects with the configured storage settings. `credential` is used for identity-based
    /// settings only.
    pub fn connect(
        settings: &StorageSettings,
        credential: impl FnOnce(Option<&str>) -> anyhow::Result<Arc<dyn TokenCredential>>,
    ) -> anyhow::Result<Self> {
        let (location, credentials) = match settings {
            StorageSettings::ConnectionString(cs) => from_connection_string(cs)?,
            StorageSettings::Identity {
                table_service_uri,
                client_id,
            } => {
                let account = table_service_uri
                    .host_str()
                    .and_then(|h| h.split('.').next())
                    .unwrap_or_default()
                    .to_string();
                (
                    CloudLocation::Custom {
                        account,
                        uri: table_service_uri.as_str().trim_end_matches('/').to_string(),
                    },
                    StorageCredentials::token_credential(credential(client_id.as_deref())?),
                )
            }
        };
        let requests = Arc::new(AtomicU64::new(0));
        let service = TableServiceClientBuilder::with_location(location, credentials)
            .client_options(client_options(requests.clone())?)
            .build();
        let missing = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let table = |name: &'static str| Table {
            name,
            client: service.table_client(name),
            missing: missing.clone(),
        };
        Ok(Store {
            instances: table(INSTANCES),
            heartbeats: table(HEARTBEATS),
            repairs: table(REPAIRS),
            scalesets: table(SCALESETS),
            operations: table(OPERATIONS),
            slots: table(SLOTS),
            requests,
            last_heartbeat: Arc::default(),
            identities: Arc::default(),
        })
    }

    /// Requests sent to table storage by this store since it was created.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Recreates the tables if a request found one missing since the last check (storage restored
    /// without them, a table dropped by hand); a no-op otherwise. Returns whether it recreated.
    pub async fn recreate_missing_tables(&self) -> Result<bool, StoreError> {
        if !self.instances.missing.swap(false, Ordering::Relaxed) {
            return Ok(false);
        }
        tracing::warn!("a table was missing; recreating the tables");
        if let Err(e) = self.ensure_tables().await {
            self.instances.missing.store(true, Ordering::Relaxed);
            return Err(e);
        }
        Ok(true)
    }

    /// Creates the tables if they do not exist. Idempotent.
    pub async fn ensure_tables(&self) -> Result<(), StoreError> {
        for t in [
            &self.instances,
            &self.heartbeats,
            &self.repairs,
            &self.scalesets,
            &self.operations,
            &self.slots,
        ] {
            t.ensure_exists().await?;
        }
        Ok(())
    }

    fn remember(&self, key: (String, String), heartbeat: Heartbeat, etag: String) {
        let mut cache = lock(&self.last_heartbeat);
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(key, StoredHeartbeat { heartbeat, etag });
    }
}

/// Bounded retries: a storage hiccup is retried briefly inside the call; a longer outage fails
/// the invocation (and Event Grid redelivers) instead of holding it for minutes.
fn client_options(requests: Arc<AtomicU64>) -> anyhow::Result<azure_core::ClientOptions> {
    // Idle connections are kept for as many invocations as run at once, and not for long: a burst
    // must not leave thousands of sockets (and their buffers) behind.
    let http = reqwest::Client::builder()
        .connect_timeout(std::time::Duration::from_secs(5))
        .timeout(std::time::Duration::from_secs(30))
        .pool_max_idle_per_host(crate::admission::MAX_CONCURRENT_INVOCATIONS)
        .pool_idle_timeout(std::time::Duration::from_secs(30))
        .build()
        .context("building the storage HTTP client")?;
    let retry = azure_core::ExponentialRetryOptions {
        initial_delay: std::time::Duration::from_millis(200),
        max_retries: 2,
        max_total_elapsed: std::time::Duration::from_secs(5),
        max_delay: std::time::Duration::from_secs(1),
    };
    Ok(azure_core::ClientOptions::default()
        .retry(azure_core::RetryOptions::exponential(retry))
        .transport(azure_core::TransportOptions::new(Arc::new(
            table::CountingTransport {
                inner: http,
                requests,
            },
        ))))
}

/// A poisoned cache lock only means another task panicked mid-update of a cache; the data is
/// still a valid (if possibly stale) cache, which the ETag checks tolerate.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn collect<T>(rows: Vec<Row>, f: impl Fn(&Row) -> Result<T, RowError>) -> (Vec<T>, Skipped) {
    let mut out = Vec::with_capacity(rows.len());
    let mut skipped = Skipped::default();
    for row in &rows {
        match f(row) {
            Ok(v) => out.push(v),
            Err(e) => skipped.0.push(e),
        }
    }
    (out, skipped)
}

/// Why a storage connection string cannot be used, if it cannot — without its secrets, for the
/// startup check that lists every problem at once.
pub fn connection_string_problem(cs: &str) -> Option<String> {
    from_connection_string(cs)
        .err()
        .map(|e| crate::secret::redact(&format!("{e:#}")))
}

fn from_connection_string(cs: &str) -> anyhow::Result<(CloudLocation, StorageCredentials)> {
    let parsed = ConnectionString::new(cs).context("the storage connection string is malformed")?;
    if parsed.use_development_storage == Some(true) {
        let uri = parsed
            .development_storage_proxy_uri
            .map(|p| format!("{}/devstoreaccount1", p.trim_end_matches('/')));
        let location = match uri {
            Some(uri) => CloudLocation::Custom {
                account: "devstoreaccount1".into(),
                uri,
            },
            None => CloudLocation::Emulator {
                address: "127.0.0.1".into(),
                port: 10002,
            },
        };
        return Ok((location, StorageCredentials::emulator()));
    }
    if parsed.account_key.is_some() && parsed.account_name.is_none() {
        bail!("the storage connection string has an AccountKey but no AccountName");
    }
    let credentials = parsed.storage_credentials().context(
        "the storage connection string has neither AccountKey nor SharedAccessSignature",
    )?;
    let Some(account) = parsed.account_name else {
        if let Some(endpoint) = parsed.table_endpoint {
            // A SAS connection string may name only the endpoint.
            return Ok((
                CloudLocation::Custom {
                    account: String::new(),
                    uri: endpoint.trim_end_matches('/').to_string(),
                },
                credentials,
            ));
        }
        bail!("the storage connection string names no AccountName and no TableEndpoint");
    };
    let location = match parsed.table_endpoint {
        Some(endpoint) => CloudLocation::Custom {
            account: account.to_string(),
            uri: endpoint.trim_end_matches('/').to_string(),
        },
        None => {
            let scheme = match parsed.default_endpoints_protocol {
                Some(azure_storage::EndpointProtocol::Http) => "http",
                _ => "https",
            };
            let suffix = parsed.endpoint_suffix.unwrap_or("core.windows.net");
            CloudLocation::Custom {
                account: account.to_string(),
                uri: format!("{scheme}://{account}.table.{suffix}"),
            }
        }
    };
    Ok((location, credentials))
}

/// Numbers journal rows written by this process: two entries of one instance at one time (an
/// intent and its answer) must not share a row key.
static JOURNAL_SEQ: AtomicU64 = AtomicU64::new(0);

#[cfg(test)]
mod tests {
    use super::*;
    use azure_storage::clients::ServiceType;

    fn table_url(cs: &str) -> String {
        let (location, _) = from_connection_string(cs).unwrap();
        location.url(ServiceType::Table).unwrap().to_string()
    }

    #[test]
    fn connection_strings_point_at_the_right_table_endpoint() {
        assert_eq!(
            table_url("UseDevelopmentStorage=true"),
            "http://127.0.0.1:10002/devstoreaccount1"
        );
        assert_eq!(
            table_url(
                "UseDevelopmentStorage=true;DevelopmentStorageProxyUri=http://127.0.0.1:4000/"
            ),
            "http://127.0.0.1:4000/devstoreaccount1"
        );
        assert_eq!(
            table_url("DefaultEndpointsProtocol=https;AccountName=healer;AccountKey=a2V5;EndpointSuffix=core.windows.net"),
            "https://healer.table.core.windows.net/"
        );
        assert_eq!(
            table_url("AccountName=healer;AccountKey=a2V5;EndpointSuffix=core.chinacloudapi.cn"),
            "https://healer.table.core.chinacloudapi.cn/"
        );
        assert_eq!(
            table_url(
                "AccountName=healer;AccountKey=a2V5;TableEndpoint=https://tables.example.net/"
            ),
            "https://tables.example.net/"
        );
        assert_eq!(
            table_url("TableEndpoint=https://t.example.net;SharedAccessSignature=sv=2024&sig=x"),
            "https://t.example.net/"
        );
    }

    #[test]
    fn unusable_connection_strings_say_what_is_missing() {
        for (cs, needle) in [
            (
                "AccountName=healer",
                "neither AccountKey nor SharedAccessSignature",
            ),
            ("AccountKey=a2V5", "but no AccountName"),
            ("NoEquals", "malformed"),
        ] {
            let err = format!("{:#}", from_connection_string(cs).unwrap_err());
            assert!(err.contains(needle), "{cs}: {err}");
        }
    }
}
