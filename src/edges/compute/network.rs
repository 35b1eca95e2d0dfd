//! The address of a Flexible scale set's VM, for a stateful replacement (issue 18): the VM's
//! primary network interface, its public IP and private address (the network provider's
//! 2024-05-01, through the edge's own transport: two calls, the same credential, throttle
//! accounting and error classification as every Compute call — not a second generated SDK), and
//! the NIC written whole with the address given or taken.

use super::{Compute, ComputeError};
use crate::scaleset::ScaleSetId;
use azure_core::Method;

pub const NETWORK_API_VERSION: &str = "2024-05-01";
const COMPUTE_API_VERSION: &str = "2024-07-01";

/// Where a VM's address stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceAddress {
    /// The primary NIC's id.
    pub nic: String,
    /// The public IP's id on its first IP configuration, if any.
    pub public_ip: Option<String>,
    pub private_ip: Option<String>,
    pub private_static: bool,
}

/// What to write on a NIC's first IP configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddressChange {
    /// This public IP (or none).
    Public(Option<String>),
    /// This private address as static (or back to dynamic).
    Private(Option<String>),
}

impl Compute {
    /// A Flexible VM's primary NIC and its addresses.
    pub async fn instance_address(
        &self,
        id: &ScaleSetId,
        vm_name: &str,
    ) -> Result<InstanceAddress, ComputeError> {
        let vm = self
            .call_json(
                "read a VM's network profile",
                Method::Get,
                &format!(
                    "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines/{vm_name}?api-version={COMPUTE_API_VERSION}",
                    id.subscription, id.resource_group
                ),
                None,
            )
            .await?;
        let nics = vm["properties"]["networkProfile"]["networkInterfaces"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let nic = nics
            .iter()
            .find(|n| n["properties"]["primary"].as_bool() == Some(true))
            .or(nics.first())
            .and_then(|n| n["id"].as_str())
            .ok_or_else(|| {
                ComputeError::Failed(format!("VM {vm_name} names no network interface"))
            })?
            .to_string();
        let body = self.nic(&nic).await?;
        let props = &body["properties"]["ipConfigurations"][0]["properties"];
        Ok(InstanceAddress {
            nic,
            public_ip: props["publicIPAddress"]["id"].as_str().map(str::to_string),
            private_ip: props["privateIPAddress"].as_str().map(str::to_string),
            private_static: props["privateIPAllocationMethod"].as_str() == Some("Static"),
        })
    }

    async fn nic(&self, nic: &str) -> Result<serde_json::Value, ComputeError> {
        self.call_json(
            "read a network interface",
            Method::Get,
            &format!("{nic}?api-version={NETWORK_API_VERSION}"),
            None,
        )
        .await
    }

    /// Writes the NIC back whole with its first IP configuration's address changed.
    pub async fn set_address(&self, nic: &str, change: &AddressChange) -> Result<(), ComputeError> {
        let mut body = self.nic(nic).await?;
        let Some(props) = body["properties"]["ipConfigurations"][0]
            .get_mut("properties")
            .and_then(|p| p.as_object_mut())
        else {
            return Err(ComputeError::Failed(format!(
                "network interface {nic} has no IP configuration"
            )));
        };
        match change {
            AddressChange::Public(Some(pip)) => {
                props.insert("publicIPAddress".into(), serde_json::json!({"id": pip}));
            }
            AddressChange::Public(None) => {
                props.remove("publicIPAddress");
            }
            AddressChange::Private(Some(ip)) => {
                props.insert("privateIPAllocationMethod".into(), "Static".into());
                props.insert("privateIPAddress".into(), ip.clone().into());
            }
            AddressChange::Private(None) => {
                props.insert("privateIPAllocationMethod".into(), "Dynamic".into());
            }
        }
        self.call_json(
            "write a network interface",
            Method::Put,
            &format!("{nic}?api-version={NETWORK_API_VERSION}"),
            Some(&body),
        )
        .await
        .map(|_| ())
    }
}
