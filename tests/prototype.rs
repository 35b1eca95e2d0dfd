//! Golden images (issue 17): the Compute edge's calls against the simulator, driven by the real
//! `azure_mgmt_compute` clients.

mod common;

use common::{spawn_app, TestApp, IDENTITY_SECRET};
use std::sync::Arc;
use vmss_healer::compute::{Compute, ComputeError, ImageRef, OperationRef, OperationState};

/// The simulator's managed-identity endpoint, as a credential (the handler's own reads it from
/// the process environment, which tests running side by side cannot share).
#[derive(Debug)]
struct SimulatorIdentity {
    url: String,
    http: reqwest::Client,
}

#[async_trait::async_trait]
impl azure_core::auth::TokenCredential for SimulatorIdentity {
    async fn get_token(
        &self,
        _scopes: &[&str],
    ) -> azure_core::Result<azure_core::auth::AccessToken> {
        let answer: serde_json::Value = self
            .http
            .get(format!(
                "{}/msi/token?api-version=2019-08-01&resource=https://management.azure.com",
                self.url
            ))
            .header("X-IDENTITY-HEADER", IDENTITY_SECRET)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| azure_core::Error::new(azure_core::error::ErrorKind::Credential, e))?
            .json()
            .await
            .map_err(|e| azure_core::Error::new(azure_core::error::ErrorKind::Credential, e))?;
        Ok(azure_core::auth::AccessToken::new(
            answer["access_token"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
            time::OffsetDateTime::now_utc() + time::Duration::minutes(30),
        ))
    }

    async fn clear_cache(&self) -> azure_core::Result<()> {
        Ok(())
    }
}

fn compute(app: &TestApp) -> Compute {
    let credential = Arc::new(SimulatorIdentity {
        url: app.sim_url.clone(),
        http: app.http.clone(),
    });
    Compute::new(
        &url::Url::parse(&app.sim_url).unwrap(),
        credential,
        std::time::Duration::from_secs(10),
    )
    .unwrap()
}

async fn state(
    compute: &Compute,
    accepted: &vmss_healer::compute::Accepted,
) -> (OperationState, Option<String>) {
    let op: &OperationRef = accepted.operation.as_ref().expect("an operation to follow");
    let status = compute.operation_status(op).await.unwrap();
    (status.state, status.output)
}

/// Every call of a capture, in order, against the simulator: the instance's disk, Run Command
/// with its output, deallocate, snapshot, gallery and definition made once, a version followed
/// until it is done, listed and deleted, the model pointed at the definition — refused for a set
/// on a platform image, as Azure refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_calls_a_golden_image_takes_work_against_the_simulator() {
    let definition = format!(
        "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/galleries/sig_fleet/images/api-prototype",
        common::SUB,
        common::RG
    );
    let app = spawn_app()
        .scale_set("web", 2)
        .scale_set_spec(serde_json::json!({"name": "api", "capacity": 2, "imageReference": {"id": format!("{definition}/versions/1.0.0")}}))
        .start()
        .await;
    let compute = compute(&app);
    let (web, api) = (TestApp::scale_set("web"), TestApp::scale_set("api"));
    assert!(
        matches!(compute.scale_set(&web).await.unwrap().image, Some(ImageRef::Platform(p)) if p.starts_with("Canonical:"))
    );
    assert!(matches!(
        compute.scale_set(&api).await.unwrap().image,
        Some(ImageRef::Custom(_))
    ));

    let disk = compute.instance_disk(&api, "0").await.unwrap();
    assert!(disk.os_disk.contains("/disks/api_0_OsDisk_1_"), "{disk:?}");
    assert_eq!(
        (disk.os_type.as_str(), disk.hyper_v_generation.as_deref()),
        ("Linux", Some("V2"))
    );

    let script = vec!["/opt/vmss-healer/vmss-healer-agent prepare-image".to_string()];
    let ran = compute
        .run_command(&api, "0", &script, false)
        .await
        .unwrap();
    let (done, output) = state(&compute, &ran).await;
    assert_eq!(done, OperationState::Succeeded);
    assert!(output
        .unwrap_or_default()
        .contains("machine-specific state cleared"));
    let stopped = compute.deallocate_instance(&api, "0").await.unwrap();
    assert_eq!(state(&compute, &stopped).await.0, OperationState::Succeeded);
    assert_eq!(app.vm("api", 0).await["power_state"], "deallocated");

    let snap = compute
        .create_snapshot(&api, "api-0-prototype", "westeurope", &disk.os_disk)
        .await
        .unwrap();
    assert_eq!(state(&compute, &snap).await.0, OperationState::Succeeded);
    let snapshot_id = format!(
        "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/snapshots/api-0-prototype",
        common::SUB,
        common::RG
    );
    for _ in 0..2 {
        compute
            .ensure_gallery(&api, "sig_fleet", "westeurope")
            .await
            .unwrap();
        compute
            .ensure_image_definition(
                &api,
                "sig_fleet",
                "api-prototype",
                "westeurope",
                "Linux",
                "V2",
                "x64",
            )
            .await
            .unwrap();
    }
    // A definition of another OS is not this set's.
    let mismatch = compute
        .ensure_image_definition(
            &api,
            "sig_fleet",
            "api-prototype",
            "westeurope",
            "Windows",
            "V2",
            "x64",
        )
        .await
        .unwrap_err();
    assert!(
        matches!(mismatch, ComputeError::Refused(ref e) if e.code == "ImageDefinitionMismatch"),
        "{mismatch}"
    );

    app.admin(
        reqwest::Method::PUT,
        "artifacts/delay",
        Some(serde_json::json!({"ms": 3_600_000})),
    )
    .await;
    let version = compute
        .create_image_version(
            &api,
            "sig_fleet",
            "api-prototype",
            "2026.12.1",
            "westeurope",
            &snapshot_id,
            "Standard_ZRS",
        )
        .await
        .unwrap();
    assert_eq!(
        state(&compute, &version).await.0,
        OperationState::InProgress,
        "versions take their time"
    );
    let listed = compute
        .image_versions(&api, "sig_fleet", "api-prototype")
        .await
        .unwrap();
    assert_eq!(
        listed
            .iter()
            .map(|v| (v.name.as_str(), v.provisioning_state.as_deref()))
            .collect::<Vec<_>>(),
        vec![("2026.12.1", Some("Creating"))]
    );
    app.admin(reqwest::Method::POST, "artifacts/complete", None)
        .await;
    assert_eq!(state(&compute, &version).await.0, OperationState::Succeeded);

    // The model follows the definition (its latest version); a platform-image set cannot.
    compute.set_image(&api, &definition).await.unwrap();
    assert_eq!(
        compute.scale_set(&api).await.unwrap().image,
        Some(ImageRef::Custom(definition.clone()))
    );
    assert_eq!(
        app.vm("api", 1).await["latest_model_applied"],
        false,
        "a new model"
    );
    let refused = compute.set_image(&web, &definition).await.unwrap_err();
    assert!(
        matches!(refused, ComputeError::Refused(ref e) if e.code == "OperationNotAllowed"),
        "{refused}"
    );

    let gone = compute
        .delete_image_version(&api, "sig_fleet", "api-prototype", "2026.12.1")
        .await
        .unwrap();
    assert_eq!(state(&compute, &gone).await.0, OperationState::Succeeded);
    assert!(compute
        .image_versions(&api, "sig_fleet", "api-prototype")
        .await
        .unwrap()
        .is_empty());
    let deleted = compute
        .delete_snapshot(&api, "api-0-prototype")
        .await
        .unwrap();
    assert_eq!(state(&compute, &deleted).await.0, OperationState::Succeeded);
    // The gallery and the definition were written, under the actions the role grants.
    let actions: Vec<&str> = app
        .compute_calls()
        .await
        .iter()
        .filter_map(|c| {
            vmss_healer::compute::required_action(c["method"].as_str()?, c["path"].as_str()?)
        })
        .collect();
    for action in [
        "Microsoft.Compute/galleries/write",
        "Microsoft.Compute/galleries/images/write",
    ] {
        assert!(actions.contains(&action), "{action}: {actions:?}");
    }
}

/// One round of the Function App's timers and the fleet, as in the other operation tests.
async fn round(app: &TestApp) -> serde_json::Value {
    app.complete_operations().await;
    app.heartbeat_round().await;
    let (status, answer) = app.invoke_timer("monitor-state").await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = app.invoke_timer("monitor-status").await;
    assert_eq!(status, 200, "{answer}");
    answer
}

fn operation(answer: &serde_json::Value) -> &serde_json::Value {
    &answer["ReturnValue"]["scale_sets"][0]["operation"]
}

fn gallery_url(app: &TestApp, tail: &str) -> String {
    format!(
        "{}/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/galleries/{tail}?api-version=2023-07-03",
        app.sim_url,
        common::SUB,
        common::RG
    )
}

async fn arm(
    app: &TestApp,
    method: reqwest::Method,
    url: String,
    body: Option<serde_json::Value>,
) -> serde_json::Value {
    let identity = SimulatorIdentity {
        url: app.sim_url.clone(),
        http: app.http.clone(),
    };
    let token = azure_core::auth::TokenCredential::get_token(&identity, &[])
        .await
        .unwrap();
    let mut request = app
        .http
        .request(method, url)
        .bearer_auth(token.token.secret());
    if let Some(body) = body {
        request = request.json(&body);
    }
    request
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap_or(serde_json::Value::Null)
}

/// The image the scale set's model names, as ARM shows it.
async fn model_image(app: &TestApp) -> String {
    let set = arm(
        app,
        reqwest::Method::GET,
        format!(
            "{}{}?api-version=2024-07-01",
            app.sim_url,
            common::scale_set_id("api")
        ),
        None,
    )
    .await;
    set["properties"]["virtualMachineProfile"]["storageProfile"]["imageReference"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// The snapshots the simulator holds.
async fn snapshots(app: &TestApp) -> Vec<String> {
    let artifacts = app.admin(reqwest::Method::GET, "artifacts", None).await;
    artifacts
        .as_object()
        .into_iter()
        .flat_map(|o| o.keys())
        .filter(|k| k.contains("/snapshots/"))
        .cloned()
        .collect()
}

fn api_on_a_gallery_image() -> serde_json::Value {
    serde_json::json!({"name": "api", "capacity": 3, "imageReference": {"id": format!(
        "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/galleries/SIG_{}/images/api-prototype/versions/2026.101.0",
        common::SUB, common::RG, common::RG.replace('-', "_"))}})
}

/// `--auto` takes the healthy instance ready the longest (ties: the lowest id), which is held
/// while it is prepared, deallocated, snapshotted and captured into a version that takes several
/// passes; it comes back healthy; then the model follows the definition, the snapshot goes, the
/// versions beyond `--max-history` go (never the one the model named), and the rolling upgrade
/// starts. The healer never repaired the instance it did not hear from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_captures_the_longest_ready_instance_and_the_model_follows_its_image() {
    let mut app = spawn_app()
        .scale_set_spec(api_on_a_gallery_image())
        .start()
        .await;
    let gallery = format!("SIG_{}", common::RG.replace('-', "_"));
    // Earlier images: three versions of the definition, the model on the oldest.
    arm(
        &app,
        reqwest::Method::PUT,
        gallery_url(&app, &gallery),
        Some(serde_json::json!({"location": "westeurope"})),
    )
    .await;
    arm(&app, reqwest::Method::PUT, gallery_url(&app, &format!("{gallery}/images/api-prototype")), Some(serde_json::json!({"location": "westeurope",
        "properties": {"osType": "Linux", "osState": "Generalized", "hyperVGeneration": "V2", "identifier": {"publisher": "p", "offer": "o", "sku": "s"}}}))).await;
    let disk = compute(&app)
        .instance_disk(&TestApp::scale_set("api"), "2")
        .await
        .unwrap()
        .os_disk;
    for v in ["2026.101.0", "2026.102.0", "2026.103.0"] {
        arm(&app, reqwest::Method::PUT, gallery_url(&app, &format!("{gallery}/images/api-prototype/versions/{v}")),
            Some(serde_json::json!({"location": "westeurope", "properties": {"storageProfile": {"source": {"id": disk}}}}))).await;
    }
    // Instance 0 is down: never the one captured.
    app.sync_and_break("api", 0, serde_json::json!({"beat": "down"}))
        .await;
    round(&app).await;
    app.admin(
        reqwest::Method::PUT,
        "artifacts/delay",
        Some(serde_json::json!({"ms": 3_600_000})),
    )
    .await;
    let (code, out, err) = app.cli(&[
        "prototype",
        "api",
        "--auto",
        "--minimum-ready",
        "10m",
        "--max-history",
        "2",
        "--then-cycle",
        "--reason",
        "monthly image",
    ]);
    assert_eq!(code, 0, "{out}{err}");

    let mut answers = Vec::new();
    let mut completed = false;
    for _ in 0..40 {
        let answer = round(&app).await;
        let op = operation(&answer).clone();
        answers.push(answer);
        if op["state"] == "succeeded" || op["state"] == "failed" {
            break;
        }
        // The version takes several passes; then it is done.
        if !completed
            && op["progress"]
                .as_str()
                .unwrap_or("")
                .contains("image version")
        {
            let listed = arm(
                &app,
                reqwest::Method::GET,
                gallery_url(&app, &format!("{gallery}/images/api-prototype/versions")),
                None,
            )
            .await;
            if listed["value"].as_array().map_or(0, Vec::len) == 4 {
                assert_eq!(
                    app.vm("api", 1).await["power_state"],
                    "deallocated",
                    "held while captured"
                );
                // A handler restarted in the middle goes on where the operation's row says.
                app.restart_handler(&[]);
                app.admin(reqwest::Method::POST, "artifacts/complete", None)
                    .await;
                completed = true;
            }
        }
    }
    let last = operation(answers.last().unwrap()).clone();
    assert_eq!(last["state"], "succeeded", "{:#}", answers.last().unwrap());
    assert!(completed, "the version was created over several passes");
    let fleet = app.fleet("api").await;
    assert_eq!(
        app.vm("api", 1).await["prepared"],
        true,
        "instance 1 was captured"
    );
    assert_eq!(
        app.vm("api", 1).await["power_state"],
        "running",
        "and restored"
    );
    assert_eq!(
        model_image(&app).await,
        vmss_healer::operations::prototype::definition_id(&TestApp::scale_set("api"), &gallery),
        "{fleet}"
    );
    // History: the new version (named to sort after every earlier one) and the newest old one;
    // the model now follows the definition, so its old version is history like the others.
    let listed = arm(
        &app,
        reqwest::Method::GET,
        gallery_url(&app, &format!("{gallery}/images/api-prototype/versions")),
        None,
    )
    .await;
    let mut names: Vec<String> = listed["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    names.sort();
    let today = time::OffsetDateTime::now_utc();
    let new = format!(
        "{}.{}{:02}.0",
        today.year(),
        u8::from(today.month()),
        today.day()
    );
    assert_eq!(names, vec!["2026.103.0".to_string(), new], "{names:?}");
    let snapshots = snapshots(&app).await;
    assert!(snapshots.is_empty(), "the snapshot is gone: {snapshots:?}");
    // The journal: every step, and no repair of the instance the healer could not hear from.
    let (journal, _) = app.recent_journal(&TestApp::scale_set("api")).await;
    let outcomes: Vec<&str> = journal
        .iter()
        .rev()
        .filter(|e| e.incident.starts_with("prototype-"))
        .map(|e| e.outcome.as_str())
        .collect();
    for step in [
        "started",
        "prepared",
        "deallocated",
        "snapshot",
        "captured",
        "restored",
        "published",
        "succeeded",
        "then_cycle",
    ] {
        assert!(outcomes.contains(&step), "{step} missing: {outcomes:?}");
    }
    assert!(
        journal
            .iter()
            .all(|e| !(e.instance_id == "1" && e.kind == vmss_healer::journal::EntryKind::Repair)),
        "{journal:?}"
    );
    let (_, ops, _) = app.cli(&["operations", "api", "--json"]);
    assert!(
        ops.contains("\"kind\": \"cycle\""),
        "the rolling upgrade started: {ops}"
    );
    // It brings every instance to the new image, as a cycle does.
    let mut cycled = false;
    for _ in 0..40 {
        let answer = round(&app).await;
        if operation(&answer)["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("cycle-"))
            && operation(&answer)["state"] == "succeeded"
        {
            cycled = true;
            break;
        }
    }
    assert!(cycled, "the rolling upgrade did not finish");
    for vm in app.fleet("api").await["vms"].as_array().unwrap() {
        assert_eq!(vm["latest_model_applied"], true, "{vm}");
    }
    // Every request is one the roles allow (infra/), and the golden image's actions are used (but
    // disks/read, which Azure checks on the disk a snapshot copies).
    let mut used = std::collections::BTreeSet::new();
    for call in app.compute_calls().await {
        let (method, path) = (
            call["method"].as_str().unwrap(),
            call["path"].as_str().unwrap(),
        );
        if path.starts_with("/msi/") {
            continue;
        }
        let action = vmss_healer::compute::required_action(method, path)
            .unwrap_or_else(|| panic!("{method} {path} is not covered by REQUIRED_ACTIONS"));
        used.insert(action);
    }
    // The gallery's and the definition's writes are not needed here (they were there): the
    // first test of this file holds them.
    for action in vmss_healer::compute::PROTOTYPE_ACTIONS.iter().filter(|a| {
        !a.ends_with("disks/read")
            && !a.ends_with("galleries/write")
            && !a.ends_with("images/write")
    }) {
        assert!(used.contains(action), "{action} unused: {used:?}");
    }
}

/// A version that fails leaves the model as it was and the instance restored, with an alert.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_version_restores_the_instance_and_leaves_the_model() {
    let (url, receiver) =
        common::webhook::start_receiver(common::webhook::Receiver::default()).await;
    let app = spawn_app()
        .scale_set_spec(api_on_a_gallery_image())
        .env("HEALER_WEBHOOK_URL", &url)
        .start()
        .await;
    round(&app).await;
    app.admin(
        reqwest::Method::POST,
        "operation-faults",
        Some(
            serde_json::json!({"verb": "imageversion", "status": "Failed",
        "code": "ReplicationJobsNotCompleted", "message": "Replication job not completed."}),
        ),
    )
    .await;
    let (code, out, err) = app.cli(&["prototype", "api", "--instance", "2"]);
    assert_eq!(code, 0, "{out}{err}");
    let mut last = serde_json::Value::Null;
    for _ in 0..40 {
        let answer = round(&app).await;
        last = operation(&answer).clone();
        if last["state"] == "failed" || last["state"] == "succeeded" {
            break;
        }
    }
    assert_eq!(last["state"], "failed", "{last:#}");
    assert!(last["progress"].as_str().is_some());
    let image = model_image(&app).await;
    assert!(
        image.ends_with("/versions/2026.101.0"),
        "the model is untouched: {image}"
    );
    assert_eq!(app.vm("api", 2).await["power_state"], "running", "restored");
    let alerts =
        common::webhook::wait_for_alerts(&receiver, 1, std::time::Duration::from_secs(30)).await;
    let alert = alerts
        .iter()
        .find(|a| a["kind"] == "operation")
        .unwrap_or_else(|| panic!("{alerts:?}"));
    let reason = alert["reason"].as_str().unwrap();
    assert!(
        reason.contains("ReplicationJobsNotCompleted") && reason.contains("model is untouched"),
        "{reason}"
    );
}

/// An operator's abort while the instance's disk is captured: the instance is restored, the
/// snapshot taken for it deleted, the model left as it was, and the operation ends `aborted`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abort_during_the_capture_restores_the_instance_and_publishes_nothing() {
    let app = spawn_app()
        .scale_set_spec(api_on_a_gallery_image())
        .start()
        .await;
    round(&app).await;
    let (code, out, err) = app.cli(&["prototype", "api", "--instance", "2"]);
    assert_eq!(code, 0, "{out}{err}");
    // Snapshots and versions take their time: the capture waits at its step.
    app.operation_delay_ms(3_600_000).await;
    let capturing = |op: &serde_json::Value| {
        let p = op["progress"].as_str().unwrap_or("");
        p.contains("(snapshot)") || p.contains("(image version)")
    };
    let mut last = serde_json::Value::Null;
    for _ in 0..40 {
        last = operation(&round(&app).await).clone();
        if capturing(&last) {
            break;
        }
    }
    assert!(capturing(&last), "{last:#}");
    let id = last["id"].as_str().unwrap().to_string();
    let (code, out, err) = app.cli(&["operation", "abort", &id, "--reason", "wrong day"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("rolling_back"), "{out}");
    app.operation_delay_ms(0).await;
    app.admin(reqwest::Method::POST, "artifacts/complete", None)
        .await;
    for _ in 0..40 {
        last = operation(&round(&app).await).clone();
        if last.is_null() || last["state"] == "aborted" || last["state"] == "failed" {
            break;
        }
    }
    let (_, out, _) = app.cli(&["operations", "api", "--json"]);
    let ops: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let op = ops.iter().find(|o| o["id"] == id.as_str()).unwrap();
    assert_eq!(op["state"], "aborted", "{op:#}");
    let image = model_image(&app).await;
    assert!(
        image.ends_with("/versions/2026.101.0"),
        "the model is untouched: {image}"
    );
    assert_eq!(app.vm("api", 2).await["power_state"], "running", "restored");
    let snapshots = snapshots(&app).await;
    assert!(snapshots.is_empty(), "the snapshot is gone: {snapshots:?}");
}

/// Refused with the reason: a set on a platform image (Azure never lets it change its image type),
/// bad parameters all at once; a dry run on a gallery-image set walks every step and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn platform_sets_and_bad_parameters_are_refused_and_a_dry_run_writes_nothing() {
    let app = spawn_app()
        .scale_set("web", 3)
        .scale_set_spec(api_on_a_gallery_image())
        .start()
        .await;
    round(&app).await;
    let (code, _, err) = app.cli(&[
        "prototype",
        "api",
        "--auto",
        "--instance",
        "1",
        "--max-history",
        "1",
        "--gallery",
        "my-gallery",
    ]);
    assert_eq!(code, 2, "{err}");
    for why in ["--instance and --auto", "--max-history", "--gallery"] {
        assert!(err.contains(why), "{why}: {err}");
    }
    let (code, out, err) = app.cli(&["prototype", "web", "--instance", "1"]);
    assert_eq!(code, 0, "{out}{err}");
    let answer = round(&app).await;
    let web = answer["ReturnValue"]["scale_sets"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["scale_set"].as_str().unwrap().ends_with(":web"))
        .unwrap()
        .clone();
    assert_eq!(web["operation"]["state"], "failed", "{web:#}");
    let (_, ops, _) = app.cli(&["operations", "web", "--json"]);
    assert!(ops.contains("may not be changed"), "{ops}");

    app.clear_compute_calls().await;
    let (code, out, err) = app.cli(&["prototype", "api", "--instance", "1", "--dry-run"]);
    assert_eq!(code, 0, "{out}{err}");
    let mut state = String::new();
    for _ in 0..30 {
        let answer = round(&app).await;
        let api = answer["ReturnValue"]["scale_sets"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["scale_set"].as_str().unwrap().ends_with(":api"))
            .unwrap()
            .clone();
        state = api["operation"]["state"].as_str().unwrap_or("").to_string();
        if state == "succeeded" || state == "failed" {
            break;
        }
    }
    assert_eq!(state, "succeeded");
    let writes: Vec<serde_json::Value> = app
        .compute_calls()
        .await
        .into_iter()
        .filter(|c| c["method"] != "GET")
        .collect();
    assert!(writes.is_empty(), "{writes:?}");
}
