//! Issue 12 items 4-6: passes that are interrupted, answers that never come, a Compute API that
//! hangs. A call is never sent twice blindly, an interrupted pass blocks nothing, and no pass
//! outlasts its deadline.

mod common;

use common::{spawn_app, Mode, TestApp};
use serde_json::json;
use std::time::Duration;
use time::OffsetDateTime;
use vmss_healer::incident::{Incident, Phase};
use vmss_healer::journal::{Entry, EntryKind};
use vmss_healer::policy::RepairAction;

/// A call is given a second (`HEALER_CALL_TIMEOUT`), a pass four (`HEALER_PASS_DEADLINE`, slack
/// for a busy machine's table reads before the call): a call still unanswered five seconds after
/// it was claimed had its answer lost.
fn quick() -> common::Builder {
    spawn_app()
        .env("HEALER_CALL_TIMEOUT", "1")
        .env("HEALER_PASS_DEADLINE", "4")
}

async fn posts(app: &TestApp, verb: &str) -> usize {
    app.compute_calls()
        .await
        .iter()
        .filter(|c| c["method"] == "POST" && c["path"].as_str().unwrap().ends_with(verb))
        .count()
}

fn outcomes<'a>(journal: &'a [Entry], instance: &str) -> Vec<&'a str> {
    journal
        .iter()
        .filter(|e| {
            e.instance_id == instance && matches!(e.kind, EntryKind::Repair | EntryKind::Intent)
        })
        .map(|e| e.outcome.as_str())
        .collect()
}

in_both_modes!(
    a_call_that_landed_but_whose_answer_was_lost_is_never_sent_again,
    a_call_lost_before_it_landed_is_sent_once_more_and_then_spends_its_attempt,
);

async fn a_call_that_landed_but_whose_answer_was_lost_is_never_sent_again(mode: Mode) {
    let app = quick()
        .mode(mode)
        .scale_set("web", 3)
        .env("HEALER_REPAIR_ACTIONS", "restart,reimage")
        .env("HEALER_REPAIR_TIMEOUT", "8")
        .start()
        .await;
    // A fault a restart does not fix: the restart lands, and the VM stays down.
    app.sync_and_break("web", 1, json!({"beat": "down", "fault": "disk"}))
        .await;
    let one = app.key_of("web", 1).await;
    app.inject_fault(json!({"method": "POST", "pathContains": "/restart", "hangMs": 4000}))
        .await;
    let (status, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(status, 200, "{answer}");
    let (journal, _) = app.recent_journal(&TestApp::scale_set("web")).await;
    let mut first: Vec<&str> = outcomes(&journal, &one);
    first.reverse();
    assert_eq!(
        first,
        ["sending", "no_answer"],
        "the call is journaled before it is sent, and its lost answer after"
    );
    let incident = app
        .store
        .incidents(&TestApp::scale_set("web"))
        .await
        .unwrap()
        .0[&one]
        .value
        .clone();
    assert_eq!(incident.phase, Phase::Sending, "{incident:?}");

    // Passes go on; the instance shows the restart ran after it was sent: it is not sent again,
    // and the step's deadline (8 s) decides — then the next step.
    let journal = app
        .drive_until("web", Duration::from_secs(60), |j| {
            outcomes(j, &one).contains(&"requested")
        })
        .await;
    assert_eq!(posts(&app, "/restart").await, 1, "{journal:#?}");
    assert_eq!(posts(&app, "/reimage").await, 1, "{journal:#?}");
    let reimage = journal.iter().find(|e| e.outcome == "requested").unwrap();
    assert_eq!(reimage.action, Some(RepairAction::Reimage));
    assert_eq!(reimage.attempt, 2);
}

async fn a_call_lost_before_it_landed_is_sent_once_more_and_then_spends_its_attempt(mode: Mode) {
    let app = quick()
        .mode(mode)
        .scale_set("web", 3)
        .env("HEALER_REPAIR_ACTIONS", "restart,reimage")
        .start()
        .await;
    app.sync_and_break("web", 1, json!({"beat": "down"})).await;
    let one = app.key_of("web", 1).await;
    // Not carried out, and the answer lost: twice.
    app.inject_fault(
        json!({"method": "POST", "pathContains": "/restart", "status": 500,
        "hangMs": 4000, "count": 2}),
    )
    .await;
    let journal = app
        .drive_until("web", Duration::from_secs(60), |j| {
            j.iter().any(|e| e.action == Some(RepairAction::Reimage))
        })
        .await;
    assert_eq!(
        posts(&app, "/restart").await,
        2,
        "sent once more after the first was found not to have landed, never a third time"
    );
    // What each later pass found, as its intent and answer rows carry it.
    let mut found: Vec<&str> = journal
        .iter()
        .filter(|e| e.instance_id == one)
        .filter_map(|e| e.evidence.get("lost_answer"))
        .filter_map(|l| l["found"].as_str())
        .collect();
    found.dedup();
    assert_eq!(found.len(), 2, "{journal:#?}");
    assert!(found[0].contains("sent again"), "{found:?}");
    assert!(found[1].contains("attempt is spent"), "{found:?}");
    let reimage = journal
        .iter()
        .find(|e| e.action == Some(RepairAction::Reimage))
        .unwrap();
    assert_eq!(reimage.attempt, 2, "{journal:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_left_by_an_interrupted_pass_does_not_block_the_next() {
    let app = quick()
        .scale_set("web", 3)
        .env("HEALER_REPAIR_ACTIONS", "restart")
        .start()
        .await;
    let set = TestApp::scale_set("web");
    app.sync_and_break("web", 1, json!({"beat": "down"})).await;
    // What a pass that stopped between claiming and calling leaves: the claim, `Sending`, and no
    // call.
    let claimed_at = OffsetDateTime::now_utc() - time::Duration::seconds(10);
    let orphan = Incident::open(
        "1",
        "reported_down",
        RepairAction::Restart,
        claimed_at,
        time::Duration::seconds(900),
    )
    .sending_at(claimed_at);
    app.store
        .claim_incidents(&set, &[(&orphan, None)])
        .await
        .unwrap();
    app.invoke_timer("monitor-state").await;
    let (_, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["repairs_requested"], 1,
        "taken up at once, not withheld for the 900 s repair timeout: {answer}"
    );
    assert_eq!(posts(&app, "/restart").await, 1);
    let inc = app.store.incidents(&set).await.unwrap().0["1"]
        .value
        .clone();
    assert_eq!(
        (inc.attempt, inc.phase, inc.unanswered),
        (1, Phase::Running, 1),
        "the same attempt, now running"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_compute_api_never_makes_a_pass_outlast_its_deadline() {
    // Eight calls of a second each do not fit a five-second pass (with slack for a busy
    // machine's table reads before them).
    const SETS: [&str; 8] = ["a", "b", "c", "d", "e", "f", "g", "h"];
    let mut app = spawn_app()
        .env("HEALER_CALL_TIMEOUT", "1")
        .env("HEALER_PASS_DEADLINE", "5");
    for name in SETS {
        app = app.scale_set(name, 3);
    }
    let app = app.env("HEALER_REPAIR_ACTIONS", "restart").start().await;
    app.invoke_timer("monitor-state").await;
    for name in SETS {
        app.break_vm(name, 1, json!({"beat": "down"})).await;
    }
    app.heartbeat_round().await;
    app.clear_compute_calls().await;

    // Every write hangs, and is not carried out.
    app.inject_fault(json!({"method": "POST", "status": 500, "hangMs": 5000, "count": 100}))
        .await;
    let (status, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(status, 200, "the pass ended and answered: {answer}");
    let sets = answer["ReturnValue"]["scale_sets"].as_array().unwrap();
    let sum = |k: &str| sets.iter().map(|s| s[k].as_u64().unwrap()).sum::<u64>();
    assert!(
        sum("deferred") >= 1,
        "what did not fit is left to the next pass: {answer}"
    );
    assert_eq!(
        sum("repairs_failed") + sum("deferred"),
        SETS.len() as u64,
        "every step was either tried or deferred: {answer}"
    );
    // The deferred were journaled and not claimed: the next pass decides them afresh.
    let mut deferred = 0;
    for name in SETS {
        let set = TestApp::scale_set(name);
        let (journal, _) = app.recent_journal(&set).await;
        if journal.iter().any(|e| e.outcome == "pass_deadline") {
            deferred += 1;
            let (incidents, _) = app.store.incidents(&set).await.unwrap();
            assert!(incidents.is_empty(), "{name}: {incidents:?}");
        }
    }
    assert_eq!(deferred as u64, sum("deferred"));

    // Reads hang too: the mirror pass stops at its deadline, and says which sets it left.
    app.inject_fault(json!({"method": "GET", "hangMs": 5000, "count": 100}))
        .await;
    let (status, answer) = app.invoke_timer("monitor-state").await;
    assert_eq!(status, 200, "{answer}");
    let outcomes = common::sync_outcomes(&answer);
    assert_eq!(outcomes.len(), SETS.len(), "{answer}");
    assert!(
        outcomes
            .iter()
            .all(|o| ["deferred", "timed_out", "no_answer"].contains(o)),
        "{answer}"
    );
    assert!(
        outcomes.iter().any(|o| *o != "no_answer"),
        "not every set was tried: {answer}"
    );
}
