//! The shared table-storage state layer (design §3). The only code that knows table names, keys,
//! property names and ETags; everything above it speaks in domain types.

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
const SCALESET_PARTITION: &str = "scaleset";
const INCIDENT_PREFIX: &str = "incident:";

/// Handles to the four tables, plus what this process remembers to save requests.
#[derive(Debug, Clone)]
pub struct Store {
    instances: Table,
    heartbeats: Table,
    repairs: Table,
    scalesets: Table,
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

    /// Creates the four tables if they do not exist. Idempotent.
    pub async fn ensure_tables(&self) -> Result<(), StoreError> {
        for t in [
            &self.instances,
            &self.heartbeats,
            &self.repairs,
            &self.scalesets,
        ] {
            t.ensure_exists().await?;
        }
        Ok(())
    }

    // ---- instances: the mirror ----

    pub async fn mirror(
        &self,
        set: &ScaleSetId,
    ) -> Result<(Vec<MirroredInstance>, Skipped), StoreError> {
        let rows = self
            .instances
            .query(Some(format!("PartitionKey eq {}", quote(&set.key()))))
            .await?;
        Ok(collect(rows, instance_from_row))
    }

    /// The mirrored instance for a heartbeat's identity check, from a short-lived cache.
    pub async fn mirrored_identity(
        &self,
        set: &ScaleSetId,
        instance_id: &str,
    ) -> Result<Option<Instance>, StoreError> {
        let key = (set.key(), instance_id.to_string());
        if let Some((inst, at)) = lock(&self.identities).get(&key) {
            if at.elapsed() < IDENTITY_TTL {
                return Ok(Some(inst.clone()));
            }
        }
        let found = self.mirrored_instance(set, instance_id).await?;
        if let Some(inst) = &found {
            let mut cache = lock(&self.identities);
            if cache.len() >= CACHE_LIMIT {
                cache.clear();
            }
            cache.insert(key, (inst.clone(), Instant::now()));
        }
        Ok(found)
    }

    pub async fn mirrored_instance(
        &self,
        set: &ScaleSetId,
        instance_id: &str,
    ) -> Result<Option<Instance>, StoreError> {
        match self.instances.get(&set.key(), instance_id).await? {
            Some(row) => Ok(instance_from_row(&row).ok().map(|m| m.instance)),
            None => Ok(None),
        }
    }

    /// Writes new and changed instances, and refreshes the sync time of unchanged ones.
    pub async fn write_mirror(
        &self,
        set: &ScaleSetId,
        instances: &[Instance],
        synced_at: OffsetDateTime,
    ) -> Result<usize, StoreError> {
        let entities = instances
            .iter()
            .map(|i| instance_entity(set, i, synced_at))
            .collect();
        self.instances.upsert_batch(&set.key(), entities).await
    }

    pub async fn remove_instances(
        &self,
        set: &ScaleSetId,
        instance_ids: &[String],
    ) -> Result<usize, StoreError> {
        let removed = self
            .instances
            .delete_batch(&set.key(), instance_ids)
            .await?;
        // A heartbeat of a VM that no longer exists would only confuse a reader.
        self.heartbeats
            .delete_batch(&set.key(), instance_ids)
            .await?;
        Ok(removed)
    }

    // ---- heartbeats ----

    pub async fn heartbeats(
        &self,
        set: &ScaleSetId,
    ) -> Result<(HashMap<String, Heartbeat>, Skipped), StoreError> {
        let rows = self
            .heartbeats
            .query(Some(format!("PartitionKey eq {}", quote(&set.key()))))
            .await?;
        let (list, skipped) = collect(rows, |r| heartbeat_from_row(set, r));
        Ok((
            list.into_iter()
                .map(|h| (h.target.instance_id.clone(), h))
                .collect(),
            skipped,
        ))
    }

    pub async fn heartbeat(
        &self,
        set: &ScaleSetId,
        instance_id: &str,
    ) -> Result<Option<StoredHeartbeat>, StoreError> {
        let Some(row) = self.heartbeats.get(&set.key(), instance_id).await? else {
            return Ok(None);
        };
        let etag = row.etag().unwrap_or_default().to_string();
        match heartbeat_from_row(set, &row) {
            Ok(heartbeat) => Ok(Some(StoredHeartbeat { heartbeat, etag })),
            // An unreadable stored row is replaced by the next good heartbeat.
            Err(_) => Ok(Some(StoredHeartbeat {
                heartbeat: unreadable_placeholder(set, instance_id),
                etag,
            })),
        }
    }

    /// Stores a heartbeat unless a newer one is stored. With the last write of this instance
    /// remembered, a newer reading costs one conditional write and an older or duplicate one
    /// costs nothing; otherwise the stored row is read first. Concurrent writers are ordered by
    /// ETag.
    pub async fn store_heartbeat(
        &self,
        hb: &Heartbeat,
        is_newer: impl Fn(&Heartbeat, &Heartbeat) -> bool,
    ) -> Result<HeartbeatWrite, StoreError> {
        let set = &hb.target.scale_set;
        let key = (set.key(), hb.target.instance_id.clone());
        let remembered = lock(&self.last_heartbeat).get(&key).cloned();
        if let Some(last) = remembered {
            if !is_newer(hb, &last.heartbeat) {
                return Ok(HeartbeatWrite::Ignored);
            }
            let next = with_down_since(hb, Some(&last.heartbeat));
            match self
                .heartbeats
                .replace_if(&set.key(), heartbeat_entity(&next), &last.etag)
                .await
            {
                Ok(etag) => {
                    self.remember(key, next, etag);
                    return Ok(HeartbeatWrite::Stored);
                }
                // Another worker wrote meanwhile: read what is there, as without a memory.
                Err(StoreError::PreconditionFailed { .. }) => {
                    lock(&self.last_heartbeat).remove(&key);
                }
                Err(e) => return Err(e),
            }
        }
        for _ in 0..5 {
            let stored = self.heartbeat(set, &hb.target.instance_id).await?;
            let next = with_down_since(hb, stored.as_ref().map(|s| &s.heartbeat));
            let entity = heartbeat_entity(&next);
            let written = match &stored {
                None => self.heartbeats.insert(entity).await,
                Some(stored) if !is_newer(hb, &stored.heartbeat) => {
                    self.remember(key, stored.heartbeat.clone(), stored.etag.clone());
                    return Ok(HeartbeatWrite::Ignored);
                }
                Some(stored) => {
                    self.heartbeats
                        .replace_if(&set.key(), entity, &stored.etag)
                        .await
                }
            };
            match written {
                Ok(etag) => {
                    self.remember(key, next, etag);
                    return Ok(HeartbeatWrite::Stored);
                }
                Err(StoreError::Conflict { .. } | StoreError::PreconditionFailed { .. }) => {
                    continue
                }
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Contended {
            table: HEARTBEATS,
            key: format!("{}/{}", set.key(), hb.target.instance_id),
        })
    }

    /// Writes many heartbeats unconditionally, in batches per scale set: a bulk import (seeding a
    /// benchmark, migrating from another healer), not the ingest path.
    pub async fn import_heartbeats(&self, heartbeats: &[Heartbeat]) -> Result<usize, StoreError> {
        let mut by_set: HashMap<String, Vec<Entity>> = HashMap::new();
        for hb in heartbeats {
            by_set
                .entry(hb.target.scale_set.key())
                .or_default()
                .push(heartbeat_entity(&with_down_since(hb, None)));
        }
        let mut written = 0;
        for (pk, entities) in by_set {
            written += self.heartbeats.upsert_batch(&pk, entities).await?;
        }
        Ok(written)
    }

    fn remember(&self, key: (String, String), heartbeat: Heartbeat, etag: String) {
        let mut cache = lock(&self.last_heartbeat);
        if cache.len() >= CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(key, StoredHeartbeat { heartbeat, etag });
    }

    // ---- scalesets ----

    pub async fn scale_set(&self, set: &ScaleSetId) -> Result<Option<ScaleSetRecord>, StoreError> {
        match self.scalesets.get(SCALESET_PARTITION, &set.key()).await? {
            Some(row) => Ok(scaleset_from_row(&row).ok()),
            None => Ok(None),
        }
    }

    /// Every scale set's row, in one query.
    pub async fn scale_sets(&self) -> Result<HashMap<String, ScaleSetRecord>, StoreError> {
        let rows = self
            .scalesets
            .query(Some(format!(
                "PartitionKey eq {}",
                quote(SCALESET_PARTITION)
            )))
            .await?;
        let (records, _) = collect(rows, |r| {
            scaleset_from_row(r).map(|rec| (r.row_key().to_string(), rec))
        });
        Ok(records.into_iter().collect())
    }

    pub async fn write_scale_set(
        &self,
        set: &ScaleSetId,
        record: &ScaleSetRecord,
    ) -> Result<(), StoreError> {
        self.scalesets
            .upsert(SCALESET_PARTITION, scaleset_entity(set, record))
            .await
    }

    /// Records the outcome of a mirror sync, leaving the columns other writers own as they are.
    pub async fn record_sync(
        &self,
        set: &ScaleSetId,
        record: &ScaleSetRecord,
    ) -> Result<(), StoreError> {
        self.scalesets
            .merge(SCALESET_PARTITION, sync_result_entity(set, record))
            .await
    }

    /// Asks the next mirror pass to read these scale sets: merges only, no read, one request per
    /// hundred sets (their rows share a partition).
    pub async fn request_resync(
        &self,
        sets: &[ScaleSetId],
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let rows = sets
            .iter()
            .map(|set| Entity::new(SCALESET_PARTITION, &set.key()).time("changedAt", at))
            .collect();
        self.scalesets.merge_batch(SCALESET_PARTITION, rows).await?;
        Ok(())
    }

    /// Records the brake now holding the scale set (`None`: released), leaving the rest of its
    /// row as it is.
    pub async fn set_breaker(
        &self,
        set: &ScaleSetId,
        breaker: Option<&str>,
        since: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let entity = Entity::new(SCALESET_PARTITION, &set.key())
            .str("breaker", breaker.unwrap_or_default())
            .time("breakerSince", since);
        self.scalesets.merge(SCALESET_PARTITION, entity).await
    }

    /// Sets (`Some(note)`) or lifts (`None`) an operator's manual brake on the scale set, leaving
    /// the rest of its row as it is.
    pub async fn set_operator_pause(
        &self,
        set: &ScaleSetId,
        note: Option<&str>,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let entity = Entity::new(SCALESET_PARTITION, &set.key())
            .str("resourceId", set.resource_id())
            .str("operatorPause", note.unwrap_or_default())
            .time("operatorPauseSince", at);
        self.scalesets.merge(SCALESET_PARTITION, entity).await
    }

    /// Records that the Compute API asked us to back off from these scale sets (one subscription:
    /// Compute throttles per subscription) until `until`. Merges only, a request per hundred sets.
    pub async fn set_throttled(
        &self,
        sets: &[ScaleSetId],
        until: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let rows = sets
            .iter()
            .map(|set| Entity::new(SCALESET_PARTITION, &set.key()).time("throttledUntil", until))
            .collect();
        self.scalesets.merge_batch(SCALESET_PARTITION, rows).await?;
        Ok(())
    }

    /// Marks a scale set as changed outside a sync (a Resource Manager event), so the next
    /// `monitor-state` pass resyncs it.
    pub async fn mark_scale_set_changed(
        &self,
        set: &ScaleSetId,
        at: OffsetDateTime,
    ) -> Result<(), StoreError> {
        // `exists` is left to the mirror pass that reads the set: an event saying it was deleted
        // is a reason to read it, not proof.
        let entity = Entity::new(SCALESET_PARTITION, &set.key()).time("changedAt", at);
        self.scalesets.merge(SCALESET_PARTITION, entity).await
    }

    // ---- repairs: incident rows (one per instance, the claim) ----

    /// The incident row of every instance of the scale set that has one.
    pub async fn incidents(
        &self,
        set: &ScaleSetId,
    ) -> Result<(HashMap<String, Versioned<Incident>>, Skipped), StoreError> {
        // `incident:` rows sort after the journal's numeric keys; `;` is the character after `:`.
        let filter = format!(
            "PartitionKey eq {} and RowKey ge {} and RowKey lt {}",
            quote(&set.key()),
            quote(INCIDENT_PREFIX),
            quote("incident;")
        );
        let rows = self.repairs.query(Some(filter)).await?;
        let (list, skipped) = collect(rows, |r| {
            let version = r.etag().unwrap_or_default().to_string();
            incident_from_row(r).map(|value| Versioned { value, version })
        });
        Ok((
            list.into_iter()
                .map(|v| (v.value.target.clone(), v))
                .collect(),
            skipped,
        ))
    }

    /// Writes an incident only if its row is still at `claim` (or absent when `claim` is `None`).
    /// `Ok(None)` means another writer got there first: the caller must not act.
    pub async fn claim_incident(
        &self,
        set: &ScaleSetId,
        incident: &Incident,
        claim: Option<&str>,
    ) -> Result<Option<String>, StoreError> {
        let entity = incident_entity(set, incident);
        let written = match claim {
            None => self.repairs.insert(entity).await,
            Some(version) => self.repairs.replace_if(&set.key(), entity, version).await,
        };
        match written {
            Ok(version) => Ok(Some(version)),
            Err(StoreError::Conflict { .. } | StoreError::PreconditionFailed { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Claims many incidents of one scale set at once, each as [`Store::claim_incident`] would:
    /// one request per hundred rows, and rows claimed elsewhere (`None`) do not stop the others.
    pub async fn claim_incidents(
        &self,
        set: &ScaleSetId,
        claims: &[(&Incident, Option<&str>)],
    ) -> Result<Vec<Option<String>>, StoreError> {
        let rows = claims
            .iter()
            .map(|(incident, claim)| (incident_entity(set, incident), claim.map(str::to_string)))
            .collect();
        self.repairs.write_if_batch(&set.key(), rows).await
    }

    /// Undoes a claim: puts `previous` back (or removes the row if there was none), only if the
    /// row is still at `version`. `Ok(false)` if it changed meanwhile.
    pub async fn release_incident(
        &self,
        set: &ScaleSetId,
        target: &str,
        previous: Option<&Incident>,
        version: &str,
    ) -> Result<bool, StoreError> {
        match previous {
            Some(p) => match self
                .repairs
                .replace_if(&set.key(), incident_entity(set, p), version)
                .await
            {
                Ok(_) => Ok(true),
                Err(StoreError::PreconditionFailed { .. }) => Ok(false),
                Err(e) => Err(e),
            },
            None => {
                self.repairs
                    .delete_if(&set.key(), &format!("{INCIDENT_PREFIX}{target}"), version)
                    .await
            }
        }
    }

    // ---- repairs: the journal ----

    pub async fn append_journal(&self, entries: &[Entry]) -> Result<(), StoreError> {
        let mut by_set: HashMap<String, Vec<Entity>> = HashMap::new();
        for e in entries {
            // Unique across the batches of a pass (and its passes), whose entries share a time.
            let seq = JOURNAL_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 1_000_000;
            by_set
                .entry(e.scale_set.key())
                .or_default()
                .push(journal_entity(e, seq));
        }
        for (pk, entities) in by_set {
            self.repairs.upsert_batch(&pk, entities).await?;
        }
        Ok(())
    }

    /// Journal rows of a scale set at or after `since`, newest first.
    pub async fn journal(
        &self,
        set: &ScaleSetId,
        since: OffsetDateTime,
    ) -> Result<(Vec<Entry>, Skipped), StoreError> {
        // Row keys start with the inverted time, so "newer than" is "row key below".
        let upper = format!("{:020}~", inverted_micros(since));
        let filter = format!(
            "PartitionKey eq {} and RowKey lt {}",
            quote(&set.key()),
            quote(&upper)
        );
        let rows = self.repairs.query(Some(filter)).await?;
        Ok(collect(rows, |r| journal_from_row(set, r)))
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

fn instance_entity(set: &ScaleSetId, i: &Instance, synced_at: OffsetDateTime) -> Entity {
    Entity::new(&set.key(), &i.instance_id)
        .opt_str("vmId", i.vm_id.clone())
        .opt_str("computerName", i.computer_name.clone())
        .opt_str("provisioningState", i.provisioning_state.clone())
        .opt_str("powerState", i.power_state.clone())
        .opt_str("healthState", i.health.map(|h| h.as_str()))
        .opt_time("healthSince", i.health_since)
        .opt_bool("latestModelApplied", i.latest_model_applied)
        .bool(
            "protectFromScaleSetActions",
            i.protected_from_scale_set_actions,
        )
        .bool("protectFromScaleIn", i.protected_from_scale_in)
        .bool("deleteLocked", i.delete_locked)
        .opt_str("zone", i.zone.clone())
        .opt_time("createdAt", i.created_at)
        .opt_time("provisionedAt", i.provisioned_at)
        .time("syncedAt", synced_at)
}

fn instance_from_row(r: &Row) -> Result<MirroredInstance, RowError> {
    Ok(MirroredInstance {
        instance: Instance {
            instance_id: r.row_key().to_string(),
            vm_id: r.opt_str("vmId"),
            computer_name: r.opt_str("computerName"),
            provisioning_state: r.opt_str("provisioningState"),
            power_state: r.opt_str("powerState"),
            health: r
                .opt_str("healthState")
                .and_then(|h| AppHealth::from_code(&h)),
            health_since: r.opt_time("healthSince")?,
            latest_model_applied: r.opt_bool("latestModelApplied"),
            protected_from_scale_set_actions: r
                .opt_bool("protectFromScaleSetActions")
                .unwrap_or(false),
            protected_from_scale_in: r.opt_bool("protectFromScaleIn").unwrap_or(false),
            // Rows written before locks were read have none.
            delete_locked: r.opt_bool("deleteLocked").unwrap_or(false),
            zone: r.opt_str("zone"),
            created_at: r.opt_time("createdAt")?,
            provisioned_at: r.opt_time("provisionedAt")?,
        },
        synced_at: r.time("syncedAt")?,
    })
}

fn heartbeat_entity(hb: &Heartbeat) -> Entity {
    let until = match hb.status {
        Status::Maintenance { until } => Some(until),
        _ => None,
    };
    Entity::new(&hb.target.scale_set.key(), &hb.target.instance_id)
        .str("status", hb.status.label())
        .opt_time("until", until)
        .time("eventTime", hb.event_time)
        .time("receivedAt", hb.received_at)
        .opt_i64("sequence", hb.sequence)
        .opt_str("vmId", hb.vm_id.clone())
        .opt_str("computerName", hb.computer_name.clone())
        .opt_str("detail", hb.detail.clone())
        .str("origin", hb.origin.as_str())
        .str("eventId", hb.event_id.clone())
        .opt_time("downSince", hb.down_since)
        .bool("attested", hb.attested)
}

fn heartbeat_from_row(set: &ScaleSetId, r: &Row) -> Result<Heartbeat, RowError> {
    let status_text = r.str("status")?;
    let status = match status_text.as_str() {
        "UP" => Status::Up,
        "DOWN" => Status::Down,
        "MAINTENANCE" => Status::Maintenance {
            until: r.time("until")?,
        },
        other => {
            return Err(RowError {
                row_key: r.row_key().into(),
                property: "status".into(),
                why: format!("is `{other}`"),
            })
        }
    };
    Ok(Heartbeat {
        target: set.instance(r.row_key()),
        status,
        event_time: r.time("eventTime")?,
        received_at: r.time("receivedAt")?,
        sequence: r.opt_i64("sequence")?,
        vm_id: r.opt_str("vmId"),
        computer_name: r.opt_str("computerName"),
        detail: r.opt_str("detail"),
        origin: match r.opt_str("origin").as_deref() {
            Some("prunella") => Origin::Prunella,
            _ => Origin::Agent,
        },
        event_id: r.opt_str("eventId").unwrap_or_default(),
        down_since: r.opt_time("downSince")?,
        attested: r.opt_bool("attested").unwrap_or(false),
        attestation: None,
    })
}

/// Carries the start of a DOWN streak from the stored reading to the new one.
fn with_down_since(new: &Heartbeat, stored: Option<&Heartbeat>) -> Heartbeat {
    let down_since = match (&new.status, stored) {
        // A streak begun by a weaker source (a hostname-only DOWN) does not count for a stronger
        // one: it would let a forger start the `HEALER_DOWN_FOR` clock early.
        (Status::Down, Some(prev))
            if prev.status == Status::Down
                && prev.proof() >= new.proof().min(crate::heartbeat::Proof::VmId) =>
        {
            Some(prev.down_since.unwrap_or(prev.event_time))
        }
        (Status::Down, _) => Some(new.event_time),
        _ => None,
    };
    Heartbeat {
        down_since,
        ..new.clone()
    }
}

/// Stands in for a stored row that cannot be parsed, so that any real heartbeat supersedes it.
fn unreadable_placeholder(set: &ScaleSetId, instance_id: &str) -> Heartbeat {
    Heartbeat {
        target: set.instance(instance_id),
        status: Status::Up,
        event_time: OffsetDateTime::UNIX_EPOCH,
        received_at: OffsetDateTime::UNIX_EPOCH,
        sequence: None,
        vm_id: None,
        computer_name: None,
        detail: None,
        origin: Origin::Agent,
        event_id: String::new(),
        down_since: None,
        attested: false,
        attestation: None,
    }
}

fn scaleset_entity(set: &ScaleSetId, r: &ScaleSetRecord) -> Entity {
    Entity::new(SCALESET_PARTITION, &set.key())
        .str("resourceId", set.resource_id())
        .opt_i64("capacity", r.capacity)
        .opt_str("orchestrationMode", r.orchestration_mode.clone())
        .bool("platformAutoRepair", r.platform_auto_repair)
        .opt_time("lastSync", r.synced_at)
        .str("syncError", r.sync_error.clone().unwrap_or_default())
        .opt_time("throttledUntil", r.throttled_until)
        .bool("exists", r.exists)
        .opt_time("changedAt", r.changed_at)
        .str("breaker", r.breaker.clone().unwrap_or_default())
        .opt_time("breakerSince", r.breaker_since)
        .str(
            "operatorPause",
            r.operator_pause.clone().unwrap_or_default(),
        )
        .opt_time("operatorPauseSince", r.operator_pause_since)
}

/// The columns a mirror sync owns; the breaker (monitor-status) and `changedAt` (events, repairs)
/// are left to their writers, so a change announced during the sync is not lost.
fn sync_result_entity(set: &ScaleSetId, r: &ScaleSetRecord) -> Entity {
    Entity::new(SCALESET_PARTITION, &set.key())
        .str("resourceId", set.resource_id())
        .opt_i64("capacity", r.capacity)
        .opt_str("orchestrationMode", r.orchestration_mode.clone())
        .bool("platformAutoRepair", r.platform_auto_repair)
        .opt_time("lastSync", r.synced_at)
        .str("syncError", r.sync_error.clone().unwrap_or_default())
        .opt_time("throttledUntil", r.throttled_until)
        .bool("exists", r.exists)
}

fn scaleset_from_row(r: &Row) -> Result<ScaleSetRecord, RowError> {
    Ok(ScaleSetRecord {
        capacity: r.opt_i64("capacity")?,
        orchestration_mode: r.opt_str("orchestrationMode"),
        platform_auto_repair: r.opt_bool("platformAutoRepair").unwrap_or(false),
        synced_at: r.opt_time("lastSync")?,
        sync_error: r.opt_str("syncError").filter(|s| !s.is_empty()),
        throttled_until: r.opt_time("throttledUntil")?,
        exists: r.opt_bool("exists").unwrap_or(true),
        changed_at: r.opt_time("changedAt")?,
        breaker: r.opt_str("breaker").filter(|s| !s.is_empty()),
        breaker_since: r.opt_time("breakerSince")?,
        operator_pause: r.opt_str("operatorPause").filter(|s| !s.is_empty()),
        operator_pause_since: r.opt_time("operatorPauseSince")?,
    })
}

/// Microseconds until the far future: newer rows get smaller keys and list first.
fn inverted_micros(t: OffsetDateTime) -> i128 {
    const FAR: i128 = 99_999_999_999_999_999; // year ~5138 in microseconds
    FAR - t.unix_timestamp_nanos() / 1000
}

fn incident_entity(set: &ScaleSetId, i: &Incident) -> Entity {
    let state = match i.state {
        State::Repairing => "repairing",
        State::GivenUp => "given_up",
        State::Closed => "closed",
    };
    Entity::new(&set.key(), &format!("{INCIDENT_PREFIX}{}", i.target))
        .str("incident", i.id.clone())
        .str("instanceId", i.target.clone())
        .time("openedAt", i.opened_at)
        .str("cause", i.cause.clone())
        .str("state", state)
        .i64("attempt", i64::from(i.attempt))
        .opt_str("action", i.action.map(|a| a.as_str()))
        .opt_time("stepStarted", i.step_started)
        .opt_time("deadline", i.deadline)
        .opt_time("endedAt", i.ended_at)
        .opt_str("resolution", i.resolution.map(|r| r.as_str()))
        .str("phase", i.phase.as_str())
        .str("stage", i.stage.as_str())
        .opt_str("hold", i.hold.map(|h| h.as_str()))
        .opt_str("operation", i.operation.as_ref().map(|o| o.url.clone()))
        .opt_str(
            "operationKind",
            i.operation.as_ref().map(|o| o.kind.as_str()),
        )
        .opt_time("settledAt", i.settled_at)
        .opt_i64("errorStatus", i.error.as_ref().map(|e| i64::from(e.status)))
        .opt_str("errorCode", i.error.as_ref().map(|e| e.code.clone()))
        .opt_str("errorMessage", i.error.as_ref().map(|e| e.message.clone()))
        .bool("surged", i.surged)
        .bool("dryRun", i.dry_run)
        .opt_time("sentAt", i.sent_at)
        .i64("unanswered", i64::from(i.unanswered))
}

fn incident_from_row(r: &Row) -> Result<Incident, RowError> {
    let bad = |p: &str, why: String| RowError {
        row_key: r.row_key().into(),
        property: p.into(),
        why,
    };
    let state = match r.str("state")?.as_str() {
        "repairing" => State::Repairing,
        "given_up" => State::GivenUp,
        "closed" => State::Closed,
        other => return Err(bad("state", format!("is `{other}`"))),
    };
    // Rows written before steps were followed had no phase: their call had been accepted.
    let phase = match r.opt_str("phase") {
        Some(p) => Phase::parse(&p).ok_or_else(|| bad("phase", format!("is `{p}`")))?,
        None => Phase::Running,
    };
    let stage = match r.opt_str("stage") {
        Some(p) => Stage::parse(&p).ok_or_else(|| bad("stage", format!("is `{p}`")))?,
        None => Stage::Act,
    };
    let operation = match (r.opt_str("operation"), r.opt_str("operationKind")) {
        (Some(url), kind) => Some(OperationRef {
            url,
            kind: kind
                .as_deref()
                .and_then(OperationKind::parse)
                .unwrap_or(OperationKind::AsyncOperation),
        }),
        (None, _) => None,
    };
    let error = r.opt_str("errorCode").map(|code| ArmError {
        status: r
            .opt_i64("errorStatus")
            .ok()
            .flatten()
            .unwrap_or(0)
            .clamp(0, i64::from(u16::MAX)) as u16,
        code,
        message: r.opt_str("errorMessage").unwrap_or_default(),
    });
    Ok(Incident {
        id: r.str("incident")?,
        target: r.str("instanceId")?,
        opened_at: r.time("openedAt")?,
        cause: r.opt_str("cause").unwrap_or_default(),
        state,
        attempt: r.opt_i64("attempt")?.unwrap_or(0).clamp(0, u32::MAX as i64) as u32,
        action: match r.opt_str("action") {
            Some(a) => Some(a.parse::<RepairAction>().map_err(|e| bad("action", e))?),
            None => None,
        },
        step_started: r.opt_time("stepStarted")?,
        deadline: r.opt_time("deadline")?,
        ended_at: r.opt_time("endedAt")?,
        resolution: match r.opt_str("resolution").as_deref() {
            Some("recovered") => Some(Resolution::Recovered),
            Some("removed") => Some(Resolution::Removed),
            _ => None,
        },
        phase,
        stage,
        hold: r.opt_str("hold").as_deref().and_then(Hold::parse),
        operation,
        settled_at: r.opt_time("settledAt")?,
        error,
        surged: r.opt_bool("surged").unwrap_or(false),
        dry_run: r.opt_bool("dryRun").unwrap_or(false),
        sent_at: r.opt_time("sentAt")?,
        unanswered: r.opt_i64("unanswered")?.unwrap_or(0).clamp(0, 100) as u32,
    })
}

/// Numbers journal rows written by this process: two entries of one instance at one time (an
/// intent and its answer) must not share a row key.
static JOURNAL_SEQ: AtomicU64 = AtomicU64::new(0);

fn journal_entity(e: &Entry, seq: u64) -> Entity {
    let row_key = format!("{:020}-{}-{seq:06}", inverted_micros(e.at), e.instance_id);
    Entity::new(&e.scale_set.key(), &row_key)
        .str("instanceId", e.instance_id.clone())
        .time("at", e.at)
        .str("incident", e.incident.clone())
        .str("kind", e.kind.as_str())
        .opt_str("action", e.action.map(|a| a.as_str()))
        .i64("attempt", i64::from(e.attempt))
        .str("outcome", e.outcome.clone())
        .str("reason", e.reason.clone())
        .str("evidence", e.evidence.to_string())
        .bool("dryRun", e.dry_run)
}

fn journal_from_row(set: &ScaleSetId, r: &Row) -> Result<Entry, RowError> {
    let kind_text = r.str("kind")?;
    let bad = |p: &str, why: String| RowError {
        row_key: r.row_key().into(),
        property: p.into(),
        why,
    };
    Ok(Entry {
        scale_set: set.clone(),
        instance_id: r.str("instanceId")?,
        at: r.time("at")?,
        incident: r.str("incident")?,
        kind: EntryKind::parse(&kind_text)
            .ok_or_else(|| bad("kind", format!("is `{kind_text}`")))?,
        action: match r.opt_str("action") {
            Some(a) => Some(a.parse::<RepairAction>().map_err(|e| bad("action", e))?),
            None => None,
        },
        attempt: r.opt_i64("attempt")?.unwrap_or(0).clamp(0, u32::MAX as i64) as u32,
        outcome: r.opt_str("outcome").unwrap_or_default(),
        reason: r.opt_str("reason").unwrap_or_default(),
        evidence: r
            .opt_str("evidence")
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or(serde_json::Value::Null),
        dry_run: r.opt_bool("dryRun").unwrap_or(false),
    })
}

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
