//! Stateful instances (issue 18): what belongs to an instance's *slot* rather than to the VM — its
//! data disks (by LUN) and its address — and must follow it when the VM is replaced, as the EC2
//! Autoheal pattern's lifecycle hook carries a volume and an Elastic IP to the new instance.
//!
//! The policy is a per-set override (`STATEFUL_DISKS`, `STATEFUL_ADDRESS`, `STATEFUL_ZONE_COPY`),
//! checked at startup; a slot is a row of table `slots`, created when the set is first mirrored,
//! so what it holds survives restarts and the VM it follows.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;
use time::OffsetDateTime;

/// Which address follows the slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Address {
    /// None: the new VM takes whatever address it is given.
    #[default]
    None,
    /// The standalone public IP of the VM's NIC (Flexible scale sets only: a Uniform set's NICs
    /// are the scale set's model, not resources of their own).
    PublicIp,
    /// The static private IP of the VM's NIC (Flexible only, for the same reason).
    PrivateIp,
}

impl Address {
    pub fn as_str(self) -> &'static str {
        match self {
            Address::None => "none",
            Address::PublicIp => "public-ip",
            Address::PrivateIp => "private-ip",
        }
    }
}

impl FromStr for Address {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "none" => Ok(Address::None),
            "public-ip" => Ok(Address::PublicIp),
            "private-ip" => Ok(Address::PrivateIp),
            other => Err(format!(
                "`{other}` is not an address to carry (none, public-ip or private-ip)"
            )),
        }
    }
}

/// A scale set's stateful policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Stateful {
    /// The LUNs of the data disks that belong to the slot (sorted, unique).
    pub luns: Vec<u32>,
    pub address: Address,
    /// Whether a disk may be copied (by snapshot) into the zone the new VM landed in; if not, a
    /// replacement in another zone is refused with the reason.
    pub zone_copy: bool,
}

impl Stateful {
    /// A policy that carries nothing is no policy.
    pub fn carries_anything(&self) -> bool {
        !self.luns.is_empty() || self.address != Address::None
    }

    /// Whether this policy can work on a scale set of this orchestration mode; the reason if not.
    pub fn refusal(&self, flexible: bool) -> Option<String> {
        (self.address != Address::None && !flexible).then(|| {
            format!(
                "STATEFUL_ADDRESS={} needs a Flexible scale set: a Uniform set's network interfaces belong to its model, so no address can move from one instance to another",
                self.address.as_str()
            )
        })
    }
}

impl fmt::Display for Stateful {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let luns: Vec<String> = self.luns.iter().map(u32::to_string).collect();
        write!(
            f,
            "disks at LUN {}, address {}, zone copy {}",
            if luns.is_empty() {
                "none".to_string()
            } else {
                luns.join(",")
            },
            self.address.as_str(),
            if self.zone_copy { "allowed" } else { "refused" }
        )
    }
}

/// Reads `STATEFUL_DISKS` (LUNs, `0,1`): each 0 to 63 (Azure's LUN range), none twice.
pub fn parse_luns(raw: &str) -> Result<Vec<u32>, String> {
    let mut luns = Vec::new();
    for part in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let lun: u32 = part
            .parse()
            .map_err(|_| format!("`{part}` is not a LUN (a whole number from 0 to 63)"))?;
        if lun > 63 {
            return Err(format!("LUN {lun} is out of range (0 to 63)"));
        }
        if luns.contains(&lun) {
            return Err(format!("LUN {lun} is listed twice"));
        }
        luns.push(lun);
    }
    if luns.is_empty() {
        return Err("no LUN given".into());
    }
    luns.sort_unstable();
    Ok(luns)
}

/// One data disk of a slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlotDisk {
    pub lun: u32,
    /// The managed disk's resource id.
    pub id: String,
    /// Its zone, if zonal.
    #[serde(default)]
    pub zone: Option<String>,
}

/// What follows one instance's slot across replacements (a row of table `slots`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Slot {
    /// `slot-<n>`: unique in its scale set, never reused.
    pub id: String,
    /// The instance that holds it now.
    pub instance: String,
    pub disks: Vec<SlotDisk>,
    /// The public IP's resource id, or the static private address, that follows it.
    #[serde(default)]
    pub address: Option<String>,
    /// The zone of the instance that holds it.
    #[serde(default)]
    pub zone: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub updated: OffsetDateTime,
}

impl Slot {
    pub fn disk_ids(&self) -> impl Iterator<Item = &str> {
        self.disks.iter().map(|d| d.id.as_str())
    }
}

/// The slot an unslotted instance gets when its set is mirrored: its disks at the policy's LUNs.
/// `None` when it has none of them (a VM just created, whose disks a replacement brings).
pub fn slot_for(
    id: String,
    instance: &str,
    zone: Option<&str>,
    disks: &[(u32, String)],
    policy: &Stateful,
    now: OffsetDateTime,
) -> Option<Slot> {
    let carried: Vec<SlotDisk> = policy
        .luns
        .iter()
        .filter_map(|lun| {
            disks
                .iter()
                .find(|(l, _)| l == lun)
                .map(|(_, disk)| SlotDisk {
                    lun: *lun,
                    id: disk.clone(),
                    zone: zone.map(str::to_string),
                })
        })
        .collect();
    if carried.is_empty() {
        return None;
    }
    Some(Slot {
        id,
        instance: instance.to_string(),
        disks: carried,
        address: None,
        zone: zone.map(str::to_string),
        updated: now,
    })
}

/// The slots a mirror read adds: one for each instance that has disks at the policy's LUNs and
/// neither holds a slot nor has disks a slot already names (a replacement moves those).
pub fn new_slots(
    existing: &[Slot],
    instances: &[crate::mirror::Instance],
    policy: &Stateful,
    now: OffsetDateTime,
) -> Vec<Slot> {
    let mut slots: Vec<Slot> = existing.to_vec();
    let mut added = Vec::new();
    for i in instances {
        let held = slots.iter().any(|s| s.instance == i.instance_id);
        let named = i.data_disks.iter().any(|(_, disk)| {
            slots
                .iter()
                .any(|s| s.disk_ids().any(|d| d.eq_ignore_ascii_case(disk)))
        });
        if held || named {
            continue;
        }
        let id = next_slot_id(slots.iter().map(|s| s.id.as_str()));
        if let Some(slot) = slot_for(
            id,
            &i.instance_id,
            i.zone.as_deref(),
            &i.data_disks,
            policy,
            now,
        ) {
            slots.push(slot.clone());
            added.push(slot);
        }
    }
    added
}

/// The next slot id in a set that has these.
pub fn next_slot_id<'a>(existing: impl Iterator<Item = &'a str>) -> String {
    let n = existing
        .filter_map(|id| id.strip_prefix("slot-"))
        .filter_map(|n| n.parse::<u32>().ok())
        .map(|n| n + 1)
        .max()
        .unwrap_or(0);
    format!("slot-{n}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn luns_parse_in_azures_range_once_each() {
        assert_eq!(parse_luns("1, 0").unwrap(), vec![0, 1]);
        for (bad, why) in [
            ("64", "out of range"),
            ("0,0", "twice"),
            ("a", "not a LUN"),
            ("", "no LUN"),
        ] {
            assert!(parse_luns(bad).unwrap_err().contains(why), "{bad}");
        }
    }

    #[test]
    fn an_address_moves_only_on_flexible_sets() {
        let p = |address| Stateful {
            luns: vec![0],
            address,
            zone_copy: true,
        };
        assert!(p(Address::PublicIp)
            .refusal(false)
            .unwrap()
            .contains("Flexible"));
        assert_eq!(p(Address::PublicIp).refusal(true), None);
        assert_eq!(p(Address::None).refusal(false), None);
        assert_eq!("PUBLIC-IP".parse::<Address>(), Ok(Address::PublicIp));
        assert!("elastic".parse::<Address>().is_err());
    }

    #[test]
    fn a_slot_takes_the_disks_at_the_policys_luns_only() {
        let now = datetime!(2026-12-02 10:00 UTC);
        let policy = Stateful {
            luns: vec![0, 2],
            address: Address::None,
            zone_copy: true,
        };
        let disks = vec![(0, "d0".to_string()), (1, "scratch".to_string())];
        let slot = slot_for("slot-0".into(), "3", Some("1"), &disks, &policy, now).unwrap();
        assert_eq!(slot.disk_ids().collect::<Vec<_>>(), vec!["d0"]);
        assert_eq!(slot.disks[0].zone.as_deref(), Some("1"));
        assert_eq!(
            slot_for("slot-1".into(), "4", None, &[], &policy, now),
            None,
            "a VM without the slot's disks gets none"
        );
        assert_eq!(
            next_slot_id(["slot-0", "slot-4", "x"].into_iter()),
            "slot-5"
        );
        assert_eq!(next_slot_id(std::iter::empty()), "slot-0");
    }

    #[test]
    fn a_mirror_read_slots_each_stateful_instance_once() {
        let now = datetime!(2026-12-02 10:00 UTC);
        let policy = Stateful {
            luns: vec![0],
            address: Address::None,
            zone_copy: true,
        };
        let vm = |id: &str, disks: &[(u32, &str)]| {
            let mut i = crate::mirror::fixtures::instance(id);
            i.zone = Some("1".into());
            i.data_disks = disks.iter().map(|(l, d)| (*l, d.to_string())).collect();
            i
        };
        let fleet = vec![
            vm("0", &[(0, "D0")]),
            vm("1", &[(0, "d1"), (1, "scratch")]),
            vm("2", &[]),
            vm("3", &[(1, "scratch3")]),
        ];
        let first = new_slots(&[], &fleet, &policy, now);
        let held: Vec<(&str, &str)> = first
            .iter()
            .map(|s| (s.id.as_str(), s.instance.as_str()))
            .collect();
        assert_eq!(held, vec![("slot-0", "0"), ("slot-1", "1")]);
        assert!(
            new_slots(&first, &fleet, &policy, now).is_empty(),
            "slotted once"
        );
        // Mid-replacement the disk is on the new VM 4 before the slot moves: no second slot.
        let moving = vec![vm("4", &[(0, "d0")]), vm("1", &[(0, "d1")])];
        assert!(new_slots(&first, &moving, &policy, now).is_empty());
        // A new stateful VM later gets the next id.
        let later = new_slots(&first, &[vm("9", &[(0, "d9")])], &policy, now);
        assert_eq!(later[0].id, "slot-2");
    }
}
