//! The `scalesets` table: one row per watched scale set — capacity, orchestration mode, the last
//! sync, the brake, the operator's pause and the throttle.

use super::*;

impl Store {
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
    /// row as it is. The columns keep their first name (`breaker`, `breakerSince`), so rows
    /// written by earlier versions read the same.
    pub async fn set_brake(
        &self,
        set: &ScaleSetId,
        brake: Option<&str>,
        since: OffsetDateTime,
    ) -> Result<(), StoreError> {
        let entity = Entity::new(SCALESET_PARTITION, &set.key())
            .str("breaker", brake.unwrap_or_default())
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
}

fn scaleset_entity(set: &ScaleSetId, r: &ScaleSetRecord) -> Entity {
    sync_result_entity(set, r)
        .opt_time("changedAt", r.changed_at)
        .str("breaker", r.brake.clone().unwrap_or_default())
        .opt_time("breakerSince", r.brake_since)
        .str(
            "operatorPause",
            r.operator_pause.clone().unwrap_or_default(),
        )
        .opt_time("operatorPauseSince", r.operator_pause_since)
}

/// The columns a mirror sync owns; the brake (monitor-status) and `changedAt` (events, repairs)
/// are left to their writers, so a change announced during the sync is not lost.
fn sync_result_entity(set: &ScaleSetId, r: &ScaleSetRecord) -> Entity {
    Entity::new(SCALESET_PARTITION, &set.key())
        .str("resourceId", set.resource_id())
        .opt_i64("capacity", r.capacity)
        .opt_str("orchestrationMode", r.orchestration_mode.clone())
        .bool("platformAutoRepair", r.platform_auto_repair)
        .opt_i64(
            "terminateNoticeS",
            r.terminate_notice.map(|d| d.whole_seconds()),
        )
        .opt_str("location", r.location.clone())
        .opt_str("image", r.image.clone())
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
        terminate_notice: r
            .opt_i64("terminateNoticeS")?
            .filter(|s| *s > 0)
            .map(time::Duration::seconds),
        location: r.opt_str("location").filter(|s| !s.is_empty()),
        image: r.opt_str("image").filter(|s| !s.is_empty()),
        synced_at: r.opt_time("lastSync")?,
        sync_error: r.opt_str("syncError").filter(|s| !s.is_empty()),
        throttled_until: r.opt_time("throttledUntil")?,
        exists: r.opt_bool("exists").unwrap_or(true),
        changed_at: r.opt_time("changedAt")?,
        brake: r.opt_str("breaker").filter(|s| !s.is_empty()),
        brake_since: r.opt_time("breakerSince")?,
        operator_pause: r.opt_str("operatorPause").filter(|s| !s.is_empty()),
        operator_pause_since: r.opt_time("operatorPauseSince")?,
    })
}
