//! The Compute simulator behaves like ARM where the handler depends on it, and what it reports
//! reaches the mirror through the real azure_mgmt_compute client.

mod common;

use common::{scale_set_id, spawn_app, TestApp, IDENTITY_SECRET, OTHER_SUB};
use serde_json::{json, Value};

async fn token(app: &TestApp) -> String {
    let r: Value = app
        .http
        .get(format!(
            "{}/msi/token?api-version=2019-08-01&resource=https://management.azure.com",
            app.sim_url
        ))
        .header("X-IDENTITY-HEADER", IDENTITY_SECRET)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    r["access_token"].as_str().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn arm_rules_auth_api_version_and_async_operations() {
    let app = spawn_app().scale_set("web", 3).start().await;
    let url = format!("{}{}", app.sim_url, scale_set_id("web"));

    let no_secret = app
        .http
        .get(format!("{}/msi/token?resource=x", app.sim_url))
        .send()
        .await
        .unwrap();
    assert_eq!(
        no_secret.status(),
        401,
        "the identity endpoint checks X-IDENTITY-HEADER"
    );

    let anonymous = app
        .http
        .get(format!("{url}?api-version=2024-07-01"))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), 401);
    let forged = app
        .http
        .get(format!("{url}?api-version=2024-07-01"))
        .bearer_auth("made-up")
        .send()
        .await
        .unwrap();
    assert_eq!(forged.status(), 401);
    let body: Value = forged.json().await.unwrap();
    assert_eq!(body["error"]["code"], "InvalidAuthenticationToken");

    let bearer = token(&app).await;
    let old_api = app
        .http
        .get(format!("{url}?api-version=2019-07-01"))
        .bearer_auth(&bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(old_api.status(), 400);
    let missing = app
        .http
        .get(format!("{url}/virtualMachines/99?api-version=2024-07-01"))
        .bearer_auth(&bearer)
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);

    // Case-insensitive paths, a 202 with Azure-AsyncOperation, and an operation that can be polled.
    let restart = app
        .http
        .post(format!(
            "{}/restart?api-version=2024-07-01",
            url.to_uppercase().replace("HTTP://", "http://")
        ))
        .bearer_auth(&bearer)
        .json(&json!({"instanceIds": ["1"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(restart.status(), 202);
    let operation = restart.headers()["azure-asyncoperation"]
        .to_str()
        .unwrap()
        .to_string();
    let status: Value = app
        .http
        .get(&operation)
        .bearer_auth(&bearer)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(status["status"], "Succeeded");

    let bad_ids = app
        .http
        .post(format!("{url}/delete?api-version=2024-07-01"))
        .bearer_auth(&bearer)
        .json(&json!({"instanceIds": ["42"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_ids.status(), 400);
    assert_eq!(
        app.fleet("web").await["capacity"],
        json!(3),
        "a rejected delete deletes nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instance_view_details_reach_the_mirror() {
    let app = spawn_app().scale_set("web", 3).start().await;
    app.break_vm("web", 0, json!({"health": "unhealthy"})).await;
    app.break_vm(
        "web",
        1,
        json!({"protectFromScaleSetActions": true, "powerState": "deallocated"}),
    )
    .await;
    let (status, _) = app.invoke_timer("monitor-state").await;
    assert_eq!(status, 200);
    let set = TestApp::scale_set("web");
    let zero = app
        .store
        .mirrored_instance(&set, "0")
        .await
        .unwrap()
        .unwrap();
    assert_eq!(zero.health.map(|h| h.as_str()), Some("unhealthy"));
    assert!(zero.created_at.is_some(), "timeCreated is mirrored");
    assert_eq!(
        zero.provisioned_at, zero.created_at,
        "when the last operation ended: for a fleet never touched, its creation"
    );
    assert_eq!(
        zero.vm_id.as_deref(),
        app.vm("web", 0).await["vm_id"].as_str()
    );
    assert_eq!(zero.computer_name.as_deref(), Some("web000000"));
    let one = app
        .store
        .mirrored_instance(&set, "1")
        .await
        .unwrap()
        .unwrap();
    assert!(one.protected_from_scale_set_actions);
    assert_eq!(one.power_state.as_deref(), Some("deallocated"));
    assert_eq!(
        one.health, None,
        "no Application Health extension, no health state"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_errors_keep_the_last_mirror_and_say_why() {
    let app = spawn_app().scale_set("web", 3).start().await;
    let set = TestApp::scale_set("web");
    app.invoke_timer("monitor-state").await;

    // One 5xx on a read is retried within the pass.
    app.inject_fault(json!({"status": 503, "method": "GET", "count": 1}))
        .await;
    let (_, answer) = app.invoke_timer("monitor-state").await;
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["outcome"], "synced",
        "{answer}"
    );

    // A persistent one fails the scale set's sync, not the pass, and keeps the mirror.
    app.inject_fault(json!({"status": 500, "method": "GET", "count": 2}))
        .await;
    let (status, answer) = app.invoke_timer("monitor-state").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["ReturnValue"]["scale_sets"][0]["outcome"], "transient",
        "{answer}"
    );
    assert_eq!(app.store.mirror(&set).await.unwrap().0.len(), 3);
    let record = app.store.scale_set(&set).await.unwrap().unwrap();
    assert!(record.sync_error.unwrap().contains("500"));
    // Once the fault passes, the next pass syncs and clears the error.
    app.invoke_timer("monitor-state").await;
    assert_eq!(
        app.store.scale_set(&set).await.unwrap().unwrap().sync_error,
        None
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nearly_spent_read_budget_defers_the_rest_of_a_pass_and_catches_up_next() {
    let app = spawn_app()
        .scale_set("a", 2)
        .scale_set("b", 2)
        .scale_set("c", 2)
        .start()
        .await;
    app.admin(
        reqwest::Method::PUT,
        "ratelimit",
        Some(json!({"remaining": 5})),
    )
    .await;
    let (_, answer) = app.invoke_timer("monitor-state").await;
    let outcomes = common::sync_outcomes(&answer);
    assert_eq!(outcomes, ["synced", "deferred", "deferred"], "{answer}");
    assert!(answer["ReturnValue"]["scale_sets"][1]["detail"]
        .as_str()
        .unwrap()
        .contains("5 left"));

    // The budget recovers: the deferred scale sets go first, and all are synced.
    app.admin(
        reqwest::Method::PUT,
        "ratelimit",
        Some(json!({"remaining": 1000})),
    )
    .await;
    app.clear_compute_calls().await;
    let (_, answer) = app.invoke_timer("monitor-state").await;
    let outcomes = common::sync_outcomes(&answer);
    assert_eq!(outcomes, ["synced", "synced", "synced"], "{answer}");
    let first_read = app.compute_calls().await[0]["path"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        !first_read.ends_with("/virtualMachineScaleSets/a"),
        "a was synced last time; {first_read} went first"
    );
}

/// A raw ARM client for the simulator's own tests: what Azure answers, without the handler.
struct Arm<'a> {
    app: &'a TestApp,
    bearer: String,
}

impl<'a> Arm<'a> {
    async fn new(app: &'a TestApp) -> Self {
        Arm {
            bearer: token(app).await,
            app,
        }
    }

    fn url(&self, set: &str, tail: &str) -> String {
        format!(
            "{}{}{tail}?api-version=2024-07-01",
            self.app.sim_url,
            scale_set_id(set)
        )
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let r = request.bearer_auth(&self.bearer).send().await.unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap_or_default();
        (
            status,
            headers,
            serde_json::from_str(&text).unwrap_or(Value::Null),
        )
    }

    async fn post(
        &self,
        set: &str,
        verb: &str,
        ids: &[&str],
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let request = self
            .app
            .http
            .post(self.url(set, &format!("/{verb}")))
            .json(&json!({ "instanceIds": ids }));
        self.send(request).await
    }

    async fn get(&self, set: &str) -> (u16, reqwest::header::HeaderMap, Value) {
        self.send(self.app.http.get(self.url(set, ""))).await
    }

    async fn patch(
        &self,
        set: &str,
        capacity: u64,
        if_match: Option<&str>,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut request = self
            .app
            .http
            .patch(self.url(set, ""))
            .json(&json!({"sku": {"capacity": capacity}}));
        if let Some(etag) = if_match {
            request = request.header("if-match", etag);
        }
        self.send(request).await
    }

    /// The id of the disk at LUN 0 of instance `vm` (empty if none), and the instance as read.
    async fn disk_at_lun0(&self, set: &str, vm: u64) -> (String, Value) {
        let (_, _, body) = self
            .send(
                self.app
                    .http
                    .get(self.url(set, &format!("/virtualMachines/{vm}"))),
            )
            .await;
        let id = body["properties"]["storageProfile"]["dataDisks"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["lun"] == 0)
            .and_then(|d| d["managedDisk"]["id"].as_str())
            .unwrap_or_default()
            .to_string();
        (id, body)
    }

    /// `attachDetachDataDisks` on instance `vm` of `set`.
    async fn attach_detach(
        &self,
        set: &str,
        vm: u64,
        body: Value,
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let url = self.url(set, &format!("/virtualMachines/{vm}/attachDetachDataDisks"));
        self.send(self.app.http.post(url).json(&body)).await
    }

    async fn operation(&self, headers: &reqwest::header::HeaderMap) -> Value {
        let url = headers["azure-asyncoperation"]
            .to_str()
            .unwrap()
            .to_string();
        self.send(self.app.http.get(url)).await.2
    }
}

async fn slow_operations(app: &TestApp) {
    app.admin(
        reqwest::Method::PUT,
        "operations/delay",
        Some(json!({"ms": 3_600_000})),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operations_run_until_they_end_succeeded_failed_or_canceled_with_arm_error_codes() {
    let app = spawn_app().scale_set("web", 3).start().await;
    let arm = Arm::new(&app).await;
    slow_operations(&app).await;

    let (status, headers, _) = arm.post("web", "restart", &["0"]).await;
    assert_eq!(status, 202);
    assert_eq!(arm.operation(&headers).await["status"], "InProgress");
    assert_eq!(app.vm("web", 0).await["provisioning_state"], "Updating");
    app.admin(reqwest::Method::POST, "operations/complete", None)
        .await;
    let done = arm.operation(&headers).await;
    assert_eq!(
        (done["status"].as_str(), done["error"].is_null()),
        (Some("Succeeded"), true)
    );
    assert!(done["endTime"].is_string(), "{done}");

    for (status, code) in [
        ("Failed", "VMAgentStatusCommunicationError"),
        ("Canceled", "OperationCanceled"),
    ] {
        app.admin(
            reqwest::Method::POST,
            "operation-faults",
            Some(json!({"verb": "reimage", "status": status, "code": code, "message": "it went wrong"})),
        )
        .await;
        let (accepted, headers, _) = arm.post("web", "reimage", &["1"]).await;
        assert_eq!(
            accepted, 202,
            "the request is accepted; the operation fails later"
        );
        assert_eq!(arm.operation(&headers).await["status"], "InProgress");
        app.admin(reqwest::Method::POST, "operations/complete", None)
            .await;
        let ended = arm.operation(&headers).await;
        assert_eq!(ended["status"], status, "{ended}");
        assert_eq!(ended["error"]["code"], code, "{ended}");
        assert_eq!(ended["error"]["message"], "it went wrong");
        assert_eq!(
            app.vm("web", 1).await["provisioning_state"],
            "Succeeded",
            "a failed operation leaves the instance as it was"
        );
    }

    // With a delay, an operation ends by itself once that time has passed.
    app.admin(
        reqwest::Method::PUT,
        "operations/delay",
        Some(json!({"ms": 300})),
    )
    .await;
    let (_, headers, _) = arm.post("web", "restart", &["2"]).await;
    assert_eq!(arm.operation(&headers).await["status"], "InProgress");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while arm.operation(&headers).await["status"] != "Succeeded" {
        assert!(
            std::time::Instant::now() < deadline,
            "the operation never ended"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

/// Resource Manager reports how operations end, failures too (`…Failure`, status `Failed`), and an
/// operator's power-off; a failed operation can leave its instances `Failed`, as Azure does
/// (https://learn.microsoft.com/azure/virtual-machines/states-billing), a failed scale-out its new
/// instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_operations_and_power_offs_raise_resource_manager_events() {
    let app = spawn_app().scale_set("web", 3).start().await;
    let arm = Arm::new(&app).await;
    slow_operations(&app).await;
    app.clear_resource_events_now().await;
    app.admin(
        reqwest::Method::POST,
        "operation-faults",
        Some(json!({"verb": "reimage", "status": "Failed", "code": "VMExtensionProvisioningError", "leaves": "Failed"})),
    )
    .await;
    let (accepted, _, _) = arm.post("web", "reimage", &["1"]).await;
    assert_eq!(accepted, 202);
    app.complete_operations().await;
    assert_eq!(app.vm("web", 1).await["provisioning_state"], "Failed");
    let events = app
        .admin(reqwest::Method::GET, "resource-events", None)
        .await;
    let set_id = app.resource_id_of("web", 1).await;
    let set_id = set_id
        .rsplit_once("/virtualMachines/")
        .unwrap()
        .0
        .to_string();
    assert!(
        events.as_array().unwrap().iter().any(|e| {
            e["eventType"] == "Microsoft.Resources.ResourceActionFailure"
                && e["data"]["status"] == "Failed"
                && e["data"]["operationName"]
                    == "Microsoft.Compute/virtualMachineScaleSets/reimage/action"
                && e["data"]["resourceUri"] == set_id
        }),
        "{events}"
    );

    // A failed scale-out keeps the instances it was creating, failed, and reports the write's
    // failure.
    app.clear_resource_events_now().await;
    app.admin(
        reqwest::Method::POST,
        "operation-faults",
        Some(json!({"verb": "scale", "status": "Failed", "code": "AllocationFailed", "leaves": "Failed"})),
    )
    .await;
    app.set_capacity("web", 4).await;
    app.complete_operations().await;
    let fleet = app.fleet("web").await;
    let failed: Vec<&Value> = fleet["vms"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["provisioning_state"] == "Failed")
        .collect();
    assert_eq!(failed.len(), 2, "instance 1 and the new one: {fleet}");
    let events = app
        .admin(reqwest::Method::GET, "resource-events", None)
        .await;
    assert!(
        events.as_array().unwrap().iter().any(|e| {
            e["eventType"] == "Microsoft.Resources.ResourceWriteFailure"
                && e["data"]["operationName"] == "Microsoft.Compute/virtualMachineScaleSets/write"
        }),
        "{events}"
    );

    // An operator's power-off: the VM stops, RM reports the action on the instance.
    app.clear_resource_events_now().await;
    let answer = app
        .admin(
            reqwest::Method::POST,
            &format!("scalesets/{}/vms/2/poweroff", TestApp::key("web")),
            None,
        )
        .await;
    assert_eq!(app.vm("web", 2).await["power_state"], "stopped");
    let events = app
        .admin(reqwest::Method::GET, "resource-events", None)
        .await;
    let off = &events.as_array().unwrap()[0];
    assert_eq!(
        (
            off["eventType"].as_str(),
            off["data"]["operationName"].as_str(),
            off["data"]["resourceUri"].as_str()
        ),
        (
            Some("Microsoft.Resources.ResourceActionSuccess"),
            Some("Microsoft.Compute/virtualMachineScaleSets/virtualMachines/powerOff/action"),
            answer["resourceUri"].as_str()
        ),
        "{events}"
    );
    assert!(off["data"]["resourceUri"]
        .as_str()
        .unwrap()
        .ends_with("/virtualMachines/2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_set_write_preempts_a_running_delete() {
    let app = spawn_app().scale_set("web", 4).start().await;
    let arm = Arm::new(&app).await;
    slow_operations(&app).await;

    let (status, delete, _) = arm.post("web", "delete", &["1"]).await;
    assert_eq!(status, 202);
    assert_eq!(app.vm("web", 1).await["provisioning_state"], "Deleting");
    let (_, _, set) = arm.get("web").await;
    assert_eq!(
        set["properties"]["provisioningState"], "Updating",
        "a delete changes the capacity"
    );

    let (status, _, _) = arm.patch("web", 5, None).await;
    assert_eq!(status, 200);
    let preempted = arm.operation(&delete).await;
    assert_eq!(preempted["status"], "Failed", "{preempted}");
    assert_eq!(preempted["error"]["code"], "OperationPreempted");
    assert_eq!(
        app.vm("web", 1).await["provisioning_state"],
        "Succeeded",
        "the preempted delete deleted nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_of_a_stopped_instance_is_not_allowed_start_is_and_busy_instances_conflict() {
    let app = spawn_app().scale_set("web", 4).start().await;
    let arm = Arm::new(&app).await;
    app.break_vm("web", 1, json!({"powerState": "deallocated"}))
        .await;

    // One deallocated instance refuses the whole batch, and nothing in it is restarted.
    let (status, _, body) = arm.post("web", "restart", &["0", "1"]).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "OperationNotAllowed");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("requires the VM to be running"));
    assert_eq!(app.vm("web", 0).await["provisioning_state"], "Succeeded");
    let (status, _, _) = arm.post("web", "restart", &["0"]).await;
    assert_eq!(status, 202, "alone, the running instance restarts");

    slow_operations(&app).await;
    let (status, _, _) = arm.post("web", "start", &["1"]).await;
    assert_eq!(status, 202, "a deallocated instance is started");
    let (status, _, body) = arm.post("web", "restart", &["1"]).await;
    assert_eq!(status, 409, "while its start runs: {body}");
    assert_eq!(body["error"]["code"], "Conflict");

    // An instance being deleted is no longer an active instance.
    let (_, _, _) = arm.post("web", "delete", &["2"]).await;
    let (status, _, body) = arm.post("web", "reimage", &["2"]).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("not an active Virtual Machine Scale Set VM instanceId"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scale_set_writes_honour_if_match_and_the_capacity_limit() {
    let app = spawn_app()
        .scale_set_spec(json!({"name": "web", "capacity": 3, "maxCapacity": 4}))
        .start()
        .await;
    let arm = Arm::new(&app).await;

    let (status, headers, set) = arm.get("web").await;
    assert_eq!(status, 200);
    let etag = set["etag"].as_str().unwrap().to_string();
    assert_eq!(
        headers["etag"].to_str().unwrap(),
        etag,
        "body and header agree"
    );
    assert!(
        etag.starts_with('"') && etag.ends_with('"'),
        "a quoted ETag: {etag}"
    );

    // Someone else writes (autoscale): the ETag moves on and ours no longer matches.
    app.set_capacity("web", 2).await;
    let (status, _, body) = arm.patch("web", 4, Some(&etag)).await;
    assert_eq!(status, 412, "{body}");
    assert_eq!(body["error"]["code"], "PreconditionFailed");
    assert_eq!(
        app.fleet("web").await["capacity"],
        json!(2),
        "a refused write changes nothing"
    );

    let (_, _, fresh) = arm.get("web").await;
    let current = fresh["etag"].as_str().unwrap().to_string();
    assert_ne!(current, etag);
    let (status, _, _) = arm.patch("web", 3, Some(&current)).await;
    assert_eq!(status, 200);
    assert_eq!(app.fleet("web").await["capacity"], json!(3));

    let (status, _, body) = arm.patch("web", 5, None).await;
    assert_eq!(status, 409, "{body}");
    assert_eq!(body["error"]["code"], "OperationNotAllowed");
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("exceeds the total limit of '4'"));

    // A write between a read and a write, as autoscale makes it, is a fault rule too.
    let (_, _, fresh) = arm.get("web").await;
    let current = fresh["etag"].as_str().unwrap().to_string();
    app.inject_fault(json!({"method": "PATCH", "autoscaleTo": 4}))
        .await;
    let (status, _, _) = arm.patch("web", 4, Some(&current)).await;
    assert_eq!(status, 412, "autoscale wrote first");
    assert_eq!(app.fleet("web").await["capacity"], json!(4));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_rate_limit_header_per_policy_counted_per_subscription() {
    let app = spawn_app()
        .scale_set("a", 1)
        .scale_set_spec(json!({"name": "other", "capacity": 1, "subscription": OTHER_SUB}))
        .start()
        .await;
    let arm = Arm::new(&app).await;
    let remaining = |headers: &reqwest::header::HeaderMap| -> Vec<(String, i64)> {
        headers
            .get_all("x-ms-ratelimit-remaining-resource")
            .iter()
            .map(|v| {
                let (policy, count) = v.to_str().unwrap().rsplit_once(';').unwrap();
                (policy.to_string(), count.parse().unwrap())
            })
            .collect()
    };
    let (_, first, _) = arm.get("a").await;
    let policies = remaining(&first);
    assert_eq!(policies.len(), 2, "one header per policy: {policies:?}");
    assert!(policies[0].0.ends_with("3Min") && policies[1].0.ends_with("30Min"));
    assert!(
        policies[0].1 < policies[1].1,
        "the tight bucket comes first"
    );
    let (_, second, _) = arm.get("a").await;
    assert_eq!(
        remaining(&second)[0].1,
        policies[0].1 - 1,
        "each call is charged"
    );

    // Another subscription has a budget of its own.
    let other = format!(
        "{}/subscriptions/{OTHER_SUB}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachineScaleSets/other?api-version=2024-07-01",
        app.sim_url,
        common::RG
    );
    let (_, theirs, _) = arm.send(app.http.get(other)).await;
    assert_eq!(
        remaining(&theirs)[0].1,
        policies[0].1,
        "{:?}",
        remaining(&theirs)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_throttles_the_whole_subscription_until_retry_after() {
    let app = spawn_app()
        .scale_set("a", 1)
        .scale_set("b", 1)
        .scale_set_spec(json!({"name": "other", "capacity": 1, "subscription": OTHER_SUB}))
        .start()
        .await;
    let arm = Arm::new(&app).await;
    app.inject_fault(json!({"status": 429, "retryAfter": 120, "pathContains": "/a"}))
        .await;
    let (status, headers, _) = arm.get("a").await;
    assert_eq!(
        (status, headers["retry-after"].to_str().unwrap()),
        (429, "120")
    );
    let (status, headers, _) = arm.get("b").await;
    assert_eq!(status, 429, "the same subscription is throttled");
    let left: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((110..=120).contains(&left), "{left}");
    let other = format!(
        "{}/subscriptions/{OTHER_SUB}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachineScaleSets/other?api-version=2024-07-01",
        app.sim_url,
        common::RG
    );
    let (status, _, _) = arm.send(app.http.get(other)).await;
    assert_eq!(status, 200, "another subscription is not");
}

/// Issue 12 item 5's ground truth: Azure reports when the last operation on an instance ended as
/// the `time` of its `ProvisioningState/…` status ("Azure VM Scale Sets and Azure Resource
/// Explorer": after a start, `ProvisioningState/succeeded` carries the time it completed). A call
/// whose answer was lost is found out from it. And the simulator can lose an answer to a call it
/// carried out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operation_stamps_the_instance_view_and_an_answer_can_be_lost() {
    let app = spawn_app().scale_set("web", 2).start().await;
    let url = format!("{}{}", app.sim_url, scale_set_id("web"));
    let bearer = token(&app).await;
    let provisioned = |app: &TestApp, i: u64| {
        let url = format!("{url}/virtualMachines/{i}/instanceView?api-version=2024-07-01");
        let (http, bearer) = (app.http.clone(), bearer.clone());
        async move {
            let view: Value = http
                .get(url)
                .bearer_auth(bearer)
                .send()
                .await
                .unwrap()
                .json()
                .await
                .unwrap();
            let status = view["statuses"]
                .as_array()
                .unwrap_or_else(|| panic!("{view}"))
                .iter()
                .find(|s| {
                    s["code"]
                        .as_str()
                        .unwrap()
                        .starts_with("ProvisioningState/")
                })
                .cloned()
                .unwrap();
            time::OffsetDateTime::parse(
                status["time"].as_str().unwrap(),
                &time::format_description::well_known::Rfc3339,
            )
            .unwrap()
        }
    };
    let before = provisioned(&app, 1).await;
    assert!(
        time::OffsetDateTime::now_utc() - before > time::Duration::hours(1),
        "a day-old fleet's last operation is its creation: {before}"
    );

    // The restart is carried out, its answer held longer than the client waits.
    app.inject_fault(json!({"method": "POST", "pathContains": "/restart", "hangMs": 3000}))
        .await;
    let sent = time::OffsetDateTime::now_utc();
    let lost = app
        .http
        .post(format!("{url}/restart?api-version=2024-07-01"))
        .bearer_auth(&bearer)
        .timeout(std::time::Duration::from_millis(300))
        .json(&json!({"instanceIds": ["1"]}))
        .send()
        .await;
    assert!(lost.is_err_and(|e| e.is_timeout()), "the answer never came");
    app.complete_operations().await;
    let ops = app.operations().await;
    assert_eq!(ops.len(), 1, "yet the restart was carried out: {ops:?}");
    let after = provisioned(&app, 1).await;
    assert!(
        after >= sent,
        "the instance view shows it ended after it was sent: {after}"
    );
    assert_eq!(provisioned(&app, 0).await, provisioned(&app, 0).await);
    assert!(
        provisioned(&app, 0).await < sent,
        "an untouched instance keeps its time"
    );
}

/// A GET of any ARM URL (path and query as ARM takes them) with the test's token.
async fn arm_get(arm: &Arm<'_>, path_and_query: &str) -> (u16, Value) {
    let (status, _, body) = arm
        .send(
            arm.app
                .http
                .get(format!("{}{path_and_query}", arm.app.sim_url)),
        )
        .await;
    (status, body)
}

/// Flexible orchestration as the REST spec (2024-07-01) and "Orchestration modes API comparison"
/// describe it: instances are plain VMs listed with the VM API filtered by scale set, with their
/// instance views only under that filter; acted on one by one with the VM API; deleted in a
/// batch by name; and the scale-set instance API knows none of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flexible_scale_sets_are_plain_vms_listed_by_filter_and_acted_on_one_by_one() {
    let app = spawn_app()
        .scale_set_spec(json!({"name": "flex", "capacity": 5, "orchestrationMode": "Flexible", "zones": ["1", "2"]}))
        .scale_set("web", 2)
        .page_size(2)
        .start()
        .await;
    let arm = Arm::new(&app).await;
    let flex_id = scale_set_id("flex");
    let rg_vms = format!(
        "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines",
        common::SUB,
        common::RG
    );
    let filter = format!("'virtualMachineScaleSet/id' eq '{flex_id}'");
    let q = |extra: &str| {
        format!(
            "{rg_vms}?api-version=2024-07-01&$filter={}{extra}",
            url::form_urlencoded::byte_serialize(filter.as_bytes()).collect::<String>()
        )
    };

    // The list is paged (nextLink carries the filter and the expansion) and holds the set's
    // VMs only, each naming its set, with its instance view when expanded.
    let mut vms = Vec::new();
    let mut next = Some(format!("{}{}", app.sim_url, q("&$expand=instanceView")));
    let mut pages = 0;
    while let Some(url) = next {
        let (status, _, page) = arm.send(app.http.get(&url)).await;
        assert_eq!(status, 200, "{page}");
        pages += 1;
        vms.extend(page["value"].as_array().unwrap().iter().cloned());
        next = page["nextLink"].as_str().map(str::to_string);
    }
    assert_eq!((vms.len(), pages), (5, 3));
    for vm in &vms {
        let name = vm["name"].as_str().unwrap();
        assert!(
            name.starts_with("flex_") && name.len() == "flex_".len() + 8,
            "{name}"
        );
        assert_eq!(vm["type"], "Microsoft.Compute/virtualMachines");
        assert_eq!(vm["id"], format!("{rg_vms}/{name}"));
        assert_eq!(vm["properties"]["virtualMachineScaleSet"]["id"], flex_id);
        assert!(
            vm["properties"]["vmId"].is_string() && vm["properties"]["timeCreated"].is_string()
        );
        assert!(vm["zones"].is_array());
        let statuses = vm["properties"]["instanceView"]["statuses"]
            .as_array()
            .unwrap();
        assert!(statuses.iter().any(|s| s["code"] == "PowerState/running"));
        assert!(
            vm["properties"].get("protectionPolicy").is_none(),
            "Flexible VMs have no instance protection"
        );
    }
    // Without the filter, $expand is refused; an unknown filter is refused.
    let (status, body) = arm_get(
        &arm,
        &format!("{rg_vms}?api-version=2024-07-01&$expand=instanceView"),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("InvalidParameter")),
        "{body}"
    );
    let (status, _) = arm_get(
        &arm,
        &format!("{rg_vms}?api-version=2024-07-01&$filter=name%20eq%20'x'"),
    )
    .await;
    assert_eq!(status, 400);
    // statusOnly on the subscription-wide list: the instance views alone.
    let (status, body) = arm_get(
        &arm,
        &format!(
            "/subscriptions/{}/providers/Microsoft.Compute/virtualMachines?api-version=2024-07-01&statusOnly=true&$filter={}",
            common::SUB,
            url::form_urlencoded::byte_serialize(filter.as_bytes()).collect::<String>()
        ),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let first = &body["value"][0];
    assert!(
        first["properties"]["instanceView"]["statuses"].is_array()
            && first["properties"].get("vmId").is_none(),
        "{first}"
    );
    // The scale-set instance API knows none of them; the Uniform set's VMs are not plain VMs.
    let (status, body) = arm_get(
        &arm,
        &format!("{flex_id}/virtualMachines?api-version=2024-07-01"),
    )
    .await;
    assert_eq!(
        (status, body["value"].as_array().map(Vec::len)),
        (200, Some(0))
    );
    let (_, body) = arm_get(&arm, &format!("{rg_vms}?api-version=2024-07-01")).await;
    assert!(body["value"]
        .as_array()
        .unwrap()
        .iter()
        .all(|v| v["name"].as_str().unwrap().starts_with("flex_")));

    // Power and reimage go to each VM; the scale-set batch form is refused.
    let names: Vec<String> = vms
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_string())
        .collect();
    let (status, _, body) = arm.post("flex", "restart", &[names[0].as_str()]).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("OperationNotAllowed")),
        "{body}"
    );
    app.clear_resource_events_now().await;
    let (status, headers, _) = arm
        .send(app.http.post(format!(
            "{}{rg_vms}/{}/restart?api-version=2024-07-01",
            app.sim_url,
            names[0].to_uppercase()
        )))
        .await;
    assert_eq!(status, 202);
    assert!(headers.contains_key("azure-asyncoperation"));
    app.complete_operations().await;
    let events = app
        .admin(reqwest::Method::GET, "resource-events", None)
        .await;
    assert!(
        events.as_array().unwrap().iter().any(|e| {
            e["data"]["operationName"] == "Microsoft.Compute/virtualMachines/restart/action"
                && e["data"]["resourceUri"] == format!("{rg_vms}/{}", names[0])
        }),
        "a VM's action is reported on the VM: {events}"
    );
    // Restarting a deallocated VM is refused as for Uniform; starting it is not.
    app.break_vm("flex", 1, json!({"powerState": "deallocated"}))
        .await;
    let vm1 = app.vm("flex", 1).await["name"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, _, body) = arm
        .send(app.http.post(format!(
            "{}{rg_vms}/{vm1}/restart?api-version=2024-07-01",
            app.sim_url
        )))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("OperationNotAllowed"))
    );
    for verb in ["start", "reimage", "redeploy"] {
        let (status, _, body) = arm
            .send(app.http.post(format!(
                "{}{rg_vms}/{vm1}/{verb}?api-version=2024-07-01",
                app.sim_url
            )))
            .await;
        assert_eq!(status, 202, "{verb}: {body}");
        app.complete_operations().await;
    }
    let (status, body) = arm_get(
        &arm,
        &format!("{rg_vms}/{vm1}/instanceView?api-version=2024-07-01"),
    )
    .await;
    assert_eq!(status, 200);
    assert!(
        body["statuses"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| s["code"] == "PowerState/running"),
        "{body}"
    );
    let (status, _) = arm_get(
        &arm,
        &format!("{rg_vms}/nope_12345678?api-version=2024-07-01"),
    )
    .await;
    assert_eq!(status, 404);

    // Deletion stays a batch on the scale set, by VM name (any case); a name it does not have is
    // refused like an inactive instance id.
    let (status, _, body) = arm
        .post(
            "flex",
            "delete",
            &[names[2].to_uppercase().as_str(), names[3].as_str()],
        )
        .await;
    assert_eq!(status, 202, "{body}");
    app.complete_operations().await;
    assert_eq!(app.fleet("flex").await["capacity"], 3);
    let (status, _, _) = arm.post("flex", "delete", &["flex_00000000"]).await;
    assert_eq!(status, 400);
    let events = app
        .admin(reqwest::Method::GET, "resource-events", None)
        .await;
    assert!(
        events.as_array().unwrap().iter().any(|e| {
            e["eventType"] == "Microsoft.Resources.ResourceDeleteSuccess"
                && e["data"]["resourceUri"] == format!("{rg_vms}/{}", names[3])
        }),
        "{events}"
    );
}

/// Management locks as Resource Manager lists and enforces them: per resource group (with every
/// resource's lock in it) at their own api-version; a lock on a VM or its group refuses its
/// deletion (409 `ScopeLocked`), a `ReadOnly` one its actions too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn locks_are_listed_per_group_and_refuse_what_they_lock() {
    let app = spawn_app()
        .scale_set_spec(json!({"name": "flex", "capacity": 3, "orchestrationMode": "Flexible"}))
        .start()
        .await;
    let arm = Arm::new(&app).await;
    let vm = |i| {
        let app = &app;
        async move { app.resource_id_of("flex", i).await }
    };
    let (vm0, vm1) = (vm(0).await, vm(1).await);
    for (scope, level) in [(&vm0, "CanNotDelete"), (&vm1, "ReadOnly")] {
        app.admin(
            reqwest::Method::POST,
            "locks",
            Some(json!({"scope": scope, "level": level})),
        )
        .await;
    }
    let locks = format!(
        "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Authorization/locks",
        common::SUB,
        common::RG
    );
    let (status, body) = arm_get(&arm, &format!("{locks}?api-version=2016-09-01")).await;
    assert_eq!(status, 200, "{body}");
    let ids: Vec<&str> = body["value"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids.len(), 2);
    assert!(
        ids[0].starts_with(&format!("{vm0}/providers/Microsoft.Authorization/locks/")),
        "{ids:?}"
    );
    assert_eq!(body["value"][1]["properties"]["level"], "ReadOnly");
    let (status, _) = arm_get(&arm, &format!("{locks}?api-version=2024-07-01")).await;
    assert_eq!(status, 400, "locks have their own api-version");

    let name = |id: &str| id.rsplit('/').next().unwrap().to_string();
    let (status, _, body) = arm.post("flex", "delete", &[name(&vm0).as_str()]).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("ScopeLocked")),
        "{body}"
    );
    let post = |id: &str, verb: &str| {
        app.http
            .post(format!("{}{id}/{verb}?api-version=2024-07-01", app.sim_url))
    };
    let (status, _, _) = arm.send(post(&vm0, "restart")).await;
    assert_eq!(status, 202, "CanNotDelete allows a restart");
    app.complete_operations().await;
    let (status, _, body) = arm.send(post(&vm1, "restart")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("ScopeLocked")),
        "{body}"
    );
}

/// Model versions and the manual upgrade, as "Performing manual upgrades on Virtual Machine Scale
/// Sets" and the REST spec's `VirtualMachineScaleSets_UpdateInstances` describe them: a new model
/// leaves every instance on its old one until `manualupgrade` names it; a reimage keeps the
/// instance's model (VirtualMachineScaleSetReimageParameters: "the OS disk is reimaged to the
/// existing version"); a new instance gets the latest. The mirror reads it through the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_model_reaches_an_instance_only_by_its_manual_upgrade() {
    let app = spawn_app().scale_set("web", 3).start().await;
    let arm = Arm::new(&app).await;
    let key = TestApp::key("web");
    let model = app
        .admin(
            reqwest::Method::POST,
            &format!("scalesets/{key}/model"),
            None,
        )
        .await;
    assert_eq!(model["modelVersion"], 2);
    for i in 0..3 {
        assert_eq!(app.vm("web", i).await["latest_model_applied"], false);
    }

    // The instances must be named: an upgrade of "all" is not what the call does.
    let (status, _, body) = arm.post("web", "manualupgrade", &[]).await;
    assert_eq!(status, 400, "{body}");
    let (status, headers, _) = arm.post("web", "manualupgrade", &["0"]).await;
    assert_eq!(status, 202);
    assert_eq!(arm.operation(&headers).await["status"], "Succeeded");
    let (status, _, _) = arm.post("web", "reimage", &["1"]).await;
    assert_eq!(status, 202);
    app.set_capacity("web", 4).await;
    app.complete_operations().await;

    let (status, answer) = app.invoke_timer("monitor-state").await;
    assert_eq!(status, 200, "{answer}");
    let (mirror, _) = app.store.mirror(&TestApp::scale_set("web")).await.unwrap();
    let latest: std::collections::BTreeMap<String, Option<bool>> = mirror
        .iter()
        .map(|m| {
            (
                m.instance.instance_id.clone(),
                m.instance.latest_model_applied,
            )
        })
        .collect();
    assert_eq!(
        latest,
        [("0", true), ("1", false), ("2", false), ("3", true)]
            .into_iter()
            .map(|(k, v)| (k.to_string(), Some(v)))
            .collect(),
        "upgraded, reimaged, untouched, new"
    );
    // A Flexible scale set's manual upgrade is not offered (in preview on Azure).
    let flex = spawn_app()
        .scale_set_spec(json!({"name": "flex", "capacity": 1, "orchestrationMode": "Flexible"}))
        .start()
        .await;
    let arm = Arm::new(&flex).await;
    let (status, _, body) = arm.post("flex", "manualupgrade", &[]).await;
    assert_eq!(status, 409, "{body}");
}

/// Terminate notifications as "Terminate notification for Azure Virtual Machine Scale Set
/// instances" and "Scheduled Events for Linux VMs" describe them: the model carries the notice; a
/// delete (and only a delete) gives each VM a Terminate event naming it, `NotBefore` = now + the
/// notice as an HTTP date; the delete waits until the event is approved (or the notice runs out);
/// the mirror reads the notice through the client.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delete_under_terminate_notifications_waits_for_the_vms_approval() {
    let app = spawn_app()
        .scale_set_spec(json!({"name": "web", "capacity": 3, "terminateNotificationSeconds": 600}))
        .start()
        .await;
    let arm = Arm::new(&app).await;
    let (_, _, set) = arm.get("web").await;
    assert_eq!(
        set["properties"]["virtualMachineProfile"]["scheduledEventsProfile"]
            ["terminateNotificationProfile"],
        json!({"notBeforeTimeout": "PT600S", "enable": true})
    );
    let (status, answer) = app.invoke_timer("monitor-state").await;
    assert_eq!(status, 200, "{answer}");
    let records = app.store.scale_sets().await.unwrap();
    let record = &records[&TestApp::scale_set("web").key()];
    assert_eq!(record.terminate_notice, Some(time::Duration::seconds(600)));

    let events = |vm: &'static str| {
        let app = &app;
        async move {
            app.admin(
                reqwest::Method::GET,
                &format!("scheduledevents?vm={vm}"),
                None,
            )
            .await
        }
    };
    // A reimage raises no event.
    let (status, _, _) = arm.post("web", "reimage", &["0"]).await;
    assert_eq!(status, 202);
    assert_eq!(events("web_0").await["Events"], json!([]));

    let (status, headers, _) = arm.post("web", "delete", &["1"]).await;
    assert_eq!(status, 202);
    assert_eq!(
        arm.operation(&headers).await["status"],
        "InProgress",
        "waits for the drain"
    );
    let doc = events("WEB_1").await;
    let event = &doc["Events"][0];
    assert_eq!(
        (
            event["EventType"].as_str(),
            event["EventStatus"].as_str(),
            event["Resources"].clone()
        ),
        (Some("Terminate"), Some("Scheduled"), json!(["web_1"])),
        "{doc}"
    );
    let not_before = time::PrimitiveDateTime::parse(
        event["NotBefore"].as_str().unwrap(),
        time::macros::format_description!(
            "[weekday repr:short], [day] [month repr:short] [year] [hour]:[minute]:[second] GMT"
        ),
    )
    .unwrap()
    .assume_utc();
    let ahead = not_before - time::OffsetDateTime::now_utc();
    assert!(
        ahead > time::Duration::seconds(590) && ahead <= time::Duration::seconds(600),
        "{ahead}"
    );
    assert_eq!(
        events("web_2").await["Events"],
        json!([]),
        "only the VM it names"
    );
    assert_eq!(
        app.vm("web", 1).await["power_state"],
        "running",
        "it runs while it drains"
    );

    let refused = app
        .http
        .post(format!("{}/admin/scheduledevents", app.sim_url))
        .json(&json!({"StartRequests": [{"EventId": "no-such-event"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    let id = event["EventId"].as_str().unwrap();
    app.admin(
        reqwest::Method::POST,
        "scheduledevents",
        Some(json!({"StartRequests": [{"EventId": id}]})),
    )
    .await;
    assert_eq!(arm.operation(&headers).await["status"], "Succeeded");
    let fleet = app.fleet("web").await;
    assert_eq!(fleet["vms"].as_array().unwrap().len(), 2, "{fleet}");
    assert_eq!(events("web_1").await["Events"], json!([]));
}

/// Autoscale settings as `Microsoft.Insights/autoscalesettings` (api-version 2022-10-01) has
/// them: listed per resource group, read and written with PUT, `targetResourceUri` naming the
/// scale set, the profile's capacity as strings. An enabled setting keeps its target within its
/// minimum and maximum: a set scaled to zero under it comes back; its target cannot change, and
/// disabled, it lets the set go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autoscale_settings_hold_their_target_within_range_and_cannot_be_retargeted() {
    let app = spawn_app()
        .scale_set("web", 3)
        .scale_set("api", 1)
        .start()
        .await;
    let arm = Arm::new(&app).await;
    let url = |name: &str| {
        format!(
            "{}/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Insights/autoscalesettings{name}?api-version=2022-10-01",
            app.sim_url,
            common::SUB,
            common::RG
        )
    };
    let setting = |target: &str, min: &str, max: &str| {
        json!({"location": "westeurope", "properties": {
            "enabled": true, "targetResourceUri": scale_set_id(target),
            "profiles": [{"name": "default", "capacity": {"minimum": min, "maximum": max, "default": min}, "rules": []}]
        }})
    };
    let arm = &arm;
    let put = |body: Value| {
        let (http, url) = (app.http.clone(), url("/as-web"));
        async move { arm.send(http.put(url).json(&body)).await }
    };
    let (status, _, created) = put(setting("web", "2", "10")).await;
    assert_eq!(status, 201, "{created}");
    assert_eq!(
        created["properties"]["targetResourceUri"],
        json!(scale_set_id("web"))
    );
    let (status, _, listed) = arm.send(app.http.get(url(""))).await;
    assert_eq!(
        (status, listed["value"].as_array().map(Vec::len)),
        (200, Some(1)),
        "{listed}"
    );
    // Refused: a range upside down, a target that is not there, the Compute api-version.
    let (status, _, body) = put(setting("web", "5", "3")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("InvalidRequest"))
    );
    let (status, _, body) = put(setting("nosuchset", "1", "3")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("TargetResourceNotFound"))
    );
    let (status, _, _) = arm
        .send(
            app.http
                .get(url("/as-web").replace("2022-10-01", "2024-07-01")),
        )
        .await;
    assert_eq!(status, 400);

    // Held within range: scaled to zero, web comes back to its minimum.
    let (status, _, _) = arm.patch("web", 0, None).await;
    assert_eq!(status, 200);
    app.complete_operations().await;
    assert_eq!(app.fleet("web").await["capacity"], 2);

    // A setting's target is immutable: moving autoscale to api is a new setting, and web's
    // disabled lets web stay at zero.
    let (status, _, body) = put(setting("api", "2", "10")).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("TargetResourceIdIsImmutable")),
        "{body}"
    );
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("create a new autoscale setting with a different name"));
    let (status, _, _) = arm
        .send(
            app.http
                .put(url("/as-api"))
                .json(&setting("api", "2", "10")),
        )
        .await;
    assert_eq!(status, 201);
    let mut off = setting("web", "2", "10");
    off["properties"]["enabled"] = json!(false);
    let (status, _, _) = put(off).await;
    assert_eq!(status, 200);
    let (status, _, _) = arm.patch("web", 0, None).await;
    assert_eq!(status, 200);
    app.complete_operations().await;
    assert_eq!(app.fleet("web").await["capacity"], 0);
    app.complete_operations().await;
    assert_eq!(app.fleet("api").await["capacity"], 2);
}

/// A scale-in under terminate notifications is a delete of the instances it removes: each gets a
/// Terminate event and keeps running until it is approved; the highest instance ids go first;
/// what serves is recorded after every request, draining instances not counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_in_under_terminate_notifications_drains_the_instances_it_removes() {
    let app = spawn_app()
        .scale_set_spec(json!({"name": "web", "capacity": 3, "terminateNotificationSeconds": 600}))
        .start()
        .await;
    let arm = Arm::new(&app).await;
    let serving_now = || async {
        let history = app.admin(reqwest::Method::GET, "serving", None).await;
        history.as_array().unwrap().last().unwrap()["sets"][TestApp::key("web")].clone()
    };
    assert_eq!(serving_now().await, json!(3));
    let (status, headers, _) = arm.patch("web", 1, None).await;
    assert_eq!(status, 200);
    assert_eq!(arm.operation(&headers).await["status"], "InProgress");
    let named = |doc: &Value| doc["Events"].as_array().map(Vec::len).unwrap_or(0);
    let mut events = Vec::new();
    for vm in ["web_0", "web_1", "web_2"] {
        events.push(
            app.admin(
                reqwest::Method::GET,
                &format!("scheduledevents?vm={vm}"),
                None,
            )
            .await,
        );
    }
    assert_eq!(
        events.iter().map(named).collect::<Vec<_>>(),
        vec![0, 1, 1],
        "the highest ids leave: {events:?}"
    );
    assert_eq!(events[2]["Events"][0]["EventType"], "Terminate");
    assert_eq!(
        app.vm("web", 2).await["power_state"],
        "running",
        "it drains first"
    );
    assert_eq!(
        serving_now().await,
        json!(1),
        "draining instances do not serve"
    );

    let ids: Vec<Value> = events[1..]
        .iter()
        .map(|d| json!({"EventId": d["Events"][0]["EventId"]}))
        .collect();
    app.admin(
        reqwest::Method::POST,
        "scheduledevents",
        Some(json!({ "StartRequests": ids })),
    )
    .await;
    assert_eq!(arm.operation(&headers).await["status"], "Succeeded");
    let fleet = app.fleet("web").await;
    let left: Vec<u64> = fleet["vms"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["instance_id"].as_u64().unwrap())
        .collect();
    assert_eq!(left, vec![0], "{fleet}");
    let history = app.admin(reqwest::Method::GET, "serving", None).await;
    let counts: Vec<u64> = history
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["sets"][TestApp::key("web")].as_u64().unwrap())
        .collect();
    assert_eq!(counts, vec![3, 1], "{history}");
}

/// A golden image's resources (issue 17): a snapshot copies a VM's OS disk (the disk provider's
/// api-version), a gallery holds image definitions that need an OS type, state and identifier, and
/// an image version — named `<major>.<minor>.<patch>` — is `Creating` until its long-running
/// operation ends, which takes as long as the simulator is told; failures carry ARM's error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_captured_from_a_disk_into_a_gallery_version_that_takes_its_time() {
    let app = spawn_app().scale_set("web", 2).start().await;
    let arm = Arm::new(&app).await;
    let url = |tail: &str, version: &str| {
        format!(
            "{}/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/{tail}?api-version={version}",
            app.sim_url,
            common::SUB,
            common::RG
        )
    };
    let arm = &arm;
    let put = |tail: &'static str, version: &'static str, body: Value| {
        let (http, u) = (app.http.clone(), url(tail, version));
        async move { arm.send(http.put(u).json(&body)).await }
    };
    let get = |tail: &'static str, version: &'static str| {
        let (http, u) = (app.http.clone(), url(tail, version));
        async move { arm.send(http.get(u)).await }
    };
    let (_, _, vm) = arm
        .send(app.http.get(arm.url("web", "/virtualMachines/1")))
        .await;
    let disk = vm["properties"]["storageProfile"]["osDisk"]["managedDisk"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        disk.contains("/providers/Microsoft.Compute/disks/web_1_OsDisk_1_"),
        "{disk}"
    );

    // A snapshot of it, with the disk provider's api-version; of a disk that is not there, none.
    let snapshot = |source: &str| json!({"location": "westeurope", "properties": {"creationData": {"createOption": "Copy", "sourceResourceId": source}}});
    let (status, _, _) = put("snapshots/snap1", "2024-07-01", snapshot(&disk)).await;
    assert_eq!(
        status, 400,
        "the Compute api-version is not the disk provider's"
    );
    let (status, _, body) = put(
        "snapshots/snap1",
        "2024-03-02",
        snapshot(&format!("{disk}x")),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("NotFound")),
        "{body}"
    );
    app.admin(
        reqwest::Method::PUT,
        "artifacts/delay",
        Some(json!({"ms": 3_600_000})),
    )
    .await;
    let (status, headers, body) = put("snapshots/snap1", "2024-03-02", snapshot(&disk)).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(
        arm.operation(&headers).await["status"],
        "Succeeded",
        "a snapshot takes the operation delay"
    );
    let (_, _, snap) = get("snapshots/snap1", "2024-03-02").await;
    assert_eq!(snap["properties"]["provisioningState"], "Succeeded");
    let snap_id = snap["id"].as_str().unwrap().to_string();

    // A gallery, then an image definition (refused without what Azure requires).
    let (status, _, _) = put("galleries/sig/images/web", "2023-07-03", json!({})).await;
    assert_eq!(status, 404, "no gallery yet");
    let (status, _, _) = put(
        "galleries/sig",
        "2023-07-03",
        json!({"location": "westeurope", "properties": {}}),
    )
    .await;
    assert_eq!(status, 201);
    let (status, _, body) = put("galleries/sig/images/web", "2023-07-03", json!({"location": "westeurope", "properties": {"osType": "Linux", "hyperVGeneration": "V3"}})).await;
    assert_eq!(status, 400);
    let message = body["error"]["message"].as_str().unwrap();
    for why in ["osState", "identifier", "hyperVGeneration"] {
        assert!(message.contains(why), "{why}: {message}");
    }
    let definition = json!({"location": "westeurope", "properties": {"osType": "Linux", "osState": "Generalized",
        "hyperVGeneration": "V2", "architecture": "x64",
        "identifier": {"publisher": "vmss-healer", "offer": "web", "sku": "prototype"}}});
    let (status, _, _) = put("galleries/sig/images/web", "2023-07-03", definition).await;
    assert_eq!(status, 201);

    // A version: named as Azure requires, from the snapshot, Creating until its operation ends.
    let version = |source: &str| {
        json!({"location": "westeurope", "properties": {
        "storageProfile": {"source": {"id": source}},
        "publishingProfile": {"targetRegions": [{"name": "westeurope", "regionalReplicaCount": 1, "storageAccountType": "Standard_ZRS"}]}}})
    };
    for bad in ["v1", "1.2.3.4", "2026.12.99999999999"] {
        let (http, u) = (
            app.http.clone(),
            url(
                &format!("galleries/sig/images/web/versions/{bad}"),
                "2023-07-03",
            ),
        );
        let (status, _, _) = arm.send(http.put(u).json(&version(&snap_id))).await;
        assert_eq!(status, 400, "{bad}");
    }
    let (status, headers, body) = put(
        "galleries/sig/images/web/versions/2026.12.01",
        "2023-07-03",
        version(&snap_id),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["properties"]["provisioningState"], "Creating");
    assert_eq!(arm.operation(&headers).await["status"], "InProgress");
    let (_, _, listed) = get("galleries/sig/images/web/versions", "2023-07-03").await;
    assert_eq!(
        listed["value"].as_array().map(Vec::len),
        Some(1),
        "{listed}"
    );
    app.admin(reqwest::Method::POST, "artifacts/complete", None)
        .await;
    assert_eq!(arm.operation(&headers).await["status"], "Succeeded");
    let (_, _, made) = get("galleries/sig/images/web/versions/2026.12.01", "2023-07-03").await;
    assert_eq!(made["properties"]["provisioningState"], "Succeeded");

    // One that fails says why, and stays Failed.
    app.admin(
        reqwest::Method::POST,
        "operation-faults",
        Some(json!({"verb": "imageversion", "status": "Failed",
        "code": "ReplicationJobsNotCompleted", "message": "Replication job not completed."})),
    )
    .await;
    let (status, headers, _) = put(
        "galleries/sig/images/web/versions/2026.12.2",
        "2023-07-03",
        version(&snap_id),
    )
    .await;
    assert_eq!(status, 201);
    app.admin(reqwest::Method::POST, "artifacts/complete", None)
        .await;
    let status = arm.operation(&headers).await;
    assert_eq!(
        (status["status"].as_str(), status["error"]["code"].as_str()),
        (Some("Failed"), Some("ReplicationJobsNotCompleted"))
    );
    let (_, _, failed) = get("galleries/sig/images/web/versions/2026.12.2", "2023-07-03").await;
    assert_eq!(failed["properties"]["provisioningState"], "Failed");

    // Deleting a version is long-running too.
    let (status, headers, _) = arm
        .send(app.http.delete(url(
            "galleries/sig/images/web/versions/2026.12.2",
            "2023-07-03",
        )))
        .await;
    assert_eq!(status, 202);
    app.admin(reqwest::Method::POST, "artifacts/complete", None)
        .await;
    assert_eq!(arm.operation(&headers).await["status"], "Succeeded");
    let (status, _, _) = get("galleries/sig/images/web/versions/2026.12.2", "2023-07-03").await;
    assert_eq!(status, 404);
}

/// A scale set's image can move between versions of its kind but never change kind: a set on a
/// marketplace image cannot be pointed at a gallery image (409 OperationNotAllowed), a platform
/// image keeps its publisher, offer and sku (409 PropertyChangeNotAllowed); a custom image must be
/// there and done (404 GalleryImageNotFound). An accepted change is a new model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_sets_image_changes_only_within_its_kind() {
    let definition = format!(
        "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/galleries/sig/images/api",
        common::SUB,
        common::RG
    );
    let app = spawn_app()
        .scale_set("web", 2)
        .scale_set_spec(json!({"name": "api", "capacity": 2, "imageReference": {"id": definition}}))
        .start()
        .await;
    let arm = Arm::new(&app).await;
    let patch = |set: &'static str, image: Value| {
        let (arm, url) = (&arm, arm.url(set, ""));
        let body = json!({"properties": {"virtualMachineProfile": {"storageProfile": {"imageReference": image}}}});
        async move { arm.send(arm.app.http.patch(url).json(&body)).await }
    };
    let (_, _, web) = arm.get("web").await;
    let platform =
        web["properties"]["virtualMachineProfile"]["storageProfile"]["imageReference"].clone();
    assert_eq!(platform["publisher"], "Canonical", "{web}");

    let (status, _, body) = patch("web", json!({"id": definition})).await;
    assert_eq!(
        (status, body["error"]["message"].as_str()),
        (
            409,
            Some("The Image type for a Virtual Machine Scale Set may not be changed.")
        )
    );
    let mut other_sku = platform.clone();
    other_sku["sku"] = json!("24_04-lts");
    let (status, _, body) = patch("web", other_sku).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("PropertyChangeNotAllowed"))
    );
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("imageReference.sku"));
    let mut pinned = platform.clone();
    pinned["version"] = json!("22.04.202611010");
    let (status, _, _) = patch("web", pinned).await;
    assert_eq!(status, 200);
    assert_eq!(
        app.vm("web", 0).await["latest_model_applied"],
        false,
        "a new model"
    );

    // api is on a gallery image: a version that is not there (yet) is refused, a finished one taken.
    let gallery = |tail: &str| {
        format!(
            "{}/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/galleries/{tail}?api-version=2023-07-03",
            app.sim_url,
            common::SUB,
            common::RG
        )
    };
    arm.send(
        app.http
            .put(gallery("sig"))
            .json(&json!({"location": "westeurope"})),
    )
    .await;
    let (status, _, _) = arm
        .send(app.http.put(gallery("sig/images/api")).json(&json!({"location": "westeurope", "properties": {
            "osType": "Linux", "osState": "Generalized", "identifier": {"publisher": "p", "offer": "o", "sku": "s"}}})))
        .await;
    assert_eq!(status, 201);
    let (_, _, vm) = arm
        .send(app.http.get(arm.url("api", "/virtualMachines/0")))
        .await;
    let disk = vm["properties"]["storageProfile"]["osDisk"]["managedDisk"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    app.admin(
        reqwest::Method::PUT,
        "artifacts/delay",
        Some(json!({"ms": 3_600_000})),
    )
    .await;
    let version = format!("{definition}/versions/1.0.0");
    let (status, _, _) = arm
        .send(
            app.http
                .put(gallery("sig/images/api/versions/1.0.0"))
                .json(&json!({"location": "westeurope",
            "properties": {"storageProfile": {"source": {"id": disk}}}})),
        )
        .await;
    assert_eq!(status, 201);
    let (status, _, body) = patch("api", json!({"id": version})).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("GalleryImageNotFound")),
        "still Creating"
    );
    app.admin(reqwest::Method::POST, "artifacts/complete", None)
        .await;
    let (status, _, answer) = patch("api", json!({"id": version})).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(
        answer["properties"]["virtualMachineProfile"]["storageProfile"]["imageReference"]["id"],
        json!(version)
    );
    assert_eq!(app.vm("api", 1).await["latest_model_applied"], false);
}

/// What preparing an instance for capture needs: `runCommand` on a scale-set VM answers 202 with
/// only a `Location` (`monitor=true`) that gives the script's output once it ran (REST spec
/// example `VirtualMachineScaleSetVMRunCommand.json`); the agent's `prepare-image` clears the VM's
/// machine state; `deallocate` stops it with its disks kept, and a deallocated VM runs no command.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scale_set_vm_runs_a_command_and_is_deallocated_and_started_again() {
    let app = spawn_app().scale_set("web", 2).start().await;
    let arm = Arm::new(&app).await;
    let run = |script: &'static str, command: &'static str| {
        let (arm, url) = (&arm, arm.url("web", "/virtualMachines/0/runCommand"));
        async move {
            arm.send(
                arm.app
                    .http
                    .post(url)
                    .json(&json!({"commandId": command, "script": [script]})),
            )
            .await
        }
    };
    let follow = |headers: reqwest::header::HeaderMap| {
        let arm = &arm;
        async move {
            let url = headers["location"].to_str().unwrap().to_string();
            assert!(url.contains("monitor=true"), "{url}");
            assert!(headers.get("azure-asyncoperation").is_none());
            arm.send(arm.app.http.get(url)).await
        }
    };
    let (status, _, _) = run("true", "RunSomething").await;
    assert_eq!(status, 400);
    app.operation_delay_ms(3_600_000).await;
    let (status, headers, _) = run("sudo vmss-healer-agent prepare-image", "RunShellScript").await;
    assert_eq!(status, 202);
    let (status, _, _) = follow(headers.clone()).await;
    assert_eq!(status, 202, "still running");
    assert_eq!(app.vm("web", 0).await["prepared"], false);
    app.complete_operations().await;
    let (status, _, result) = follow(headers).await;
    assert_eq!(status, 200, "{result}");
    assert_eq!(
        result["value"][0]["code"],
        "ComponentStatus/StdOut/succeeded"
    );
    assert!(result["value"][0]["message"]
        .as_str()
        .unwrap()
        .contains("machine-specific state cleared"));
    assert_eq!(app.vm("web", 0).await["prepared"], true);

    let (status, _, _) = arm
        .send(
            app.http
                .post(arm.url("web", "/virtualMachines/0/deallocate")),
        )
        .await;
    assert_eq!(status, 202);
    app.complete_operations().await;
    assert_eq!(app.vm("web", 0).await["power_state"], "deallocated");
    let (status, _, body) = run("true", "RunShellScript").await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("OperationNotAllowed"))
    );
    let (_, _, view) = arm
        .send(
            app.http
                .get(arm.url("web", "/virtualMachines/0/instanceView")),
        )
        .await;
    assert_eq!(view["hyperVGeneration"], "V2");
    let (status, _, _) = arm
        .send(app.http.post(arm.url("web", "/virtualMachines/0/start")))
        .await;
    assert_eq!(status, 202);
    app.complete_operations().await;
    assert_eq!(app.vm("web", 0).await["power_state"], "running");
}

/// Managed data disks as a stateful replacement meets them (issue 18, `disks.rs`): a VM's disk is
/// shown in its storage profile and owned by it; it is attached elsewhere only once detached
/// (`ConflictingUserInput` before, `AttachDiskWhileBeingDetached` during); a LUN takes one disk;
/// a zonal disk attaches only in its zone and is copied into another only through a snapshot;
/// an attach that fails leaves the disk unattached; a deleted VM leaves its disks unattached; an
/// attached disk cannot be deleted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_disks_attach_to_one_vm_in_their_zone_and_move_zones_by_snapshot() {
    let app = spawn_app()
        .scale_set_spec(json!({"name": "db", "capacity": 2, "zones": ["1", "2"],
                               "dataDisks": [{"lun": 0, "sizeGb": 128}]}))
        .start()
        .await;
    let arm = Arm::new(&app).await;
    let disks = || async { app.admin(reqwest::Method::GET, "disks", None).await };
    let list = disks().await;
    assert_eq!(list.as_array().unwrap().len(), 2, "{list}");
    let (_, _, vm0) = arm
        .send(app.http.get(arm.url("db", "/virtualMachines/0")))
        .await;
    let data = &vm0["properties"]["storageProfile"]["dataDisks"][0];
    assert_eq!(data["lun"], 0, "{vm0}");
    let disk0 = data["managedDisk"]["id"].as_str().unwrap().to_string();
    assert!(
        disk0.contains("/providers/Microsoft.Compute/disks/db_0-data-0"),
        "{disk0}"
    );
    let disk_url = |id: &str| format!("{}{id}?api-version=2024-03-02", app.sim_url);
    let (status, _, d) = arm.send(app.http.get(disk_url(&disk0))).await;
    assert_eq!(status, 200, "{d}");
    assert_eq!(d["properties"]["diskState"], "Attached");
    assert_eq!(d["zones"], json!(["1"]), "in its VM's zone");
    assert!(
        d["managedBy"]
            .as_str()
            .unwrap()
            .ends_with("/virtualMachines/0"),
        "{d}"
    );

    let change = |vm: u64, body: Value| arm.attach_detach("db", vm, body);
    let follow = |headers: reqwest::header::HeaderMap| {
        let arm = &arm;
        async move {
            let url = headers["location"].to_str().unwrap().to_string();
            arm.send(arm.app.http.get(url)).await
        }
    };
    let attach = |id: &str, lun: u32| json!({"dataDisksToAttach": [{"lun": lun, "diskId": id, "caching": "ReadWrite"}]});
    let detach =
        |id: &str| json!({"dataDisksToDetach": [{"diskId": id, "detachOption": "Default"}]});

    // Owned by VM 0: VM 1 cannot take it.
    let (status, _, body) = change(1, attach(&disk0, 1)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("ConflictingUserInput")),
        "{body}"
    );
    // Detaching: still not.
    app.operation_delay_ms(3_600_000).await;
    let (status, headers, _) = change(0, detach(&disk0)).await;
    assert_eq!(status, 202);
    assert!(headers["location"]
        .to_str()
        .unwrap()
        .contains("monitor=true"));
    let (status, _, body) = change(1, attach(&disk0, 1)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("AttachDiskWhileBeingDetached")),
        "{body}"
    );
    assert_eq!(follow(headers.clone()).await.0, 202, "the detach runs");
    app.complete_operations().await;
    let (status, _, profile) = follow(headers).await;
    assert_eq!(status, 200, "{profile}");
    assert_eq!(profile["dataDisks"], json!([]), "detached");
    let (_, _, d) = arm.send(app.http.get(disk_url(&disk0))).await;
    assert_eq!(d["properties"]["diskState"], "Unattached");
    assert!(d.get("managedBy").is_none());

    // VM 1 is in zone 2: the zone-1 disk does not attach there.
    let (status, _, body) = change(1, attach(&disk0, 1)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("BadRequest")),
        "{body}"
    );
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("VM zone: '2'. Disk zone: '1'"));
    // A LUN takes one disk.
    let (status, _, body) = change(0, attach(&disk0, 0)).await;
    assert_eq!(status, 202, "back on VM 0: {body}");
    app.complete_operations().await;
    let disk1 = disks()
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["id"].as_str().unwrap().to_string())
        .find(|id| id.contains("db_1-data-0"))
        .unwrap();
    let (status, _, body) = change(1, detach(&disk1)).await;
    assert_eq!(status, 202, "{body}");
    app.complete_operations().await;
    let (status, _, body) = change(0, attach(&disk1, 0)).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("InvalidParameter")),
        "{body}"
    );

    // Into zone 2: a copy of the disk is refused, a copy of its snapshot is not.
    let rg_url = |tail: &str| {
        format!("{}/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/{tail}?api-version=2024-03-02", app.sim_url, common::SUB, common::RG)
    };
    let copy = |source: &str| json!({"location": "westeurope", "zones": ["2"], "properties": {"creationData": {"createOption": "Copy", "sourceResourceId": source}}});
    let (status, _, body) = arm
        .send(app.http.put(rg_url("disks/moved")).json(&copy(&disk0)))
        .await;
    assert_eq!(status, 400, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("cannot be copied from the source"),
        "{body}"
    );
    let (status, _, _) = arm
        .send(app.http.put(rg_url("snapshots/db0snap")).json(&json!({"location": "westeurope", "properties": {"creationData": {"createOption": "Copy", "sourceResourceId": disk0}}})))
        .await;
    assert_eq!(status, 201);
    app.admin(reqwest::Method::POST, "artifacts/complete", None)
        .await;
    let snap = format!(
        "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/snapshots/db0snap",
        common::SUB,
        common::RG
    );
    let (status, headers, moved) = arm
        .send(app.http.put(rg_url("disks/moved")).json(&copy(&snap)))
        .await;
    assert_eq!(status, 202, "{moved}");
    let status_url = headers["azure-asyncoperation"]
        .to_str()
        .unwrap()
        .to_string();
    let (_, _, running) = arm.send(app.http.get(status_url.clone())).await;
    assert_eq!(running["status"], "InProgress");
    app.operation_delay_ms(0).await;
    app.complete_operations().await;
    let (_, _, ended) = arm.send(app.http.get(status_url)).await;
    assert_eq!(ended["status"], "Succeeded", "{ended}");
    let moved_id = moved["id"].as_str().unwrap().to_string();
    let (status, headers, body) = change(1, attach(&moved_id, 0)).await;
    assert_eq!(status, 202, "{body}");
    follow(headers).await;
    let all = disks().await;
    let copy = all
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "moved")
        .unwrap();
    assert_eq!(
        (copy["zone"].as_str(), copy["lun"].as_u64()),
        (Some("2"), Some(0))
    );
    assert_eq!(
        copy["content"], "data written by db_0",
        "the copy carries the data"
    );
    assert!(copy["managedBy"]
        .as_str()
        .unwrap()
        .ends_with("/virtualMachines/1"));

    // An attach that fails leaves the disk unattached.
    app.admin(reqwest::Method::POST, "operation-faults", Some(json!({"verb": "attachdatadisks", "status": "Failed", "code": "InternalExecutionError", "message": "An internal execution error occurred."}))).await;
    let (status, headers, _) = change(1, attach(&disk1, 1)).await;
    assert_eq!(status, 202);
    let (status, _, body) = follow(headers).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("InternalExecutionError")),
        "{body}"
    );
    let (_, _, d) = arm.send(app.http.get(disk_url(&disk1))).await;
    assert_eq!(d["properties"]["diskState"], "Unattached", "{d}");

    // An attached disk is not deleted; a deleted VM leaves its disks unattached.
    let (status, _, body) = arm.send(app.http.delete(disk_url(&disk0))).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (409, Some("OperationNotAllowed"))
    );
    arm.post("db", "delete", &["0"]).await;
    app.complete_operations().await;
    let (_, _, d) = arm.send(app.http.get(disk_url(&disk0))).await;
    assert_eq!(
        d["properties"]["diskState"], "Unattached",
        "kept, unattached: {d}"
    );
    assert_eq!(arm.send(app.http.delete(disk_url(&disk0))).await.0, 200);
    assert_eq!(arm.send(app.http.get(disk_url(&disk0))).await.0, 404);
}

/// A scale set whose model has data disks ("Create a scale set with empty data disks on each vm",
/// VirtualMachineScaleSet_Create_WithEmptyDataDisksOnEachVm.json) gives each VM it creates an
/// empty disk of its own at each LUN: the model shows them, a scale-out's VM has one, and no
/// second disk is attached at that LUN (400 `InvalidParameter` "A disk at LUN 0 already exists.",
/// Azure/azure-sdk-for-go#678) until it is detached (Remove-AzVmssVMDataDisk: a scale set VM's
/// data disk comes off by LUN) — then the other takes its place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_models_data_disks_come_empty_with_each_new_vm_and_hold_their_lun() {
    let app = spawn_app()
        .scale_set_spec(json!({"name": "db", "capacity": 1, "modelDisks": true,
                               "dataDisks": [{"lun": 0, "sizeGb": 128}]}))
        .start()
        .await;
    let arm = Arm::new(&app).await;
    let (_, _, set) = arm.get("db").await;
    let model = &set["properties"]["virtualMachineProfile"]["storageProfile"]["dataDisks"];
    assert_eq!(
        (model[0]["lun"].as_u64(), model[0]["createOption"].as_str()),
        (Some(0), Some("Empty")),
        "{set}"
    );
    let (status, _, body) = arm.patch("db", 2, None).await;
    assert!(status == 200 || status == 202, "{status} {body}");
    app.complete_operations().await;
    let (own, vm1) = arm.disk_at_lun0("db", 1).await;
    assert!(own.contains("/disks/db_1-model-0"), "{vm1}");
    let all = app.admin(reqwest::Method::GET, "disks", None).await;
    let blank = all
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "db_1-model-0")
        .unwrap();
    assert_eq!(blank["content"], "", "empty: {blank}");

    let change = |vm: u64, body: Value| arm.attach_detach("db", vm, body);
    let (data, _) = arm.disk_at_lun0("db", 0).await;
    let (status, _, body) = change(0, json!({"dataDisksToDetach": [{"diskId": data}]})).await;
    assert_eq!(status, 202, "{body}");
    app.complete_operations().await;
    let attach = json!({"dataDisksToAttach": [{"lun": 0, "diskId": data, "caching": "ReadWrite"}]});
    let (status, _, body) = change(1, attach.clone()).await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("InvalidParameter")),
        "{body}"
    );
    assert_eq!(
        body["error"]["message"], "A disk at LUN 0 already exists.",
        "{body}"
    );
    let (status, _, body) = change(1, json!({"dataDisksToDetach": [{"diskId": own}]})).await;
    assert_eq!(status, 202, "{body}");
    app.complete_operations().await;
    let (status, _, body) = change(1, attach).await;
    assert_eq!(status, 202, "{body}");
    app.complete_operations().await;
    let (now, vm1) = arm.disk_at_lun0("db", 1).await;
    assert_eq!(now, data, "{vm1}");
}

/// Flexible VMs' network interfaces and public IPs as a stateful replacement meets them (issue 18,
/// `network.rs`): a VM names its NIC, the NIC its public IP; a public IP is held by one IP
/// configuration (`PublicIPAddressInUse` otherwise) and moves by writing the NICs whole; a static
/// private address is one NIC's (`PrivateIPAddressInUse`); a deleted VM's NIC goes with it, its
/// public IP stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_ip_moves_between_flexible_vms_only_once_released() {
    let app = spawn_app()
        .mode(common::Mode::Flexible)
        .scale_set_spec(json!({"name": "app", "capacity": 2, "publicIps": true}))
        .start()
        .await;
    let arm = Arm::new(&app).await;
    let net = |id: &str| format!("{}{id}?api-version=2024-05-01", app.sim_url);
    let vm_id = |n: u64| {
        let app = &app;
        async move { app.resource_id_of("app", n).await }
    };
    let (_, _, vm0) = arm
        .send(app.http.get(format!(
            "{}{}?api-version=2024-07-01",
            app.sim_url,
            vm_id(0).await
        )))
        .await;
    let nic0 = vm0["properties"]["networkProfile"]["networkInterfaces"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, _, vm1) = arm
        .send(app.http.get(format!(
            "{}{}?api-version=2024-07-01",
            app.sim_url,
            vm_id(1).await
        )))
        .await;
    let nic1 = vm1["properties"]["networkProfile"]["networkInterfaces"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, _, _) = arm
        .send(
            app.http
                .get(format!("{}{nic0}?api-version=2024-07-01", app.sim_url)),
        )
        .await;
    assert_eq!(
        status, 400,
        "the network provider's api-version, not Compute's"
    );
    let (status, _, n0) = arm.send(app.http.get(net(&nic0))).await;
    assert_eq!(status, 200, "{n0}");
    let pip = n0["properties"]["ipConfigurations"][0]["properties"]["publicIPAddress"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, _, n1) = arm.send(app.http.get(net(&nic1))).await;
    let pip1 = n1["properties"]["ipConfigurations"][0]["properties"]["publicIPAddress"]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (_, _, p) = arm.send(app.http.get(net(&pip))).await;
    assert!(p["properties"]["ipAddress"].is_string(), "{p}");
    assert!(
        p["properties"]["ipConfiguration"]["id"]
            .as_str()
            .unwrap()
            .starts_with(&nic0.to_ascii_lowercase()),
        "{p}"
    );
    let with = |nic: &Value, pip: Option<&str>, private: Option<&str>| {
        let mut body = nic.clone();
        let props = &mut body["properties"]["ipConfigurations"][0]["properties"];
        match pip {
            Some(p) => props["publicIPAddress"] = json!({"id": p}),
            None => {
                props.as_object_mut().unwrap().remove("publicIPAddress");
            }
        }
        if let Some(ip) = private {
            props["privateIPAllocationMethod"] = json!("Static");
            props["privateIPAddress"] = json!(ip);
        }
        body
    };
    // Held by VM 0: VM 1 cannot take it.
    let (status, _, body) = arm
        .send(app.http.put(net(&nic1)).json(&with(&n1, Some(&pip), None)))
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("PublicIPAddressInUse")),
        "{body}"
    );
    assert!(body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("is referencing public IP address"));
    // Released by VM 0, taken by VM 1 (which lets its own go).
    let (status, _, _) = arm
        .send(app.http.put(net(&nic0)).json(&with(&n0, None, None)))
        .await;
    assert_eq!(status, 200);
    let (status, _, body) = arm
        .send(app.http.put(net(&nic1)).json(&with(&n1, Some(&pip), None)))
        .await;
    assert_eq!(status, 200, "{body}");
    let (_, _, p) = arm.send(app.http.get(net(&pip))).await;
    assert!(p["properties"]["ipConfiguration"]["id"]
        .as_str()
        .unwrap()
        .starts_with(&nic1.to_ascii_lowercase()));
    let (_, _, p1) = arm.send(app.http.get(net(&pip1))).await;
    assert!(p1["properties"].get("ipConfiguration").is_none(), "{p1}");
    // A private address is one NIC's.
    let ip0 = n0["properties"]["ipConfigurations"][0]["properties"]["privateIPAddress"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, _, body) = arm
        .send(
            app.http
                .put(net(&nic1))
                .json(&with(&n1, Some(&pip), Some(&ip0))),
        )
        .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("PrivateIPAddressInUse")),
        "{body}"
    );
    // VM 0 deleted: its NIC goes, its address is free.
    arm.post("app", "delete", &[&app.key_of("app", 0).await])
        .await;
    app.complete_operations().await;
    assert_eq!(arm.send(app.http.get(net(&nic0))).await.0, 404);
    let (status, _, body) = arm
        .send(
            app.http
                .put(net(&nic1))
                .json(&with(&n1, Some(&pip), Some(&ip0))),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        body["properties"]["ipConfigurations"][0]["properties"]["privateIPAddress"],
        ip0
    );
}
