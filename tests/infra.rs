//! What can be checked of the infrastructure without the Bicep CLI: the app settings it sets are
//! exactly the ones the code reads (and the README documents), and the custom role holds exactly
//! the Compute actions the handler's requests need.

mod common;

use common::spawn_app;
use serde_json::json;
use std::collections::BTreeSet;
use vmss_healer::compute::{required_action, REQUIRED_ACTIONS};
use vmss_healer::settings::CATALOG;

fn read(path: &str) -> String {
    std::fs::read_to_string(format!("{}/{path}", env!("CARGO_MANIFEST_DIR"))).unwrap()
}

/// The quoted values of every `name: '…'` in a Bicep file.
fn names(bicep: &str) -> Vec<String> {
    bicep
        .split("name: '")
        .skip(1)
        .filter_map(|rest| rest.split('\'').next())
        .map(str::to_string)
        .collect()
}

#[test]
fn the_infrastructure_sets_exactly_the_settings_the_code_reads() {
    let main = read("infra/main.bicep");
    // `HEALER_STORAGE__tableServiceUri` is the identity-based form of HEALER_STORAGE.
    let set: BTreeSet<String> = names(&main)
        .into_iter()
        .filter(|n| n.starts_with("HEALER_"))
        .map(|n| n.split("__").next().unwrap().to_string())
        .collect();
    let read_by_code: BTreeSet<String> = CATALOG
        .iter()
        .map(|s| s.name.to_string())
        .filter(|n| n.starts_with("HEALER_"))
        .collect();
    assert_eq!(
        set.difference(&read_by_code).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "set by infra/main.bicep but read by no code"
    );
    assert_eq!(
        read_by_code.difference(&set).collect::<Vec<_>>(),
        Vec::<&String>::new(),
        "read by the code but not set by infra/main.bicep"
    );
    // The host's storage by identity, never a connection string with a key.
    assert!(main.contains("'AzureWebJobsStorage__accountName'"));
    assert!(!main.contains("AccountKey"));
    assert!(main.contains("allowSharedKeyAccess: false"));
    assert!(main.contains("disableLocalAuth: true"));
}

#[test]
fn the_custom_role_holds_exactly_the_actions_the_handler_needs() {
    let role = read("infra/modules/compute-role.bicep");
    let block = role
        .split("actions: [")
        .nth(1)
        .and_then(|rest| rest.split(']').next())
        .expect("an actions list");
    let granted: BTreeSet<&str> = block
        .lines()
        .map(|l| l.trim().trim_matches('\''))
        .filter(|l| !l.is_empty())
        .collect();
    let needed: BTreeSet<&str> = REQUIRED_ACTIONS.iter().copied().collect();
    assert_eq!(granted, needed);
    assert!(role.contains("notActions: []"));
}

/// Every request the handler sends maps to an action of [`REQUIRED_ACTIONS`], and every action of
/// it is used: restart, reimage and replace (delete + capacity) in one run, with the mirror read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_compute_request_is_covered_by_the_role_and_every_action_is_used() {
    let sets = format!(
        "{}[REPAIR_ACTIONS=restart] {}[REPAIR_ACTIONS=reimage] {}[REPAIR_ACTIONS=replace]",
        common::scale_set_id("a"),
        common::scale_set_id("b"),
        common::scale_set_id("c")
    );
    let app = spawn_app()
        .scale_set("a", 4)
        .scale_set("b", 4)
        .scale_set("c", 4)
        .env("HEALER_SCALE_SETS", &sets)
        .start()
        .await;
    app.clear_compute_calls().await;
    app.invoke_timer("monitor-state").await;
    for set in ["a", "b", "c"] {
        app.break_vm(set, 1, json!({"beat": "down"})).await;
    }
    app.heartbeat_round().await;
    let (_, answer) = app.invoke_timer("monitor-status").await;
    let requested: u64 = answer["ReturnValue"]["scale_sets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["repairs_requested"].as_u64().unwrap())
        .sum();
    assert_eq!(requested, 3, "{answer}");

    let mut used = BTreeSet::new();
    for call in app.compute_calls().await {
        let (method, path) = (
            call["method"].as_str().unwrap(),
            call["path"].as_str().unwrap(),
        );
        if path.starts_with("/msi/") {
            continue; // the managed-identity endpoint, not Resource Manager
        }
        let action = required_action(method, path)
            .unwrap_or_else(|| panic!("{method} {path} is not covered by REQUIRED_ACTIONS"));
        used.insert(action);
    }
    let all: BTreeSet<&str> = REQUIRED_ACTIONS.iter().copied().collect();
    assert_eq!(used, all, "an action of the role is never used");
}

#[test]
fn the_sample_points_its_agents_at_the_topic_main_creates() {
    let main = read("infra/main.bicep");
    let sample = read("infra/sample/sample.bicep");
    // The sample computes the topic endpoint before the topic exists: both files must name it the
    // same way.
    let suffix = "uniqueString(resourceGroup().id, name)";
    assert!(main.contains(&format!("var suffix = {suffix}")));
    assert!(sample.contains(&format!("var suffix = {suffix}")));
    assert!(main.contains("name: '${name}-heartbeats-${suffix}'"));
    assert!(sample.contains(
        "https://${name}-heartbeats-${suffix}.${location}-1.eventgrid.azure.net/api/events"
    ));
    // It installs the repository's agent files, and watches and authorizes its own scale set.
    for file in [
        "vmss-healer-agent",
        "vmss-healer-agent.service",
        "install.sh",
    ] {
        assert!(
            sample.contains(&format!("loadTextContent('../agent/{file}')")),
            "{file}"
        );
    }
    assert!(sample.contains("watchedScaleSets: [{ id: scaleSet.id"));
    assert!(sample.contains("senderPrincipalIds: [scaleSet.identity.principalId]"));
}
