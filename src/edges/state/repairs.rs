//! The `repairs` table: incidents (claimed by ETag, one per instance) and the journal rows of
//! each scale set, newest first.

use super::*;

impl Store {
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

    /// Deletes up to `at_most` journal rows of `set` written before `before` (never an incident
    /// row): Table Storage keeps no history for ever unless told. How many went.
    pub async fn prune_journal(
        &self,
        set: &ScaleSetId,
        before: OffsetDateTime,
        at_most: usize,
    ) -> Result<usize, StoreError> {
        // Older rows have larger inverted times, so "before" is "row key above"; every journal
        // key sorts before the `incident:` rows.
        let filter = format!(
            "PartitionKey eq {} and RowKey ge {} and RowKey lt {}",
            quote(&set.key()),
            quote(&format!("{:020}", inverted_micros(before))),
            quote(INCIDENT_PREFIX)
        );
        let keys = self.repairs.first_keys(filter, at_most).await?;
        self.repairs.delete_batch(&set.key(), &keys).await
    }
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
