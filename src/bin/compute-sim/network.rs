//! Network interfaces and public IPs of Flexible scale sets' VMs: what carrying a stateful
//! instance's address to its replacement needs of Azure (issue 18). A Flexible VM is an ordinary
//! VM whose network interface is a resource of its own (a Uniform instance's belongs to the scale
//! set's model, and no address moves between those).
//!
//! What it knows of Azure, and where from (each with a test in `tests/simulator.rs`):
//! - The network provider's api-version `2024-05-01`; a VM names its NIC in
//!   `networkProfile.networkInterfaces[].id`; a NIC's `ipConfigurations[].properties` hold
//!   `privateIPAddress`, `privateIPAllocationMethod` (`Dynamic` or `Static`) and `publicIPAddress`
//!   (`{id}`); a public IP's `ipConfiguration.id` names the IP configuration that holds it
//!   (Network Interfaces - Get / Create Or Update, Public IP Addresses - Get).
//! - A NIC is written whole (PUT); the address it names must be free: a public IP another IP
//!   configuration holds is 400 `PublicIPAddressInUse`, "Resource {ipconfig} is referencing public
//!   IP address {pip} that is already allocated to resource {other ipconfig}."
//!   (gardener/gardener-extension-provider-azure#759, MicrosoftLearning AZ-100 #15); a private
//!   address another NIC holds is 400 `PrivateIPAddressInUse`.
//! - A Flexible VM made by its scale set has its NIC deleted with it (`deleteOption: Delete` in
//!   the scale set's network profile): its public IP, a resource of its own, stays, unassociated.
//!
//! A NIC here is derived from its VM (`{vm name}-nic`, `ipconfig1`, a private address from the
//! instance number); what a PUT changed is kept by NIC.

use crate::arm::{arm_error, json_ok};
use crate::world::{ScaleSet, Vm, World};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use serde::Serialize;
use serde_json::{json, Value};

pub const NETWORK_API_VERSION: &str = "2024-05-01";

/// What a PUT set on a NIC.
#[derive(Debug, Clone, Serialize, Default)]
pub struct NicState {
    pub private_ip: Option<String>,
    pub private_static: bool,
    /// The public IP's id, as given.
    pub public_ip: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PublicIp {
    pub id: String,
    pub name: String,
    pub ip_address: String,
}

pub fn nic_name(set: &ScaleSet, vm: &Vm) -> String {
    format!("{}-nic", set.key_of(vm))
}

pub fn nic_id(set: &ScaleSet, vm: &Vm) -> String {
    format!(
        "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Network/networkInterfaces/{}",
        set.subscription,
        set.resource_group,
        nic_name(set, vm)
    )
}

/// The address a VM's NIC gets unless a PUT set one: from its instance number.
fn default_private_ip(vm: &Vm) -> String {
    format!("10.0.{}.{}", vm.instance_id / 250, vm.instance_id % 250 + 4)
}

impl World {
    /// The NIC's current state: what a PUT set, else its defaults.
    pub fn nic_state(&self, set: &ScaleSet, vm: &Vm) -> NicState {
        let key = nic_id(set, vm).to_ascii_lowercase();
        let mut state = self.nics.get(&key).cloned().unwrap_or_default();
        if state.private_ip.is_none() {
            state.private_ip = Some(default_private_ip(vm));
        }
        state
    }

    /// Every Flexible VM's NIC, by id (lower case), with its state.
    fn all_nics(&self) -> Vec<(String, NicState)> {
        self.sets
            .values()
            .filter(|s| s.flexible())
            .flat_map(|s| {
                s.vms
                    .values()
                    .map(move |vm| (nic_id(s, vm).to_ascii_lowercase(), self.nic_state(s, vm)))
            })
            .collect()
    }

    /// A deleted VM's NIC goes with it; its public IP stays, unassociated.
    pub fn drop_nic(&mut self, nic: &str) {
        self.nics.remove(&nic.to_ascii_lowercase());
    }

    /// A public IP on the VM's NIC (a stateful VM as deployed).
    pub fn give_public_ip(&mut self, set_key: &str, instance: u64, name: &str) -> Option<String> {
        let set = self.sets.get(set_key)?;
        let vm = set.vms.get(&instance)?;
        let id = format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Network/publicIPAddresses/{name}",
            set.subscription, set.resource_group
        );
        let nic = nic_id(set, vm).to_ascii_lowercase();
        let n = self.public_ips.len() as u64;
        self.public_ips.insert(
            id.to_ascii_lowercase(),
            PublicIp {
                id: id.clone(),
                name: name.to_string(),
                ip_address: format!("20.50.{}.{}", n / 250, n % 250 + 1),
            },
        );
        self.nics.entry(nic).or_default().public_ip = Some(id.clone());
        Some(id)
    }
}

fn nic_json(world: &World, set: &ScaleSet, vm: &Vm) -> Value {
    let state = world.nic_state(set, vm);
    let id = nic_id(set, vm);
    let mut props = json!({
        "privateIPAddress": state.private_ip,
        "privateIPAllocationMethod": if state.private_static { "Static" } else { "Dynamic" },
        "subnet": {"id": format!("/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Network/virtualNetworks/vnet/subnets/default", set.subscription, set.resource_group)},
        "primary": true,
        "provisioningState": "Succeeded",
    });
    if let Some(pip) = &state.public_ip {
        props["publicIPAddress"] = json!({"id": pip});
    }
    json!({
        "id": id,
        "name": nic_name(set, vm),
        "type": "Microsoft.Network/networkInterfaces",
        "location": set.location,
        "properties": {
            "provisioningState": "Succeeded",
            "virtualMachine": {"id": set.vm_resource_id(vm)},
            "ipConfigurations": [{
                "id": format!("{id}/ipConfigurations/ipconfig1"),
                "name": "ipconfig1",
                "properties": props,
            }],
        },
    })
}

/// The VM's `networkProfile`, as a Flexible VM shows it.
pub fn network_profile(set: &ScaleSet, vm: &Vm) -> Value {
    json!({"networkInterfaces": [{"id": nic_id(set, vm), "properties": {"primary": true, "deleteOption": "Delete"}}]})
}

/// Serves `…/providers/Microsoft.Network/{networkInterfaces|publicIPAddresses}/{name}`; `None`
/// for other paths.
pub fn handle(
    world: &mut World,
    method: &Method,
    segs: &[&str],
    l: &[&str],
    body: &Value,
) -> Option<Response> {
    let ["subscriptions", _, "resourcegroups", _, "providers", "microsoft.network", kind @ ("networkinterfaces" | "publicipaddresses"), _] =
        l
    else {
        return None;
    };
    let id = format!("/{}", segs.join("/"));
    let key = id.to_ascii_lowercase();
    Some(match (*kind, method) {
        ("publicipaddresses", &Method::GET) => match world.public_ips.get(&key) {
            Some(p) => {
                let mut v = json!({"id": p.id, "name": p.name, "type": "Microsoft.Network/publicIPAddresses",
                                   "sku": {"name": "Standard"},
                                   "properties": {"ipAddress": p.ip_address, "publicIPAllocationMethod": "Static", "provisioningState": "Succeeded"}});
                if let Some((nic, _)) = world.all_nics().into_iter().find(|(_, s)| {
                    s.public_ip
                        .as_deref()
                        .is_some_and(|x| x.eq_ignore_ascii_case(&p.id))
                }) {
                    v["properties"]["ipConfiguration"] =
                        json!({"id": format!("{nic}/ipconfigurations/ipconfig1")});
                }
                json_ok(v)
            }
            None => not_found(&id),
        },
        ("networkinterfaces", &Method::GET) => match find_nic(world, &key) {
            Some((set_key, n)) => {
                let set = &world.sets[&set_key];
                json_ok(nic_json(world, set, &set.vms[&n]))
            }
            None => not_found(&id),
        },
        ("networkinterfaces", &Method::PUT) => put_nic(world, &id, &key, body),
        _ => arm_error(
            StatusCode::METHOD_NOT_ALLOWED,
            "MethodNotAllowed",
            format!("{method} is not supported on '{id}' by the simulator."),
        ),
    })
}

fn not_found(id: &str) -> Response {
    arm_error(
        StatusCode::NOT_FOUND,
        "ResourceNotFound",
        format!("The Resource '{id}' was not found."),
    )
}

/// The Flexible VM whose NIC this is.
fn find_nic(world: &World, key: &str) -> Option<(String, u64)> {
    world.sets.iter().find_map(|(k, s)| {
        s.flexible()
            .then(|| {
                s.vms
                    .values()
                    .find(|vm| nic_id(s, vm).eq_ignore_ascii_case(key))
                    .map(|vm| (k.clone(), vm.instance_id))
            })
            .flatten()
    })
}

fn put_nic(world: &mut World, id: &str, key: &str, body: &Value) -> Response {
    let Some((set_key, n)) = find_nic(world, key) else {
        return not_found(id);
    };
    let config = &body["properties"]["ipConfigurations"][0];
    let props = &config["properties"];
    let ipconfig = format!(
        "{id}/ipConfigurations/{}",
        config["name"].as_str().unwrap_or("ipconfig1")
    );
    let public_ip = props["publicIPAddress"]["id"].as_str().map(str::to_string);
    let static_ip = props["privateIPAllocationMethod"].as_str() == Some("Static");
    let private_ip = props["privateIPAddress"].as_str().map(str::to_string);
    let others: Vec<(String, NicState)> = world
        .all_nics()
        .into_iter()
        .filter(|(k, _)| k != key)
        .collect();
    if let Some(pip) = &public_ip {
        if !world.public_ips.contains_key(&pip.to_ascii_lowercase()) {
            return arm_error(
                StatusCode::BAD_REQUEST,
                "InvalidResourceReference",
                format!("Resource {pip} referenced by resource {ipconfig} was not found."),
            );
        }
        if let Some((other, _)) = others.iter().find(|(_, s)| {
            s.public_ip
                .as_deref()
                .is_some_and(|x| x.eq_ignore_ascii_case(pip))
        }) {
            return arm_error(
                StatusCode::BAD_REQUEST,
                "PublicIPAddressInUse",
                format!("Resource {ipconfig} is referencing public IP address {pip} that is already allocated to resource {other}/ipConfigurations/ipconfig1."),
            );
        }
    }
    if let (true, Some(ip)) = (static_ip, &private_ip) {
        if let Some((other, _)) = others
            .iter()
            .find(|(_, s)| s.private_ip.as_deref() == Some(ip.as_str()))
        {
            return arm_error(
                StatusCode::BAD_REQUEST,
                "PrivateIPAddressInUse",
                format!("IP configuration {ipconfig} is using the private IP address {ip} which is already allocated to resource {other}."),
            );
        }
    }
    let set = &world.sets[&set_key];
    let vm = &set.vms[&n];
    let current = world.nic_state(set, vm);
    let state = NicState {
        // A dynamic address stays what it was; a static one is what the PUT says.
        private_ip: if static_ip {
            private_ip
        } else {
            current.private_ip
        },
        private_static: static_ip,
        public_ip,
    };
    world.nics.insert(key.to_string(), state);
    let set = &world.sets[&set_key];
    json_ok(nic_json(world, set, &set.vms[&n]))
}
