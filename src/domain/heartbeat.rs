//! Heartbeats (design §2): what a VM says about itself, checked before it is believed.
//!
//! `read` turns an event into a heartbeat or a typed rejection; `admit` checks it against the
//! mirror (is this VM who it claims to be?) and against the stored heartbeat (is it newer?).

use crate::event::{json_kind, parse_time, Event};
use crate::mirror::Instance;
use crate::scaleset::{InstanceRef, ScaleSetId};
use serde::Serialize;
use serde_json::Value;
use time::{Duration, OffsetDateTime};

pub const HEARTBEAT_TYPE: &str = "VmssHealer.Heartbeat";
pub const PRUNELLA_TYPE: &str = "prunella-status";
pub const MAX_DETAIL_BYTES: usize = 1024;
/// IMDS attested documents are about 4 KiB; anything much larger is not one.
const MAX_ATTESTATION_BYTES: usize = 16 * 1024;
/// A VM clock this far ahead would pin its heartbeat in the future and mask later ones.
pub const MAX_CLOCK_SKEW: Duration = Duration::minutes(5);
/// Event Grid gives up on an event after at most 24 hours of retries ("Event Grid message delivery
/// and retry": `eventTimeToLiveInMinutes` is at most 1440), so a reading older than that is not a
/// late delivery: it is a clock a day wrong, or a forgery dated back to look silent.
pub const MAX_EVENT_AGE: Duration = Duration::hours(24);

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "status", rename_all = "UPPERCASE")]
pub enum Status {
    Up,
    Down,
    Maintenance {
        #[serde(with = "time::serde::rfc3339")]
        until: OffsetDateTime,
    },
    /// The platform will terminate, reboot or redeploy the VM at `until` (its scheduled event's
    /// `NotBefore`), and the VM drains meanwhile: never a fault.
    Draining {
        #[serde(with = "time::serde::rfc3339")]
        until: OffsetDateTime,
    },
    /// The VM runs; its application does not yet (it waits for its data disk to be mounted, say):
    /// never healthy, judged by the startup timeout like a VM that never reported.
    Starting,
}

impl Status {
    pub fn label(&self) -> &'static str {
        match self {
            Status::Up => "UP",
            Status::Down => "DOWN",
            Status::Maintenance { .. } => "MAINTENANCE",
            Status::Draining { .. } => "DRAINING",
            Status::Starting => "STARTING",
        }
    }

    /// Until when the VM said it is away on purpose (MAINTENANCE, DRAINING).
    pub fn until(&self) -> Option<OffsetDateTime> {
        match self {
            Status::Maintenance { until } | Status::Draining { until } => Some(*until),
            Status::Up | Status::Down | Status::Starting => None,
        }
    }
}

/// Which agent format the heartbeat came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Origin {
    Agent,
    /// A legacy Prunella agent: no vmId, identified by computer name only.
    Prunella,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::Agent => "agent",
            Origin::Prunella => "prunella",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Heartbeat {
    pub target: InstanceRef,
    pub status: Status,
    /// When the VM took the reading.
    #[serde(with = "time::serde::rfc3339")]
    pub event_time: OffsetDateTime,
    /// When we received it.
    #[serde(with = "time::serde::rfc3339")]
    pub received_at: OffsetDateTime,
    pub sequence: Option<i64>,
    pub vm_id: Option<String>,
    pub computer_name: Option<String>,
    pub detail: Option<String>,
    pub origin: Origin,
    pub event_id: String,
    /// When the current run of DOWN readings began (kept by the state layer across writes);
    /// `None` unless the status is DOWN.
    #[serde(with = "time::serde::rfc3339::option")]
    pub down_since: Option<OffsetDateTime>,
    /// The platform vouched for the source (a verified IMDS attested document): see
    /// [`crate::attestation`].
    pub attested: bool,
    /// The attested document sent with the heartbeat (base64 PKCS#7), until it is checked; not
    /// stored.
    #[serde(skip)]
    pub attestation: Option<String>,
}

/// How far a heartbeat's source has proven it is the VM it speaks for. Ordered: a policy names
/// the least proof a heartbeat needs to be believed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Proof {
    /// Only the computer name matches the mirror (legacy Prunella agents): any host on the
    /// network can learn it.
    Name,
    /// The IMDS `vmId` matches the mirror: known to the VM itself and to readers of the scale
    /// set in ARM.
    VmId,
    /// The platform signed the VM's identity for this very heartbeat (IMDS attested document).
    Attested,
}

impl Proof {
    pub fn as_str(self) -> &'static str {
        match self {
            Proof::Name => "name",
            Proof::VmId => "vmid",
            Proof::Attested => "attested",
        }
    }
}

impl std::str::FromStr for Proof {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "name" => Ok(Proof::Name),
            "vmid" => Ok(Proof::VmId),
            "attested" => Ok(Proof::Attested),
            other => Err(format!("`{other}` is not name, vmid or attested")),
        }
    }
}

impl Heartbeat {
    /// What the source proved, once [`verify`] accepted it.
    pub fn proof(&self) -> Proof {
        match self.origin {
            Origin::Agent if self.attested => Proof::Attested,
            Origin::Agent => Proof::VmId,
            Origin::Prunella => Proof::Name,
        }
    }
}

/// Why a heartbeat is refused. Each is permanent: redelivering the event cannot fix it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Rejection {
    #[error("heartbeat has no subject")]
    MissingSubject,
    #[error("heartbeat subject is not a scale set VM id: {0}")]
    BadSubject(String),
    #[error("heartbeat has no eventTime/time")]
    MissingTime,
    #[error("heartbeat eventTime {event_time} is more than 5 minutes ahead of the receiver's clock ({now})")]
    FromTheFuture { event_time: String, now: String },
    #[error("heartbeat eventTime {event_time} is more than 24 hours before it was received ({now}): no delivery is that late")]
    TooOld { event_time: String, now: String },
    #[error("heartbeat eventTime {event_time} for {instance} is before the instance was created ({created})")]
    BeforeCreation {
        instance: String,
        event_time: String,
        created: String,
    },
    #[error("heartbeat for {instance} proves only `{proof}`; its scale set requires `{required}` (HEALER_DOWN_PROOF){hint}")]
    InsufficientProof {
        instance: String,
        proof: &'static str,
        required: &'static str,
        hint: &'static str,
    },
    #[error("heartbeat data is a JSON {0}, expected an object")]
    DataNotAnObject(&'static str),
    #[error("heartbeat data.status is missing")]
    MissingStatus,
    #[error("heartbeat data.status `{0}` is not UP, DOWN, MAINTENANCE or DRAINING")]
    UnknownStatus(String),
    #[error("{status} heartbeat needs data.until as an RFC 3339 time, got {got}")]
    BadUntil { status: &'static str, got: String },
    #[error("heartbeat data.{field} has the wrong type: {why}")]
    BadField { field: &'static str, why: String },
    #[error("heartbeat data.detail is {0} bytes, at most 1024 are allowed")]
    DetailTooLong(usize),
    #[error(
        "Prunella heartbeat data.name `{0}` does not end in a 6-character base-36 instance number"
    )]
    BadComputerName(String),
    #[error("scale set {0} is not watched by this healer (HEALER_SCALE_SETS)")]
    UnknownScaleSet(String),
    #[error("instance {0} is not in the mirror of its scale set")]
    UnknownInstance(String),
    #[error("vmId `{claimed}` does not match the mirrored vmId of {instance}: possible spoof")]
    VmIdMismatch { instance: String, claimed: String },
    #[error("heartbeat for {0} carries no vmId; agents must send the VM's IMDS vmId")]
    MissingVmId(String),
    #[error("computer name `{claimed}` does not match the mirrored computer name of {instance}")]
    ComputerNameMismatch { instance: String, claimed: String },
    #[error("the attested document sent for {instance} is refused: {why}; possible spoof")]
    AttestationRefused { instance: String, why: String },
}

impl Rejection {
    /// A short, constant label for logs and counters.
    pub fn label(&self) -> &'static str {
        match self {
            Rejection::MissingSubject => "missing_subject",
            Rejection::BadSubject(_) => "bad_subject",
            Rejection::MissingTime => "missing_time",
            Rejection::FromTheFuture { .. } => "from_the_future",
            Rejection::TooOld { .. } => "too_old",
            Rejection::BeforeCreation { .. } => "before_creation",
            Rejection::InsufficientProof { .. } => "insufficient_proof",
            Rejection::DataNotAnObject(_) => "data_not_object",
            Rejection::MissingStatus => "missing_status",
            Rejection::UnknownStatus(_) => "unknown_status",
            Rejection::BadUntil { .. } => "bad_until",
            Rejection::BadField { .. } => "bad_field",
            Rejection::DetailTooLong(_) => "detail_too_long",
            Rejection::BadComputerName(_) => "bad_computer_name",
            Rejection::UnknownScaleSet(_) => "unknown_scale_set",
            Rejection::UnknownInstance(_) => "unknown_instance",
            Rejection::VmIdMismatch { .. } => "vm_id_mismatch",
            Rejection::MissingVmId(_) => "missing_vm_id",
            Rejection::ComputerNameMismatch { .. } => "computer_name_mismatch",
            Rejection::AttestationRefused { .. } => "attestation_refused",
        }
    }
}

/// Reads a heartbeat event (either agent format). `now` is the receive time.
pub fn read(event: &Event, now: OffsetDateTime) -> Result<Heartbeat, Rejection> {
    let subject = event.subject.as_deref().ok_or(Rejection::MissingSubject)?;
    let data = match &event.data {
        Value::Object(map) => map,
        other => return Err(Rejection::DataNotAnObject(json_kind(other))),
    };
    let event_time = event.time.ok_or(Rejection::MissingTime)?;
    if event_time - now > MAX_CLOCK_SKEW {
        return Err(Rejection::FromTheFuture {
            event_time: fmt(event_time),
            now: fmt(now),
        });
    }
    if now - event_time > MAX_EVENT_AGE {
        return Err(Rejection::TooOld {
            event_time: fmt(event_time),
            now: fmt(now),
        });
    }
    let status_text = optional_str(data, "status")?.ok_or(Rejection::MissingStatus)?;
    let is_prunella = event.event_type.eq_ignore_ascii_case(PRUNELLA_TYPE);
    let status = match status_text.trim().to_ascii_uppercase().as_str() {
        "UP" => Status::Up,
        "DOWN" => Status::Down,
        "STARTING" if !is_prunella => Status::Starting,
        word @ ("MAINTENANCE" | "DRAINING") if !is_prunella => {
            let until = data.get("until");
            let parsed = until.and_then(Value::as_str).and_then(parse_time);
            let until = parsed.ok_or_else(|| Rejection::BadUntil {
                status: if word == "DRAINING" {
                    "DRAINING"
                } else {
                    "MAINTENANCE"
                },
                got: until.map_or("nothing".into(), Value::to_string),
            })?;
            if word == "DRAINING" {
                Status::Draining { until }
            } else {
                Status::Maintenance { until }
            }
        }
        _ => return Err(Rejection::UnknownStatus(status_text.to_string())),
    };
    let detail = optional_str(data, "detail")?.map(str::to_string);
    if let Some(d) = &detail {
        if d.len() > MAX_DETAIL_BYTES {
            return Err(Rejection::DetailTooLong(d.len()));
        }
    }

    let (target, origin, computer_name) = if is_prunella {
        let set = ScaleSetId::parse(subject).map_err(|e| Rejection::BadSubject(e.to_string()))?;
        let name = optional_str(data, "name")?
            .ok_or_else(|| Rejection::BadComputerName(String::new()))?
            .to_string();
        let instance_id = prunella_instance_id(&name)?;
        (set.instance(&instance_id), Origin::Prunella, Some(name))
    } else {
        let target =
            InstanceRef::parse(subject).map_err(|e| Rejection::BadSubject(e.to_string()))?;
        let name = optional_str(data, "computerName")?.map(str::to_string);
        (target, Origin::Agent, name)
    };

    let sequence = match data.get("sequence") {
        None | Some(Value::Null) => None,
        Some(v) => Some(v.as_i64().ok_or_else(|| Rejection::BadField {
            field: "sequence",
            why: format!("expected a whole number, got {v}"),
        })?),
    };

    let attestation = optional_str(data, "attestation")?.map(str::to_string);
    if attestation
        .as_ref()
        .is_some_and(|a| a.len() > MAX_ATTESTATION_BYTES)
    {
        return Err(Rejection::BadField {
            field: "attestation",
            why: format!("longer than {MAX_ATTESTATION_BYTES} bytes"),
        });
    }

    Ok(Heartbeat {
        target,
        status,
        event_time,
        received_at: now,
        sequence,
        vm_id: optional_str(data, "vmId")?.map(|s| s.to_ascii_lowercase()),
        computer_name,
        detail,
        origin,
        event_id: event.id.clone(),
        down_since: None,
        attested: false,
        attestation,
    })
}

/// VMSS computer names end in the instance id as six base-36 digits.
fn prunella_instance_id(name: &str) -> Result<String, Rejection> {
    let bad = || Rejection::BadComputerName(name.to_string());
    let digits = name
        .len()
        .checked_sub(6)
        .and_then(|start| name.get(start..))
        .ok_or_else(bad)?;
    u64::from_str_radix(digits, 36)
        .map(|n| n.to_string())
        .map_err(|_| bad())
}

/// Checks the heartbeat's claimed identity against the mirrored instance (design §2); returns
/// that instance.
pub fn verify<'a>(
    hb: &Heartbeat,
    mirrored: Option<&'a Instance>,
) -> Result<&'a Instance, Rejection> {
    let instance = mirrored.ok_or_else(|| Rejection::UnknownInstance(hb.target.to_string()))?;
    match hb.origin {
        Origin::Agent => {
            let claimed = hb
                .vm_id
                .as_deref()
                .ok_or_else(|| Rejection::MissingVmId(hb.target.to_string()))?;
            let matches = instance
                .vm_id
                .as_deref()
                .is_some_and(|m| m.eq_ignore_ascii_case(claimed));
            if !matches {
                return Err(Rejection::VmIdMismatch {
                    instance: hb.target.to_string(),
                    claimed: claimed.to_string(),
                });
            }
        }
        Origin::Prunella => {
            let claimed = hb.computer_name.as_deref().unwrap_or_default();
            let matches = instance
                .computer_name
                .as_deref()
                .is_some_and(|m| m.eq_ignore_ascii_case(claimed));
            if !matches {
                return Err(Rejection::ComputerNameMismatch {
                    instance: hb.target.to_string(),
                    claimed: claimed.to_string(),
                });
            }
        }
    }
    Ok(instance)
}

/// After [`verify`] and the attestation check: is the heartbeat believable for this instance at
/// all? It must prove at least what the scale set requires — a heartbeat that proves less would
/// otherwise decide how silence is judged (an UP dated long ago has a new VM replaced as silent;
/// one dated ahead hides a broken VM) — and it cannot be older than the VM it speaks for.
pub fn admit(hb: &Heartbeat, instance: &Instance, required: Proof) -> Result<(), Rejection> {
    let proof = hb.proof();
    if proof < required {
        return Err(Rejection::InsufficientProof {
            instance: hb.target.to_string(),
            proof: proof.as_str(),
            required: required.as_str(),
            hint: match proof {
                Proof::Name => ": a computer name is public; accept it only while migrating a scale set from Prunella (`…/<vmss>[DOWN_PROOF=name]` in HEALER_SCALE_SETS)",
                _ => ": the agent must send its IMDS attested document (install it with `--attest`)",
            },
        });
    }
    if let Some(created) = instance.created_at {
        if hb.event_time < created - MAX_CLOCK_SKEW {
            return Err(Rejection::BeforeCreation {
                instance: hb.target.to_string(),
                event_time: fmt(hb.event_time),
                created: fmt(created),
            });
        }
    }
    Ok(())
}

/// Event Grid is at-least-once and unordered: only a reading newer than the stored one counts.
/// Equal times are broken by the sequence number, when both have one.
///
/// Proof comes before time: a heartbeat that proves less never supersedes one that proved more
/// (a hostname-only UP dated ahead would otherwise mask the real agent's DOWN), and one that
/// proves more supersedes a weaker one whatever their times. Proof beyond what the scale set
/// requires (and beyond a vmId) does not rank: an agent whose attested document failed once
/// still supersedes its own earlier attested readings, or its row would freeze and fall silent.
pub fn supersedes(new: &Heartbeat, stored: &Heartbeat, required: Proof) -> bool {
    let rank = |hb: &Heartbeat| hb.proof().min(required.max(Proof::VmId));
    match rank(new).cmp(&rank(stored)) {
        std::cmp::Ordering::Greater => return true,
        std::cmp::Ordering::Less => return false,
        std::cmp::Ordering::Equal => {}
    }
    match new.event_time.cmp(&stored.event_time) {
        std::cmp::Ordering::Greater => true,
        std::cmp::Ordering::Less => false,
        std::cmp::Ordering::Equal => match (new.sequence, stored.sequence) {
            (Some(a), Some(b)) => a > b,
            _ => false,
        },
    }
}

fn optional_str<'a>(
    data: &'a serde_json::Map<String, Value>,
    field: &'static str,
) -> Result<Option<&'a str>, Rejection> {
    match data.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(other) => Err(Rejection::BadField {
            field,
            why: format!("expected a string, got a {}", json_kind(other)),
        }),
    }
}

fn fmt(t: OffsetDateTime) -> String {
    t.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| t.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::decode;
    use crate::mirror::fixtures::instance;
    use serde_json::json;
    use time::macros::datetime;

    const NOW: OffsetDateTime = datetime!(2026-11-22 10:52:30 UTC);
    const SET: &str =
        "/subscriptions/S/resourceGroups/RG/providers/Microsoft.Compute/virtualMachineScaleSets/web";

    fn agent(status: Value) -> Event {
        decode(json!({"id": "e", "eventType": HEARTBEAT_TYPE, "subject": format!("{SET}/virtualMachines/7"),
            "eventTime": "2026-11-22T10:52:00Z", "dataVersion": "1",
            "data": {"status": status, "vmId": "VM-7", "computerName": "web000007", "sequence": 12}}))
        .unwrap()
    }

    #[test]
    fn agent_heartbeats_read_with_every_field() {
        let hb = read(&agent(json!("up")), NOW).unwrap();
        assert_eq!(hb.target.instance_id, "7");
        assert_eq!(hb.target.scale_set.name, "web");
        assert_eq!(hb.status, Status::Up);
        assert_eq!(hb.vm_id.as_deref(), Some("vm-7"));
        assert_eq!(hb.sequence, Some(12));
        assert_eq!(hb.origin, Origin::Agent);
        assert_eq!(
            read(&agent(json!("Down")), NOW).unwrap().status,
            Status::Down
        );
    }

    #[test]
    fn starting_is_read_from_agents_only() {
        assert_eq!(
            read(&agent(json!("Starting")), NOW).unwrap().status,
            Status::Starting
        );
        let mut prunella = agent(json!("STARTING"));
        prunella.event_type = PRUNELLA_TYPE.into();
        assert!(
            read(&prunella, NOW).is_err(),
            "Prunella agents say UP or DOWN"
        );
    }

    #[test]
    fn maintenance_needs_an_until_time() {
        let mut e = agent(json!("MAINTENANCE"));
        assert!(matches!(read(&e, NOW), Err(Rejection::BadUntil { .. })));
        e.data["until"] = json!("2026-11-22T11:30:00Z");
        assert_eq!(
            read(&e, NOW).unwrap().status,
            Status::Maintenance {
                until: datetime!(2026-11-22 11:30 UTC)
            }
        );
    }

    #[test]
    fn draining_needs_an_until_time_and_is_said_so() {
        let mut e = agent(json!("draining"));
        let refused = read(&e, NOW).unwrap_err();
        assert!(
            refused
                .to_string()
                .starts_with("DRAINING heartbeat needs data.until"),
            "{refused}"
        );
        e.data["until"] = json!("2026-11-22T11:35:00Z");
        let hb = read(&e, NOW).unwrap();
        assert_eq!(
            hb.status,
            Status::Draining {
                until: datetime!(2026-11-22 11:35 UTC)
            }
        );
        assert_eq!(hb.status.label(), "DRAINING");
        assert_eq!(hb.status.until(), Some(datetime!(2026-11-22 11:35 UTC)));
        // Prunella agents know UP and DOWN only.
        let p = decode(
            json!({"id": "p", "eventType": "prunella-status", "subject": SET,
            "eventTime": "2026-11-22T10:52:00Z",
            "data": {"name": "web00000A", "status": "DRAINING", "until": "2026-11-22T11:35:00Z"}}),
        )
        .unwrap();
        assert!(matches!(read(&p, NOW), Err(Rejection::UnknownStatus(_))));
    }

    #[test]
    fn bad_heartbeats_are_rejected_with_a_reason() {
        type Mutation = Box<dyn Fn(&mut Event)>;
        let cases: Vec<(Mutation, &str)> = vec![
            (
                Box::new(|e| e.data["status"] = json!("SLEEPY")),
                "unknown_status",
            ),
            (Box::new(|e| e.data["status"] = json!(1)), "bad_field"),
            (
                Box::new(|e| {
                    e.data.as_object_mut().unwrap().remove("status");
                }),
                "missing_status",
            ),
            (
                Box::new(|e| e.data["detail"] = json!("x".repeat(1025))),
                "detail_too_long",
            ),
            (Box::new(|e| e.data["sequence"] = json!("12")), "bad_field"),
            (Box::new(|e| e.data = json!("UP")), "data_not_object"),
            (Box::new(|e| e.subject = None), "missing_subject"),
            (Box::new(|e| e.subject = Some(SET.into())), "bad_subject"),
            (Box::new(|e| e.time = None), "missing_time"),
            (
                Box::new(|e| e.time = Some(NOW + Duration::minutes(6))),
                "from_the_future",
            ),
            (
                Box::new(|e| e.time = Some(NOW - MAX_EVENT_AGE - Duration::SECOND)),
                "too_old",
            ),
        ];
        for (mutate, label) in cases {
            let mut e = agent(json!("UP"));
            mutate(&mut e);
            let err = read(&e, NOW).unwrap_err();
            assert_eq!(err.label(), label, "{err}");
        }
        let mut e = agent(json!("UP"));
        e.time = Some(NOW + Duration::minutes(4));
        assert!(read(&e, NOW).is_ok(), "small clock skew is tolerated");
        e.time = Some(NOW - MAX_EVENT_AGE + Duration::SECOND);
        assert!(
            read(&e, NOW).is_ok(),
            "a delivery late by Event Grid's retries is read"
        );
    }

    #[test]
    fn prunella_heartbeats_name_the_instance_by_computer_name() {
        let e = decode(
            json!({"id": "p", "eventType": "prunella-status", "subject": SET,
            "eventTime": "2026-11-22T10:52:00Z", "data": {"name": "web00000A", "status": "DOWN"}}),
        )
        .unwrap();
        let hb = read(&e, NOW).unwrap();
        assert_eq!(hb.target.instance_id, "10");
        assert_eq!(hb.origin, Origin::Prunella);
        assert_eq!(hb.status, Status::Down);
        let mut short = e.clone();
        short.data["name"] = json!("web");
        assert_eq!(read(&short, NOW).unwrap_err().label(), "bad_computer_name");
        let mut maint = e.clone();
        maint.data["status"] = json!("MAINTENANCE");
        assert_eq!(read(&maint, NOW).unwrap_err().label(), "unknown_status");
    }

    #[test]
    fn identity_is_checked_against_the_mirror() {
        let hb = read(&agent(json!("DOWN")), NOW).unwrap();
        let mut mirrored = instance("7");
        mirrored.vm_id = Some("vm-7".into());
        assert_eq!(verify(&hb, Some(&mirrored)), Ok(&mirrored));
        assert_eq!(verify(&hb, None).unwrap_err().label(), "unknown_instance");
        mirrored.vm_id = Some("vm-other".into());
        assert_eq!(
            verify(&hb, Some(&mirrored)).unwrap_err().label(),
            "vm_id_mismatch"
        );
        let mut anonymous = hb.clone();
        anonymous.vm_id = None;
        assert_eq!(
            verify(&anonymous, Some(&mirrored)).unwrap_err().label(),
            "missing_vm_id"
        );

        let mut prunella = hb.clone();
        prunella.origin = Origin::Prunella;
        prunella.computer_name = Some("WEB000007".into());
        let mut mirrored = instance("7");
        mirrored.computer_name = Some("web000007".into());
        assert_eq!(verify(&prunella, Some(&mirrored)), Ok(&mirrored));
        mirrored.computer_name = Some("web000008".into());
        assert_eq!(
            verify(&prunella, Some(&mirrored)).unwrap_err().label(),
            "computer_name_mismatch"
        );
    }

    #[test]
    fn only_newer_readings_supersede() {
        let old = read(&agent(json!("UP")), NOW).unwrap();
        let mut newer = old.clone();
        newer.event_time += Duration::seconds(1);
        assert!(supersedes(&newer, &old, Proof::VmId));
        assert!(!supersedes(&old, &newer, Proof::VmId));
        let mut same_time_higher_seq = old.clone();
        same_time_higher_seq.sequence = Some(13);
        assert!(supersedes(&same_time_higher_seq, &old, Proof::VmId));
        assert!(
            !supersedes(&old, &old, Proof::VmId),
            "a duplicate delivery is not newer"
        );
    }

    #[test]
    fn a_reading_that_proves_less_never_supersedes_one_that_proved_more() {
        let vmid = read(&agent(json!("DOWN")), NOW).unwrap();
        let mut name = vmid.clone();
        name.origin = Origin::Prunella;
        name.status = Status::Up;
        let mut attested = vmid.clone();
        attested.attested = true;
        let later = |hb: &Heartbeat| {
            let mut hb = hb.clone();
            hb.event_time += MAX_CLOCK_SKEW;
            hb
        };
        // (new, stored, required, supersedes)
        let cases = [
            (later(&name), &vmid, Proof::Name, false),
            (vmid.clone(), &later(&name), Proof::Name, true),
            (later(&vmid), &attested, Proof::Attested, false),
            (vmid.clone(), &later(&attested), Proof::Attested, false),
            (attested.clone(), &later(&vmid), Proof::Attested, true),
            // Where attestation is not required it does not rank: time decides.
            (later(&vmid), &attested, Proof::VmId, true),
            (vmid.clone(), &later(&attested), Proof::VmId, false),
            (later(&vmid), &attested, Proof::Name, true),
        ];
        for (i, (new, stored, required, expected)) in cases.iter().enumerate() {
            assert_eq!(
                supersedes(new, stored, *required),
                *expected,
                "case {i}: {:?} over {:?} under {required:?}",
                new.proof(),
                stored.proof()
            );
        }
    }

    #[test]
    fn a_reading_needs_the_required_proof_and_cannot_predate_its_vm() {
        let hb = read(&agent(json!("UP")), NOW).unwrap();
        let mut mirrored = instance("7");
        mirrored.created_at = Some(hb.event_time - Duration::hours(1));
        assert_eq!(admit(&hb, &mirrored, Proof::VmId), Ok(()));
        assert_eq!(admit(&hb, &mirrored, Proof::Name), Ok(()));
        let err = admit(&hb, &mirrored, Proof::Attested).unwrap_err();
        assert_eq!(err.label(), "insufficient_proof");
        assert!(err.to_string().contains("--attest"), "{err}");

        let mut name = hb.clone();
        name.origin = Origin::Prunella;
        let err = admit(&name, &mirrored, Proof::VmId).unwrap_err();
        assert_eq!(err.label(), "insufficient_proof");
        assert!(err.to_string().contains("DOWN_PROOF=name"), "{err}");
        assert_eq!(admit(&name, &mirrored, Proof::Name), Ok(()));

        // A VM clock a little behind is tolerated; a reading from before the VM existed is not.
        mirrored.created_at = Some(hb.event_time + MAX_CLOCK_SKEW - Duration::SECOND);
        assert_eq!(admit(&hb, &mirrored, Proof::VmId), Ok(()));
        mirrored.created_at = Some(hb.event_time + MAX_CLOCK_SKEW + Duration::SECOND);
        assert_eq!(
            admit(&hb, &mirrored, Proof::VmId).unwrap_err().label(),
            "before_creation"
        );
        mirrored.created_at = None;
        assert_eq!(admit(&hb, &mirrored, Proof::VmId), Ok(()));
    }
}
