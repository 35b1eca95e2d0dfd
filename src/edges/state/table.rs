//! Table mechanics shared by every table: typed property values, paged queries, batches and
//! conditional writes, with the storage errors a caller branches on.

use azure_core::error::ErrorKind;
use azure_core::StatusCode;
use azure_data_tables::operations::TransactionBuilder;
use azure_data_tables::prelude::{IfMatchCondition, TableClient};
use futures::StreamExt;
use serde_json::{Map, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// Counts the requests sent to table storage, for tests and benchmarks of write economy.
#[derive(Debug)]
pub(crate) struct CountingTransport {
    pub(crate) inner: reqwest::Client,
    pub(crate) requests: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

#[async_trait::async_trait]
impl azure_core::HttpClient for CountingTransport {
    async fn execute_request(
        &self,
        request: &azure_core::Request,
    ) -> azure_core::Result<azure_core::Response> {
        self.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.execute_request(request).await
    }
}

/// Largest entity group transaction the Table service accepts.
pub const MAX_BATCH: usize = 100;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The row exists already (insert) — another writer got there first.
    #[error("{table}: row {key} already exists")]
    Conflict { table: &'static str, key: String },
    /// The row changed since it was read (ETag mismatch) or is gone.
    #[error("{table}: row {key} changed since it was read")]
    PreconditionFailed { table: &'static str, key: String },
    /// Storage could not be reached or answered with a server error: worth a retry.
    #[error("{table}: table storage unavailable during {op}: {detail}")]
    Unavailable {
        table: &'static str,
        op: &'static str,
        /// The storage client's error, redacted: it quotes request URLs, which carry the SAS.
        detail: String,
    },
    #[error("{table}: {op} failed: {detail}")]
    Failed {
        table: &'static str,
        op: &'static str,
        detail: String,
    },
    /// The table does not exist (it was dropped, or storage was restored without it): it is
    /// recreated, and the request is worth a retry.
    #[error("{table}: the table is missing; it is being recreated, try again")]
    TableMissing { table: &'static str },
    /// Other writers kept changing the row between our reads and writes: worth a retry later.
    #[error("{table}: row {key} kept changing under other writers; try again later")]
    Contended { table: &'static str, key: String },
    #[error("{table}: batch {op} failed on row {key}: HTTP {status}")]
    BatchRejected {
        table: &'static str,
        op: &'static str,
        key: String,
        status: u16,
    },
}

impl StoreError {
    /// Whether retrying later could succeed (so an Event Grid delivery should be redelivered).
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable { .. }
                | StoreError::Contended { .. }
                | StoreError::TableMissing { .. }
        )
    }

    pub(crate) fn from_azure(
        table: &'static str,
        op: &'static str,
        key: &str,
        e: azure_core::Error,
    ) -> Self {
        let code = e.as_http_error().and_then(|h| h.error_code());
        let detail = describe(&e);
        if code.is_some_and(|c| c.eq_ignore_ascii_case("TableNotFound")) {
            return StoreError::TableMissing { table };
        }
        match e.kind() {
            ErrorKind::HttpResponse { status, .. } => match *status {
                StatusCode::Conflict => StoreError::Conflict {
                    table,
                    key: key.to_string(),
                },
                StatusCode::PreconditionFailed | StatusCode::NotFound if op != "query" => {
                    StoreError::PreconditionFailed {
                        table,
                        key: key.to_string(),
                    }
                }
                s if u16::from(s) >= 500
                    || s == StatusCode::TooManyRequests
                    || s == StatusCode::RequestTimeout =>
                {
                    StoreError::Unavailable { table, op, detail }
                }
                _ => StoreError::Failed { table, op, detail },
            },
            ErrorKind::Io => StoreError::Unavailable { table, op, detail },
            _ => StoreError::Failed { table, op, detail },
        }
    }
}

/// The storage client's error with its causes, and no secret: the error is the only thing that
/// leaves this layer, so it is redacted here rather than trusted to every reader.
fn describe(e: &azure_core::Error) -> String {
    let mut text = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let more = c.to_string();
        if !text.contains(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        cause = c.source();
    }
    crate::secret::redact(&text)
}

/// An entity being written: keys plus typed properties.
#[derive(Debug, Clone)]
pub struct Entity(Map<String, Value>);

impl Entity {
    pub fn new(partition_key: &str, row_key: &str) -> Self {
        let mut map = Map::new();
        map.insert("PartitionKey".into(), Value::String(partition_key.into()));
        map.insert("RowKey".into(), Value::String(row_key.into()));
        Entity(map)
    }

    pub fn row_key(&self) -> &str {
        self.0
            .get("RowKey")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    pub fn str(mut self, name: &str, value: impl Into<String>) -> Self {
        self.0.insert(name.into(), Value::String(value.into()));
        self
    }

    pub fn opt_str(self, name: &str, value: Option<impl Into<String>>) -> Self {
        match value {
            Some(v) => self.str(name, v),
            None => self,
        }
    }

    pub fn bool(mut self, name: &str, value: bool) -> Self {
        self.0.insert(name.into(), Value::Bool(value));
        self
    }

    pub fn opt_bool(self, name: &str, value: Option<bool>) -> Self {
        match value {
            Some(v) => self.bool(name, v),
            None => self,
        }
    }

    /// An `Edm.Int64`: sent as a string with its type annotation, as JSON numbers would be read
    /// back as Int32 or Double.
    pub fn i64(mut self, name: &str, value: i64) -> Self {
        self.0.insert(name.into(), Value::String(value.to_string()));
        self.0.insert(
            format!("{name}@odata.type"),
            Value::String("Edm.Int64".into()),
        );
        self
    }

    pub fn opt_i64(self, name: &str, value: Option<i64>) -> Self {
        match value {
            Some(v) => self.i64(name, v),
            None => self,
        }
    }

    /// An `Edm.DateTime`, so the column sorts and filters as a time in every table tool.
    pub fn time(mut self, name: &str, value: OffsetDateTime) -> Self {
        self.0
            .insert(name.into(), Value::String(format_time(value)));
        self.0.insert(
            format!("{name}@odata.type"),
            Value::String("Edm.DateTime".into()),
        );
        self
    }

    pub fn opt_time(self, name: &str, value: Option<OffsetDateTime>) -> Self {
        match value {
            Some(v) => self.time(name, v),
            None => self,
        }
    }

    pub(crate) fn into_value(self) -> Value {
        Value::Object(self.0)
    }
}

pub fn format_time(t: OffsetDateTime) -> String {
    // Table storage keeps 7 fractional digits; microseconds are plenty and parse everywhere.
    let t = t.to_offset(time::UtcOffset::UTC);
    let t = t
        .replace_nanosecond(t.nanosecond() / 1000 * 1000)
        .unwrap_or(t);
    t.format(&Rfc3339).unwrap_or_default()
}

/// A row read back, with typed getters that tolerate the service's encodings.
#[derive(Debug, Clone)]
pub struct Row(pub(crate) Map<String, Value>);

#[derive(Debug, Clone, thiserror::Error)]
#[error("row {row_key}: property `{property}` {why}")]
pub struct RowError {
    pub row_key: String,
    pub property: String,
    pub why: String,
}

impl Row {
    pub fn partition_key(&self) -> &str {
        self.0
            .get("PartitionKey")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    pub fn row_key(&self) -> &str {
        self.0
            .get("RowKey")
            .and_then(Value::as_str)
            .unwrap_or_default()
    }

    pub fn etag(&self) -> Option<&str> {
        self.0.get("odata.etag").and_then(Value::as_str)
    }

    fn err(&self, property: &str, why: impl Into<String>) -> RowError {
        RowError {
            row_key: self.row_key().to_string(),
            property: property.to_string(),
            why: why.into(),
        }
    }

    pub fn opt_str(&self, name: &str) -> Option<String> {
        self.0.get(name).and_then(Value::as_str).map(str::to_string)
    }

    pub fn str(&self, name: &str) -> Result<String, RowError> {
        self.opt_str(name)
            .ok_or_else(|| self.err(name, "is missing"))
    }

    pub fn opt_bool(&self, name: &str) -> Option<bool> {
        self.0.get(name).and_then(Value::as_bool)
    }

    pub fn opt_i64(&self, name: &str) -> Result<Option<i64>, RowError> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_i64()
                .map(Some)
                .ok_or_else(|| self.err(name, "is not a whole number")),
            Some(Value::String(s)) => s
                .parse()
                .map(Some)
                .map_err(|_| self.err(name, "is not a whole number")),
            Some(_) => Err(self.err(name, "is not a whole number")),
        }
    }

    pub fn opt_time(&self, name: &str) -> Result<Option<OffsetDateTime>, RowError> {
        match self.0.get(name) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) => OffsetDateTime::parse(s, &Rfc3339)
                .map(Some)
                .map_err(|_| self.err(name, format!("is not a time: `{s}`"))),
            Some(_) => Err(self.err(name, "is not a time")),
        }
    }

    pub fn time(&self, name: &str) -> Result<OffsetDateTime, RowError> {
        self.opt_time(name)?
            .ok_or_else(|| self.err(name, "is missing"))
    }
}

/// One table, by name.
#[derive(Debug, Clone)]
pub struct Table {
    pub(crate) name: &'static str,
    pub(crate) client: TableClient,
    /// Set when any table of the store was found missing, so that it is recreated.
    pub(crate) missing: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Table {
    /// Classifies a storage error, and remembers a missing table.
    fn error(&self, op: &'static str, key: &str, e: azure_core::Error) -> StoreError {
        let error = StoreError::from_azure(self.name, op, key, e);
        if let StoreError::TableMissing { .. } = error {
            self.missing
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        error
    }

    pub async fn ensure_exists(&self) -> Result<(), StoreError> {
        match self.client.create().await {
            Ok(_) => Ok(()),
            Err(e) => match self.error("create table", self.name, e) {
                StoreError::Conflict { .. } => Ok(()),
                other => Err(other),
            },
        }
    }

    /// Runs a query to its end, following continuation tokens.
    pub async fn query(&self, filter: Option<String>) -> Result<Vec<Row>, StoreError> {
        let mut builder = self.client.query();
        if let Some(f) = filter {
            builder = builder.filter(f);
        }
        let mut stream = builder.into_stream::<Map<String, Value>>();
        let mut rows = Vec::new();
        while let Some(page) = stream.next().await {
            let page = page.map_err(|e| self.error("query", "", e))?;
            rows.extend(page.entities.into_iter().map(Row));
        }
        Ok(rows)
    }

    /// The row keys of the first `at_most` rows the filter matches, in key order, reading no
    /// more (`$top`, `$select=RowKey`): a clean-up deletes a bounded share per pass without
    /// reading the rest.
    pub async fn first_keys(
        &self,
        filter: String,
        at_most: usize,
    ) -> Result<Vec<String>, StoreError> {
        // A page holds at most 1,000 entities.
        let top = u32::try_from(at_most.clamp(1, 1000)).unwrap_or(1000);
        let mut stream = self
            .client
            .query()
            .filter(filter)
            .select("RowKey")
            .top(top)
            .into_stream::<Map<String, Value>>();
        let mut keys = Vec::new();
        while keys.len() < at_most {
            let Some(page) = stream.next().await else {
                break;
            };
            let page = page.map_err(|e| self.error("query", "", e))?;
            keys.extend(
                page.entities
                    .into_iter()
                    .filter_map(|e| e.get("RowKey").and_then(Value::as_str).map(str::to_string)),
            );
        }
        keys.truncate(at_most);
        Ok(keys)
    }

    pub async fn get(&self, partition_key: &str, row_key: &str) -> Result<Option<Row>, StoreError> {
        let filter = format!(
            "PartitionKey eq {} and RowKey eq {}",
            quote(partition_key),
            quote(row_key)
        );
        Ok(self.query(Some(filter)).await?.into_iter().next())
    }

    /// Inserts a row that must not exist yet ([`StoreError::Conflict`] if it does); returns its
    /// ETag.
    pub async fn insert(&self, entity: Entity) -> Result<String, StoreError> {
        let key = entity.row_key().to_string();
        let op = self
            .client
            .insert::<Value, Value>(entity.into_value())
            .map_err(|e| self.error("insert", &key, e))?
            .return_entity(false);
        op.await
            .map(|r| r.etag.to_string())
            .map_err(|e| self.error("insert", &key, e))
    }

    /// Replaces a row only if it still has `etag` ([`StoreError::PreconditionFailed`] if not);
    /// returns the new ETag.
    pub async fn replace_if(
        &self,
        partition_key: &str,
        entity: Entity,
        etag: &str,
    ) -> Result<String, StoreError> {
        let key = entity.row_key().to_string();
        let client = self
            .client
            .partition_key_client(partition_key)
            .entity_client(&key);
        let op = client
            .update(
                entity.into_value(),
                IfMatchCondition::Etag(etag.to_string().into()),
            )
            .map_err(|e| self.error("replace", &key, e))?;
        op.await
            .map(|r| r.etag.to_string())
            .map_err(|e| self.error("replace", &key, e))
    }

    pub async fn upsert(&self, partition_key: &str, entity: Entity) -> Result<(), StoreError> {
        let key = entity.row_key().to_string();
        let client = self
            .client
            .partition_key_client(partition_key)
            .entity_client(&key);
        let op = client
            .insert_or_replace(entity.into_value())
            .map_err(|e| self.error("upsert", &key, e))?;
        op.await
            .map(|_| ())
            .map_err(|e| self.error("upsert", &key, e))
    }

    /// Merges properties into a row, creating it if needed.
    pub async fn merge(&self, partition_key: &str, entity: Entity) -> Result<(), StoreError> {
        let key = entity.row_key().to_string();
        let client = self
            .client
            .partition_key_client(partition_key)
            .entity_client(&key);
        let op = client
            .insert_or_merge(entity.into_value())
            .map_err(|e| self.error("merge", &key, e))?;
        op.await
            .map(|_| ())
            .map_err(|e| self.error("merge", &key, e))
    }

    /// Upserts rows of one partition in transactions of at most [`MAX_BATCH`].
    pub async fn upsert_batch(
        &self,
        partition_key: &str,
        entities: Vec<Entity>,
    ) -> Result<usize, StoreError> {
        self.write_batch(partition_key, entities, false).await
    }

    /// Merges properties into rows of one partition (creating them if needed), in transactions of
    /// at most [`MAX_BATCH`].
    pub async fn merge_batch(
        &self,
        partition_key: &str,
        entities: Vec<Entity>,
    ) -> Result<usize, StoreError> {
        self.write_batch(partition_key, entities, true).await
    }

    async fn write_batch(
        &self,
        partition_key: &str,
        entities: Vec<Entity>,
        merge: bool,
    ) -> Result<usize, StoreError> {
        let what = if merge { "batch merge" } else { "batch upsert" };
        let mut written = 0;
        let mut iter = entities.into_iter().peekable();
        while iter.peek().is_some() {
            let chunk: Vec<Entity> = iter.by_ref().take(MAX_BATCH).collect();
            let keys: Vec<String> = chunk.iter().map(|e| e.row_key().to_string()).collect();
            let mut tx = self
                .client
                .partition_key_client(partition_key)
                .transaction();
            for entity in chunk {
                let key = entity.row_key().to_string();
                let value = entity.into_value();
                tx = if merge {
                    tx.insert_or_merge(key.clone(), value)
                } else {
                    tx.insert_or_replace(key.clone(), value)
                }
                .map_err(|e| self.error(what, &key, e))?;
            }
            self.run_batch(tx, what, &keys).await?;
            written += keys.len();
        }
        Ok(written)
    }

    /// Writes rows of one partition, each only if it is absent (`None`: insert) or still at the
    /// version given (replace), in transactions of at most [`MAX_BATCH`]. A transaction fails
    /// whole when one of its rows changed; its rows are then written one by one, so the others
    /// still land. Returns each row's new version, `None` where another writer got there first.
    pub async fn write_if_batch(
        &self,
        partition_key: &str,
        rows: Vec<(Entity, Option<String>)>,
    ) -> Result<Vec<Option<String>>, StoreError> {
        let mut versions = Vec::with_capacity(rows.len());
        let mut iter = rows.into_iter().peekable();
        while iter.peek().is_some() {
            let chunk: Vec<(Entity, Option<String>)> = iter.by_ref().take(MAX_BATCH).collect();
            let keys: Vec<String> = chunk.iter().map(|(e, _)| e.row_key().to_string()).collect();
            let mut tx = self
                .client
                .partition_key_client(partition_key)
                .transaction();
            for (entity, etag) in &chunk {
                let key = entity.row_key().to_string();
                let value = entity.clone().into_value();
                tx = match etag {
                    None => tx.insert(value),
                    Some(etag) => tx.update(
                        key.clone(),
                        value,
                        Some(IfMatchCondition::Etag(etag.clone().into())),
                    ),
                }
                .map_err(|e| self.error("batch write", &key, e))?;
            }
            match self.run_batch_versions(tx, "batch write", &keys).await {
                Ok(written) => {
                    for (key, version) in keys.iter().zip(written) {
                        // A version the answer did not carry is read back: the row was written.
                        let version = match version {
                            Some(v) => v,
                            None => self
                                .get(partition_key, key)
                                .await?
                                .and_then(|r| r.etag().map(str::to_string))
                                .unwrap_or_default(),
                        };
                        versions.push(Some(version));
                    }
                }
                Err(StoreError::BatchRejected {
                    status: 404 | 409 | 412,
                    ..
                }) => {
                    for (entity, etag) in chunk {
                        let written = match etag {
                            None => self.insert(entity).await,
                            Some(etag) => self.replace_if(partition_key, entity, &etag).await,
                        };
                        match written {
                            Ok(version) => versions.push(Some(version)),
                            Err(
                                StoreError::Conflict { .. } | StoreError::PreconditionFailed { .. },
                            ) => versions.push(None),
                            Err(e) => return Err(e),
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(versions)
    }

    /// Deletes rows of one partition in transactions of at most [`MAX_BATCH`]; rows already gone
    /// are not an error.
    pub async fn delete_batch(
        &self,
        partition_key: &str,
        row_keys: &[String],
    ) -> Result<usize, StoreError> {
        let mut deleted = 0;
        for chunk in row_keys.chunks(MAX_BATCH) {
            let mut tx = self
                .client
                .partition_key_client(partition_key)
                .transaction();
            for key in chunk {
                tx = tx
                    .delete(key.clone(), None)
                    .map_err(|e| self.error("batch delete", key, e))?;
            }
            match self.run_batch(tx, "batch delete", chunk).await {
                Ok(()) => deleted += chunk.len(),
                // One missing row fails the whole transaction: fall back to single deletes.
                Err(StoreError::BatchRejected { status: 404, .. }) => {
                    for key in chunk {
                        if self.delete(partition_key, key).await? {
                            deleted += 1;
                        }
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(deleted)
    }

    /// Deletes one row only if it still has `etag`; `Ok(false)` if it changed or is gone.
    pub async fn delete_if(
        &self,
        partition_key: &str,
        row_key: &str,
        etag: &str,
    ) -> Result<bool, StoreError> {
        let client = self
            .client
            .partition_key_client(partition_key)
            .entity_client(row_key);
        let op = client
            .delete()
            .if_match(IfMatchCondition::Etag(etag.to_string().into()));
        match op.await {
            Ok(_) => Ok(true),
            Err(e) => match self.error("delete", row_key, e) {
                StoreError::PreconditionFailed { .. } => Ok(false),
                other => Err(other),
            },
        }
    }

    /// Deletes one row; `Ok(false)` if it was not there.
    pub async fn delete(&self, partition_key: &str, row_key: &str) -> Result<bool, StoreError> {
        let client = self
            .client
            .partition_key_client(partition_key)
            .entity_client(row_key);
        match client.delete().await {
            Ok(_) => Ok(true),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::HttpResponse {
                        status: StatusCode::NotFound,
                        ..
                    }
                ) =>
            {
                Ok(false)
            }
            Err(e) => Err(self.error("delete", row_key, e)),
        }
    }

    async fn run_batch(
        &self,
        tx: TransactionBuilder,
        op: &'static str,
        keys: &[String],
    ) -> Result<(), StoreError> {
        self.run_batch_versions(tx, op, keys).await.map(|_| ())
    }

    /// Runs a transaction; returns the version each operation wrote, where the answer says.
    async fn run_batch_versions(
        &self,
        tx: TransactionBuilder,
        op: &'static str,
        keys: &[String],
    ) -> Result<Vec<Option<String>>, StoreError> {
        let response = tx.await.map_err(|e| self.error(op, "", e))?;
        // The service answers 202 for the batch and reports a failed changeset inside it.
        for (i, r) in response.operation_responses.iter().enumerate() {
            let status = u16::from(r.status_code);
            if status >= 300 {
                return Err(StoreError::BatchRejected {
                    table: self.name,
                    op,
                    key: keys.get(i).cloned().unwrap_or_default(),
                    status,
                });
            }
        }
        Ok(response
            .operation_responses
            .iter()
            .map(|r| r.etag.as_ref().map(|e| e.to_string()))
            .chain(std::iter::repeat(None))
            .take(keys.len())
            .collect())
    }
}

/// Quotes a string literal for an OData filter.
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
