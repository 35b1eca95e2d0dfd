//! The table layer against a real Azurite: tables, typed rows, paging, batches and ETags.

mod common;

use common::azurite::Azurite;
use std::sync::Arc;
use time::{Duration, OffsetDateTime};
use vmss_healer::heartbeat::{supersedes, Heartbeat, Origin, Proof, Status};

/// Newer, as `monitor-events` decides it for a scale set that requires vmId proof.
fn newer(new: &Heartbeat, stored: &Heartbeat) -> bool {
    supersedes(new, stored, Proof::Name)
}
use vmss_healer::journal::{Entry, EntryKind};
use vmss_healer::mirror::{AppHealth, Instance, ScaleSetRecord};
use vmss_healer::policy::RepairAction;
use vmss_healer::scaleset::ScaleSetId;
use vmss_healer::settings::StorageSettings;
use vmss_healer::state::{HeartbeatWrite, Store};

fn store_for(cs: String) -> Store {
    Store::connect(&StorageSettings::ConnectionString(cs), |_| {
        anyhow::bail!("no identity in these tests")
    })
    .expect("connect")
}

fn set() -> ScaleSetId {
    ScaleSetId::new("sub", "rg", "web")
}

fn instance(id: usize) -> Instance {
    Instance {
        instance_id: id.to_string(),
        vm_id: Some(format!("vm-{id}")),
        computer_name: Some(format!("web{id:06}")),
        provisioning_state: Some("Succeeded".into()),
        power_state: Some("running".into()),
        health_since: None,
        health: if id.is_multiple_of(2) {
            Some(AppHealth::Healthy)
        } else {
            None
        },
        latest_model_applied: Some(true),
        protected_from_scale_set_actions: id == 3,
        protected_from_scale_in: false,
        delete_locked: false,
        zone: Some("1".into()),
        created_at: Some(
            OffsetDateTime::UNIX_EPOCH + Duration::days(20_000) + Duration::microseconds(id as i64),
        ),
        provisioned_at: Some(OffsetDateTime::UNIX_EPOCH + Duration::days(20_001)),
        // A stateful VM's disks survive the round trip (ids hold neither `=` nor `;`).
        data_disks: if id.is_multiple_of(2) {
            vec![(0, format!("/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/disks/web_{id}-data-0")), (3, "d3".into())]
        } else {
            Vec::new()
        },
    }
}

fn heartbeat(at: OffsetDateTime, seq: i64) -> Heartbeat {
    Heartbeat {
        target: set().instance("7"),
        status: Status::Up,
        event_time: at,
        received_at: at,
        sequence: Some(seq),
        vm_id: Some("vm-7".into()),
        computer_name: None,
        detail: Some("ok".into()),
        origin: Origin::Agent,
        event_id: format!("e{seq}"),
        down_since: None,
        attested: false,
        attestation: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_round_trips_through_batches_and_continuation_pages() {
    let azurite = Azurite::start();
    let store = store_for(azurite.connection_string());
    store.ensure_tables().await.unwrap();
    store
        .ensure_tables()
        .await
        .expect("creating tables twice is fine");

    // More rows than one query page (1,000) and than one batch (100).
    let written: Vec<Instance> = (0..1_150).map(instance).collect();
    let synced = OffsetDateTime::now_utc();
    assert_eq!(
        store.write_mirror(&set(), &written, synced).await.unwrap(),
        1_150
    );

    let (mut read, skipped) = store.mirror(&set()).await.unwrap();
    assert!(skipped.0.is_empty());
    assert_eq!(read.len(), 1_150, "every page was followed");
    read.sort_by_key(|m| m.instance.instance_id.parse::<usize>().unwrap());
    for (got, want) in read.iter().zip(&written) {
        assert_eq!(&got.instance, want);
    }

    // Removal in batches, tolerating rows that are already gone.
    let gone: Vec<String> = (0..150)
        .map(|i| i.to_string())
        .chain(["missing".to_string()])
        .collect();
    assert_eq!(store.remove_instances(&set(), &gone).await.unwrap(), 150);
    let (read, _) = store.mirror(&set()).await.unwrap();
    assert_eq!(read.len(), 1_000);
    assert!(store
        .mirrored_instance(&set(), "149")
        .await
        .unwrap()
        .is_none());
    assert_eq!(
        store.mirrored_instance(&set(), "150").await.unwrap(),
        Some(instance(150))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeats_keep_the_newest_reading_even_with_concurrent_writers() {
    let azurite = Azurite::start();
    let store = Arc::new(store_for(azurite.connection_string()));
    store.ensure_tables().await.unwrap();
    let t0 = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();

    assert_eq!(
        store
            .store_heartbeat(&heartbeat(t0, 1), newer)
            .await
            .unwrap(),
        HeartbeatWrite::Stored
    );
    assert_eq!(
        store
            .store_heartbeat(&heartbeat(t0, 1), newer)
            .await
            .unwrap(),
        HeartbeatWrite::Ignored
    );
    assert_eq!(
        store
            .store_heartbeat(&heartbeat(t0 - Duration::seconds(60), 0), newer)
            .await
            .unwrap(),
        HeartbeatWrite::Ignored,
        "an older, late delivery does not overwrite"
    );

    let tasks: Vec<_> = (2..22)
        .map(|seq| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .store_heartbeat(&heartbeat(t0 + Duration::seconds(seq), seq), newer)
                    .await
            })
        })
        .collect();
    for t in tasks {
        t.await
            .unwrap()
            .expect("each write either stores or is ignored");
    }
    let stored = store
        .heartbeat(&set(), "7")
        .await
        .unwrap()
        .unwrap()
        .heartbeat;
    assert_eq!(
        stored.sequence,
        Some(21),
        "the newest of the racing writers won"
    );
    assert_eq!(stored.event_time, t0 + Duration::seconds(21));
    assert_eq!(
        stored,
        heartbeat(t0 + Duration::seconds(21), 21),
        "every field round-trips"
    );

    let maintenance = Heartbeat {
        status: Status::Maintenance {
            until: t0 + Duration::hours(1),
        },
        ..heartbeat(t0 + Duration::seconds(30), 30)
    };
    store.store_heartbeat(&maintenance, newer).await.unwrap();
    let (all, _) = store.heartbeats(&set()).await.unwrap();
    assert_eq!(all.get("7"), Some(&maintenance));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn journal_lists_newest_first_and_scale_set_records_round_trip() {
    let azurite = Azurite::start();
    let store = store_for(azurite.connection_string());
    store.ensure_tables().await.unwrap();
    let t0 = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let entry = |i: i64, kind| Entry {
        scale_set: set(),
        instance_id: format!("{i}"),
        at: t0 + Duration::seconds(i),
        incident: format!("inc-{i}"),
        kind,
        action: Some(RepairAction::Delete),
        attempt: 1,
        outcome: "requested".into(),
        reason: "the instance reported DOWN".into(),
        evidence: serde_json::json!({"status": "DOWN"}),
        dry_run: false,
    };
    let entries: Vec<Entry> = (0..5).map(|i| entry(i, EntryKind::Repair)).collect();
    store.append_journal(&entries).await.unwrap();

    let (recent, skipped) = store
        .journal(&set(), t0 + Duration::seconds(2))
        .await
        .unwrap();
    assert!(skipped.0.is_empty());
    let ids: Vec<&str> = recent.iter().map(|e| e.instance_id.as_str()).collect();
    assert_eq!(
        ids,
        ["4", "3", "2"],
        "newest first, nothing older than `since`"
    );
    assert_eq!(recent[0], entries[4]);

    assert_eq!(store.scale_set(&set()).await.unwrap(), None);
    let record = ScaleSetRecord {
        capacity: Some(20),
        orchestration_mode: Some("Uniform".into()),
        platform_auto_repair: true,
        terminate_notice: Some(Duration::minutes(5)),
        location: Some("westeurope".into()),
        image: Some("platform:Canonical:ubuntu:22_04:latest".into()),
        synced_at: Some(t0),
        sync_error: None,
        throttled_until: Some(t0 + Duration::minutes(5)),
        exists: true,
        changed_at: None,
        brake: Some("too_many_unhealthy".into()),
        brake_since: Some(t0),
        operator_pause: Some("deploying v2".into()),
        operator_pause_since: Some(t0),
    };
    store.write_scale_set(&set(), &record).await.unwrap();
    assert_eq!(store.scale_set(&set()).await.unwrap(), Some(record.clone()));

    // A change announced while a sync runs survives the sync's write, and the sync leaves the
    // brake (monitor-status's) alone.
    let t1 = t0 + Duration::seconds(30);
    store
        .request_resync(std::slice::from_ref(&set()), t1)
        .await
        .unwrap();
    let synced = ScaleSetRecord {
        capacity: Some(21),
        synced_at: Some(t0 + Duration::seconds(10)),
        brake: None,
        brake_since: None,
        ..record.clone()
    };
    store.record_sync(&set(), &synced).await.unwrap();
    assert_eq!(
        store.scale_set(&set()).await.unwrap(),
        Some(ScaleSetRecord {
            changed_at: Some(t1),
            brake: record.brake.clone(),
            brake_since: record.brake_since,
            ..synced
        })
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn development_storage_connection_strings_reach_azurite() {
    let azurite = Azurite::start();
    let cs = format!(
        "UseDevelopmentStorage=true;DevelopmentStorageProxyUri=http://127.0.0.1:{}",
        azurite.port
    );
    let store = store_for(cs);
    store
        .ensure_tables()
        .await
        .expect("the dev-storage form authenticates");
    store
        .write_mirror(&set(), &[instance(1)], OffsetDateTime::now_utc())
        .await
        .unwrap();
    assert_eq!(
        store.mirrored_instance(&set(), "1").await.unwrap(),
        Some(instance(1))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn storage_down_is_a_transient_error_and_bad_strings_fail_at_connect() {
    let mut azurite = Azurite::start();
    let store = store_for(azurite.connection_string());
    store.ensure_tables().await.unwrap();
    azurite.stop();
    let err = store
        .store_heartbeat(&heartbeat(OffsetDateTime::now_utc(), 1), newer)
        .await
        .unwrap_err();
    assert!(err.is_transient(), "{err}");

    let err = Store::connect(
        &StorageSettings::ConnectionString("AccountName=x".into()),
        |_| anyhow::bail!("unused"),
    )
    .unwrap_err();
    assert!(format!("{err:#}").contains("AccountKey"), "{err:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_streak_remembers_when_it_began() {
    let azurite = Azurite::start();
    let store = store_for(azurite.connection_string());
    store.ensure_tables().await.unwrap();
    let t0 = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let at = |s: i64, status: Status| Heartbeat {
        status,
        ..heartbeat(t0 + Duration::seconds(s), s)
    };
    let down_since = |store: &Store| {
        let store = store.clone();
        async move {
            store
                .heartbeat(&set(), "7")
                .await
                .unwrap()
                .unwrap()
                .heartbeat
                .down_since
        }
    };

    store
        .store_heartbeat(&at(0, Status::Up), newer)
        .await
        .unwrap();
    assert_eq!(down_since(&store).await, None);
    store
        .store_heartbeat(&at(10, Status::Down), newer)
        .await
        .unwrap();
    store
        .store_heartbeat(&at(20, Status::Down), newer)
        .await
        .unwrap();
    assert_eq!(
        down_since(&store).await,
        Some(t0 + Duration::seconds(10)),
        "the streak began at the first DOWN"
    );
    store
        .store_heartbeat(&at(30, Status::Up), newer)
        .await
        .unwrap();
    store
        .store_heartbeat(&at(40, Status::Down), newer)
        .await
        .unwrap();
    assert_eq!(
        down_since(&store).await,
        Some(t0 + Duration::seconds(40)),
        "an UP ends the streak"
    );
    // A streak a hostname-only DOWN began does not count for the VM's own agent: a forger could
    // otherwise start the HEALER_DOWN_FOR clock early.
    let on_8 = |secs: i64, origin: Origin| Heartbeat {
        target: set().instance("8"),
        origin,
        ..at(secs, Status::Down)
    };
    store
        .store_heartbeat(&on_8(50, Origin::Prunella), newer)
        .await
        .unwrap();
    store
        .store_heartbeat(&on_8(70, Origin::Agent), newer)
        .await
        .unwrap();
    let stored = store.heartbeat(&set(), "8").await.unwrap().unwrap();
    assert_eq!(
        stored.heartbeat.down_since,
        Some(t0 + Duration::seconds(70)),
        "the agent's streak begins with its own DOWN"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batched_claims_land_every_row_still_as_read_and_skip_the_rest() {
    use vmss_healer::incident::{Incident, Phase};
    let azurite = Azurite::start();
    let store = store_for(azurite.connection_string());
    store.ensure_tables().await.unwrap();
    let t0 = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let open = |id: &str| {
        Incident::open(
            id,
            "silent",
            RepairAction::Restart,
            t0,
            Duration::minutes(15),
        )
    };
    let first: Vec<Incident> = ["1", "2", "3"].iter().map(|id| open(id)).collect();
    let claims: Vec<(&Incident, Option<&str>)> = first.iter().map(|i| (i, None)).collect();
    let versions: Vec<String> = store
        .claim_incidents(&set(), &claims)
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.expect("a new row is inserted"))
        .collect();

    // Another pass changes #2 after we read it.
    let theirs = first[1].accepted(None);
    store
        .claim_incident(&set(), &theirs, Some(&versions[1]))
        .await
        .unwrap()
        .expect("their claim");

    let ours: Vec<Incident> = first
        .iter()
        .map(|i| i.accepted(None).succeeded(t0))
        .collect();
    let new = open("4");
    let claims: Vec<(&Incident, Option<&str>)> = vec![
        (&ours[0], Some(versions[0].as_str())),
        (&ours[1], Some(versions[1].as_str())),
        (&ours[2], Some(versions[2].as_str())),
        (&new, None),
    ];
    let written = store.claim_incidents(&set(), &claims).await.unwrap();
    assert_eq!(
        written.iter().map(Option::is_some).collect::<Vec<_>>(),
        [true, false, true, true],
        "the stale row is skipped, the others land"
    );
    let (rows, _) = store.incidents(&set()).await.unwrap();
    assert_eq!(rows["1"].value.phase, Phase::Succeeded);
    assert_eq!(rows["2"].value, theirs, "their write stands");
    assert_eq!(rows["4"].value, new);

    // The versions returned are the rows' own: the next conditional write at them succeeds, in a
    // batch that needs no fallback.
    let again: Vec<Incident> = ours
        .iter()
        .map(|i| i.advance(vmss_healer::incident::Stage::Delete))
        .collect();
    let claims = vec![
        (&again[0], written[0].as_deref()),
        (&again[2], written[2].as_deref()),
    ];
    let next = store.claim_incidents(&set(), &claims).await.unwrap();
    assert!(next.iter().all(Option::is_some), "{next:?}");
    assert_eq!(
        store.incidents(&set()).await.unwrap().0["3"].version,
        next[1].clone().unwrap()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incident_claims_admit_exactly_one_writer() {
    use vmss_healer::incident::{Incident, State};
    let azurite = Azurite::start();
    let store = Arc::new(store_for(azurite.connection_string()));
    store.ensure_tables().await.unwrap();
    let t0 = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let opened = Incident::open(
        "4",
        "silent",
        RepairAction::Restart,
        t0,
        Duration::minutes(15),
    );

    // Ten racers insert the same new incident: one wins.
    let racers: Vec<_> = (0..10)
        .map(|_| {
            let (store, inc) = (store.clone(), opened.clone());
            tokio::spawn(async move { store.claim_incident(&set(), &inc, None).await.unwrap() })
        })
        .collect();
    let mut wins = Vec::new();
    for r in racers {
        wins.extend(r.await.unwrap());
    }
    assert_eq!(wins.len(), 1, "exactly one insert wins");
    let version = wins.pop().unwrap();

    // Ten racers escalate from the same version: one wins, the rest see a changed row.
    let escalated = opened.escalate(
        RepairAction::Replace,
        t0 + Duration::minutes(16),
        Duration::minutes(15),
    );
    let racers: Vec<_> = (0..10)
        .map(|_| {
            let (store, inc, v) = (store.clone(), escalated.clone(), version.clone());
            tokio::spawn(async move { store.claim_incident(&set(), &inc, Some(&v)).await.unwrap() })
        })
        .collect();
    let mut wins = Vec::new();
    for r in racers {
        wins.extend(r.await.unwrap());
    }
    assert_eq!(wins.len(), 1, "exactly one replace wins");
    let (rows, _) = store.incidents(&set()).await.unwrap();
    assert_eq!(rows["4"].value, escalated);

    // Releasing puts the previous row back; a stale release changes nothing.
    assert!(store
        .release_incident(&set(), "4", Some(&opened), &wins[0])
        .await
        .unwrap());
    let (rows, _) = store.incidents(&set()).await.unwrap();
    assert_eq!(rows["4"].value, opened);
    assert!(
        !store
            .release_incident(&set(), "4", None, &wins[0])
            .await
            .unwrap(),
        "stale version"
    );
    let current = rows["4"].version.clone();
    assert!(store
        .release_incident(&set(), "4", None, &current)
        .await
        .unwrap());
    assert!(
        store.incidents(&set()).await.unwrap().0.is_empty(),
        "a released new incident is gone"
    );

    // Incident rows never show up as journal rows.
    let closed = Incident {
        state: State::Closed,
        ..opened.clone()
    };
    store.claim_incident(&set(), &closed, None).await.unwrap();
    assert!(store
        .journal(&set(), t0 - Duration::days(1))
        .await
        .unwrap()
        .0
        .is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_ingest_costs_one_write_and_duplicates_cost_nothing() {
    let azurite = Azurite::start();
    let store = store_for(azurite.connection_string());
    store.ensure_tables().await.unwrap();
    store
        .write_mirror(&set(), &[instance(7)], OffsetDateTime::now_utc())
        .await
        .unwrap();
    let t0 = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();

    // First sight of the instance: read, then insert.
    let before = store.requests();
    store
        .store_heartbeat(&heartbeat(t0, 0), newer)
        .await
        .unwrap();
    assert_eq!(store.requests() - before, 2);

    // Steady state: each newer reading is exactly one request.
    let before = store.requests();
    for s in 1..=10 {
        let r = store
            .store_heartbeat(&heartbeat(t0 + Duration::seconds(s), s), newer)
            .await
            .unwrap();
        assert_eq!(r, HeartbeatWrite::Stored);
    }
    assert_eq!(store.requests() - before, 10, "one write per heartbeat");

    // Duplicates and late deliveries cost nothing.
    let before = store.requests();
    for s in [10, 9, 3] {
        let r = store
            .store_heartbeat(&heartbeat(t0 + Duration::seconds(s), s), newer)
            .await
            .unwrap();
        assert_eq!(r, HeartbeatWrite::Ignored);
    }
    assert_eq!(store.requests() - before, 0);

    // Another worker writes meanwhile: the stale memory costs a retry, never a wrong write.
    let other = store_for(azurite.connection_string());
    other
        .store_heartbeat(&heartbeat(t0 + Duration::seconds(20), 20), newer)
        .await
        .unwrap();
    let r = store
        .store_heartbeat(&heartbeat(t0 + Duration::seconds(15), 15), newer)
        .await
        .unwrap();
    assert_eq!(
        r,
        HeartbeatWrite::Ignored,
        "older than what the other worker stored"
    );
    let stored = store
        .heartbeat(&set(), "7")
        .await
        .unwrap()
        .unwrap()
        .heartbeat;
    assert_eq!(stored.sequence, Some(20));
    let before = store.requests();
    store
        .store_heartbeat(&heartbeat(t0 + Duration::seconds(21), 21), newer)
        .await
        .unwrap();
    assert_eq!(
        store.requests() - before,
        1,
        "memory refreshed by the re-read"
    );

    // The identity check reads the mirror once, then remembers it.
    let before = store.requests();
    for _ in 0..5 {
        assert!(store
            .mirrored_identity(&set(), "7")
            .await
            .unwrap()
            .is_some());
    }
    assert_eq!(store.requests() - before, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_row_contended_past_its_retries_is_a_transient_fault() {
    let azurite = Azurite::start();
    let store = store_for(azurite.connection_string());
    store.ensure_tables().await.unwrap();
    let rival = store_for(azurite.connection_string());
    let t0 = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    store.import_heartbeats(&[heartbeat(t0, 1)]).await.unwrap();
    let rival_writes = std::sync::atomic::AtomicUsize::new(0);
    // Between every read of the row and our write, another worker writes it.
    let contend = |_: &Heartbeat, _: &Heartbeat| {
        std::thread::scope(|s| {
            s.spawn(|| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap()
                    .block_on(rival.import_heartbeats(&[heartbeat(t0, 1)]))
                    .unwrap();
            });
        });
        rival_writes.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        true
    };
    let err = store
        .store_heartbeat(&heartbeat(t0 + Duration::seconds(1), 2), contend)
        .await
        .unwrap_err();
    assert!(
        rival_writes.load(std::sync::atomic::Ordering::SeqCst) >= 2,
        "the write was retried"
    );
    assert!(
        err.is_transient(),
        "a row busy with other writers is worth a redelivery, not a dropped heartbeat: {err}"
    );
}

/// Design §7: an operation is a row of `operations`, one per scale set until it is over, every
/// write conditional on the version read (as an incident's), and it reads back as it was written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_one_per_scale_set_written_by_version_read_back_whole() {
    use vmss_healer::operations::{Command, Kind, Operation, State};
    let azurite = Azurite::start();
    let store = store_for(azurite.connection_string());
    store.ensure_tables().await.unwrap();
    let t0 = vmss_healer::mirror::at_storage_precision(OffsetDateTime::now_utc());
    let mut op = Operation::new(
        Kind::Cycle,
        set(),
        serde_json::json!({"batch": "20%", "minHealthy": "80%"}),
        "ops: monthly refresh".into(),
        false,
        t0,
    );
    op.holds = vec!["3".into(), "web_1a2b3c4d".into()];
    op.wait_until = Some(t0 + Duration::minutes(5));
    let version = store.start_operation(&op).await.unwrap();

    // A second one on the same scale set is refused while the first is not over; another set is
    // free.
    let second = Operation::new(
        Kind::Cycle,
        set(),
        serde_json::Value::Null,
        "x".into(),
        false,
        t0 + Duration::seconds(1),
    );
    let refused = store.start_operation(&second).await.unwrap_err();
    assert!(refused.to_string().contains(&op.id), "{refused}");
    let other = Operation::new(
        Kind::Cycle,
        ScaleSetId::new("sub", "rg", "api"),
        serde_json::Value::Null,
        "x".into(),
        true,
        t0,
    );
    store.start_operation(&other).await.unwrap();

    let (ops, skipped) = store.operations(Some(&set())).await.unwrap();
    assert!(skipped.0.is_empty());
    assert_eq!(ops.len(), 1);
    assert_eq!(ops[0].value, op, "read back whole");
    assert_eq!(ops[0].version, version);
    assert_eq!(store.operations(None).await.unwrap().0.len(), 2);

    // Writes go by version: a stale one is refused, never overwrites.
    let paused = op
        .command(Command::Pause, t0 + Duration::seconds(2))
        .unwrap();
    let version = store
        .update_operation(&paused, &version)
        .await
        .unwrap()
        .expect("written");
    let stale = op
        .command(Command::Abort, t0 + Duration::seconds(3))
        .unwrap();
    assert_eq!(
        store
            .update_operation(&stale, "W/\"datetime'2000-01-01T00%3A00%3A00Z'\"")
            .await
            .unwrap(),
        None
    );
    let (ops, _) = store.operations(Some(&set())).await.unwrap();
    assert_eq!(ops[0].value.state, State::Paused);

    // Once it is over, the scale set is free for the next.
    let aborted = paused
        .command(Command::Abort, t0 + Duration::seconds(4))
        .unwrap();
    store
        .update_operation(&aborted, &version)
        .await
        .unwrap()
        .expect("written");
    store.start_operation(&second).await.unwrap();
    let (ops, _) = store.operations(Some(&set())).await.unwrap();
    assert_eq!(
        ops.iter().map(|o| o.value.state).collect::<Vec<_>>(),
        [State::Aborted, State::Pending]
    );
}

/// Two operators starting an operation on one scale set at the same moment: exactly one wins,
/// whatever the interleaving of their reads and writes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_operations_started_at_once_on_one_scale_set_one_wins() {
    use vmss_healer::operations::{Kind, Operation};
    let azurite = Azurite::start();
    let store = store_for(azurite.connection_string());
    store.ensure_tables().await.unwrap();
    let t0 = OffsetDateTime::now_utc();
    for round in 0..5i64 {
        let set = ScaleSetId::new("sub", "rg", &format!("race{round}"));
        let ops: Vec<Operation> = (0..4)
            .map(|i| {
                Operation::new(
                    Kind::Cycle,
                    set.clone(),
                    serde_json::Value::Null,
                    format!("op{i}"),
                    false,
                    t0 + Duration::seconds(i),
                )
            })
            .collect();
        let results = futures::future::join_all(ops.iter().map(|o| store.start_operation(o))).await;
        let won = results.iter().filter(|r| r.is_ok()).count();
        assert_eq!(won, 1, "round {round}: {results:?}");
        assert_eq!(store.operations(Some(&set)).await.unwrap().0.len(), 1);
    }
}

/// A stateful set's slots (issue 18): created once (a second creator is refused), read back whole,
/// and moved to a new instance only over the version read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slots_are_created_once_and_moved_by_version() {
    use vmss_healer::slot::{Slot, SlotDisk};
    let azurite = Azurite::start();
    let store = store_for(azurite.connection_string());
    store.ensure_tables().await.unwrap();
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let slot = Slot {
        id: "slot-0".into(),
        instance: "0".into(),
        disks: vec![SlotDisk {
            lun: 0,
            id: "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/disks/db_0-data-0"
                .into(),
            zone: Some("1".into()),
        }],
        address: None,
        zone: Some("1".into()),
        updated: now,
    };
    store.insert_slot(&set(), &slot).await.unwrap();
    let again = store.insert_slot(&set(), &slot).await;
    assert!(
        matches!(again, Err(vmss_healer::state::StoreError::Conflict { .. })),
        "{again:?}"
    );
    let (slots, skipped) = store.slots(&set()).await.unwrap();
    assert!(skipped.0.is_empty());
    assert_eq!(slots.len(), 1);
    assert_eq!(slots[0].value, slot);
    let moved = Slot {
        instance: "1".into(),
        zone: Some("2".into()),
        ..slot.clone()
    };
    let version = slots[0].version.clone();
    assert!(store
        .update_slot(&set(), &moved, &version)
        .await
        .unwrap()
        .is_some());
    assert_eq!(
        store.update_slot(&set(), &slot, &version).await.unwrap(),
        None,
        "a stale writer does not move it back"
    );
    assert_eq!(store.slots(&set()).await.unwrap().0[0].value.instance, "1");
}

/// Journal retention: only rows written before the cut-off go, at most `at_most` per call (the
/// next call takes the rest), never an incident row however old its incident, never another
/// scale set's rows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_journal_loses_only_rows_past_their_retention_a_bounded_share_at_a_time() {
    use vmss_healer::incident::Incident;
    let azurite = Azurite::start();
    let store = store_for(azurite.connection_string());
    store.ensure_tables().await.unwrap();
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    let entry = |set: ScaleSetId, i: i64, at: OffsetDateTime| Entry {
        scale_set: set,
        instance_id: format!("{}", i % 7),
        at,
        incident: format!("inc-{i}"),
        kind: EntryKind::Withheld,
        action: None,
        attempt: 0,
        outcome: "cooldown".into(),
        reason: "a step ran recently".into(),
        evidence: serde_json::Value::Null,
        dry_run: false,
    };
    let other = ScaleSetId::new("sub", "rg", "api");
    let old: Vec<Entry> = (0..1005)
        .map(|i| entry(set(), i, now - Duration::days(3) + Duration::seconds(i)))
        .collect();
    let recent: Vec<Entry> = (0..3)
        .map(|i| entry(set(), i, now - Duration::hours(1) + Duration::seconds(i)))
        .collect();
    let elsewhere: Vec<Entry> = (0..4)
        .map(|i| entry(other.clone(), i, now - Duration::days(3)))
        .collect();
    for batch in [&old, &recent, &elsewhere] {
        store.append_journal(batch).await.unwrap();
    }
    // An incident opened long ago and still open.
    let incident = Incident::open(
        "4",
        "silent",
        RepairAction::Restart,
        now - Duration::days(5),
        Duration::minutes(15),
    );
    store.claim_incident(&set(), &incident, None).await.unwrap();

    let cut = now - Duration::days(1);
    assert_eq!(store.prune_journal(&set(), cut, 1000).await.unwrap(), 1000);
    assert_eq!(store.prune_journal(&set(), cut, 1000).await.unwrap(), 5);
    assert_eq!(store.prune_journal(&set(), cut, 1000).await.unwrap(), 0);
    let (left, _) = store
        .journal(&set(), now - Duration::days(30))
        .await
        .unwrap();
    assert_eq!(left.len(), 3, "the recent rows stay");
    assert!(left.iter().all(|e| e.at > cut));
    let (incidents, _) = store.incidents(&set()).await.unwrap();
    assert!(incidents.contains_key("4"), "an open incident stays");
    let (theirs, _) = store
        .journal(&other, now - Duration::days(30))
        .await
        .unwrap();
    assert_eq!(theirs.len(), 4, "another scale set's journal is its own");
}
