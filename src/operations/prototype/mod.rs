//! A golden image from a known-good instance (issue 17), after kamino's vmss-prototype: one
//! healthy instance's OS disk becomes a new version of a gallery image definition that the scale
//! set's model then follows, so every future instance boots already patched and warmed.
//!
//! 1. Choose: `--instance`, or `--auto`: the instance ready the longest (at least
//!    `--minimum-ready`), healthy by our verdict, on the latest model, not protected, no incident.
//!    The set must already run a custom image: Azure never lets a scale set change its image type
//!    (409 "The Image type for a Virtual Machine Scale Set may not be changed.").
//! 2. Prepare: hold it; clear its machine state (the agent's `prepare-image`, by Run Command);
//!    deallocate it.
//! 3. Capture: snapshot its OS disk; make sure of the gallery and a definition of its OS and
//!    Hyper-V generation; create the version `YYYY.MMDD.N` from the snapshot (hours, in Azure).
//! 4. Restore: start the instance (reimage it when its preparation left it unable to serve, as
//!    Sysprep does); it must come back healthy by our verdict; release it.
//! 5. Publish: the model follows the definition (`If-Match`); the snapshot goes; versions beyond
//!    `--max-history` (never fewer than 2, never the one the model names) go; `--then-cycle`
//!    starts a rolling upgrade.
//!
//! Any failure before step 5 restores the instance, deletes the snapshot and leaves the model
//! untouched, with an alert; an operator's abort does the same without the alert.
//! Pure: [`advance`] decides; `passes::operate` reads what it asks for (the instance's disk, the
//! definition's versions) and sends its calls one at a time.

#[cfg(test)]
mod tests;

use super::step::{self, Advance, CallState, Note, Progress, Status};
use super::{Operation, State};
use crate::heartbeat::Heartbeat;
use crate::mirror::{MirroredInstance, ScaleSetRecord};
use crate::policy::parse_duration;
use crate::scaleset::ScaleSetId;
use crate::verdict::Verdict;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use time::{Duration, OffsetDateTime};

/// What the agent prints once it cleared the VM's machine state; "reimage" in it: the VM cannot
/// serve again without one (Windows' Sysprep).
pub const PREPARED: &str = "machine-specific state cleared";
pub const LINUX_PREPARE: &str = "/opt/vmss-healer/vmss-healer-agent prepare-image";
pub const WINDOWS_PREPARE: &str =
    "& \"$env:ProgramFiles\\vmss-healer\\vmss-healer-agent.ps1\" prepare-image";

/// The parameters, as the operation's row keeps them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Params {
    /// The instance to capture; none: `--auto`.
    pub instance: Option<String>,
    pub gallery: String,
    pub max_history: u32,
    pub minimum_ready_s: i64,
    /// How long each step on the instance may take, its coming back healthy included.
    pub timeout_s: i64,
    /// How long the image version may take to be created.
    pub version_timeout_s: i64,
    pub then_cycle: bool,
    pub dry_run: bool,
}

/// The command line's values, unparsed.
#[derive(Debug, Clone, Default)]
pub struct Raw<'a> {
    pub instance: Option<&'a str>,
    pub auto: bool,
    pub gallery: Option<&'a str>,
    pub max_history: Option<&'a str>,
    pub minimum_ready: Option<&'a str>,
    pub timeout: Option<&'a str>,
    pub version_timeout: Option<&'a str>,
    pub then_cycle: bool,
    pub dry_run: bool,
}

/// The gallery a set's images go to unless `--gallery` names one (kamino's `SIG_<rg>`): gallery
/// names take letters, digits, underscores and periods only.
pub fn default_gallery(set: &ScaleSetId) -> String {
    let rg: String = set
        .resource_group
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
        .collect();
    format!("SIG_{rg}")
}

/// Reads the parameters; every problem at once.
pub fn parse(raw: &Raw, set: &ScaleSetId) -> Result<Params, Vec<String>> {
    let mut problems = Vec::new();
    match (raw.instance, raw.auto) {
        (Some(_), true) => problems.push("--instance and --auto: give one".to_string()),
        (None, false) => problems.push("give --instance ID or --auto".to_string()),
        _ => {}
    }
    let gallery = raw
        .gallery
        .map(str::to_string)
        .unwrap_or_else(|| default_gallery(set));
    let gallery_ok = !gallery.is_empty()
        && gallery.len() <= 80
        && gallery
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.')
        && !gallery.starts_with(['_', '.'])
        && !gallery.ends_with(['_', '.']);
    if !gallery_ok {
        problems.push(format!(
            "--gallery `{gallery}`: letters, digits, and underscores or periods inside, at most 80"
        ));
    }
    let max_history = match raw.max_history.unwrap_or("3").trim().parse::<u32>() {
        Ok(n) if n >= 2 => n,
        _ => {
            problems.push(format!(
                "--max-history `{}`: a whole number, at least 2 (the way back needs the previous image)",
                raw.max_history.unwrap_or("")
            ));
            3
        }
    };
    let mut duration = |name: &str, value: Option<&str>, default: &str| match parse_duration(
        value.unwrap_or(default),
    ) {
        Ok(d) if !d.is_zero() || name == "--minimum-ready" => Some(d),
        Ok(_) => {
            problems.push(format!("{name}: more than zero"));
            None
        }
        Err(e) => {
            problems.push(format!("{name}: {e}"));
            None
        }
    };
    let minimum_ready = duration("--minimum-ready", raw.minimum_ready, "1h");
    let timeout = duration("--timeout", raw.timeout, "30m");
    let version_timeout = duration("--version-timeout", raw.version_timeout, "3h");
    match (minimum_ready, timeout, version_timeout) {
        (Some(m), Some(t), Some(v)) if problems.is_empty() => Ok(Params {
            instance: raw.instance.map(str::to_string),
            gallery,
            max_history,
            minimum_ready_s: m.whole_seconds(),
            timeout_s: t.whole_seconds(),
            version_timeout_s: v.whole_seconds(),
            then_cycle: raw.then_cycle,
            dry_run: raw.dry_run,
        }),
        _ => Err(problems),
    }
}

impl Params {
    pub fn from_stored(v: &serde_json::Value) -> Result<Params, String> {
        serde_json::from_value(v.clone())
            .map_err(|e| format!("stored prototype parameters are unreadable: {e}: {v}"))
    }
}

/// What a call does.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "act", rename_all = "snake_case")]
pub enum Act {
    RunCommand {
        instance: String,
        script: Vec<String>,
        windows: bool,
    },
    Deallocate {
        instance: String,
    },
    Snapshot {
        name: String,
        disk: String,
    },
    /// The gallery and the image definition, created if missing (answered at once).
    EnsureImage {
        gallery: String,
        definition: String,
        os_type: String,
        hyper_v_generation: String,
        #[serde(default = "x64")]
        architecture: String,
    },
    CreateVersion {
        gallery: String,
        definition: String,
        version: String,
        snapshot: String,
    },
    Start {
        instance: String,
    },
    Reimage {
        instance: String,
    },
    /// The model follows this image (with If-Match).
    SetImage {
        image: String,
    },
    DeleteSnapshot {
        name: String,
    },
    DeleteVersion {
        gallery: String,
        definition: String,
        version: String,
    },
}

impl Act {
    pub fn describe(&self) -> String {
        match self {
            Act::RunCommand { instance, .. } => format!("prepare-image on {instance}"),
            Act::Deallocate { instance } => format!("deallocate {instance}"),
            Act::Snapshot { name, .. } => format!("snapshot {name}"),
            Act::EnsureImage {
                gallery,
                definition,
                ..
            } => {
                format!("gallery {gallery} and image definition {definition}")
            }
            Act::CreateVersion { version, .. } => format!("image version {version}"),
            Act::Start { instance } => format!("start {instance}"),
            Act::Reimage { instance } => format!("reimage {instance}"),
            Act::SetImage { image } => format!("model image {image}"),
            Act::DeleteSnapshot { name } => format!("delete snapshot {name}"),
            Act::DeleteVersion { version, .. } => format!("delete image version {version}"),
        }
    }

    /// Whether the same call again changes nothing (a lost answer is then sent again; otherwise
    /// the mirror tells whether it landed).
    fn repeatable(&self) -> bool {
        !matches!(self, Act::Reimage { .. })
    }
}

/// An operator's abort, when it has something to undo: the instance was chosen and the image is
/// not published yet (the model untouched). The instance is restored, nothing is published; the
/// memo that says so, which the next pass acts on.
pub fn abort(op: &Operation) -> Option<serde_json::Value> {
    step::abort(op, Memo::read(op), |m| {
        let undoable = m.failed.is_none()
            && matches!(
                m.stage,
                Stage::Prepare
                    | Stage::Deallocate
                    | Stage::Snapshot
                    | Stage::Version
                    | Stage::Restore
                    | Stage::Back
            );
        m.aborted = undoable;
        undoable
    })
}

/// One call, and where it stands.
pub type Call = super::step::Call<Act>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    #[default]
    Choose,
    Prepare,
    Deallocate,
    Snapshot,
    Version,
    Restore,
    Back,
    Publish,
    Cleanup,
    /// Not published: the snapshot taken for it goes.
    Discard,
}

impl Stage {
    fn label(self) -> &'static str {
        match self {
            Stage::Choose => "choose",
            Stage::Prepare => "prepare",
            Stage::Deallocate => "deallocate",
            Stage::Snapshot => "snapshot",
            Stage::Version => "image version",
            Stage::Restore => "restore",
            Stage::Back => "back healthy",
            Stage::Publish => "publish",
            Stage::Cleanup => "clean up",
            Stage::Discard => "discard the snapshot",
        }
    }
}

/// The instance's disk, as the pass read it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Disk {
    pub os_disk: String,
    pub os_type: String,
    pub hyper_v_generation: Option<String>,
    #[serde(default = "x64")]
    pub architecture: String,
}

fn x64() -> String {
    "x64".into()
}

/// One version of the definition, as the pass listed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Version {
    pub name: String,
    pub state: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Memo {
    #[serde(default)]
    pub stage: Stage,
    #[serde(default)]
    pub instance: String,
    #[serde(default)]
    pub disk: Option<Disk>,
    /// The preparation left the VM unable to serve without a reimage.
    #[serde(default)]
    pub needs_reimage: bool,
    #[serde(default)]
    pub snapshot: Option<String>,
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub calls: Vec<Call>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub deadline: Option<OffsetDateTime>,
    /// When the instance was started again: its heartbeats before do not count.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub restarted_at: Option<OffsetDateTime>,
    #[serde(default)]
    pub reimaged: bool,
    /// Why it failed before publishing: the instance is restored, then the operation fails.
    #[serde(default)]
    pub failed: Option<String>,
    /// The instance was deallocated (or may have been): a failure must start it again.
    #[serde(default)]
    pub touched: bool,
    /// What prepare-image printed.
    #[serde(default)]
    pub output: Option<String>,
    /// An operator aborted it: restored and not published, it ends `aborted`, with no alert.
    #[serde(default)]
    pub aborted: bool,
}

impl Memo {
    pub fn read(op: &Operation) -> Result<Memo, String> {
        if op.memo.is_null() {
            return Ok(Memo::default());
        }
        serde_json::from_value(op.memo.clone())
            .map_err(|e| format!("the prototype's stored progress is unreadable: {e}"))
    }
}

/// What the pass must read before deciding: the instance's disk when preparation begins, the
/// definition's versions before a version is named and when old ones are pruned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Needs {
    Nothing,
    Disk,
    Versions,
}

pub fn needs(op: &Operation) -> Needs {
    let Ok(m) = Memo::read(op) else {
        return Needs::Nothing;
    };
    if op.state != State::Running || !m.calls.is_empty() || m.failed.is_some() {
        return Needs::Nothing;
    }
    match m.stage {
        Stage::Prepare if m.disk.is_none() => Needs::Disk,
        Stage::Version if m.version.is_none() => Needs::Versions,
        Stage::Cleanup => Needs::Versions,
        _ => Needs::Nothing,
    }
}

/// The model write a prototype has sent and not yet seen end: the healer's grows and deletes
/// wait for it (a scale set write preempts a running delete).
pub fn write_in_flight(op: &Operation) -> Option<crate::incident::Call> {
    if op.state.is_over() || op.dry_run {
        return None;
    }
    let memo = Memo::read(op).ok()?;
    memo.calls.iter().find_map(|c| match (&c.act, &c.state) {
        (Act::SetImage { .. }, CallState::Sending { .. } | CallState::Accepted { .. }) => {
            Some(crate::incident::Call::Grow)
        }
        _ => None,
    })
}

/// The first call not ended, if it is unsent: calls go one at a time, in order.
pub fn sendable(memo: &Memo) -> Option<usize> {
    super::step::sendable(&memo.calls)
}

/// What one pass sees.
pub struct View<'a> {
    pub record: Option<&'a ScaleSetRecord>,
    pub instances: &'a [MirroredInstance],
    pub heartbeats: &'a HashMap<String, Heartbeat>,
    pub verdicts: &'a HashMap<&'a str, Verdict>,
    /// Instances with an open incident of the healer's.
    pub incidents: HashSet<&'a str>,
    pub brake: Option<String>,
    pub statuses: &'a HashMap<String, Status>,
    /// A finished command's output, by its status URL.
    pub outputs: &'a HashMap<String, String>,
    pub disk: Option<Result<Disk, String>>,
    pub versions: Option<Result<Vec<Version>, String>>,
    pub settle: Duration,
    pub dry_run: bool,
}

impl View<'_> {
    fn present(&self, id: &str) -> Option<&MirroredInstance> {
        self.instances.iter().find(|m| m.instance.instance_id == id)
    }

    fn healthy(&self, id: &str) -> bool {
        matches!(self.verdicts.get(id), Some(Verdict::Healthy))
    }

    fn back_since(&self, id: &str, since: OffsetDateTime) -> bool {
        self.healthy(id)
            && self
                .heartbeats
                .get(id)
                .is_some_and(|hb| hb.event_time.min(hb.received_at) > since)
    }
}

/// The definition's id in the set's resource group.
pub fn definition_id(set: &ScaleSetId, gallery: &str) -> String {
    format!(
        "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/galleries/{gallery}/images/{}",
        set.subscription,
        set.resource_group,
        definition_name(set)
    )
}

pub fn definition_name(set: &ScaleSetId) -> String {
    format!("{}-prototype", set.name)
}

/// `YYYY.MMDD.N`: unique, and later images always sort higher — a model that follows the
/// definition boots its highest version.
pub fn version_name(now: OffsetDateTime, existing: &[Version]) -> String {
    let prefix = format!("{}.{}{:02}.", now.year(), u8::from(now.month()), now.day());
    let n = existing
        .iter()
        .filter_map(|v| v.name.strip_prefix(&prefix))
        .filter_map(|rest| rest.parse::<u32>().ok())
        .map(|n| n + 1)
        .max()
        .unwrap_or(0);
    format!("{prefix}{n}")
}

fn version_key(name: &str) -> Vec<u64> {
    name.split('.').map(|p| p.parse().unwrap_or(0)).collect()
}

pub fn advance(op: &Operation, view: &View, now: OffsetDateTime) -> Advance {
    let mut p = Proto {
        view,
        now,
        out: Advance::of(op),
        memo: Memo::default(),
        params: None,
    };
    // Rolling back: restoring the instance after an operator's abort.
    if !matches!(
        op.state,
        State::Pending | State::Running | State::RollingBack
    ) {
        return p.out;
    }
    match (Params::from_stored(&op.params), Memo::read(op)) {
        (Ok(params), Ok(m)) => {
            p.params = Some(params);
            p.memo = m;
            p.run();
        }
        (Err(e), _) | (_, Err(e)) => p.end(State::Failed, e),
    }
    p.out.finish(op, &p.memo, now)
}

struct Proto<'a, 'v> {
    view: &'a View<'v>,
    now: OffsetDateTime,
    out: Advance,
    memo: Memo,
    params: Option<Params>,
}

impl Proto<'_, '_> {
    fn params(&self) -> &Params {
        self.params
            .as_ref()
            .unwrap_or_else(|| unreachable!("params are read before the prototype runs"))
    }

    fn dry(&self) -> bool {
        self.view.dry_run || self.out.op.dry_run
    }

    fn note(&mut self, outcome: &'static str, reason: String) {
        let instance = if self.memo.instance.is_empty() {
            "*".to_string()
        } else {
            self.memo.instance.clone()
        };
        self.out.notes.push(Note {
            instance,
            outcome,
            reason,
            evidence: serde_json::Value::Null,
        });
    }

    fn wait(&mut self, what: String) {
        self.out.op.waiting = Some(what);
        self.out.op.wait_until = self.memo.deadline;
    }

    fn step(&mut self, stage: Stage, act: Option<Act>, deadline: Duration) {
        self.memo.stage = stage;
        self.memo.calls = act.into_iter().map(Call::new).collect();
        self.memo.deadline = Some(self.now + deadline);
        self.out.op.step = stage.label().into();
        self.out.op.done = self.memo.stage as u32;
        self.out.resync = true;
    }

    fn timeout(&self) -> Duration {
        Duration::seconds(self.params().timeout_s)
    }

    fn run(&mut self) {
        if let Some(brake) = self.view.brake.as_deref() {
            let (what, news) = step::hold(
                &self.out.op,
                &mut self.memo.deadline,
                brake,
                self.now,
                self.view.settle,
            );
            if news {
                self.note("held", format!("{what}; no step until it releases"));
            }
            return self.wait(what);
        }
        self.track();
        if self.out.op.state == State::Pending {
            return self.choose();
        }
        let what = self.memo.stage.label();
        match step::progress(
            &self.memo.calls,
            self.memo.deadline,
            self.now,
            Act::describe,
        ) {
            // Published, the image is in use: what is left over is journaled, not undone.
            Progress::Failed(_, error) if self.memo.stage == Stage::Cleanup => {
                self.note("cleanup_failed", format!("{error}; left for an operator"));
                return self.succeed();
            }
            Progress::Failed(_, error) if self.memo.stage == Stage::Discard => {
                self.note(
                    "cleanup_failed",
                    format!("{error}; the snapshot is left for an operator"),
                );
                let why = self.memo.failed.clone().unwrap_or_default();
                return self.give_up(why);
            }
            Progress::Failed(_, error) => return self.fail(format!("{what}: {error}")),
            Progress::Late => return self.fail(format!("{what} did not end in time")),
            Progress::Waiting(on) => return self.wait(on),
            Progress::Ended => {}
        }
        if self.memo.aborted && self.memo.failed.is_none() {
            let why = "aborted by an operator".to_string();
            if !matches!(self.memo.stage, Stage::Restore | Stage::Back) {
                return self.fail(why);
            }
            // Already coming back: it is brought back, and nothing is published.
            self.memo.failed = Some(why.clone());
            self.out.op.last_error = Some(why.clone());
            self.note("failed_step", format!("{why}; the model is untouched"));
        }
        match self.memo.stage {
            Stage::Choose => self.choose(),
            Stage::Prepare => self.prepared(),
            Stage::Deallocate => self.deallocated(),
            Stage::Snapshot => self.snapshotted(),
            Stage::Version => self.versioned(),
            Stage::Restore => self.restarted(),
            Stage::Back => self.back(),
            Stage::Publish => self.published(),
            Stage::Cleanup => self.cleaned(),
            Stage::Discard => {
                let why = self.memo.failed.clone().unwrap_or_default();
                self.give_up(why)
            }
        }
    }

    /// What the status reads and the mirror say of the calls sent.
    fn track(&mut self) {
        let (dry, now) = (self.dry(), self.now);
        let instance = self
            .view
            .present(&self.memo.instance)
            .map(|m| m.instance.clone());
        for call in &mut self.memo.calls {
            if let CallState::Accepted { url: Some(u), .. } = &call.state {
                if let (Some(Status::Ended(_)), Some(out)) =
                    (self.view.statuses.get(u), self.view.outputs.get(u))
                {
                    self.memo.output = Some(out.clone());
                }
            }
            let repeatable = call.act.repeatable();
            let Some(sent_at) = call.state.settle(self.view.statuses, dry, repeatable, now) else {
                continue;
            };
            // No status to read: what the mirror shows of the instance.
            let landed = instance.as_ref().is_some_and(|i| {
                let after = i.provisioned_at.is_some_and(|t| t > sent_at);
                let power = i.power_state.as_deref().unwrap_or("");
                match &call.act {
                    Act::Deallocate { .. } => power.eq_ignore_ascii_case("deallocated"),
                    Act::Start { .. } | Act::Reimage { .. } => {
                        after && power.eq_ignore_ascii_case("running")
                    }
                    _ => false,
                }
            });
            if landed {
                call.state = CallState::Ended { at: now };
            }
        }
    }

    fn choose(&mut self) {
        let params = self.params().clone();
        let set = self.out.op.scale_set.clone();
        let image = self.view.record.and_then(|r| r.image.clone());
        match image.as_deref() {
            None => return self.end(State::Failed, "the scale set's image is not known yet: the mirror has not read it (monitor-state)".into()),
            Some(i) if i.starts_with("platform:") => {
                return self.end(
                    State::Failed,
                    format!(
                        "the scale set runs the platform image {}: Azure never lets a scale set change its image type (\"The Image type for a Virtual Machine Scale Set may not be changed.\"); deploy it from a gallery image first",
                        &i["platform:".len()..]
                    ),
                )
            }
            Some(_) => {}
        }
        if self
            .view
            .record
            .and_then(|r| r.orchestration_mode.as_deref())
            .is_some_and(|m| m.eq_ignore_ascii_case("flexible"))
        {
            return self.end(
                State::Failed,
                "a Flexible scale set's instances are prepared and captured through the VM API, which this version does not drive yet".into(),
            );
        }
        let minimum = Duration::seconds(params.minimum_ready_s);
        let why_not = |m: &MirroredInstance| -> Option<&'static str> {
            let i = &m.instance;
            let id = i.instance_id.as_str();
            if !self.view.healthy(id) {
                Some("not healthy")
            } else if i.latest_model_applied == Some(false) {
                Some("not on the latest model")
            } else if i.protected_from_scale_set_actions || i.delete_locked {
                Some("protected")
            } else if self.view.incidents.contains(id) {
                Some("an incident is open")
            } else {
                None
            }
        };
        let ready_since = |m: &MirroredInstance| {
            m.instance
                .provisioned_at
                .or(m.instance.created_at)
                .unwrap_or(self.now)
        };
        let healthy = self
            .view
            .instances
            .iter()
            .filter(|m| self.view.healthy(&m.instance.instance_id))
            .count();
        if healthy < 2 {
            return self.end(
                State::Failed,
                format!("{healthy} healthy instance(s): capturing one would leave none serving"),
            );
        }
        let chosen = match &params.instance {
            Some(id) => match self.view.present(id) {
                None => Err(format!("instance {id} is not in the scale set")),
                Some(m) => match why_not(m) {
                    Some(why) => Err(format!("instance {id} cannot be captured: {why}")),
                    None => Ok(m.instance.instance_id.clone()),
                },
            },
            None => self
                .view
                .instances
                .iter()
                .filter(|m| why_not(m).is_none())
                .filter(|m| self.now - ready_since(m) >= minimum)
                .min_by_key(|m| (ready_since(m), m.instance.instance_id.clone()))
                .map(|m| m.instance.instance_id.clone())
                .ok_or_else(|| {
                    format!(
                        "no instance has been ready for --minimum-ready ({} s): healthy, on the latest model, not protected, no incident",
                        params.minimum_ready_s
                    )
                }),
        };
        let id = match chosen {
            Ok(id) => id,
            Err(why) => return self.end(State::Failed, format!("choose: {why}")),
        };
        self.memo.instance = id.clone();
        self.out.op.state = State::Running;
        self.out.op.holds = vec![id.clone()];
        self.out.op.total = Stage::Cleanup as u32 + 1;
        self.note(
            "started",
            format!(
                "golden image from {id} into {}/{} for {}{}",
                params.gallery,
                definition_name(&set),
                set,
                if self.dry() {
                    " (dry run: nothing is called)"
                } else {
                    ""
                }
            ),
        );
        self.step(Stage::Prepare, None, self.timeout());
        self.wait("the instance's disk to be read".into());
    }

    /// Preparation: with the disk read, the agent's `prepare-image`; then its output is checked.
    fn prepared(&mut self) {
        if self.memo.calls.is_empty() {
            let disk = match self.view.disk.clone() {
                Some(Ok(d)) => d,
                Some(Err(e)) => return self.fail(format!("reading the instance's disk: {e}")),
                None if self.dry() => Disk {
                    os_disk: "(dry run)".into(),
                    os_type: "Linux".into(),
                    hyper_v_generation: Some("V2".into()),
                    architecture: x64(),
                },
                None => return self.wait("the instance's disk to be read".into()),
            };
            let windows = disk.os_type.eq_ignore_ascii_case("windows");
            self.memo.disk = Some(disk);
            let script = vec![if windows {
                WINDOWS_PREPARE
            } else {
                LINUX_PREPARE
            }
            .to_string()];
            let instance = self.memo.instance.clone();
            self.memo.touched = true;
            self.step(
                Stage::Prepare,
                Some(Act::RunCommand {
                    instance,
                    script,
                    windows,
                }),
                self.timeout(),
            );
            return self.wait("prepare-image to run".into());
        }
        let output = self.memo.output.clone().unwrap_or_default();
        if !self.dry() && !output.contains(PREPARED) {
            return self.fail(format!(
                "prepare-image did not say it cleared the machine state (output: {:?}); is the agent installed?",
                output.chars().take(200).collect::<String>()
            ));
        }
        self.memo.needs_reimage = output.contains("reimage");
        self.note(
            "prepared",
            format!("machine state cleared: {}", output.trim()),
        );
        let instance = self.memo.instance.clone();
        self.step(
            Stage::Deallocate,
            Some(Act::Deallocate { instance }),
            self.timeout(),
        );
        self.wait("the instance to be deallocated".into());
    }

    fn deallocated(&mut self) {
        let set = &self.out.op.scale_set;
        let name = format!(
            "{}-{}-prototype-{}",
            set.name,
            self.memo.instance,
            self.now.unix_timestamp()
        );
        let disk = self
            .memo
            .disk
            .as_ref()
            .map(|d| d.os_disk.clone())
            .unwrap_or_default();
        self.note(
            "deallocated",
            "deallocated: its disk holds still for the snapshot".into(),
        );
        self.memo.snapshot = Some(name.clone());
        self.step(
            Stage::Snapshot,
            Some(Act::Snapshot { name, disk }),
            self.timeout(),
        );
        self.wait("the snapshot".into());
    }

    fn snapshotted(&mut self) {
        self.note(
            "snapshot",
            format!(
                "snapshot {} taken",
                self.memo.snapshot.clone().unwrap_or_default()
            ),
        );
        self.step(
            Stage::Version,
            None,
            Duration::seconds(self.params().version_timeout_s),
        );
        self.versioned();
    }

    /// The definition made sure of, then the version named and created.
    fn versioned(&mut self) {
        let set = self.out.op.scale_set.clone();
        let gallery = self.params().gallery.clone();
        let definition = definition_name(&set);
        if self.memo.version.is_none() {
            let existing = match self.view.versions.clone() {
                Some(Ok(v)) => v,
                // A definition not made yet has no versions to list.
                Some(Err(_)) => Vec::new(),
                None if self.dry() => Vec::new(),
                None => return self.wait("the definition's versions to be read".into()),
            };
            let version = version_name(self.now, &existing);
            let disk = self.memo.disk.clone().unwrap_or(Disk {
                os_disk: String::new(),
                os_type: "Linux".into(),
                hyper_v_generation: None,
                architecture: x64(),
            });
            let snapshot = format!(
                "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/snapshots/{}",
                set.subscription,
                set.resource_group,
                self.memo.snapshot.clone().unwrap_or_default()
            );
            self.memo.version = Some(version.clone());
            self.memo.calls = vec![
                Call::new(Act::EnsureImage {
                    gallery: gallery.clone(),
                    definition: definition.clone(),
                    os_type: disk.os_type.clone(),
                    hyper_v_generation: disk.hyper_v_generation.unwrap_or_else(|| "V2".into()),
                    architecture: disk.architecture,
                }),
                Call::new(Act::CreateVersion {
                    gallery,
                    definition,
                    version: version.clone(),
                    snapshot,
                }),
            ];
            self.out.resync = true;
            return self.wait(format!("image version {version} to be created"));
        }
        self.note(
            "captured",
            format!(
                "image version {} created",
                self.memo.version.clone().unwrap_or_default()
            ),
        );
        self.restore();
    }

    /// Starts the instance again (after a capture, or after a failure that touched it).
    fn restore(&mut self) {
        let instance = self.memo.instance.clone();
        let act = if self.memo.needs_reimage && !self.memo.reimaged {
            self.memo.reimaged = true;
            Act::Reimage { instance }
        } else {
            Act::Start { instance }
        };
        self.step(Stage::Restore, Some(act), self.timeout());
        self.wait("the instance to start again".into());
    }

    fn restarted(&mut self) {
        self.memo.restarted_at = self.memo.calls.iter().filter_map(Call::ended_at).max();
        self.step(Stage::Back, None, self.timeout());
        self.back();
    }

    /// Back healthy by our verdict after the restart; else once reimaged; else the healer's.
    fn back(&mut self) {
        let since = self.memo.restarted_at.unwrap_or(self.now);
        let id = self.memo.instance.clone();
        if self.dry() || self.view.back_since(&id, since) {
            self.note("restored", format!("{id} is back and healthy"));
            self.out.op.holds.clear();
            self.memo.touched = false;
            if let Some(why) = self.memo.failed.clone() {
                return self.give_up(why);
            }
            return self.publish();
        }
        if self.memo.deadline.is_some_and(|d| self.now > d) {
            if !self.memo.reimaged {
                self.note(
                    "reimage",
                    format!("{id} did not come back healthy: reimaged"),
                );
                self.memo.needs_reimage = true;
                return self.restore();
            }
            self.out.op.holds.clear();
            let why = self
                .memo
                .failed
                .clone()
                .unwrap_or_else(|| format!("{id} did not come back healthy, even reimaged"));
            self.note("released", format!("{id} is left to the healer's repairs"));
            return self.give_up(why);
        }
        self.wait(format!("{id} to come back healthy"));
    }

    fn publish(&mut self) {
        let set = self.out.op.scale_set.clone();
        let image = definition_id(&set, &self.params().gallery);
        self.step(
            Stage::Publish,
            Some(Act::SetImage { image }),
            self.timeout(),
        );
        self.wait("the model to follow the new image".into());
    }

    fn published(&mut self) {
        let version = self.memo.version.clone().unwrap_or_default();
        self.note(
            "published",
            format!(
                "the model follows {} (now version {version})",
                definition_name(&self.out.op.scale_set)
            ),
        );
        self.step(Stage::Cleanup, None, self.timeout());
        self.cleaned();
    }

    /// The snapshot and the versions beyond the history go; then it is done.
    fn cleaned(&mut self) {
        if !self.memo.calls.is_empty() {
            let names: Vec<String> = self.memo.calls.iter().map(|c| c.act.describe()).collect();
            self.note("cleaned", names.join(", "));
            return self.succeed();
        }
        let versions = match self.view.versions.clone() {
            Some(Ok(v)) => v,
            Some(Err(e)) => {
                self.note("prune_skipped", format!("old versions not pruned: {e}"));
                Vec::new()
            }
            None if self.dry() => Vec::new(),
            None => return self.wait("the definition's versions to be read".into()),
        };
        let params = self.params().clone();
        let keep = params.max_history.max(2) as usize;
        let in_use = self
            .view
            .record
            .and_then(|r| r.image.clone())
            .and_then(|i| {
                i.rsplit_once("/versions/")
                    .map(|(_, v)| v.to_ascii_lowercase())
            });
        let mut sorted = versions;
        sorted.sort_by_key(|v| std::cmp::Reverse(version_key(&v.name)));
        let definition = definition_name(&self.out.op.scale_set);
        let mut calls: Vec<Call> = self
            .memo
            .snapshot
            .clone()
            .map(|name| Call::new(Act::DeleteSnapshot { name }))
            .into_iter()
            .collect();
        for v in sorted.iter().skip(keep) {
            if in_use.as_deref() == Some(v.name.to_ascii_lowercase().as_str()) {
                continue;
            }
            calls.push(Call::new(Act::DeleteVersion {
                gallery: params.gallery.clone(),
                definition: definition.clone(),
                version: v.name.clone(),
            }));
        }
        if calls.is_empty() {
            return self.succeed();
        }
        self.memo.calls = calls;
        self.wait("the snapshot and old versions to go".into());
    }

    fn succeed(&mut self) {
        let version = self.memo.version.clone().unwrap_or_default();
        let cycle = if self.params().then_cycle {
            "; a rolling upgrade follows (--then-cycle)"
        } else {
            ""
        };
        self.end(
            State::Succeeded,
            format!("golden image {version} published{cycle}"),
        );
    }

    /// A failure before publishing: a touched instance is restored first, then it fails.
    fn fail(&mut self, why: String) {
        if self.memo.failed.is_some() {
            // Failing while restoring: the instance is the healer's now.
            self.out.op.holds.clear();
            return self.give_up(why);
        }
        if self.memo.stage == Stage::Snapshot
            && self.memo.calls.iter().all(|c| c.failed().is_some())
        {
            // Refused: there is no snapshot to discard.
            self.memo.snapshot = None;
        }
        self.memo.failed = Some(why.clone());
        self.note("failed_step", format!("{why}; the model is untouched"));
        self.out.op.last_error = Some(why);
        if self.memo.touched {
            return self.restore();
        }
        let why = self.memo.failed.clone().unwrap_or_default();
        self.give_up(why)
    }

    fn give_up(&mut self, why: String) {
        // A snapshot of an OS disk taken for a version that will not be published goes first.
        if let Some(name) = self.memo.snapshot.take().filter(|_| !self.dry()) {
            self.memo.failed.get_or_insert(why);
            self.step(
                Stage::Discard,
                Some(Act::DeleteSnapshot { name }),
                self.timeout(),
            );
            return self.wait("the snapshot to be deleted".into());
        }
        if self.memo.aborted {
            return self.end(State::Aborted, format!("{why}; the model is untouched"));
        }
        self.out.alert = Some(format!(
            "golden image of {} failed: {why}; the model is untouched",
            self.out.op.scale_set
        ));
        self.end(State::Failed, why);
    }

    fn end(&mut self, state: State, reason: String) {
        if state == State::Failed && self.out.alert.is_none() {
            self.out.alert = Some(format!("golden image not made: {reason}"));
        }
        self.note(
            match state {
                State::Succeeded => "succeeded",
                State::Aborted => "aborted",
                _ => "failed",
            },
            reason.clone(),
        );
        self.out.op.state = state;
        self.out.op.step = state.as_str().into();
        self.out.op.holds.clear();
        if state != State::Succeeded {
            self.out.op.last_error = Some(reason);
        }
        self.out.op.waiting = None;
        self.out.op.wait_until = None;
    }
}
