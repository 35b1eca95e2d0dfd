//! The operator's commands of the `handler` binary, against a deployment's tables with the same
//! settings as the Function App: `status` (what the healer sees and did), `journal` (the audit
//! trail), `pause` / `resume` (a manual brake `monitor-status` obeys), `operations` and
//! `operation pause|resume|abort` (the long-running operations of design §7). Reads and writes
//! the tables only, never the Compute API.

use crate::journal::{Entry, EntryKind};
use crate::operations::{Command, Operation};
use crate::plan::{pipeline_fault, Brakes};
use crate::repair::gather;
use crate::settings::{Settings, WatchedScaleSet};
use crate::state::Store;
use crate::status::{render, summarize, Report};
use anyhow::Context;
use futures::StreamExt;
use time::{Duration, OffsetDateTime};

/// Journal rows shown per scale set.
const RECENT: usize = 10;

/// `handler status [--json]`.
pub async fn status(settings: &Settings, store: &Store, json: bool) -> anyhow::Result<String> {
    let now = OffsetDateTime::now_utc();
    let records = store
        .scale_sets()
        .await
        .context("reading the scalesets table")?;
    let reads: Vec<_> = settings
        .scale_sets
        .iter()
        .map(|w| {
            let record = records.get(&w.id.key()).cloned();
            gather(store, &w.id, record, w.policy.stateful.is_some())
        })
        .collect();
    let observations: Vec<_> = futures::stream::iter(reads)
        .buffered(4)
        .collect::<Vec<_>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .context("reading the mirror, heartbeats and incidents")?;
    let mut observations = observations;
    let running = crate::repair::running_operations(store)
        .await
        .context("reading the operations table")?;
    let running: Vec<Operation> = running.into_iter().map(|v| v.value).collect();
    let mut held = crate::repair::held_by(&running);
    for (watched, obs) in settings.scale_sets.iter().zip(observations.iter_mut()) {
        obs.held = held.remove(&watched.id.key()).unwrap_or_default();
    }
    let pairs: Vec<_> = observations
        .iter()
        .zip(&settings.scale_sets)
        .map(|(o, w)| (o, &w.policy))
        .collect();
    let brakes = Brakes {
        mirror_max_age: settings.mirror_max_age,
        full_resync: settings.full_resync,
        pipeline_fault: pipeline_fault(&pairs, now),
        dry_run: settings.dry_run,
        lease: settings.lease(),
    };
    let mut scale_sets = Vec::new();
    for (watched, obs) in settings.scale_sets.iter().zip(&observations) {
        let (journal, _) = store
            .journal(&watched.id, now - Duration::hours(24))
            .await
            .with_context(|| format!("reading the journal of {}", watched.id))?;
        let recent: Vec<Entry> = journal.into_iter().take(RECENT).collect();
        scale_sets.push(summarize(
            &watched.id,
            &watched.policy,
            obs,
            brakes,
            &recent,
            now,
        ));
    }
    let report = Report {
        at: now,
        dry_run: settings.dry_run,
        settings_warnings: settings.warnings.clone(),
        scale_sets,
        operations: running,
    };
    Ok(if json {
        serde_json::to_string_pretty(&report)? + "\n"
    } else {
        render(&report)
    })
}

/// `handler pause <scale set> [--reason TEXT]` (`note: Some`) and `handler resume <scale set>`.
pub async fn set_pause(
    settings: &Settings,
    store: &Store,
    which: &str,
    note: Option<&str>,
) -> anyhow::Result<String> {
    let watched = find(settings, which)?;
    let now = OffsetDateTime::now_utc();
    store
        .set_operator_pause(&watched.id, note, now)
        .await
        .with_context(|| format!("writing the brake of {}", watched.id))?;
    let (outcome, reason, told) = match note {
        Some(note) => (
            "operator_pause",
            format!("paused by an operator: {note}"),
            format!(
                "paused {}: monitor-status starts no repair there until `handler resume {}`",
                watched.id, watched.id.name
            ),
        ),
        None => (
            "operator_resume",
            "resumed by an operator".to_string(),
            format!("resumed {}", watched.id),
        ),
    };
    // The audit trail: who paused what is in the journal, not only in the row that holds it.
    store
        .append_journal(&[Entry {
            scale_set: watched.id.clone(),
            instance_id: "*".into(),
            at: now,
            incident: String::new(),
            kind: EntryKind::Withheld,
            action: None,
            attempt: 0,
            outcome: outcome.into(),
            reason,
            evidence: serde_json::Value::Null,
            dry_run: settings.dry_run,
        }])
        .await
        .context("journaling the operator's brake")?;
    tracing::warn!(scale_set = %watched.id, decision = outcome, note = note.unwrap_or(""), "operator brake changed");
    Ok(told + "\n")
}

/// `handler operations [<scale set>] [--json]`: every operation, oldest first, with its progress.
pub async fn list_operations(
    settings: &Settings,
    store: &Store,
    which: Option<&str>,
    json: bool,
) -> anyhow::Result<String> {
    let set = which.map(|w| find(settings, w)).transpose()?.map(|w| &w.id);
    let (ops, skipped) = store
        .operations(set)
        .await
        .context("reading the operations table")?;
    for bad in &skipped.0 {
        tracing::warn!(error = %bad, "skipped an unreadable operation row");
    }
    let ops: Vec<Operation> = ops.into_iter().map(|v| v.value).collect();
    if json {
        return Ok(serde_json::to_string_pretty(&ops)? + "\n");
    }
    if ops.is_empty() {
        return Ok("no operation\n".into());
    }
    let mut out = String::new();
    for o in &ops {
        out.push_str(&format!(
            "{}  {}  {}{}  {}  started {} by {}{}\n",
            o.id,
            o.sets(),
            o.state.as_str(),
            if o.dry_run { " (dry run)" } else { "" },
            o.progress(),
            crate::journal::stamp(o.started),
            o.requested_by,
            o.last_error
                .as_deref()
                .map(|e| format!("; last error: {e}"))
                .unwrap_or_default()
        ));
    }
    Ok(out)
}

/// What `handler journal` asks for.
pub struct JournalQuery {
    pub filter: crate::journal::Filter,
    /// How far back.
    pub since: Duration,
    /// The newest this many rows.
    pub limit: Option<usize>,
    /// Each row's evidence too (always in `--json`).
    pub evidence: bool,
}

/// The command's arguments do not make a query: every problem, at once.
#[derive(Debug, thiserror::Error)]
#[error("{}", .0.join("; "))]
pub struct BadQuery(pub Vec<String>);

/// `handler journal`'s arguments, checked as a whole.
pub fn journal_query(
    instance: Option<&str>,
    incident: Option<&str>,
    kinds: &[String],
    since: &str,
    limit: Option<usize>,
    evidence: bool,
) -> Result<JournalQuery, BadQuery> {
    let mut problems = Vec::new();
    let mut parsed = Vec::new();
    for k in kinds.iter().map(|k| k.trim().to_ascii_lowercase()) {
        match crate::journal::EntryKind::parse(&k) {
            Some(kind) => parsed.push(kind),
            None => problems.push(format!(
                "--kind: `{k}` is not a kind (repair, withheld, outcome, step, intent, operation)"
            )),
        }
    }
    let since = match crate::policy::parse_duration(since) {
        Ok(d) if d > Duration::ZERO => d,
        Ok(_) => {
            problems.push(format!("--since: `{since}` must be more than zero"));
            Duration::ZERO
        }
        Err(e) => {
            problems.push(format!("--since: {e}"));
            Duration::ZERO
        }
    };
    if limit == Some(0) {
        problems.push("--limit: 0 rows shows nothing; give at least 1".into());
    }
    if !problems.is_empty() {
        return Err(BadQuery(problems));
    }
    Ok(JournalQuery {
        filter: crate::journal::Filter {
            instance: instance.map(str::to_string),
            incident: incident.map(str::to_string),
            kinds: parsed,
        },
        since,
        limit,
        evidence,
    })
}

/// `handler journal [<scale set>] [--instance I] [--incident ID] [--kind K,…] [--since 24h]
/// [--limit N] [--evidence] [--json]`: the audit trail of one watched scale set or all, oldest
/// first, read from the journal's partitions (never the Compute API).
pub async fn journal(
    settings: &Settings,
    store: &Store,
    which: Option<&str>,
    query: &JournalQuery,
    json: bool,
) -> anyhow::Result<String> {
    let sets = journal_sets(settings, which)?;
    let since = OffsetDateTime::now_utc() - query.since;
    let rows = read_journals(store, &sets, since).await?;
    let rows = crate::journal::chronicle(vec![rows], &query.filter, query.limit);
    if json {
        return Ok(serde_json::to_string_pretty(&rows)? + "\n");
    }
    Ok(crate::journal::render(&rows, query.evidence))
}

/// How often `handler journal --follow` looks for new rows.
const FOLLOW_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// `handler journal … --follow`: the rows so far, then each new one as it is written, until the
/// operator stops it (or `emit` says its reader went away); with `--json`, one row per line. A
/// failed read is said on standard error and tried again: following outlives a storage hiccup.
pub async fn follow_journal(
    settings: &Settings,
    store: &Store,
    which: Option<&str>,
    query: &JournalQuery,
    json: bool,
    mut emit: impl FnMut(&str) -> bool,
) -> anyhow::Result<()> {
    let sets = journal_sets(settings, which)?;
    let start = OffsetDateTime::now_utc() - query.since;
    let mut follow = crate::journal::Follow::default();
    let mut limit = query.limit;
    loop {
        // The next read starts at the newest row read, kept or not: a filter that keeps nothing
        // does not have every poll read the whole window again.
        match read_journals(store, &sets, follow.since(start)).await {
            Ok(rows) => {
                let fresh = follow.fresh(rows);
                for e in crate::journal::chronicle(vec![fresh], &query.filter, limit.take()) {
                    let line = if json {
                        serde_json::to_string(&e)? + "\n"
                    } else {
                        crate::journal::line(&e, query.evidence)
                    };
                    if !emit(&line) {
                        return Ok(());
                    }
                }
            }
            Err(e) => tracing::warn!(error = format!("{e:#}"), "journal not read; trying again"),
        }
        tokio::time::sleep(FOLLOW_EVERY).await;
    }
}

fn journal_sets<'a>(
    settings: &'a Settings,
    which: Option<&str>,
) -> anyhow::Result<Vec<&'a WatchedScaleSet>> {
    Ok(match which {
        Some(w) => vec![find(settings, w)?],
        None => settings.scale_sets.iter().collect(),
    })
}

/// The journal rows of `sets` at or after `since`, oldest first.
async fn read_journals(
    store: &Store,
    sets: &[&WatchedScaleSet],
    since: OffsetDateTime,
) -> anyhow::Result<Vec<Entry>> {
    let reads = sets.iter().map(|w| async move {
        store
            .journal(&w.id, since)
            .await
            .with_context(|| format!("reading the journal of {}", w.id))
    });
    let mut per_set = Vec::new();
    // Four sets at a time, as `status` reads them: an operator's command never floods storage.
    let reads: Vec<_> = futures::stream::iter(reads).buffered(4).collect().await;
    for read in reads {
        let (rows, skipped) = read?;
        for bad in &skipped.0 {
            tracing::warn!(error = %bad, "skipped an unreadable journal row");
        }
        per_set.push(rows);
    }
    Ok(crate::journal::chronicle(
        per_set,
        &crate::journal::Filter::default(),
        None,
    ))
}

/// `handler cycle <scale set> …`: a rolling cycle written as a pending operation, which the next
/// `monitor-status` pass takes up (issue 15). Parameters are checked as a whole first; a scale set
/// with an operation not yet over is refused (one per set).
pub async fn start_cycle(
    settings: &Settings,
    store: &Store,
    which: &str,
    raw: &crate::operations::cycle::Raw<'_>,
    note: &str,
    json: bool,
) -> anyhow::Result<String> {
    let watched = find(settings, which)?;
    let params = crate::operations::cycle::parse(raw).map_err(NotStarted::Parameters)?;
    let dry_run = params.dry_run || settings.dry_run;
    let op = Operation::new(
        crate::operations::Kind::Cycle,
        watched.id.clone(),
        serde_json::to_value(&params)?,
        note.to_string(),
        dry_run,
        OffsetDateTime::now_utc(),
    );
    start(store, op, note, json).await
}

/// `handler swap <from> <to> …`: a blue/green swap written as a pending operation (issue 16),
/// holding both scale sets; its row is the `from` set's. What only a pass can check (regions,
/// capacities, autoscale settings) is its preflight.
pub async fn start_swap(
    settings: &Settings,
    store: &Store,
    from: &str,
    to: &str,
    raw: &crate::operations::swap::Raw<'_>,
    note: &str,
    json: bool,
) -> anyhow::Result<String> {
    let (from, to) = (find(settings, from)?, find(settings, to)?);
    let mut problems = Vec::new();
    if from.id == to.id {
        problems.push("from and to are the same scale set: a swap needs two".to_string());
    }
    let params = crate::operations::swap::parse(raw, &to.id);
    if let Err(p) = &params {
        problems.extend(p.iter().cloned());
    }
    let params = match params {
        Ok(p) if problems.is_empty() => p,
        _ => return Err(NotStarted::Parameters(problems).into()),
    };
    let dry_run = params.dry_run || settings.dry_run;
    let mut op = Operation::new(
        crate::operations::Kind::Swap,
        from.id.clone(),
        serde_json::to_value(&params)?,
        note.to_string(),
        dry_run,
        OffsetDateTime::now_utc(),
    );
    op.partner = Some(to.id.clone());
    start(store, op, note, json).await
}

/// `handler prototype <scale set> …`: a golden image written as a pending operation (issue 17);
/// which instance, and whether the set can take a gallery image, its first pass decides.
pub async fn start_prototype(
    settings: &Settings,
    store: &Store,
    which: &str,
    raw: &crate::operations::prototype::Raw<'_>,
    note: &str,
    json: bool,
) -> anyhow::Result<String> {
    let watched = find(settings, which)?;
    let params =
        crate::operations::prototype::parse(raw, &watched.id).map_err(NotStarted::Parameters)?;
    let dry_run = params.dry_run || settings.dry_run;
    let op = Operation::new(
        crate::operations::Kind::Prototype,
        watched.id.clone(),
        serde_json::to_value(&params)?,
        note.to_string(),
        dry_run,
        OffsetDateTime::now_utc(),
    );
    start(store, op, note, json).await
}

/// Writes a pending operation (its sets held), journals the operator's command.
async fn start(store: &Store, mut op: Operation, note: &str, json: bool) -> anyhow::Result<String> {
    let now = op.started;
    let set = op.scale_set.clone();
    // Ids are `<kind>-<unix seconds>`: an operation started in the second an earlier one of the
    // set started (and ended) takes the next free second, so no row is ever overwritten.
    let (existing, _) = store
        .operations(Some(&set))
        .await
        .context("reading the operations table")?;
    let mut second = now.unix_timestamp();
    while existing.iter().any(|v| v.value.id == op.id) {
        second += 1;
        op.id = format!("{}-{second}", op.kind.as_str());
    }
    match store.start_operation(&op).await {
        Ok(_) => {}
        Err(crate::state::StoreError::Conflict { key, .. }) => {
            return Err(NotStarted::InTheWay(key).into())
        }
        Err(e) => return Err(anyhow::Error::new(e).context("writing the operation")),
    }
    let kind = op.kind.as_str();
    let what = match &op.partner {
        Some(to) => format!("{kind} to {to}"),
        None => kind.to_string(),
    };
    store
        .append_journal(&[Entry {
            scale_set: set.clone(),
            instance_id: "*".into(),
            at: now,
            incident: op.id.clone(),
            kind: EntryKind::Operation,
            action: None,
            attempt: 0,
            outcome: "operator_start".into(),
            reason: format!("{what} requested by an operator: {note}"),
            evidence: op.params.clone(),
            dry_run: op.dry_run,
        }])
        .await
        .context("journaling the operator's command")?;
    tracing::warn!(scale_set = %set, operation = %op.id, decision = "operator_start", note, "operator started an operation");
    if json {
        return Ok(serde_json::to_string_pretty(&op)? + "\n");
    }
    Ok(format!(
        "operation {} ({what}) on {}: pending; the next monitor-status pass starts it{} (`handler operations` follows it)\n",
        op.id,
        set,
        if op.dry_run { " as a dry run: nothing is called" } else { "" }
    ))
}

/// An operation the command could not start: the caller's to fix.
#[derive(Debug, thiserror::Error)]
pub enum NotStarted {
    #[error("{}", .0.join("; "))]
    Parameters(Vec<String>),
    #[error("another operation is in the way: {0}")]
    InTheWay(String),
}

/// `handler operation pause|resume|abort <id> [--scale-set S] [--reason TEXT]`: the command is
/// written over the version read (a pass advancing the operation at the same moment makes it
/// fail, and the operator tries again), and journaled.
pub async fn command_operation(
    settings: &Settings,
    store: &Store,
    id: &str,
    which: Option<&str>,
    command: Command,
    note: &str,
) -> anyhow::Result<String> {
    let set = which.map(|w| find(settings, w)).transpose()?.map(|w| &w.id);
    let (ops, _) = store
        .operations(set)
        .await
        .context("reading the operations table")?;
    let matching: Vec<_> = ops.into_iter().filter(|v| v.value.id == id).collect();
    let found = match matching.as_slice() {
        [one] => one,
        [] => return Err(NoSuchOperation::Unknown { id: id.into() }.into()),
        _ => return Err(NoSuchOperation::Ambiguous { id: id.into() }.into()),
    };
    let now = OffsetDateTime::now_utc();
    let next = found.value.command(command, now)?;
    if store
        .update_operation(&next, &found.version)
        .await
        .context("writing the operation")?
        .is_none()
    {
        anyhow::bail!("operation {id} changed while the command was written (a pass advanced it); run the command again");
    }
    let outcome = format!("operator_{}", command.as_str());
    store
        .append_journal(&[Entry {
            scale_set: next.scale_set.clone(),
            instance_id: "*".into(),
            at: now,
            incident: next.id.clone(),
            kind: EntryKind::Operation,
            action: None,
            attempt: 0,
            outcome: outcome.clone(),
            reason: format!("{} by an operator: {note}", next.state.as_str()),
            evidence: serde_json::json!({"from": found.value.state.as_str(), "to": next.state.as_str()}),
            dry_run: next.dry_run,
        }])
        .await
        .context("journaling the operator's command")?;
    tracing::warn!(scale_set = %next.scale_set, operation = %next.id, decision = %outcome, note, "operator command on an operation");
    Ok(format!(
        "operation {} on {}: {} → {}\n",
        next.id,
        next.scale_set,
        found.value.state.as_str(),
        next.state.as_str()
    ))
}

/// The command names no (or no single) operation: the caller's mistake.
#[derive(Debug, thiserror::Error)]
pub enum NoSuchOperation {
    #[error("no operation `{id}` (`handler operations` lists them)")]
    Unknown { id: String },
    #[error("`{id}` names operations of more than one scale set; give --scale-set")]
    Ambiguous { id: String },
}

/// The command names no (or no single) watched scale set: the caller's mistake, not the
/// deployment's.
#[derive(Debug, thiserror::Error)]
pub enum NoSuchScaleSet {
    #[error("`{which}` is not a watched scale set (HEALER_SCALE_SETS); watched:\n  {watched}")]
    NotWatched { which: String, watched: String },
    #[error("`{which}` names more than one watched scale set; give the resource id:\n  {watched}")]
    Ambiguous { which: String, watched: String },
}

/// A watched scale set by resource id or by name (when the name is unique).
fn find<'a>(settings: &'a Settings, which: &str) -> anyhow::Result<&'a WatchedScaleSet> {
    let matches: Vec<&WatchedScaleSet> = settings
        .scale_sets
        .iter()
        .filter(|w| {
            w.id.resource_id()
                .eq_ignore_ascii_case(which.trim_end_matches('/'))
                || w.id.name.eq_ignore_ascii_case(which)
        })
        .collect();
    let names = || {
        settings
            .scale_sets
            .iter()
            .map(|w| w.id.resource_id())
            .collect::<Vec<_>>()
            .join("\n  ")
    };
    let which = which.to_string();
    match matches.as_slice() {
        [one] => Ok(one),
        [] => Err(NoSuchScaleSet::NotWatched {
            which,
            watched: names(),
        }
        .into()),
        _ => Err(NoSuchScaleSet::Ambiguous {
            which,
            watched: names(),
        }
        .into()),
    }
}
