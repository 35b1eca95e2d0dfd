//! The Microsoft.Compute scale-set REST surface, as ARM serves it at api-version 2024-07-01.
//! Paths are matched case-insensitively, as ARM does.

use crate::world::{Effect, ScaleSet, Vm, World};
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

/// Every ARM request: log, inject faults, authenticate, check the api-version, dispatch.
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

    let mut world = shared.world.lock().await;
    world.advance();
    let response = respond(
        &mut world,
        &shared.base_url,
        &method,
        &path,
        &query,
        &headers,
        &body,
    );
    let status = response.status().as_u16();
    world.calls.push(crate::world::Call {
        method: method.to_string(),
        path,
        query: uri.query().unwrap_or("").to_string(),
        status,
        at: OffsetDateTime::now_utc(),
    });
    let mut response = response;
    // Every Compute answer carries the remaining budget, as ARM's throttling headers do.
    let remaining = world
        .rate_limit_remaining
        .unwrap_or_else(|| 1200usize.saturating_sub(world.calls.len() % 1200));
    if let Ok(v) = HeaderValue::from_str(&format!(
        "Microsoft.Compute/GetVMScaleSet3Min;{remaining},Microsoft.Compute/GetVMScaleSet30Min;{}",
        remaining * 5
    )) {
        response
            .headers_mut()
            .insert("x-ms-ratelimit-remaining-resource", v);
    }
    response
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
    if let Some(fault) = world.take_fault(method.as_str(), path) {
        let status =
            StatusCode::from_u16(fault.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut r = if status == StatusCode::TOO_MANY_REQUESTS {
            arm_error(
                status,
                "OperationNotAllowed",
                "The server rejected the request because too many requests have been received for this subscription.",
            )
        } else {
            arm_error(
                status,
                "InternalExecutionError",
                "An internal execution error occurred. Please retry later.",
            )
        };
        if let Some(secs) = fault.retry_after {
            r.headers_mut()
                .insert("retry-after", HeaderValue::from(secs));
        }
        return r;
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

    match query.get("api-version").map(String::as_str) {
        Some(API_VERSION) => {}
        Some(other) => {
            return arm_error(
                StatusCode::BAD_REQUEST,
                "NoRegisteredProviderFound",
                format!("No registered resource provider found for API version '{other}'. The supported api-versions are '{API_VERSION}'."),
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
        return match world.operations.get(*op) {
            Some(op) => json_ok(json!({
                "name": op.id,
                "startTime": rfc3339(op.started),
                "endTime": op.ended.map(rfc3339),
                "status": if op.ended.is_some() { "Succeeded" } else { "InProgress" },
            })),
            None => arm_error(
                StatusCode::NOT_FOUND,
                "OperationNotFound",
                format!("Operation {op} not found."),
            ),
        };
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

    match (method.clone(), rest) {
        (Method::GET, []) => json_ok(scale_set_json(&world.sets[&key])),
        (Method::PATCH, []) => {
            let Some(capacity) = parsed_body.pointer("/sku/capacity").and_then(Value::as_u64)
            else {
                return arm_error(
                    StatusCode::BAD_REQUEST,
                    "InvalidParameter",
                    "Only sku.capacity can be patched in the simulator.",
                );
            };
            let op = world.start_operation(&key, Effect::Scale(capacity as usize));
            let set = &world.sets[&key];
            let mut r = json_ok(scale_set_json(set));
            add_async_headers(&mut r, base, set, &op);
            r
        }
        (Method::GET, ["virtualmachines"]) => list_vms(world, base, &key, path, query),
        (Method::GET, ["virtualmachines", id])
        | (Method::GET, ["virtualmachines", id, "instanceview"]) => {
            let set = &world.sets[&key];
            match id.parse::<u64>().ok().and_then(|n| set.vms.get(&n)) {
                Some(vm) if rest.len() == 2 => json_ok(instance_view_json(vm)),
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
            instance_op(world, base, &key, segs[7], id, Effect::Delete)
        }
        (Method::POST, ["virtualmachines", id, "restart"]) => {
            instance_op(world, base, &key, segs[7], id, Effect::Restart)
        }
        (Method::POST, ["virtualmachines", id, "reimage"]) => {
            instance_op(world, base, &key, segs[7], id, Effect::Reimage)
        }
        (Method::POST, [verb @ ("delete" | "restart" | "reimage")]) => {
            let ids = match instance_ids(world, &key, &parsed_body, *verb == "delete") {
                Ok(ids) => ids,
                Err(InvalidParameter(m)) => {
                    return arm_error(StatusCode::BAD_REQUEST, "InvalidParameter", m)
                }
            };
            let effect = match *verb {
                "delete" => Effect::Delete(ids),
                "restart" => Effect::Restart(ids),
                _ => Effect::Reimage(ids),
            };
            let op = world.start_operation(&key, effect);
            accepted(base, &world.sets[&key], &op)
        }
        _ => arm_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{method} is not supported on '{path}' by the simulator."),
        ),
    }
}

fn json_ok(v: Value) -> Response {
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
        return Ok(set.vms.keys().copied().collect());
    };
    let mut ids = Vec::new();
    for v in list {
        let id = v.as_str().and_then(|s| s.parse::<u64>().ok());
        match id {
            Some(id) if set.vms.contains_key(&id) => ids.push(id),
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
    effect: fn(Vec<u64>) -> Effect,
) -> Response {
    match id
        .parse::<u64>()
        .ok()
        .filter(|n| world.sets[key].vms.contains_key(n))
    {
        Some(n) => {
            let op = world.start_operation(key, effect(vec![n]));
            accepted(base, &world.sets[key], &op)
        }
        None => vm_not_found(set_name, id),
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
    let mut v = json!({
        "id": set.resource_id(),
        "name": set.name,
        "type": "Microsoft.Compute/virtualMachineScaleSets",
        "location": set.location,
        "sku": {"name": set.sku, "tier": "Standard", "capacity": set.capacity()},
        "properties": props,
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
        "time": rfc3339(vm.time_created),
    })];
    statuses.push(json!({
        "code": format!("PowerState/{}", vm.power_state),
        "level": "Info",
        "displayStatus": format!("VM {}", vm.power_state),
    }));
    let mut view = json!({
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
