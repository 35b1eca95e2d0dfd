//! What can be checked of the infrastructure without the Bicep CLI: the app settings it sets are
//! exactly the ones the code reads (and the README documents), and the custom role holds exactly
//! the Compute actions the handler's requests need.

mod common;

use common::spawn_app;
use serde_json::json;
use std::collections::BTreeSet;
use vmss_healer::compute::{
    required_action, AUTOSCALE_ACTIONS, FLEXIBLE_GROUP_ACTIONS, PROTOTYPE_ACTIONS,
    REQUIRED_ACTIONS, RESOURCE_GROUP_ACTIONS, SCALE_SET_ACTIONS, STATEFUL_ACTIONS,
};
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
    // The stateful policy is per scale set only: it travels in HEALER_SCALE_SETS's overrides
    // (`watchedScaleSets[].overrides`), never as a setting of its own.
    let read_by_code: BTreeSet<String> = CATALOG
        .iter()
        .map(|s| s.name.to_string())
        .filter(|n| n.starts_with("HEALER_") && !n.starts_with("HEALER_STATEFUL_"))
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
fn the_custom_roles_hold_exactly_the_actions_the_handler_needs() {
    let role = read("infra/modules/compute-role.bicep");
    let list = |opening: &str| -> BTreeSet<&str> {
        role.split(opening)
            .nth(1)
            .unwrap_or_else(|| panic!("no `{opening}`"))
            .split(']')
            .next()
            .expect("a list")
            .lines()
            .map(|l| l.trim().trim_matches('\''))
            .filter(|l| !l.is_empty())
            .collect()
    };
    let (instance, resize) = (
        list("var instanceActions = ["),
        list("var resizeActions = ["),
    );
    let on_scale_sets: BTreeSet<&str> = SCALE_SET_ACTIONS.iter().copied().collect();
    let on_resource_groups: BTreeSet<&str> = RESOURCE_GROUP_ACTIONS.iter().copied().collect();
    assert_eq!(&instance | &resize, on_scale_sets);
    // Issue 13: the capacity write, which also allows changing the model, only for a replace.
    assert_eq!(
        resize,
        BTreeSet::from(["Microsoft.Compute/virtualMachineScaleSets/write"])
    );
    assert!(role.contains("actions: concat(instanceActions, canResize ? resizeActions : [])"));
    assert!(read("infra/main.bicep").contains(
        "var canResize = contains(toLower(repairActions), 'replace') || length(filter(watchedScaleSets, s => contains(toLower(s.?overrides ?? ''), 'replace'))) > 0"
    ));
    assert_eq!(list("actions: ["), on_resource_groups);
    // Issue 14: a Flexible set's VMs are the group's resources, acted on at the group; the role
    // goes only to the groups of sets Azure reports Flexible.
    let flexible: BTreeSet<&str> = FLEXIBLE_GROUP_ACTIONS.iter().copied().collect();
    assert_eq!(list("var flexibleActions = ["), flexible);
    assert!(role.contains("actions: flexibleActions"));
    // Issue 16: a swap's autoscale settings, on the watched groups, only with enableSwap (which
    // also grants the capacity write).
    let autoscale: BTreeSet<&str> = AUTOSCALE_ACTIONS.iter().copied().collect();
    assert_eq!(list("var autoscaleActions = ["), autoscale);
    assert!(role.contains("actions: autoscaleActions"));
    // Issue 17: a golden image's actions, on the watched groups, only with enablePrototype.
    let prototype: BTreeSet<&str> = PROTOTYPE_ACTIONS.iter().copied().collect();
    assert_eq!(list("var prototypeActions = ["), prototype);
    assert!(role.contains("actions: prototypeActions"));
    let main_bicep = read("infra/main.bicep");
    assert!(main_bicep.contains("|| enableSwap || enablePrototype"));
    let grant = main_bicep
        .split("module prototypeAccess")
        .nth(1)
        .expect("the prototype role is assigned");
    assert!(grant.contains("if (enablePrototype)") && grant.contains("prototypeRoleId"));
    // Issue 18: a stateful replacement's disks, on the groups of the stateful sets only.
    let stateful: BTreeSet<&str> = STATEFUL_ACTIONS.iter().copied().collect();
    assert_eq!(list("var statefulActions = ["), stateful);
    assert!(role.contains("actions: statefulActions"));
    let grant = main_bicep
        .split("module statefulAccess")
        .nth(1)
        .expect("the stateful role is assigned");
    assert!(grant.contains("in statefulResourceGroups") && grant.contains("statefulRoleId"));
    assert!(main_bicep.contains("contains(toUpper(s.?overrides ?? ''), 'STATEFUL_')"));
    assert_eq!(role.matches("notActions: []").count(), 6);
    let main = read("infra/main.bicep");
    assert!(main.contains("|| enableSwap"), "a swap writes capacity");
    let grant = main
        .split("module autoscaleAccess")
        .nth(1)
        .expect("the autoscale role is assigned");
    assert!(grant.contains("if (enableSwap)") && grant.contains("autoscaleRoleId"));
    assert!(grant.contains("scope: resourceGroup(rg)"));
    let access = read("infra/modules/scaleset-access.bicep");
    assert!(
        access.contains("orchestrationMode: scaleSet.properties.?orchestrationMode ?? 'Uniform'")
    );
    assert!(access.contains("module flexible 'flexible-access.bicep'"));
    let flexible_access = read("infra/modules/flexible-access.bicep");
    assert!(flexible_access.contains("= if (toLower(orchestrationMode) == 'flexible')"));
    assert!(
        read("infra/main.bicep").contains("flexibleVmRoleId: computeRole.outputs.flexibleVmRoleId")
    );
    // Each is granted where Azure checks it: the scale set's actions on the scale set, operation
    // status on the resource group (its URL is not under the scale set).
    let main = read("infra/main.bicep");
    let operations = main
        .split("module operationAccess")
        .nth(1)
        .expect("the operation reader is assigned");
    assert!(
        operations.contains("scope: resourceGroup(rg)"),
        "{operations}"
    );
    assert!(operations.contains("operationReaderRoleId"));
    assert!(read("infra/modules/scaleset-access.bicep").contains("scope: scaleSet"));
}

/// Every request the handler sends maps to an action of [`REQUIRED_ACTIONS`], and every action of
/// it is used: restart, start, reimage and replace (surge, then delete), their operations followed,
/// with the mirror read, and a cycle's manual upgrade.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_compute_request_is_covered_by_the_role_and_every_action_is_used() {
    let sets = format!(
        "{}[REPAIR_ACTIONS=restart] {}[REPAIR_ACTIONS=reimage] {}[REPAIR_ACTIONS=replace] {}[REPAIR_ACTIONS=redeploy] {}[REPAIR_ACTIONS=restart] {}[REPAIR_ACTIONS=reimage] {}[REPAIR_ACTIONS=redeploy]",
        common::scale_set_id("a"),
        common::scale_set_id("b"),
        common::scale_set_id("c"),
        common::scale_set_id("d"),
        common::scale_set_id("fa"),
        common::scale_set_id("fb"),
        common::scale_set_id("fc")
    );
    let app = spawn_app()
        .scale_set("a", 5)
        .scale_set("b", 5)
        .scale_set("c", 5)
        .scale_set("d", 5)
        .mode(common::Mode::Flexible)
        .scale_set("fa", 5)
        .scale_set("fb", 5)
        .scale_set("fc", 5)
        .env("HEALER_SCALE_SETS", &sets)
        .env("HEALER_MAX_PARALLEL", "2")
        .start()
        .await;
    app.clear_compute_calls().await;
    for set in ["a", "b", "c", "d", "fa", "fb", "fc"] {
        app.break_vm(set, 1, json!({"beat": "down"})).await;
    }
    for set in ["a", "fa"] {
        app.break_vm(set, 2, json!({"powerState": "deallocated"}))
            .await;
    }
    app.invoke_timer("monitor-state").await;
    app.heartbeat_round().await;
    let (_, answer) = app.invoke_timer("monitor-status").await;
    let requested: u64 = answer["ReturnValue"]["scale_sets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["repairs_requested"].as_u64().unwrap())
        .sum();
    assert_eq!(
        requested, 9,
        "restart, start, reimage, surge, redeploy; Flexible: restart, start, reimage, redeploy: {answer}"
    );
    // The next passes follow the operations and, the new instance mirrored, delete the broken one.
    app.invoke_timer("monitor-state").await;
    app.invoke_timer("monitor-status").await;
    // A cycle's upgrade: a new model of `d`, its instances brought to it (the manual upgrade).
    app.admin(
        reqwest::Method::POST,
        &format!("scalesets/{}/model", common::TestApp::key("d")),
        None,
    )
    .await;
    app.invoke_timer("monitor-state").await;
    let (code, out, err) = app.cli(&["cycle", "d", "--action", "upgrade", "--min-healthy", "1"]);
    assert_eq!(code, 0, "{out}{err}");
    app.heartbeat_round().await;
    let (_, answer) = app.invoke_timer("monitor-status").await;
    assert!(
        answer.to_string().contains("batch 1"),
        "the upgrade went out: {answer}"
    );

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
    // A swap's, a golden image's and a stateful replacement's actions are held against their own
    // calls in tests/swap.rs, tests/prototype.rs and tests/stateful.rs.
    let all: BTreeSet<&str> = REQUIRED_ACTIONS
        .iter()
        .copied()
        .filter(|a| {
            !AUTOSCALE_ACTIONS.contains(a)
                && !PROTOTYPE_ACTIONS.contains(a)
                && !STATEFUL_ACTIONS.contains(a)
        })
        .collect();
    assert_eq!(used, all, "an action of the roles is never used");
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
    assert!(sample.contains(
        "var colorSets = [for (color, i) in colors: { id: scaleSets[i].id, overrides: '' }]"
    ));
    // Issue 16: deletes give five minutes' notice, which the agents drain for (the health file
    // goes, so a load balancer's probe stops sending requests) and the app restores on start.
    assert!(
        sample.contains("terminateNotificationProfile: { enable: true, notBeforeTimeout: 'PT5M' }")
    );
    assert!(sample.contains(r#"--drain-command "rm -f /srv/sample/healthz""#));
    assert!(sample.contains(r#"ExecStartPre=/bin/sh -c "echo ok > /srv/sample/healthz""#));
    assert!(sample.contains(
        "var colorPrincipals = [for (color, i) in colors: scaleSets[i].identity.principalId]"
    ));
    // Issue 16: blue and green behind one load balancer whose probe is the app's /healthz (which
    // the drain removes), blue autoscaled, swaps allowed.
    assert!(sample.contains("var colors = ['blue', 'green']"));
    assert!(sample.contains("capacity: i == 0 ? capacity : 0"));
    assert!(sample.contains("requestPath: '/healthz'"));
    assert!(sample.contains(
        "probe: { id: resourceId('Microsoft.Network/loadBalancers/probes', lbName, 'healthz') }"
    ));
    assert!(sample.contains(
        "loadBalancerBackendAddressPools: [{ id: lb.properties.backendAddressPools[0].id }]"
    ));
    assert!(sample.contains("--health-url http://127.0.0.1:8080/healthz"));
    assert!(sample.contains("targetResourceUri: scaleSets[0].id"));
    assert!(sample.contains("enableSwap: true"));
    assert!(sample.contains("destinationPortRange: '8080'"));
    // Issue 18: a stateful set of one whose data disk (in its zone, not in the model) the healer
    // carries; its agent waits for /data.
    assert!(sample.contains("watchedScaleSets: concat(colorSets, ["));
    assert!(
        sample.contains("senderPrincipalIds: concat(colorPrincipals, [db.identity.principalId])")
    );
    assert!(sample.contains("{ id: db.id, overrides: 'STATEFUL_DISKS=0 MAX_UNHEALTHY=100%' }"));
    assert!(sample.contains("--require-mount /data"));
    assert!(sample.contains("zones: [statefulZone]"));
    assert!(sample.contains("dev=/dev/disk/azure/scsi1/lun0"));
    let db = sample.split("resource db ").nth(1).unwrap();
    let db = &db[..db.find("\n}\n").unwrap()];
    assert!(
        !db.contains("dataDisks"),
        "the slot's disk is not the model's"
    );
}

/// Issue 13: the two timers run half a minute apart in Azure as they do locally, so each repair
/// pass reads a mirror at most 30 s old and the passes never compete for storage; the app
/// settings, the local example and the code's defaults agree.
#[test]
fn the_timers_are_offset_everywhere_they_are_set() {
    let value = |text: &str, name: &str| -> String {
        let at = text.find(name).unwrap_or_else(|| panic!("{name} not set"));
        let rest = &text[at + name.len()..];
        let start = rest.find(['\'', '"']).unwrap() + 1;
        let end = start + rest[start..].find(['\'', '"']).unwrap();
        rest[start..end].to_string()
    };
    let bicep = read("infra/main.bicep");
    let local = read("local.settings.json.example");
    let settings = vmss_healer::settings::Settings::from_lookup(|k| match k {
        "HEALER_SCALE_SETS" => Some(common::scale_set_id("web")),
        "HEALER_STORAGE" => Some("UseDevelopmentStorage=true".into()),
        _ => None,
    })
    .unwrap();
    for (name, default) in [
        ("HEALER_STATUS_SCHEDULE", &settings.status_schedule),
        ("HEALER_STATE_SCHEDULE", &settings.state_schedule),
    ] {
        let in_azure = value(&bicep, &format!("'{name}', value: "));
        assert_eq!(in_azure, value(&local, &format!("\"{name}\": ")), "{name}");
        assert_eq!(&in_azure, default, "{name}");
    }
    assert_ne!(settings.status_schedule, settings.state_schedule);
}

/// Issue 13: each deploy path gets parameters it can read. azd fills `${…}` from its environment;
/// `az` passes them through literally (a location `${AZURE_LOCATION}`, a webhook URL
/// `${HEALER_WEBHOOK_URL=}`), so the by-hand file has none, and the guide points each path at its own.
#[test]
fn each_deploy_path_reads_parameters_it_understands() {
    let azd: serde_json::Value = serde_json::from_str(&read("infra/main.parameters.json")).unwrap();
    let az_text = read("infra/deploy.parameters.json");
    let az: serde_json::Value = serde_json::from_str(&az_text).unwrap();
    assert!(!az_text.contains("${"), "an azd placeholder on the az path");
    let names = |v: &serde_json::Value| -> BTreeSet<String> {
        v["parameters"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect()
    };
    let mut expected = names(&azd);
    // Without it, main.bicep takes the resource group's location.
    expected.remove("location");
    assert_eq!(names(&az), expected);
    let guide = read("docs/operations.md");
    assert!(
        guide.contains("-p @infra/deploy.parameters.json"),
        "the az command uses the az file"
    );
    assert!(
        !guide.contains("-p @infra/main.parameters.json"),
        "the az command must not read azd's file"
    );
    assert!(read("infra/main.bicep").contains("param location string = resourceGroup().location"));
}

/// A custom role's name is unique in the tenant: two deployments in two subscriptions must not
/// collide (RoleDefinitionWithSameNameExists).
#[test]
fn custom_role_names_are_unique_per_subscription() {
    let roles = read("infra/modules/compute-role.bicep");
    let names: Vec<&str> = roles
        .lines()
        .filter(|l| l.trim_start().starts_with("roleName:"))
        .collect();
    assert_eq!(names.len(), 6, "{names:?}");
    assert!(roles.contains("var suffix = '(${subscription().subscriptionId})'"));
    for n in names {
        assert!(n.contains("${suffix}"), "{n}");
    }
}

/// Issue 13: whichever template azd provisions (main, or the sample that wraps it), its outputs are
/// everything the postdeploy hook reads from azd's environment.
#[test]
fn both_templates_output_what_the_postdeploy_hook_needs() {
    let hook = read("infra/hooks/postdeploy.sh");
    let needed: BTreeSet<String> = [
        "FUNCTION_APP_NAME",
        "HEARTBEAT_TOPIC_NAME",
        "STORAGE_ACCOUNT_NAME",
        "SYSTEM_TOPICS",
    ]
    .into_iter()
    .filter(|v| hook.contains(&format!("${v}")) || hook.contains(&format!("${{{v}")))
    .map(str::to_string)
    .collect();
    assert_eq!(needed.len(), 4, "the hook reads these: {needed:?}");
    for template in ["infra/main.bicep", "infra/sample/sample.bicep"] {
        let text = read(template);
        let outputs: BTreeSet<String> = text
            .lines()
            .filter_map(|l| l.strip_prefix("output "))
            .filter_map(|l| l.split_whitespace().next())
            .map(str::to_string)
            .collect();
        let missing: Vec<&String> = needed.difference(&outputs).collect();
        assert!(missing.is_empty(), "{template} does not output {missing:?}");
    }
}

/// Issue 13: a redeploy after `azd down` must be possible: purge protection would block the
/// vault's fixed name for 90 days.
#[test]
fn the_vault_can_be_purged_so_its_name_can_be_reused() {
    let main = read("infra/main.bicep");
    assert!(
        !main.contains("enablePurgeProtection"),
        "purge protection blocks a redeploy"
    );
    assert!(
        !main.contains("softDeleteRetentionInDays"),
        "cannot change once a vault exists"
    );
    assert!(read("docs/operations.md").contains("azd down --purge"));
}

/// Issue 13: Azure allows one system topic per resource group, resource group names may be 90
/// characters with `_ . ( )` (which deployment and topic names do not allow), and groups that
/// differ only in case are one group.
#[test]
fn system_topics_fit_any_resource_group_and_reuse_an_existing_one() {
    let main = read("infra/main.bicep");
    let subscriptions = read("infra/subscriptions.bicep");
    assert!(
        main.contains("toLower(split(id, '/')[4])"),
        "one group whatever its case"
    );
    assert!(main.contains("param existingSystemTopics object = {}"));
    assert!(
        main.contains("if (!contains(existingSystemTopics, rg))"),
        "not created where one exists"
    );
    assert!(main.contains("contains(existingSystemTopics, rg) ? existingSystemTopics[rg]"));
    // No name is built from a raw resource group name.
    for (file, text) in [
        ("main.bicep", &main),
        ("subscriptions.bicep", &subscriptions),
    ] {
        for raw in ["-${rg}'", "-${t.resourceGroup}'"] {
            assert!(
                !text.contains(raw),
                "{file} builds a name from a raw group name: {raw}"
            );
        }
    }
    assert!(read("docs/operations.md").contains("existingSystemTopics"));
}

/// The KQL queries of the alert rules (`'''…'''` blocks of monitoring.bicep) and of the workbook.
fn monitoring_queries() -> Vec<(String, String)> {
    let bicep = read("infra/monitoring.bicep");
    let mut queries: Vec<(String, String)> = bicep
        .split("'''")
        .skip(1)
        .step_by(2)
        .enumerate()
        .map(|(i, q)| (format!("alert rule {i}"), q.to_string()))
        .collect();
    let workbook: serde_json::Value = serde_json::from_str(&read("infra/workbook.json")).unwrap();
    for item in workbook["items"].as_array().unwrap() {
        if let Some(q) = item["content"]["query"].as_str() {
            queries.push((format!("workbook item {}", item["name"]), q.to_string()));
        }
    }
    queries
}

/// Words following `prefix` in `text`: `customDimensions.scale_set` → `scale_set`.
fn after<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    text.match_indices(prefix)
        .map(|(i, _)| {
            let rest = &text[i + prefix.len()..];
            let end = rest
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'))
                .unwrap_or(rest.len());
            &rest[..end]
        })
        .collect()
}

/// The alerts and the workbook read the metrics the handler exports, by the names and
/// dimensions it exports them with: a renamed metric would otherwise leave an alert that never
/// fires.
#[test]
fn alerts_and_workbook_read_only_what_the_handler_exports() {
    use vmss_healer::telemetry::{DIMENSIONS, METRICS};
    let queries = monitoring_queries();
    assert_eq!(
        queries
            .iter()
            .filter(|(w, _)| w.starts_with("alert"))
            .count(),
        3
    );
    let mut charted = BTreeSet::new();
    for (where_, query) in &queries {
        let metrics: Vec<&str> = after(query, "name == \"")
            .into_iter()
            .map(|m| m.trim_end_matches('"'))
            .collect();
        assert!(!metrics.is_empty(), "{where_} reads no metric:\n{query}");
        let mut allowed = BTreeSet::new();
        for m in &metrics {
            assert!(
                METRICS.contains(m),
                "{where_} reads `{m}`, which the handler does not export"
            );
            let (_, dims) = DIMENSIONS.iter().find(|(name, _)| name == m).unwrap();
            allowed.extend(dims.iter().copied());
            if where_.starts_with("workbook") {
                charted.insert(m.to_string());
            }
        }
        for dim in after(query, "customDimensions.") {
            assert!(
                allowed.contains(dim),
                "{where_} reads dimension `{dim}`, which {metrics:?} are not recorded with"
            );
        }
    }
    let all: BTreeSet<String> = METRICS.iter().map(|m| m.to_string()).collect();
    assert_eq!(charted, all, "the workbook charts every metric");
    assert_eq!(DIMENSIONS.len(), METRICS.len());
}

/// Each rule of the issue exists, compares against what the code really writes, and is deployed
/// by main.bicep on the resource the app exports to.
#[test]
fn the_alert_rules_watch_give_ups_long_brakes_and_a_failing_mirror() {
    let bicep = read("infra/monitoring.bicep");
    let repair = read("src/passes/repair/settle.rs");
    let sync = read("src/passes/sync.rs");
    // Give-ups: the outcome literal the journal writes.
    assert!(bicep.contains("customDimensions.outcome) == \"given_up\""));
    assert!(repair.contains("outcome: \"given_up\".into()"));
    // A brake held longer than the operator's threshold.
    assert!(bicep.contains("name == \"healer.brake.held_seconds\""));
    assert!(bicep.contains("threshold: brakeAlertMinutes"));
    // A failing mirror: every outcome that is not a failure is one sync.rs really reports.
    for ok in ["synced", "fresh", "deferred"] {
        assert!(
            sync.contains(&format!("\"{ok}\"")),
            "sync.rs has no outcome `{ok}`"
        );
    }
    assert!(bicep.contains("outcome !in (\"synced\", \"fresh\", \"deferred\")"));
    assert!(bicep.contains("customDimensions.function) == \"monitor-state\""));
    for rule in ["giveUps", "brakeHeld", "mirrorFailing"] {
        let start = bicep.find(&format!("resource {rule} ")).unwrap();
        let body = &bicep[start..];
        let body = &body[..body[1..].find("\nresource ").map_or(body.len(), |i| i + 1)];
        for needed in [
            "kind: 'LogAlert'",
            "scopes: [insightsId]",
            "actions: actions",
            "enabled: true",
        ] {
            assert!(body.contains(needed), "{rule} lacks `{needed}`");
        }
    }
    let main = read("infra/main.bicep");
    assert!(main.contains("module monitoring 'monitoring.bicep'"));
    assert!(main.contains("insightsId: insights.id"));
    // The handler uploads with the app's identity; the role that lets it is granted on the
    // resource the rules read.
    assert!(main.contains(
        "{ name: 'APPLICATIONINSIGHTS_AUTHENTICATION_STRING', value: 'Authorization=AAD' }"
    ));
    assert!(main.contains("roles.monitoringMetricsPublisher"));
    assert!(read("infra/monitoring.bicep").contains("loadTextContent('workbook.json')"));
}

/// Issue 14: a Flexible set's instances are plain VMs, whose Resource Manager events the
/// subscription must let through (`virtualMachines/`, apart from `virtualMachineScaleSets`).
#[test]
fn the_resource_manager_subscription_lets_vm_events_through() {
    let sub = read("infra/modules/rm-subscription.bicep");
    assert!(
        sub.contains("values: ['Microsoft.Compute/virtualMachineScaleSets', 'Microsoft.Compute/virtualMachines/']"),
        "{sub}"
    );
    assert!(sub.contains("operatorType: 'StringBeginsWith'"));
    assert!(sub.contains("key: 'data.operationName'"));
}

/// The system-topic subscription delivers every Resource Manager event type the handler acts on:
/// a type it filters out would never reach `monitor-events` (issue 19: failures evaluate at once).
#[test]
fn the_resource_manager_subscription_delivers_what_monitor_events_reads() {
    let bicep = read("infra/modules/rm-subscription.bicep");
    let wanted = [
        vmss_healer::lifecycle::WRITE,
        vmss_healer::lifecycle::DELETE,
        vmss_healer::lifecycle::ACTION,
    ]
    .into_iter()
    .chain(vmss_healer::lifecycle::FAILURES);
    for event_type in wanted {
        assert!(
            bicep.contains(&format!("'{event_type}'")),
            "{event_type} is not in the subscription's includedEventTypes"
        );
        assert!(vmss_healer::lifecycle::is_lifecycle(event_type));
    }
}
