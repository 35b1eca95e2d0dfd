//! The `operations` table (design §7): one row per long-running operation, PartitionKey the scale
//! set's key, RowKey `<kind>-<unix seconds>`; written by an operator's command, advanced by
//! `monitor-status`, each write conditional on the row's ETag like an incident's.

use super::*;
use crate::operations::{Kind as OperationKind, Operation, State as OperationState};

impl Store {
    /// Starts an operation, unless one of the scale set's is not over yet (at most one per set)
    /// or another writer started this one first. `Err(Conflict)` names what is in the way.
    pub async fn start_operation(&self, op: &Operation) -> Result<String, StoreError> {
        let (existing, _) = self.operations(Some(&op.scale_set)).await?;
        let existing: Vec<Operation> = existing.into_iter().map(|v| v.value).collect();
        if let Some(running) = crate::operations::in_the_way(&existing) {
            return Err(StoreError::Conflict {
                table: OPERATIONS,
                key: format!(
                    "{} (operation {} is {}; one per scale set)",
                    op.scale_set.key(),
                    running.id,
                    running.state.as_str()
                ),
            });
        }
        self.operations.insert(operation_entity(op)).await
    }

    /// The operations of one scale set, or of every scale set, oldest first, each with the
    /// version a write must match.
    pub async fn operations(
        &self,
        set: Option<&ScaleSetId>,
    ) -> Result<(Vec<Versioned<Operation>>, Skipped), StoreError> {
        let filter = set.map(|s| format!("PartitionKey eq {}", quote(&s.key())));
        let rows = self.operations.query(filter).await?;
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
        match self
            .operations
            .replace_if(&op.scale_set.key(), operation_entity(op), version)
            .await
        {
            Ok(version) => Ok(Some(version)),
            Err(StoreError::PreconditionFailed { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

fn operation_entity(op: &Operation) -> Entity {
    Entity::new(&op.scale_set.key(), &op.id)
        .str("kind", op.kind.as_str())
        .str("state", op.state.as_str())
        .str("step", op.step.clone())
        .i64("done", i64::from(op.done))
        .i64("total", i64::from(op.total))
        .str("holds", op.holds.join(","))
        .str("params", op.params.to_string())
        .time("started", op.started)
        .time("updated", op.updated)
        .opt_time("waitUntil", op.wait_until)
        .opt_str("lastError", op.last_error.clone())
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
        holds: r
            .opt_str("holds")
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        params: r
            .opt_str("params")
            .and_then(|p| serde_json::from_str(&p).ok())
            .unwrap_or(serde_json::Value::Null),
        started: r.time("started")?,
        updated: r.time("updated")?,
        wait_until: r.opt_time("waitUntil")?,
        last_error: r.opt_str("lastError"),
        requested_by: r.opt_str("requestedBy").unwrap_or_default(),
        dry_run: r.opt_bool("dryRun").unwrap_or(false),
    })
}
