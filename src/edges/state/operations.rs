//! The `operations` table (design §7): one row per long-running operation, PartitionKey the scale
//! set's key, RowKey `<kind>-<unix seconds>`; written by an operator's command, advanced by
//! `monitor-status`, each write conditional on the row's ETag like an incident's.

use super::*;
use crate::operations::{Kind as OperationKind, Operation, State as OperationState};

/// The row that says which operation holds the scale set (`~` sorts after every operation id).
const CURRENT: &str = "~current";

impl Store {
    /// Starts an operation, unless an operation not over yet holds one of its scale sets (at
    /// most one per set; a swap holds two) or another writer started one first. Each set's
    /// `~current` row, inserted create-only, decides between operators starting at the same
    /// moment; a `~current` naming an operation that is over (or gone) is stale and taken over.
    /// `Err(Conflict)` names what is in the way; nothing stays held then.
    pub async fn start_operation(&self, op: &Operation) -> Result<String, StoreError> {
        let sets: Vec<&ScaleSetId> = op.held().into_iter().map(|(s, _)| s).collect();
        let mut locked: Vec<&ScaleSetId> = Vec::new();
        for set in &sets {
            if let Err(e) = self.hold_set(set, op).await {
                self.release_sets(&locked, &op.id).await;
                return Err(e);
            }
            locked.push(set);
        }
        match self.operations.insert(operation_entity(op)).await {
            Ok(version) => Ok(version),
            Err(e) => {
                // The operation was not written: its sets are not held for it.
                self.release_sets(&locked, &op.id).await;
                Err(e)
            }
        }
    }

    /// Takes one scale set's `~current` row for the operation.
    async fn hold_set(&self, set: &ScaleSetId, op: &Operation) -> Result<(), StoreError> {
        let partition = set.key();
        for _ in 0..2 {
            let lock = Entity::new(&partition, CURRENT)
                .str("operation", op.id.clone())
                .str("holder", op.scale_set.key());
            match self.operations.insert(lock).await {
                Ok(_) => return Ok(()),
                Err(StoreError::Conflict { .. }) => {}
                Err(e) => return Err(e),
            }
            let Some(current) = self.operations.get(&partition, CURRENT).await? else {
                continue; // released meanwhile: try again
            };
            let holder = current.opt_str("operation").unwrap_or_default();
            // A swap's row lives in its `from` set's partition; the `to` set's lock says so.
            let row_set = current
                .opt_str("holder")
                .and_then(|k| ScaleSetId::from_key(&k))
                .unwrap_or_else(|| set.clone());
            let (ops, _) = self.operations(Some(&row_set)).await?;
            match ops.iter().find(|v| v.value.id == holder) {
                Some(v) if !v.value.state.is_over() => {
                    return Err(StoreError::Conflict {
                        table: OPERATIONS,
                        key: format!(
                            "{partition} (operation {} is {}; one per scale set)",
                            v.value.id,
                            v.value.state.as_str()
                        ),
                    })
                }
                // Over, or never written: the hold is stale; released if unchanged, then retried.
                _ => {
                    if let Some(etag) = current.etag() {
                        self.operations.delete_if(&partition, CURRENT, etag).await?;
                    }
                }
            }
        }
        Err(StoreError::Contended {
            table: OPERATIONS,
            key: partition,
        })
    }

    /// Frees the scale sets an operation held, where their `~current` still names it. A release
    /// that fails leaves a stale hold, which the next start takes over.
    async fn release_sets(&self, sets: &[&ScaleSetId], id: &str) {
        for set in sets {
            if let Err(e) = self.release_set(set, id).await {
                tracing::warn!(scale_set = %set, operation = id, error = %e, "could not release a scale set's operation hold; the next start takes it over");
            }
        }
    }

    async fn release_set(&self, set: &ScaleSetId, id: &str) -> Result<(), StoreError> {
        let partition = set.key();
        if let Some(current) = self.operations.get(&partition, CURRENT).await? {
            if current.opt_str("operation").as_deref() == Some(id) {
                if let Some(etag) = current.etag() {
                    self.operations.delete_if(&partition, CURRENT, etag).await?;
                }
            }
        }
        Ok(())
    }

    /// The operations of one scale set, or of every scale set, oldest first, each with the
    /// version a write must match.
    pub async fn operations(
        &self,
        set: Option<&ScaleSetId>,
    ) -> Result<(Vec<Versioned<Operation>>, Skipped), StoreError> {
        let filter = set.map(|s| format!("PartitionKey eq {}", quote(&s.key())));
        let rows: Vec<Row> = self
            .operations
            .query(filter)
            .await?
            .into_iter()
            .filter(|r| r.row_key() != CURRENT)
            .collect();
        let (mut ops, skipped) = collect(rows, |r| {
            Ok(Versioned {
                value: operation_from_row(r)?,
                version: r.etag().unwrap_or_default().to_string(),
            })
        });
        ops.sort_by(|a, b| (a.value.started, &a.value.id).cmp(&(b.value.started, &b.value.id)));
        Ok((ops, skipped))
    }

    /// Writes an operation's new state over the version read; `None` if another writer changed
    /// it first (it is read again, never overwritten).
    pub async fn update_operation(
        &self,
        op: &Operation,
        version: &str,
    ) -> Result<Option<String>, StoreError> {
        let partition = op.scale_set.key();
        let written = match self
            .operations
            .replace_if(&partition, operation_entity(op), version)
            .await
        {
            Ok(version) => version,
            Err(StoreError::PreconditionFailed { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        // Over: its scale sets are free for the next operation.
        if op.state.is_over() {
            let sets: Vec<&ScaleSetId> = op.held().into_iter().map(|(s, _)| s).collect();
            self.release_sets(&sets, &op.id).await;
        }
        Ok(Some(written))
    }
}

/// A string property holds at most 64 KiB (32 K UTF-16 characters): the memo of a cycle of a
/// thousand Flexible VMs does not fit one, so it is kept in as many as it needs.
const MEMO_CHUNK: usize = 30_000;
const MEMO_CHUNKS: usize = 16;

fn operation_entity(op: &Operation) -> Entity {
    let memo = if op.memo.is_null() {
        String::new()
    } else {
        op.memo.to_string()
    };
    let mut entity = operation_fields(op);
    let chars: Vec<char> = memo.chars().collect();
    for (i, chunk) in chars.chunks(MEMO_CHUNK).take(MEMO_CHUNKS).enumerate() {
        entity = entity.str(&memo_property(i), chunk.iter().collect::<String>());
    }
    entity
}

fn memo_property(i: usize) -> String {
    if i == 0 {
        "memo".into()
    } else {
        format!("memo{i}")
    }
}

fn operation_fields(op: &Operation) -> Entity {
    Entity::new(&op.scale_set.key(), &op.id)
        .str("kind", op.kind.as_str())
        .str("state", op.state.as_str())
        .str("step", op.step.clone())
        .i64("done", i64::from(op.done))
        .i64("total", i64::from(op.total))
        .str("holds", op.holds.join(","))
        .opt_str("partner", op.partner.as_ref().map(ScaleSetId::key))
        .str("partnerHolds", op.partner_holds.join(","))
        .str("params", op.params.to_string())
        .time("started", op.started)
        .time("updated", op.updated)
        .opt_time("waitUntil", op.wait_until)
        .opt_str("lastError", op.last_error.clone())
        .opt_str("waiting", op.waiting.clone())
        .str("requestedBy", op.requested_by.clone())
        .bool("dryRun", op.dry_run)
}

fn operation_from_row(r: &Row) -> Result<Operation, RowError> {
    let bad = |property: &str, why: String| RowError {
        row_key: r.row_key().to_string(),
        property: property.to_string(),
        why,
    };
    let scale_set = ScaleSetId::from_key(r.partition_key())
        .ok_or_else(|| bad("PartitionKey", "not a scale set key".into()))?;
    let kind = r.str("kind")?;
    let kind =
        OperationKind::parse(&kind).ok_or_else(|| bad("kind", format!("unknown kind `{kind}`")))?;
    let state = r.str("state")?;
    let state = OperationState::parse(&state)
        .ok_or_else(|| bad("state", format!("unknown state `{state}`")))?;
    let count = |name: &str| -> Result<u32, RowError> {
        Ok(r.opt_i64(name)?
            .and_then(|n| u32::try_from(n).ok())
            .unwrap_or(0))
    };
    Ok(Operation {
        id: r.row_key().to_string(),
        scale_set,
        kind,
        state,
        step: r.opt_str("step").unwrap_or_default(),
        done: count("done")?,
        total: count("total")?,
        holds: list(r.opt_str("holds")),
        partner: match r.opt_str("partner").filter(|p| !p.is_empty()) {
            Some(k) => Some(
                ScaleSetId::from_key(&k)
                    .ok_or_else(|| bad("partner", "not a scale set key".into()))?,
            ),
            None => None,
        },
        partner_holds: list(r.opt_str("partnerHolds")),
        params: r
            .opt_str("params")
            .and_then(|p| serde_json::from_str(&p).ok())
            .unwrap_or(serde_json::Value::Null),
        started: r.time("started")?,
        updated: r.time("updated")?,
        wait_until: r.opt_time("waitUntil")?,
        last_error: r.opt_str("lastError"),
        waiting: r.opt_str("waiting"),
        memo: {
            let text: String = (0..MEMO_CHUNKS)
                .map_while(|i| r.opt_str(&memo_property(i)))
                .collect();
            if text.is_empty() {
                serde_json::Value::Null
            } else {
                serde_json::from_str(&text).map_err(|e| bad("memo", e.to_string()))?
            }
        },
        requested_by: r.opt_str("requestedBy").unwrap_or_default(),
        dry_run: r.opt_bool("dryRun").unwrap_or(false),
    })
}

fn list(joined: Option<String>) -> Vec<String> {
    joined
        .unwrap_or_default()
        .split(',')
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}
