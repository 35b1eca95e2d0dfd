//! The Microsoft.Compute scale-set REST surface, as ARM serves it at api-version 2024-07-01.
//! Paths are matched case-insensitively, as ARM does.

use crate::world::{Effect, Outcome, ScaleSet, Vm, World};
use crate::Shared;
use axum::body::Bytes;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};
use std::collections::HashMap;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

pub const API_VERSION: &str = "2024-07-01";
/// Management locks have their own api-version.
pub const LOCKS_API_VERSION: &str = "2016-09-01";
/// So do autoscale settings (Microsoft.Insights).
pub const AUTOSCALE_API_VERSION: &str = "2022-10-01";

pub fn arm_error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    let body = json!({"error": {"code": code, "message": message.into()}});
    (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.format(&Rfc3339).unwrap_or_default()
}

/// Every ARM request: log, inject faults, throttle, authenticate, check the api-version, dispatch.
pub async fn handle(State(shared): State<Shared>, request: Request) -> Response {
    let method = request.method().clone();
    let uri = request.uri().clone();
    let headers = request.headers().clone();
    let body = axum::body::to_bytes(request.into_body(), 1 << 20)
        .await
        .unwrap_or_default();
    let path = uri.path().to_string();
    let query: HashMap<String, String> =
        url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let subscription = subscription_of(&path);

    let mut world = shared.world.lock().await;
    world.advance();
    // An injected fault answers instead of ARM; with `hangMs` the answer (ARM's, or the fault's:
    // then the call neither landed nor was answered) is held back.
    let fault = world.take_fault(method.as_str(), &path);
    let hang = fault.as_ref().and_then(|f| f.hang_ms);
    let response = match fault.and_then(|f| injected(&mut world, f, &path)) {
        Some(refused) => refused,
        None => respond(
            &mut world,
            &shared.base_url,
            &method,
            &path,
            &query,
            &headers,
            &body,
        ),
    };
    let status = response.status().as_u16();
    world.calls.push(crate::world::Call {
        method: method.to_string(),
        path,
        query: uri.query().unwrap_or("").to_string(),
        status,
        at: OffsetDateTime::now_utc(),
        if_match: headers
            .get("if-match")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string),
    });
    let mut response = response;
    if let Some(ms) = hang {
        // Carried out; the answer comes too late for the client (the lock is released first, so
        // everything else goes on).
        drop(world);
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        return response;
    }
    // One header per throttling policy, the tightest first, as Compute sends them: a client that
    // keeps only the last header never sees the budget that runs out first.
    let (tight, wide) = world.charge(&subscription);
    for value in [
        format!("Microsoft.Compute/GetVMScaleSet3Min;{tight}"),
        format!("Microsoft.Compute/GetVMScaleSet30Min;{wide}"),
    ] {
        if let Ok(v) = HeaderValue::from_str(&value) {
            response
                .headers_mut()
                .append("x-ms-ratelimit-remaining-resource", v);
        }
    }
    response
}

/// The subscription a request addresses (lower case), or empty.
fn subscription_of(path: &str) -> String {
    let mut segments = path.trim_matches('/').split('/');
    match (segments.next(), segments.next()) {
        (Some(s), Some(sub)) if s.eq_ignore_ascii_case("subscriptions") => sub.to_lowercase(),
        _ => String::new(),
    }
}

fn throttled(seconds: u64) -> Response {
    let mut r = arm_error(
        StatusCode::TOO_MANY_REQUESTS,
        "OperationNotAllowed",
        "The server rejected the request because too many requests have been received for this subscription.",
    );
    r.headers_mut()
        .insert("retry-after", HeaderValue::from(seconds));
    r
}

fn injected(world: &mut World, fault: crate::world::FaultRule, path: &str) -> Option<Response> {
    if let Some(capacity) = fault.autoscale_to {
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        if segs.len() >= 8 {
            let key = crate::world::set_key(segs[1], segs[3], segs[7]);
            if world.sets.contains_key(&key) {
                world.start_operation(&key, Effect::Scale(capacity));
            }
        }
    }
    let status = StatusCode::from_u16(fault.status?).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    if status == StatusCode::TOO_MANY_REQUESTS {
        // Throttling holds the whole subscription, not just the request that met it.
        let seconds = fault.retry_after.unwrap_or(60);
        world.throttle(&subscription_of(path), seconds);
        return Some(throttled(seconds));
    }
    let (code, message) = match status.as_u16() {
        409 => (
            "Conflict",
            "The request failed due to conflict with a concurrent request.",
        ),
        400 => (
            "InvalidParameter",
            "The request is invalid (injected by the simulator).",
        ),
        _ => (
            "InternalExecutionError",
            "An internal execution error occurred. Please retry later.",
        ),
    };
    let mut r = arm_error(
        status,
        fault.code.as_deref().unwrap_or(code),
        fault.message.unwrap_or_else(|| message.to_string()),
    );
    if let Some(secs) = fault.retry_after {
        r.headers_mut()
            .insert("retry-after", HeaderValue::from(secs));
    }
    Some(r)
}

fn respond(
    world: &mut World,
    base: &str,
    method: &Method,
    path: &str,
    query: &HashMap<String, String>,
    headers: &HeaderMap,
    body: &Bytes,
) -> Response {
    if let Some(seconds) = world.throttled_for(&subscription_of(path)) {
        return throttled(seconds);
    }

    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    match token {
        None => {
            return arm_error(
                StatusCode::UNAUTHORIZED,
                "AuthenticationFailed",
                "Authentication failed. The 'Authorization' header is missing.",
            )
        }
        Some(t) => match world.tokens.get(t) {
            Some(exp) if *exp > OffsetDateTime::now_utc() => {}
            _ => {
                return arm_error(
                    StatusCode::UNAUTHORIZED,
                    "InvalidAuthenticationToken",
                    "The access token is invalid or expired.",
                )
            }
        },
    }

    let locks_path = path
        .to_ascii_lowercase()
        .trim_end_matches('/')
        .ends_with("/providers/microsoft.authorization/locks");
    let autoscale_path = path
        .to_ascii_lowercase()
        .contains("/providers/microsoft.insights/autoscalesettings");
    let gallery_version = crate::gallery::api_version(&path.to_ascii_lowercase());
    let network_path = path
        .to_ascii_lowercase()
        .contains("/providers/microsoft.network/");
    let expected = if network_path {
        crate::network::NETWORK_API_VERSION
    } else if locks_path {
        LOCKS_API_VERSION
    } else if autoscale_path {
        AUTOSCALE_API_VERSION
    } else if let Some(v) = gallery_version {
        v
    } else {
        API_VERSION
    };
    match query.get("api-version").map(String::as_str) {
        Some(v) if v == expected => {}
        Some(other) => {
            return arm_error(
                StatusCode::BAD_REQUEST,
                "NoRegisteredProviderFound",
                format!("No registered resource provider found for API version '{other}'. The supported api-versions are '{expected}'."),
            )
        }
        None => {
            return arm_error(
                StatusCode::BAD_REQUEST,
                "MissingApiVersionParameter",
                "The api-version query parameter (?api-version=) is required for all requests.",
            )
        }
    }

    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let lower: Vec<String> = segs.iter().map(|s| s.to_ascii_lowercase()).collect();
    let l: Vec<&str> = lower.iter().map(String::as_str).collect();

    // Operation status polling.
    if let ["subscriptions", _, "providers", "microsoft.compute", "locations", _, "operations", op] =
        l.as_slice()
    {
        if let Some(a) = world.artifact_operation(op) {
            let mut status =
                json!({"name": op, "startTime": rfc3339(a.started), "status": a.outcome.label()});
            if let Some(ended) = a.ended {
                status["endTime"] = json!(rfc3339(ended));
            }
            if let Outcome::Failed { code, message } | Outcome::Canceled { code, message } =
                &a.outcome
            {
                status["error"] = json!({"code": code, "message": message});
            }
            return json_ok(status);
        }
        if query.get("monitor").is_some_and(|m| m == "true") {
            if let Some(op) = world.operations.get(*op) {
                if let Effect::Disks(..) = op.effect {
                    return crate::disks::location_result(world, op);
                }
                return run_command_result(op);
            }
        }
        return match world.operations.get(*op) {
            Some(op) => {
                let mut status = json!({
                    "name": op.id,
                    "startTime": rfc3339(op.started),
                    "status": op.outcome.label(),
                });
                if let Some(ended) = op.ended {
                    status["endTime"] = json!(rfc3339(ended));
                }
                if let Outcome::Failed { code, message } | Outcome::Canceled { code, message } =
                    &op.outcome
                {
                    status["error"] = json!({"code": code, "message": message});
                }
                json_ok(status)
            }
            None => arm_error(
                StatusCode::NOT_FOUND,
                "OperationNotFound",
                format!("Operation {op} not found."),
            ),
        };
    }

    if let ["subscriptions", _, "resourcegroups", _, "providers", "microsoft.authorization", "locks"] =
        l.as_slice()
    {
        return list_locks(world, segs[1], segs[3]);
    }
    if let ["subscriptions", _, "resourcegroups", _, "providers", "microsoft.insights", "autoscalesettings", rest @ ..] =
        l.as_slice()
    {
        let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        return autoscale(
            world,
            method,
            segs[1],
            segs[3],
            rest.first().map(|_| segs[7]),
            &body,
        );
    }
    if gallery_version.is_some() {
        let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        if let Some(answer) = crate::disks::handle(world, base, method, &segs, &l, &body) {
            return answer;
        }
        if let Some(answer) = crate::gallery::handle(world, base, method, &segs, &l, &body) {
            return answer;
        }
    }
    if network_path {
        let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        if let Some(answer) = crate::network::handle(world, method, &segs, &l, &body) {
            return answer;
        }
    }
    if let Some(answer) = vm_api(world, base, method, path, &segs, &l, query, body) {
        return answer;
    }

    let ["subscriptions", _, "resourcegroups", _, "providers", "microsoft.compute", "virtualmachinescalesets", _, rest @ ..] =
        l.as_slice()
    else {
        return arm_error(
            StatusCode::NOT_FOUND,
            "InvalidResourceType",
            format!("The resource type could not be found for path '{path}'."),
        );
    };
    let key = crate::world::set_key(segs[1], segs[3], segs[7]);
    if !world.sets.contains_key(&key) {
        return arm_error(
            StatusCode::NOT_FOUND,
            "ResourceNotFound",
            format!(
                "The Resource 'Microsoft.Compute/virtualMachineScaleSets/{}' under resource group '{}' was not found.",
                segs[7], segs[3]
            ),
        );
    }
    let parsed_body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);

    if world.sets[&key].flexible() {
        if let Some(answer) = flexible_set(method, rest) {
            return answer;
        }
    }
    match (method.clone(), rest) {
        (Method::GET, []) => scale_set_answer(world, &key, StatusCode::OK),
        (Method::PATCH, []) => patch_scale_set(world, base, &key, headers, &parsed_body),
        (Method::GET, ["virtualmachines"]) => list_vms(world, base, &key, path, query),
        (Method::GET, ["virtualmachines", id])
        | (Method::GET, ["virtualmachines", id, "instanceview"]) => {
            let set = &world.sets[&key];
            match set.find(id).and_then(|n| set.vms.get(&n)) {
                Some(vm) if rest.len() == 3 => json_ok(instance_view_json(vm)),
                Some(vm) => json_ok(vm_json(
                    set,
                    vm,
                    query
                        .get("$expand")
                        .is_some_and(|e| e.eq_ignore_ascii_case("instanceView")),
                )),
                None => vm_not_found(segs[7], id),
            }
        }
        (Method::DELETE, ["virtualmachines", id]) => {
            instance_op(world, base, &key, segs[7], id, "delete")
        }
        (
            Method::POST,
            ["virtualmachines", id, verb @ ("restart" | "reimage" | "start" | "redeploy" | "deallocate")],
        ) => instance_op(world, base, &key, segs[7], id, verb),
        (Method::POST, ["virtualmachines", id, "runcommand"]) => {
            run_command(world, base, &key, segs[7], id, &parsed_body)
        }
        (Method::POST, ["virtualmachines", id, "attachdetachdatadisks"]) => {
            let set = &world.sets[&key];
            match set.find(id) {
                Some(n) => attach_detach(world, base, &key, n, &parsed_body),
                None => vm_not_found(segs[7], id),
            }
        }
        (
            Method::POST,
            [verb @ ("delete" | "restart" | "reimage" | "start" | "redeploy" | "manualupgrade")],
        ) => {
            // Delete and manual upgrade name their instances (`VirtualMachineScaleSetVMInstance
            // RequiredIDs`); the power actions and reimage default to every instance.
            let required = matches!(*verb, "delete" | "manualupgrade");
            let ids = match instance_ids(world, &key, &parsed_body, required) {
                Ok(ids) => ids,
                Err(InvalidParameter(m)) => {
                    return arm_error(StatusCode::BAD_REQUEST, "InvalidParameter", m)
                }
            };
            if let Some(refusal) = refuse(&world.sets[&key], verb, &ids) {
                return refusal;
            }
            // A Flexible set's VMs are resources of their own: a lock on one (or its group)
            // refuses the whole batch.
            let set = &world.sets[&key];
            if set.flexible() {
                if let Some(refusal) = ids
                    .iter()
                    .find_map(|n| locked(world, set, &set.vms[n], verb))
                {
                    return refusal;
                }
            }
            let op = world.start_operation(&key, effect(verb, ids));
            accepted(base, &world.sets[&key], &op)
        }
        _ => arm_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{method} is not supported on '{path}' by the simulator."),
        ),
    }
}

fn effect(verb: &str, ids: Vec<u64>) -> Effect {
    match verb {
        "delete" => Effect::Delete(ids),
        "restart" => Effect::Restart(ids),
        "start" => Effect::Start(ids),
        "redeploy" => Effect::Redeploy(ids),
        "manualupgrade" => Effect::Upgrade(ids),
        "deallocate" => Effect::Deallocate(ids),
        _ => Effect::Reimage(ids),
    }
}

/// Why ARM would refuse this action on these instances, if it would: a whole batch is refused for
/// one instance, as ARM does.
fn refuse(set: &ScaleSet, verb: &str, ids: &[u64]) -> Option<Response> {
    if verb == "delete" {
        return None;
    }
    for id in ids {
        let vm = &set.vms[id];
        if matches!(vm.provisioning_state.as_str(), "Updating" | "Creating") {
            return Some(arm_error(
                StatusCode::CONFLICT,
                "Conflict",
                "The request failed due to conflict with a concurrent request. To resolve it, please refer to https://aka.ms/activitylog to get more details on the conflicting requests.",
            ));
        }
        if verb == "restart"
            && matches!(
                vm.power_state.as_str(),
                "stopped" | "deallocated" | "deallocating"
            )
        {
            return Some(arm_error(
                StatusCode::CONFLICT,
                "OperationNotAllowed",
                "The operation requires the VM to be running (or set to run).",
            ));
        }
    }
    None
}

fn scale_set_answer(world: &World, key: &str, status: StatusCode) -> Response {
    let set = &world.sets[key];
    let mut body = scale_set_json(set);
    if world.updating(key) {
        body["properties"]["provisioningState"] = json!("Updating");
    }
    let mut r = (
        status,
        [("content-type", "application/json")],
        body.to_string(),
    )
        .into_response();
    if let Ok(v) = HeaderValue::from_str(&set.etag_value()) {
        r.headers_mut().insert("etag", v);
    }
    r
}

/// A new image for the model, as Azure allows it (see `world.rs`): a new model on success, or
/// ARM's refusal.
fn change_image(world: &mut World, key: &str, image: &Value) -> Option<Response> {
    let set = &world.sets[key];
    let (was_custom, custom) = (set.image.get("id").is_some(), image.get("id").is_some());
    if was_custom != custom {
        return Some(arm_error(
            StatusCode::CONFLICT,
            "OperationNotAllowed",
            "The Image type for a Virtual Machine Scale Set may not be changed.",
        ));
    }
    if custom {
        let id = image["id"].as_str().unwrap_or_default();
        let ready = world
            .artifacts
            .get(&id.to_ascii_lowercase())
            .is_some_and(|a| {
                let kind = a.resource["type"].as_str().unwrap_or_default();
                kind.eq_ignore_ascii_case("Microsoft.Compute/galleries/images")
                    || (kind.eq_ignore_ascii_case("Microsoft.Compute/galleries/images/versions")
                        && a.resource["properties"]["provisioningState"] == "Succeeded")
            });
        if !ready {
            return Some(arm_error(
                StatusCode::NOT_FOUND,
                "GalleryImageNotFound",
                format!("The gallery image {id} is not available in {} region. Please contact image owner to replicate to this region, or change your requested region.", set.location),
            ));
        }
    } else {
        for property in ["publisher", "offer", "sku"] {
            if !image[property]
                .as_str()
                .unwrap_or_default()
                .eq_ignore_ascii_case(set.image[property].as_str().unwrap_or_default())
            {
                return Some(arm_error(
                    StatusCode::CONFLICT,
                    "PropertyChangeNotAllowed",
                    format!("Changing property 'imageReference.{property}' is not allowed."),
                ));
            }
        }
    }
    if let Some(set) = world.sets.get_mut(key) {
        set.image = image.clone();
    }
    world.new_model(key);
    None
}

/// A PATCH of the scale set: `sku.capacity` (the capacity limit enforced) and the model's image
/// reference, with `If-Match` honoured.
fn patch_scale_set(
    world: &mut World,
    base: &str,
    key: &str,
    headers: &HeaderMap,
    body: &Value,
) -> Response {
    let set = &world.sets[key];
    if let Some(wanted) = headers.get("if-match").and_then(|v| v.to_str().ok()) {
        if wanted.trim() != "*" && wanted.trim() != set.etag_value() {
            return arm_error(
                StatusCode::PRECONDITION_FAILED,
                "PreconditionFailed",
                format!(
                    "Etag provided in if-match header {} does not match etag {} of resource.",
                    wanted.trim(),
                    set.etag_value()
                ),
            );
        }
    }
    if let Some(image) =
        body.pointer("/properties/virtualMachineProfile/storageProfile/imageReference")
    {
        if let Some(refused) = change_image(world, key, image) {
            return refused;
        }
        if body.pointer("/sku/capacity").is_none() {
            return scale_set_answer(world, key, StatusCode::OK);
        }
    }
    let set = &world.sets[key];
    let Some(capacity) = body.pointer("/sku/capacity").and_then(Value::as_u64) else {
        return arm_error(
            StatusCode::BAD_REQUEST,
            "InvalidParameter",
            "Only sku.capacity and the image reference can be patched in the simulator.",
        );
    };
    if capacity as usize > set.max_capacity {
        return arm_error(
            StatusCode::CONFLICT,
            "OperationNotAllowed",
            format!(
                "Unable to create or update VirtualMachineScaleSet '{}' as it exceeds the total limit of '{}' Virtual Machine instances.",
                set.name, set.max_capacity
            ),
        );
    }
    let op = world.start_operation(key, Effect::Scale(capacity as usize));
    let mut r = scale_set_answer(world, key, StatusCode::OK);
    add_async_headers(&mut r, base, &world.sets[key], &op);
    r
}

pub fn json_ok(v: Value) -> Response {
    (
        StatusCode::OK,
        [("content-type", "application/json")],
        v.to_string(),
    )
        .into_response()
}

fn vm_not_found(set: &str, id: &str) -> Response {
    arm_error(
        StatusCode::NOT_FOUND,
        "NotFound",
        format!("The entity was not found in this Azure location. Instance '{id}' of scale set '{set}'."),
    )
}

/// A 400 `InvalidParameter` message, turned into an ARM error response by the caller.
struct InvalidParameter(String);

fn instance_ids(
    world: &World,
    key: &str,
    body: &Value,
    required: bool,
) -> Result<Vec<u64>, InvalidParameter> {
    let set = &world.sets[key];
    let Some(list) = body.get("instanceIds").and_then(Value::as_array) else {
        if required {
            return Err(InvalidParameter(
                "The value of parameter instanceIds is invalid.".into(),
            ));
        }
        return Ok(set
            .vms
            .values()
            .filter(|vm| vm.provisioning_state != "Deleting")
            .map(|vm| vm.instance_id)
            .collect());
    };
    let mut ids = Vec::new();
    for v in list {
        // Uniform: instance ids; Flexible: VM names.
        let id = v.as_str().and_then(|s| set.find(s));
        let active = id.filter(|id| {
            set.vms
                .get(id)
                .is_some_and(|vm| vm.provisioning_state != "Deleting")
        });
        match active {
            Some(id) => ids.push(id),
            _ => {
                return Err(InvalidParameter(format!(
                    "The provided instanceId {v} is not an active Virtual Machine Scale Set VM instanceId."
                )))
            }
        }
    }
    if ids.is_empty() && required {
        return Err(InvalidParameter(
            "The value of parameter instanceIds is invalid.".into(),
        ));
    }
    Ok(ids)
}

fn instance_op(
    world: &mut World,
    base: &str,
    key: &str,
    set_name: &str,
    id: &str,
    verb: &str,
) -> Response {
    let found = world.sets[key].find(id).filter(|n| {
        world.sets[key]
            .vms
            .get(n)
            .is_some_and(|vm| vm.provisioning_state != "Deleting")
    });
    let Some(n) = found else {
        return vm_not_found(set_name, id);
    };
    if let Some(refusal) = refuse(&world.sets[key], verb, &[n]) {
        return refusal;
    }
    let op = world.start_operation(key, effect(verb, vec![n]));
    accepted(base, &world.sets[key], &op)
}

/// `runCommand` on a scale-set VM (`VirtualMachineScaleSetVMs_RunCommand`, REST spec example
/// `VirtualMachineScaleSetVMRunCommand.json`): a built-in command id and the script's lines; 202
/// with only a `Location` (`…/operations/{id}?monitor=true`), which answers 202 while the script
/// runs and then 200 with the `RunCommandResult` (`ComponentStatus/StdOut/succeeded` and
/// `…/StdErr/…` statuses whose `message` is the output). A VM that is not running cannot run one
/// (409 `OperationNotAllowed`, the simulator's wording of it).
fn run_command(
    world: &mut World,
    base: &str,
    key: &str,
    set_name: &str,
    id: &str,
    body: &Value,
) -> Response {
    let set = &world.sets[key];
    let Some(n) = set.find(id).filter(|n| set.vms.contains_key(n)) else {
        return vm_not_found(set_name, id);
    };
    if !matches!(
        body["commandId"].as_str(),
        Some("RunShellScript" | "RunPowerShellScript")
    ) {
        return arm_error(
            StatusCode::BAD_REQUEST,
            "InvalidParameter",
            "commandId must be RunShellScript or RunPowerShellScript in the simulator.",
        );
    }
    let script: Vec<&str> = body["script"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    let vm = &set.vms[&n];
    if vm.power_state != "running" {
        return arm_error(
            StatusCode::CONFLICT,
            "OperationNotAllowed",
            "The operation requires the VM to be running (or set to run).",
        );
    }
    if let Some(refusal) = refuse(set, "runcommand", &[n]) {
        return refusal;
    }
    let op = world.start_operation(key, Effect::RunCommand(n, script.join("\n")));
    let set = &world.sets[key];
    let mut r = StatusCode::ACCEPTED.into_response();
    let url = operation_url(base, set, &op).replace("?api-version", "?monitor=true&api-version");
    if let Ok(v) = HeaderValue::from_str(&url) {
        r.headers_mut().insert("location", v);
    }
    r
}

/// `attachDetachDataDisks` on one VM: refused as Azure refuses it (see `disks.rs`), else the disks
/// are reserved and a long-running operation followed by its `Location` changes them.
fn attach_detach(world: &mut World, base: &str, key: &str, n: u64, body: &Value) -> Response {
    let set = &world.sets[key];
    let vm = &set.vms[&n];
    let change = match crate::disks::refuse(world, set, vm, body) {
        Ok(c) => c,
        Err(refusal) => return refusal,
    };
    let owner = set.vm_resource_id(vm);
    world.reserve_disks(&owner, &change);
    let op = world.start_operation(key, Effect::Disks(n, change));
    let set = &world.sets[key];
    let mut r = StatusCode::ACCEPTED.into_response();
    let url = operation_url(base, set, &op).replace("?api-version", "?monitor=true&api-version");
    if let Ok(v) = HeaderValue::from_str(&url) {
        r.headers_mut().insert("location", v);
    }
    r
}

/// What a run command's `Location` answers: 202 while it runs, then its result (or error).
fn run_command_result(op: &crate::world::Operation) -> Response {
    let Effect::RunCommand(_, script) = &op.effect else {
        return arm_error(
            StatusCode::NOT_FOUND,
            "OperationNotFound",
            "not a run command",
        );
    };
    match &op.outcome {
        Outcome::InProgress => StatusCode::ACCEPTED.into_response(),
        Outcome::Succeeded => {
            let stdout = if script.contains("vmss-healer-agent prepare-image") {
                "vmss-healer-agent: machine-specific state cleared (hostname, cloud-init, machine-id)"
            } else {
                ""
            };
            let status = |stream: &str, message: &str| {
                json!({"code": format!("ComponentStatus/{stream}/succeeded"), "level": "Info",
                       "displayStatus": "Provisioning succeeded", "message": message})
            };
            json_ok(json!({"value": [status("StdOut", stdout), status("StdErr", "")]}))
        }
        Outcome::Failed { code, message } | Outcome::Canceled { code, message } => {
            arm_error(StatusCode::CONFLICT, code, message.clone())
        }
    }
}

fn operation_url(base: &str, set: &ScaleSet, op: &str) -> String {
    format!(
        "{base}/subscriptions/{}/providers/Microsoft.Compute/locations/{}/operations/{op}?api-version={API_VERSION}",
        set.subscription, set.location
    )
}

fn add_async_headers(r: &mut Response, base: &str, set: &ScaleSet, op: &str) {
    let url = operation_url(base, set, op);
    if let Ok(v) = HeaderValue::from_str(&url) {
        r.headers_mut().insert("azure-asyncoperation", v.clone());
        r.headers_mut().insert("location", v);
    }
}

fn accepted(base: &str, set: &ScaleSet, op: &str) -> Response {
    let mut r = StatusCode::ACCEPTED.into_response();
    add_async_headers(&mut r, base, set, op);
    r.headers_mut()
        .insert("retry-after", HeaderValue::from(10u32));
    r
}

fn list_vms(
    world: &World,
    base: &str,
    key: &str,
    path: &str,
    query: &HashMap<String, String>,
) -> Response {
    let set = &world.sets[key];
    let skip: usize = query
        .get("$skiptoken")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let expand = query
        .get("$expand")
        .is_some_and(|e| e.eq_ignore_ascii_case("instanceView"))
        || query
            .get("$select")
            .is_some_and(|e| e.to_ascii_lowercase().starts_with("instanceview"));
    let page: Vec<Value> = set
        .vms
        .values()
        .skip(skip)
        .take(world.page_size)
        .map(|vm| vm_json(set, vm, expand))
        .collect();
    let mut body = json!({"value": page});
    if skip + world.page_size < set.vms.len() {
        let mut next = format!(
            "{base}{path}?api-version={API_VERSION}&$skiptoken={}",
            skip + world.page_size
        );
        if expand {
            next.push_str("&$expand=instanceView");
        }
        body["nextLink"] = Value::String(next);
    }
    json_ok(body)
}

pub fn scale_set_json(set: &ScaleSet) -> Value {
    let mut props = json!({
        "provisioningState": "Succeeded",
        "orchestrationMode": set.orchestration_mode,
        "singlePlacementGroup": false,
        "overprovision": false,
        "upgradePolicy": {"mode": "Manual"},
        "uniqueId": uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_URL, set.resource_id().as_bytes()).to_string(),
        "timeCreated": "2026-01-01T00:00:00+00:00",
    });
    props["automaticRepairsPolicy"] = json!({"enabled": set.automatic_repairs, "gracePeriod": "PT30M", "repairAction": "Replace"});
    props["virtualMachineProfile"] = json!({"storageProfile": {"imageReference": set.image}});
    if !set.model_disks.is_empty() {
        props["virtualMachineProfile"]["storageProfile"]["dataDisks"] = set
            .model_disks
            .iter()
            .map(|(lun, size)| {
                json!({"lun": lun, "createOption": "Empty", "diskSizeGB": size,
                       "caching": "ReadWrite", "deleteOption": "Detach"})
            })
            .collect();
    }
    if let Some(notice) = set.terminate_notice {
        props["virtualMachineProfile"]["scheduledEventsProfile"] = json!({"terminateNotificationProfile": {
            "notBeforeTimeout": format!("PT{}S", notice.as_secs()), "enable": true}});
    }
    let mut v = json!({
        "id": set.resource_id(),
        "name": set.name,
        "type": "Microsoft.Compute/virtualMachineScaleSets",
        "location": set.location,
        "sku": {"name": set.sku, "tier": "Standard", "capacity": set.capacity()},
        "properties": props,
        "etag": set.etag_value(),
    });
    if !set.zones.is_empty() {
        v["zones"] = json!(set.zones);
    }
    v
}

fn instance_view_json(vm: &Vm) -> Value {
    let mut statuses = vec![json!({
        "code": format!("ProvisioningState/{}", vm.provisioning_state.to_ascii_lowercase()),
        "level": if vm.provisioning_state == "Failed" { "Error" } else { "Info" },
        "displayStatus": format!("Provisioning {}", vm.provisioning_state.to_ascii_lowercase()),
        "time": rfc3339(vm.provisioned_at),
    })];
    statuses.push(json!({
        "code": format!("PowerState/{}", vm.power_state),
        "level": "Info",
        "displayStatus": format!("VM {}", vm.power_state),
    }));
    let mut view = json!({
        // What a golden image's definition takes from the instance it is captured from.
        "hyperVGeneration": "V2",
        "platformUpdateDomain": vm.instance_id % 5,
        "platformFaultDomain": vm.instance_id % 2,
        "computerName": vm.computer_name,
        "osName": "ubuntu",
        "osVersion": "22.04",
        "statuses": statuses,
    });
    if let Some(h) = &vm.health {
        view["vmHealth"] = json!({"status": {
            "code": format!("HealthState/{h}"),
            "level": "Info",
            "displayStatus": format!("The VM is {h}"),
            "time": rfc3339(OffsetDateTime::now_utc()),
        }});
    }
    view
}

pub fn vm_json(set: &ScaleSet, vm: &Vm, expand: bool) -> Value {
    let mut props = json!({
        "latestModelApplied": vm.latest_model_applied,
        "modelDefinitionApplied": "VirtualMachineScaleSet",
        "vmId": vm.vm_id,
        "provisioningState": vm.provisioning_state,
        "timeCreated": rfc3339(vm.time_created),
        "hardwareProfile": {},
        "osProfile": {"computerName": vm.computer_name, "adminUsername": "azureuser",
                      "linuxConfiguration": {"disablePasswordAuthentication": true}},
        "protectionPolicy": {"protectFromScaleIn": vm.protect_from_scale_in,
                             "protectFromScaleSetActions": vm.protect_from_scale_set_actions},
        "storageProfile": {"osDisk": {"osType": "Linux", "createOption": "FromImage",
                                      "managedDisk": {"id": set.os_disk_id(vm)}},
                           "dataDisks": crate::disks::data_disks_json(vm)},
    });
    if expand {
        props["instanceView"] = instance_view_json(vm);
    }
    let mut v = json!({
        "name": format!("{}_{}", set.name, vm.instance_id),
        "id": format!("{}/virtualMachines/{}", set.resource_id(), vm.instance_id),
        "type": "Microsoft.Compute/virtualMachineScaleSets/virtualMachines",
        "location": set.location,
        "instanceId": vm.instance_id.to_string(),
        "sku": {"name": set.sku, "tier": "Standard"},
        "properties": props,
    });
    if let Some(z) = &vm.zone {
        v["zones"] = json!([z]);
    }
    v
}

/// What a Flexible scale set answers differently: its instances are not scale-set VMs, and
/// batch power and reimage actions are not offered (only the batch delete is).
fn flexible_set(method: &Method, rest: &[&str]) -> Option<Response> {
    match (method.clone(), rest) {
        // Flexible VMs are not listed by the scale-set VM API.
        (Method::GET, ["virtualmachines"]) => Some(json_ok(json!({"value": []}))),
        (_, ["virtualmachines", id, ..]) => Some(arm_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            format!("The entity was not found in this Azure location. '{id}' is not an instance of a Uniform scale set."),
        )),
        (Method::POST, [verb @ ("restart" | "reimage" | "start" | "redeploy" | "manualupgrade")]) => {
            Some(arm_error(
                StatusCode::CONFLICT,
                "OperationNotAllowed",
                format!("Operation '{verb}' is not supported on a virtual machine scale set with Flexible orchestration mode; invoke it on each virtual machine (simulator wording)."),
            ))
        }
        _ => None,
    }
}

/// The VM API, as far as Flexible scale sets' instances need it: list (by resource group or
/// subscription, filtered by scale set), get, instance view, restart, start, reimage, redeploy
/// and delete. `None`: not a VM path.
#[allow(clippy::too_many_arguments)]
fn vm_api(
    world: &mut World,
    base: &str,
    method: &Method,
    path: &str,
    segs: &[&str],
    l: &[&str],
    query: &HashMap<String, String>,
    body: &Bytes,
) -> Option<Response> {
    match l {
        ["subscriptions", _, "providers", "microsoft.compute", "virtualmachines"]
            if *method == Method::GET =>
        {
            Some(list_flexible_vms(world, base, path, query, segs[1], None))
        }
        ["subscriptions", _, "resourcegroups", _, "providers", "microsoft.compute", "virtualmachines"]
            if *method == Method::GET =>
        {
            Some(list_flexible_vms(
                world,
                base,
                path,
                query,
                segs[1],
                Some(segs[3]),
            ))
        }
        ["subscriptions", _, "resourcegroups", _, "providers", "microsoft.compute", "virtualmachines", _, rest @ ..] =>
        {
            let name = segs[7];
            let Some((key, n)) = find_flexible_vm(world, segs[1], segs[3], name) else {
                return Some(arm_error(
                    StatusCode::NOT_FOUND,
                    "ResourceNotFound",
                    format!(
                        "The Resource 'Microsoft.Compute/virtualMachines/{name}' under resource group '{}' was not found.",
                        segs[3]
                    ),
                ));
            };
            let expand = query
                .get("$expand")
                .is_some_and(|e| e.eq_ignore_ascii_case("instanceView"));
            Some(match (method.clone(), rest) {
                (Method::GET, []) => {
                    let set = &world.sets[&key];
                    json_ok(flexible_vm_json(set, &set.vms[&n], expand, false))
                }
                (Method::GET, ["instanceview"]) => {
                    json_ok(instance_view_json(&world.sets[&key].vms[&n]))
                }
                (Method::DELETE, []) => vm_op(world, base, &key, n, "delete"),
                (Method::POST, ["attachdetachdatadisks"]) => {
                    let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
                    attach_detach(world, base, &key, n, &body)
                }
                (Method::POST, [verb @ ("restart" | "start" | "reimage" | "redeploy")]) => {
                    vm_op(world, base, &key, n, verb)
                }
                _ => arm_error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "MethodNotAllowed",
                    format!("{method} is not supported on '{path}' by the simulator."),
                ),
            })
        }
        _ => None,
    }
}

/// The scale set and instance of a Flexible VM, by subscription, resource group and name.
fn find_flexible_vm(world: &World, sub: &str, rg: &str, name: &str) -> Option<(String, u64)> {
    world.sets.iter().find_map(|(key, set)| {
        (set.flexible()
            && set.subscription.eq_ignore_ascii_case(sub)
            && set.resource_group.eq_ignore_ascii_case(rg))
        .then(|| set.find(name))
        .flatten()
        .map(|n| (key.clone(), n))
    })
}

/// One VM's action: refused as ARM refuses it, else a long-running operation.
/// The lock that stops `verb` on the VM, if any: any lock on the VM or its group stops a
/// delete, a `ReadOnly` one every action.
fn locked(world: &World, set: &ScaleSet, vm: &Vm, verb: &str) -> Option<Response> {
    let vm_id = set.vm_resource_id(vm).to_ascii_lowercase();
    let group = format!(
        "/subscriptions/{}/resourcegroups/{}",
        set.subscription, set.resource_group
    )
    .to_ascii_lowercase();
    let lock = world.locks.iter().find(|(scope, level)| {
        let scope = scope.to_ascii_lowercase();
        (scope == vm_id || scope == group)
            && (verb == "delete" || level.eq_ignore_ascii_case("ReadOnly"))
    })?;
    Some(arm_error(
        StatusCode::CONFLICT,
        "ScopeLocked",
        format!(
            "The scope '{vm_id}' cannot perform {verb} operation because following scope(s) are locked: '{}'. Please remove the lock and try again.",
            lock.0
        ),
    ))
}

fn vm_op(world: &mut World, base: &str, key: &str, n: u64, verb: &str) -> Response {
    if world.sets[key].vms[&n].provisioning_state == "Deleting" {
        return arm_error(
            StatusCode::CONFLICT,
            "Conflict",
            "The request failed due to conflict with a concurrent request.",
        );
    }
    let set = &world.sets[key];
    if let Some(refusal) = locked(world, set, &set.vms[&n], verb) {
        return refusal;
    }
    if let Some(refusal) = refuse(&world.sets[key], verb, &[n]) {
        return refusal;
    }
    let op = world.start_operation(key, effect(verb, vec![n]));
    accepted(base, &world.sets[key], &op)
}

/// Autoscale settings of a resource group: list, get, put (create or replace), delete.
fn autoscale(
    world: &mut World,
    method: &Method,
    sub: &str,
    rg: &str,
    name: Option<&str>,
    body: &Value,
) -> Response {
    let prefix = format!(
        "/subscriptions/{sub}/resourceGroups/{rg}/providers/microsoft.insights/autoscalesettings/"
    )
    .to_ascii_lowercase();
    let Some(name) = name else {
        if *method != Method::GET {
            return arm_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "MethodNotAllowed",
                "list is GET",
            );
        }
        let value: Vec<&Value> = world
            .autoscale
            .iter()
            .filter(|(id, _)| id.starts_with(&prefix))
            .map(|(_, v)| v)
            .collect();
        return json_ok(json!({ "value": value }));
    };
    let id = format!("{prefix}{}", name.to_ascii_lowercase());
    let not_found = || {
        arm_error(
            StatusCode::NOT_FOUND,
            "ResourceNotFound",
            format!("The Resource 'microsoft.insights/autoscalesettings/{name}' under resource group '{rg}' was not found."),
        )
    };
    match *method {
        Method::GET => world
            .autoscale
            .get(&id)
            .cloned()
            .map_or_else(not_found, json_ok),
        Method::DELETE => match world.autoscale.remove(&id) {
            Some(_) => StatusCode::OK.into_response(),
            None => StatusCode::NO_CONTENT.into_response(),
        },
        Method::PUT => {
            let p = &body["properties"];
            let capacity = &p["profiles"][0]["capacity"];
            let n = |k: &str| capacity[k].as_str().and_then(|v| v.parse::<u64>().ok());
            let target = p["targetResourceUri"].as_str().unwrap_or_default();
            let exists = world
                .sets
                .values()
                .any(|s| s.resource_id().eq_ignore_ascii_case(target));
            match (n("minimum"), n("default"), n("maximum")) {
                _ if !exists => arm_error(
                    StatusCode::BAD_REQUEST,
                    "TargetResourceNotFound",
                    format!("The target resource '{target}' was not found."),
                ),
                // A setting's target cannot change: "The target resource reference is
                // immutable. If you want to change it, please create a new autoscale setting with
                // a different name." (400 TargetResourceIdIsImmutable, quoted in Azure/Moodle#311
                // and MicrosoftDocs/azure-docs#28175). Moving autoscale is a new setting.
                _ if world.autoscale.get(&id).is_some_and(|old| {
                    !old["properties"]["targetResourceUri"]
                        .as_str()
                        .unwrap_or_default()
                        .eq_ignore_ascii_case(target)
                }) =>
                {
                    let old = world.autoscale[&id]["properties"]["targetResourceUri"]
                        .as_str()
                        .unwrap_or_default()
                        .to_string();
                    arm_error(
                        StatusCode::BAD_REQUEST,
                        "TargetResourceIdIsImmutable",
                        format!("The autoscale setting '{name}' under resource group '{rg}' is referencing target resource '{old}'. The target resource reference is immutable. If you want to change it, please create a new autoscale setting with a different name."),
                    )
                }
                (Some(min), Some(default), Some(max)) if min <= default && default <= max => {
                    let created = !world.autoscale.contains_key(&id);
                    let mut setting = body.clone();
                    setting["id"] = json!(format!(
                        "/subscriptions/{sub}/resourceGroups/{rg}/providers/microsoft.insights/autoscalesettings/{name}"
                    ));
                    setting["name"] = json!(name);
                    setting["type"] = json!("Microsoft.Insights/autoscaleSettings");
                    world.autoscale.insert(id, setting.clone());
                    let status = if created { StatusCode::CREATED } else { StatusCode::OK };
                    let mut r = json_ok(setting);
                    *r.status_mut() = status;
                    r
                }
                _ => arm_error(
                    StatusCode::BAD_REQUEST,
                    "InvalidRequest",
                    "profiles[0].capacity needs minimum <= default <= maximum, as whole numbers in strings",
                ),
            }
        }
        _ => arm_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{method} is not supported on autoscale settings by the simulator."),
        ),
    }
}

/// A resource group's management locks, with those of every resource in it.
fn list_locks(world: &World, sub: &str, rg: &str) -> Response {
    let group = format!("/subscriptions/{sub}/resourceGroups/{rg}").to_ascii_lowercase();
    let value: Vec<Value> = world
        .locks
        .iter()
        .enumerate()
        .filter(|(_, (scope, _))| scope.to_ascii_lowercase().starts_with(&group))
        .map(|(i, (scope, level))| {
            json!({
                "id": format!("{scope}/providers/Microsoft.Authorization/locks/lock{i}"),
                "name": format!("lock{i}"),
                "type": "Microsoft.Authorization/locks",
                "properties": {"level": level, "notes": "simulator"},
            })
        })
        .collect();
    json_ok(json!({"value": value}))
}

/// The scale set a `$filter` names: `'virtualMachineScaleSet/id' eq '<id>'`, the one filter the
/// VM list accepts (quotes optional, any case).
fn scale_set_filter(raw: &str) -> Option<String> {
    let cleaned = raw.replace(['\'', '"'], " ");
    let words: Vec<&str> = cleaned.split_whitespace().collect();
    match words.as_slice() {
        [property, eq, id]
            if property.eq_ignore_ascii_case("virtualMachineScaleSet/id")
                && eq.eq_ignore_ascii_case("eq") =>
        {
            Some(id.trim_end_matches('/').to_ascii_lowercase())
        }
        _ => None,
    }
}

/// The VM list: every Flexible VM of the subscription (or resource group), or of one scale set
/// with `$filter`; `$expand=instanceView` only with that filter; `statusOnly=true` answers each
/// VM's instance view alone. Paged like every ARM list.
fn list_flexible_vms(
    world: &World,
    base: &str,
    path: &str,
    query: &HashMap<String, String>,
    sub: &str,
    rg: Option<&str>,
) -> Response {
    let filter = match query.get("$filter") {
        None => None,
        Some(raw) => match scale_set_filter(raw) {
            Some(id) => Some(id),
            None => {
                return arm_error(
                    StatusCode::BAD_REQUEST,
                    "InvalidParameter",
                    format!("The value '{raw}' of parameter '$filter' is not supported; the allowed value is 'virtualMachineScaleSet/id' eq '<scale set id>'."),
                )
            }
        },
    };
    let expand = query
        .get("$expand")
        .is_some_and(|e| e.eq_ignore_ascii_case("instanceView"));
    if expand && filter.is_none() {
        return arm_error(
            StatusCode::BAD_REQUEST,
            "InvalidParameter",
            "$expand=instanceView can only be specified together with a valid $filter option.",
        );
    }
    let status_only = query
        .get("statusOnly")
        .is_some_and(|v| v.eq_ignore_ascii_case("true"));
    let vms: Vec<Value> = world
        .sets
        .values()
        .filter(|set| {
            set.flexible()
                && set.subscription.eq_ignore_ascii_case(sub)
                && rg.is_none_or(|rg| set.resource_group.eq_ignore_ascii_case(rg))
                && filter
                    .as_deref()
                    .is_none_or(|id| set.resource_id().to_ascii_lowercase() == id)
        })
        .flat_map(|set| {
            set.vms
                .values()
                .map(move |vm| flexible_vm_json(set, vm, expand, status_only))
        })
        .collect();
    let skip: usize = query
        .get("$skiptoken")
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let page: Vec<Value> = vms
        .iter()
        .skip(skip)
        .take(world.page_size)
        .cloned()
        .collect();
    let mut body = json!({"value": page});
    if skip + world.page_size < vms.len() {
        let mut next = url::Url::parse(&format!("{base}{path}")).expect("a URL of ours");
        {
            let mut pairs = next.query_pairs_mut();
            for (k, v) in query.iter().filter(|(k, _)| *k != "$skiptoken") {
                pairs.append_pair(k, v);
            }
            pairs.append_pair("$skiptoken", &(skip + world.page_size).to_string());
        }
        body["nextLink"] = Value::String(next.to_string());
    }
    json_ok(body)
}

/// A Flexible scale set's VM as the VM API shows it.
pub fn flexible_vm_json(set: &ScaleSet, vm: &Vm, expand: bool, status_only: bool) -> Value {
    let name = set.key_of(vm);
    let id = set.vm_resource_id(vm);
    if status_only {
        return json!({"name": name, "id": id, "type": "Microsoft.Compute/virtualMachines",
                      "properties": {"instanceView": instance_view_json(vm)}});
    }
    let mut props = json!({
        "vmId": vm.vm_id,
        "provisioningState": vm.provisioning_state,
        "timeCreated": rfc3339(vm.time_created),
        "hardwareProfile": {"vmSize": set.sku},
        "osProfile": {"computerName": vm.computer_name, "adminUsername": "azureuser",
                      "linuxConfiguration": {"disablePasswordAuthentication": true}},
        "virtualMachineScaleSet": {"id": set.resource_id()},
        "networkProfile": crate::network::network_profile(set, vm),
        "storageProfile": {"osDisk": {"osType": "Linux", "createOption": "FromImage",
                                      "managedDisk": {"id": set.os_disk_id(vm)}},
                           "dataDisks": crate::disks::data_disks_json(vm)},
    });
    if expand {
        props["instanceView"] = instance_view_json(vm);
    }
    let mut v = json!({
        "name": name,
        "id": id,
        "type": "Microsoft.Compute/virtualMachines",
        "location": set.location,
        "properties": props,
    });
    if let Some(z) = &vm.zone {
        v["zones"] = json!([z]);
    }
    v
}
