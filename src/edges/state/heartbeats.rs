//! The `heartbeats` table: each instance's last believed reading, written with ETags so that a
//! weaker or older reading never replaces a stronger or newer one.

use super::*;

/// Writes of one heartbeat row tried before it counts as contended (and its delivery is retried).
const WRITE_ATTEMPTS: u32 = 8;

impl Store {
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
        for attempt in 0..WRITE_ATTEMPTS {
            if attempt > 0 {
                // Lost a race with another writer of this row: wait a little, at random (full
                // jitter, growing), so that a crowd of writers — a redelivery burst — does not
                // keep colliding until one gives up.
                let cap_ms = 5u64 << attempt.min(5);
                let wait = (uuid::Uuid::new_v4().as_u128() % u128::from(cap_ms)) as u64;
                tokio::time::sleep(std::time::Duration::from_millis(wait)).await;
            }
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

    /// When the instance's current DOWN streak began, as this process last wrote or read its
    /// heartbeat (no request: right after a write, the write's own answer).
    pub fn remembered_down_since(
        &self,
        set: &ScaleSetId,
        instance: &str,
    ) -> Option<time::OffsetDateTime> {
        lock(&self.last_heartbeat)
            .get(&(set.key(), instance.to_string()))
            .and_then(|s| s.heartbeat.down_since)
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
}

fn heartbeat_entity(hb: &Heartbeat) -> Entity {
    let until = hb.status.until();
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
        "STARTING" => Status::Starting,
        "MAINTENANCE" => Status::Maintenance {
            until: r.time("until")?,
        },
        "DRAINING" => Status::Draining {
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
