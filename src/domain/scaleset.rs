//! Identities of scale sets and their instances, parsed once from ARM resource ids.
//!
//! ARM ids are case-insensitive, so everything is folded to lower case here; the table keys in
//! design §3 are built from these values and nowhere else.

use std::fmt;

/// A Virtual Machine Scale Set, named by subscription, resource group and name (lower case).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct ScaleSetId {
    pub subscription: String,
    pub resource_group: String,
    pub name: String,
}

/// One VM of a scale set: its scale set and its instance id (lower case).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct InstanceRef {
    pub scale_set: ScaleSetId,
    pub instance_id: String,
}

/// How a scale set holds its instances, as ARM reports its `orchestrationMode`: Uniform instances
/// are scale-set VMs (numeric instance ids, the scale-set VM API), Flexible ones are ordinary
/// virtual machines (keyed by their name, the VM API). Read from Azure, never configured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Orchestration {
    #[default]
    Uniform,
    Flexible,
}

impl Orchestration {
    /// ARM's `orchestrationMode`; absent (older scale sets, or not mirrored yet) is Uniform, the
    /// only mode Azure had before Flexible.
    pub fn parse(mode: Option<&str>) -> Self {
        match mode {
            Some(m) if m.eq_ignore_ascii_case("flexible") => Orchestration::Flexible,
            _ => Orchestration::Uniform,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Orchestration::Uniform => "Uniform",
            Orchestration::Flexible => "Flexible",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{id}` is not a {what} resource id: {why}")]
pub struct BadResourceId {
    pub id: String,
    pub what: &'static str,
    pub why: String,
}

const PROVIDER: &str = "microsoft.compute";
const VMSS_TYPE: &str = "virtualmachinescalesets";
const VM_TYPE: &str = "virtualmachines";

impl ScaleSetId {
    pub fn new(subscription: &str, resource_group: &str, name: &str) -> Self {
        Self {
            subscription: subscription.to_ascii_lowercase(),
            resource_group: resource_group.to_ascii_lowercase(),
            name: name.to_ascii_lowercase(),
        }
    }

    /// Parses `/subscriptions/{s}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachineScaleSets/{n}`.
    pub fn parse(id: &str) -> Result<Self, BadResourceId> {
        let segments = segments(id, "scale set")?;
        match parse_prefix(&segments) {
            Some((set, [])) => Ok(set),
            Some((_, rest)) => Err(bad(
                id,
                "scale set",
                format!("unexpected trailing segments `{}`", rest.join("/")),
            )),
            None => Err(bad(id, "scale set", expected_shape())),
        }
    }

    /// The table key of design §3: `<subscriptionId>:<resourceGroup>:<vmssName>`.
    pub fn key(&self) -> String {
        format!(
            "{}:{}:{}",
            self.subscription, self.resource_group, self.name
        )
    }

    /// Inverse of [`ScaleSetId::key`].
    pub fn from_key(key: &str) -> Option<Self> {
        let mut parts = key.split(':');
        let (s, rg, n) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() || s.is_empty() || rg.is_empty() || n.is_empty() {
            return None;
        }
        Some(Self::new(s, rg, n))
    }

    pub fn resource_id(&self) -> String {
        format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachineScaleSets/{}",
            self.subscription, self.resource_group, self.name
        )
    }

    pub fn instance(&self, instance_id: &str) -> InstanceRef {
        InstanceRef {
            scale_set: self.clone(),
            instance_id: instance_id.to_ascii_lowercase(),
        }
    }
}

impl fmt::Display for ScaleSetId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.resource_group, self.name)
    }
}

impl InstanceRef {
    /// Parses a VMSS VM resource id: the scale set id followed by `/virtualMachines/{instanceId}`.
    pub fn parse(id: &str) -> Result<Self, BadResourceId> {
        let segments = segments(id, "scale set VM")?;
        match parse_prefix(&segments) {
            Some((set, [kind, instance])) if kind.eq_ignore_ascii_case(VM_TYPE) => {
                key_safe(id, "scale set VM", instance)?;
                Ok(set.instance(instance))
            }
            Some(_) | None => Err(bad(
                id,
                "scale set VM",
                format!("{}/virtualMachines/{{instanceId}}", expected_shape()),
            )),
        }
    }

    pub fn resource_id(&self) -> String {
        format!(
            "{}/virtualMachines/{}",
            self.scale_set.resource_id(),
            self.instance_id
        )
    }
}

/// A plain virtual machine, as a Flexible scale set's instance is named in heartbeats and
/// Resource Manager events: `/subscriptions/{s}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{name}`
/// (lower case). Which scale set it belongs to is not in the id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct VmRef {
    pub subscription: String,
    pub resource_group: String,
    pub name: String,
}

impl VmRef {
    pub fn parse(id: &str) -> Result<Self, BadResourceId> {
        let segments = segments(id, "virtual machine")?;
        match segments.as_slice() {
            [subs, sub, rgs, rg, providers, provider, kind, name]
                if subs.eq_ignore_ascii_case("subscriptions")
                    && rgs.eq_ignore_ascii_case("resourcegroups")
                    && providers.eq_ignore_ascii_case("providers")
                    && provider.eq_ignore_ascii_case(PROVIDER)
                    && kind.eq_ignore_ascii_case(VM_TYPE) =>
            {
                key_safe(id, "virtual machine", name)?;
                Ok(VmRef {
                    subscription: sub.to_ascii_lowercase(),
                    resource_group: rg.to_ascii_lowercase(),
                    name: name.to_ascii_lowercase(),
                })
            }
            _ => Err(bad(
                id,
                "virtual machine",
                "expected /subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{name}".into(),
            )),
        }
    }

    /// Whether `set` could hold this VM: a Flexible scale set's VMs are in its resource group.
    pub fn could_be_in(&self, set: &ScaleSetId) -> bool {
        self.subscription == set.subscription && self.resource_group == set.resource_group
    }

    /// The VM as an instance of `set` (its key is its name).
    pub fn in_scale_set(&self, set: &ScaleSetId) -> InstanceRef {
        set.instance(&self.name)
    }
}

impl fmt::Display for InstanceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.scale_set, self.instance_id)
    }
}

fn segments<'a>(id: &'a str, what: &'static str) -> Result<Vec<&'a str>, BadResourceId> {
    let trimmed = id.trim();
    let Some(rest) = trimmed.strip_prefix('/') else {
        return Err(bad(id, what, "it must start with `/subscriptions/`".into()));
    };
    let segments: Vec<&str> = rest.trim_end_matches('/').split('/').collect();
    if segments.iter().any(|s| s.is_empty()) {
        return Err(bad(id, what, "it has an empty segment (`//`)".into()));
    }
    Ok(segments)
}

fn parse_prefix<'s, 'a>(segments: &'s [&'a str]) -> Option<(ScaleSetId, &'s [&'a str])> {
    match segments {
        [subs, sub, rgs, rg, providers, provider, kind, name, rest @ ..]
            if subs.eq_ignore_ascii_case("subscriptions")
                && rgs.eq_ignore_ascii_case("resourcegroups")
                && providers.eq_ignore_ascii_case("providers")
                && provider.eq_ignore_ascii_case(PROVIDER)
                && kind.eq_ignore_ascii_case(VMSS_TYPE) =>
        {
            Some((ScaleSetId::new(sub, rg, name), rest))
        }
        _ => None,
    }
}

/// The longest instance key taken from outside: VM names are at most 64 characters.
const MAX_INSTANCE_KEY: usize = 80;

/// An instance id or VM name becomes a table key (design §3): only the characters Azure allows in
/// VM names (letters, digits, `-`, `_`, `.`), so that no subject from outside can carry a
/// character table keys refuse (`/ \ # ?`, control characters) and turn a bad event into a storage
/// error, which Event Grid would redeliver for a day.
fn key_safe(id: &str, what: &'static str, key: &str) -> Result<(), BadResourceId> {
    if key.is_empty() {
        return Err(bad(id, what, "empty instance id or VM name".into()));
    }
    if key.len() > MAX_INSTANCE_KEY {
        return Err(bad(
            id,
            what,
            format!("instance id or VM name longer than {MAX_INSTANCE_KEY} characters"),
        ));
    }
    if !key
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
    {
        return Err(bad(
            id,
            what,
            "an instance id or VM name has only letters, digits, `-`, `_` and `.`".into(),
        ));
    }
    Ok(())
}

fn expected_shape() -> String {
    "expected /subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachineScaleSets/{name}".into()
}

fn bad(id: &str, what: &'static str, why: String) -> BadResourceId {
    BadResourceId {
        id: id.to_string(),
        what,
        why,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scale_set_ids_fold_case_and_round_trip_through_keys() {
        let id = ScaleSetId::parse(
            "/subscriptions/SUB-1/resourceGroups/RG-Web/providers/Microsoft.Compute/virtualMachineScaleSets/Web01",
        )
        .unwrap();
        assert_eq!(id, ScaleSetId::new("sub-1", "rg-web", "web01"));
        assert_eq!(id.key(), "sub-1:rg-web:web01");
        assert_eq!(ScaleSetId::from_key(&id.key()), Some(id.clone()));
        assert_eq!(ScaleSetId::parse(&id.resource_id()), Ok(id));
    }

    #[test]
    fn instance_ids_parse_from_vm_resource_ids() {
        let vm = InstanceRef::parse(
            "/subscriptions/s/resourcegroups/rg/providers/microsoft.compute/virtualmachinescalesets/web/virtualMachines/17",
        )
        .unwrap();
        assert_eq!(vm.instance_id, "17");
        assert_eq!(vm.scale_set.name, "web");
        assert_eq!(InstanceRef::parse(&vm.resource_id()), Ok(vm));
    }

    #[test]
    fn flexible_vms_are_plain_vm_ids_keyed_by_their_name() {
        let vm = VmRef::parse(
            "/subscriptions/S/resourceGroups/RG-Web/providers/Microsoft.Compute/virtualMachines/Web_1A2b3C4d",
        )
        .unwrap();
        assert_eq!(vm.name, "web_1a2b3c4d");
        let set = ScaleSetId::new("s", "rg-web", "web");
        assert!(vm.could_be_in(&set));
        assert!(!vm.could_be_in(&ScaleSetId::new("s", "rg-other", "web")));
        let instance = vm.in_scale_set(&set);
        assert_eq!(instance.instance_id, "web_1a2b3c4d");
        assert_eq!(instance.scale_set, set);
        assert_eq!(
            Orchestration::parse(Some("Flexible")),
            Orchestration::Flexible
        );
        assert_eq!(Orchestration::parse(None), Orchestration::Uniform);
    }

    #[test]
    fn malformed_ids_say_what_is_wrong() {
        for (id, needle) in [
            ("subscriptions/s", "must start with"),
            ("/subscriptions/s//resourceGroups", "empty segment"),
            (
                "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/v",
                "expected /subscriptions",
            ),
            (
                "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/w/extra",
                "trailing",
            ),
        ] {
            let err = ScaleSetId::parse(id).unwrap_err();
            assert!(err.to_string().contains(needle), "{id}: {err}");
        }
        assert!(InstanceRef::parse(
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/w"
        )
        .is_err());
        assert!(VmRef::parse(
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/w/virtualMachines/1"
        )
        .is_err());
        // What would be a table key never carries what table keys refuse.
        let long = "a".repeat(81);
        for key in ["a#b", "a?b", "a\\b", "a\u{7}b", "a b", long.as_str()] {
            let vm = format!("/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/{key}");
            assert!(VmRef::parse(&vm).is_err(), "{key:?}");
            let instance = format!("/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/w/virtualMachines/{key}");
            assert!(InstanceRef::parse(&instance).is_err(), "{key:?}");
        }
        assert!(InstanceRef::parse(
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/w/virtualMachines/Web_1a2B.x-y"
        )
        .is_ok());
        assert_eq!(ScaleSetId::from_key("a:b"), None);
        assert_eq!(ScaleSetId::from_key("a:b:c:d"), None);
    }
}
