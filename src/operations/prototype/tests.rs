//! The prototype's decisions, pass by pass, on hand-made views.

use super::*;
use crate::heartbeat::{Origin, Status as Beat};
use crate::mirror::fixtures::instance;
use crate::operations::Kind;
use crate::verdict::Reason;
use time::macros::datetime;

const T0: OffsetDateTime = datetime!(2026-12-01 10:00 UTC);

fn set() -> ScaleSetId {
    ScaleSetId::new("sub", "rg-fleet", "api")
}

struct Fixture {
    record: ScaleSetRecord,
    instances: Vec<MirroredInstance>,
    heartbeats: HashMap<String, Heartbeat>,
    verdicts: HashMap<String, Verdict>,
    statuses: HashMap<String, Status>,
    outputs: HashMap<String, String>,
    disk: Option<Result<Disk, String>>,
    versions: Option<Result<Vec<Version>, String>>,
}

impl Fixture {
    /// Three healthy instances: 0 provisioned an hour ago, 1 a day ago, 2 ten minutes ago.
    fn new() -> Self {
        let mut record = ScaleSetRecord::unsynced();
        record.image = Some("/subscriptions/sub/resourceGroups/rg-fleet/providers/Microsoft.Compute/galleries/SIG_rg_fleet/images/api-prototype/versions/2026.101.0".into());
        let ages = [Duration::hours(1), Duration::days(1), Duration::minutes(10)];
        let instances = ages
            .iter()
            .enumerate()
            .map(|(i, age)| {
                let mut inst = instance(&i.to_string());
                inst.provisioned_at = Some(T0 - *age);
                MirroredInstance {
                    instance: inst,
                    synced_at: T0,
                }
            })
            .collect();
        let mut f = Fixture {
            record,
            instances,
            heartbeats: HashMap::new(),
            verdicts: HashMap::new(),
            statuses: HashMap::new(),
            outputs: HashMap::new(),
            disk: None,
            versions: None,
        };
        for i in 0..3 {
            f.beat(&i.to_string(), T0 - Duration::seconds(5));
            f.verdicts.insert(i.to_string(), Verdict::Healthy);
        }
        f
    }

    fn beat(&mut self, id: &str, at: OffsetDateTime) {
        self.heartbeats.insert(
            id.into(),
            Heartbeat {
                target: set().instance(id),
                status: Beat::Up,
                event_time: at,
                received_at: at,
                sequence: None,
                vm_id: None,
                computer_name: None,
                detail: None,
                origin: Origin::Agent,
                event_id: "e".into(),
                down_since: None,
                attested: false,
                attestation: None,
            },
        );
    }

    fn pass(&self, op: &Operation, now: OffsetDateTime) -> Advance {
        let verdicts: HashMap<&str, Verdict> = self
            .verdicts
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        let view = View {
            record: Some(&self.record),
            instances: &self.instances,
            heartbeats: &self.heartbeats,
            verdicts: &verdicts,
            incidents: HashSet::new(),
            brake: None,
            statuses: &self.statuses,
            outputs: &self.outputs,
            disk: self.disk.clone(),
            versions: self.versions.clone(),
            settle: Duration::seconds(180),
            dry_run: false,
        };
        advance(op, &view, now)
    }
}

fn op(raw: Raw) -> Operation {
    let params = parse(&raw, &set()).unwrap();
    Operation::new(
        Kind::Prototype,
        set(),
        serde_json::to_value(&params).unwrap(),
        "ops".into(),
        false,
        T0,
    )
}

fn auto() -> Raw<'static> {
    Raw {
        auto: true,
        ..Raw::default()
    }
}

/// Marks the call whose turn it is as sent and answered with a status URL.
fn send(op: &mut Operation, url: &str) {
    let mut memo = Memo::read(op).unwrap();
    let i = sendable(&memo).expect("a call to send");
    memo.calls[i].state = CallState::Accepted {
        at: T0,
        url: Some(url.into()),
        follow: None,
    };
    op.memo = serde_json::to_value(&memo).unwrap();
}

#[test]
fn parameters_are_read_with_every_problem_at_once() {
    let p = parse(&auto(), &set()).unwrap();
    assert_eq!(
        p.gallery, "SIG_rg_fleet",
        "kamino's SIG_<rg>, with what gallery names take"
    );
    assert_eq!(
        (p.max_history, p.minimum_ready_s, p.timeout_s),
        (3, 3600, 1800)
    );
    assert_eq!(
        Params::from_stored(&serde_json::to_value(&p).unwrap()).unwrap(),
        p
    );
    let e = parse(
        &Raw {
            instance: Some("1"),
            auto: true,
            gallery: Some("my-gallery"),
            max_history: Some("1"),
            timeout: Some("0s"),
            ..Raw::default()
        },
        &set(),
    )
    .unwrap_err();
    assert_eq!(e.len(), 4, "{e:?}");
    assert!(parse(&Raw::default(), &set()).unwrap_err()[0].contains("--instance ID or --auto"));
}

#[test]
fn versions_are_named_so_that_a_later_image_always_sorts_higher() {
    let v = |name: &str| Version {
        name: name.into(),
        state: None,
    };
    let first = version_name(T0, &[]);
    assert_eq!(first, "2026.1201.0");
    let second = version_name(T0, &[v("2026.1201.0"), v("2026.1130.4")]);
    assert_eq!(second, "2026.1201.1");
    let next_day = version_name(T0 + Duration::days(1), &[v("2026.1201.0"), v(&second)]);
    assert_eq!(next_day, "2026.1202.0");
    let january = version_name(datetime!(2027-01-05 10:00 UTC), &[]);
    assert_eq!(january, "2027.105.0");
    let mut all = [next_day.clone(), first.clone(), second.clone()];
    all.sort_by_key(|n| version_key(n));
    assert_eq!(all, [first, second, next_day]);
}

type Setup = Box<dyn Fn(&mut Fixture)>;

#[test]
fn the_instance_chosen_and_what_is_refused() {
    #[rustfmt::skip]
    let cases: Vec<(&str, Raw, Setup, Result<&str, &str>)> = vec![
        ("auto takes the longest ready", auto(), Box::new(|_| {}), Ok("1")),
        ("not one that is down", auto(), Box::new(|f| { f.verdicts.insert("1".into(), Verdict::Unhealthy(Reason::ReportedDown { since: T0 })); }), Ok("0")),
        ("not one on an old model", auto(), Box::new(|f| f.instances[1].instance.latest_model_applied = Some(false)), Ok("0")),
        ("not one protected", auto(), Box::new(|f| f.instances[1].instance.protected_from_scale_set_actions = true), Ok("0")),
        ("ready long enough", Raw { minimum_ready: Some("48h"), ..auto() }, Box::new(|_| {}), Err("--minimum-ready")),
        ("a named instance", Raw { instance: Some("2"), ..Raw::default() }, Box::new(|_| {}), Ok("2")),
        ("a named one that is not there", Raw { instance: Some("9"), ..Raw::default() }, Box::new(|_| {}), Err("not in the scale set")),
        ("a platform image never becomes a gallery one", auto(), Box::new(|f| f.record.image = Some("platform:Canonical:ubuntu:22_04:latest".into())), Err("may not be changed")),
        ("an image not mirrored yet", auto(), Box::new(|f| f.record.image = None), Err("not known yet")),
        ("Flexible sets not yet", auto(), Box::new(|f| f.record.orchestration_mode = Some("Flexible".into())), Err("Flexible")),
        ("one healthy instance is all", auto(), Box::new(|f| { f.instances.truncate(1); }), Err("leave none serving")),
    ];
    for (what, raw, setup, want) in cases {
        let mut f = Fixture::new();
        setup(&mut f);
        let out = f.pass(&op(raw), T0);
        match want {
            Ok(id) => {
                assert_eq!(
                    out.op.state,
                    State::Running,
                    "{what}: {:?}",
                    out.op.last_error
                );
                assert_eq!(out.op.holds, vec![id.to_string()], "{what}");
                assert_eq!(Memo::read(&out.op).unwrap().instance, id, "{what}");
            }
            Err(why) => {
                assert_eq!(out.op.state, State::Failed, "{what}");
                let error = out.op.last_error.clone().unwrap_or_default();
                assert!(error.contains(why), "{what}: {error}");
                assert!(out.alert.is_some(), "{what}");
                assert!(out.op.holds.is_empty(), "{what}");
            }
        }
    }
}

/// Runs passes: each sends the call whose turn it is and ends it at once (its output, for the
/// command, as given); returns the notes and the last operation.
fn drive(
    f: &mut Fixture,
    mut op: Operation,
    output: &str,
    fail: Option<&str>,
    passes: usize,
) -> (Operation, Vec<Note>, Vec<String>) {
    let (mut notes, mut sent): (Vec<Note>, Vec<String>) = (Vec::new(), Vec::new());
    let mut now = T0;
    for n in 0..passes {
        f.disk = Some(Ok(Disk {
            os_disk: "/disks/api_1_OsDisk".into(),
            os_type: "Linux".into(),
            hyper_v_generation: Some("V2".into()),
            architecture: "x64".into(),
        }));
        let mut listed: Vec<Version> = ["2026.101.0", "2026.102.0", "2026.103.0"]
            .iter()
            .map(|n| Version {
                name: n.to_string(),
                state: Some("Succeeded".into()),
            })
            .collect();
        // The version made is listed once it was asked for.
        if let Some(made) = sent
            .iter()
            .find_map(|s: &String| s.strip_prefix("image version "))
        {
            listed.push(Version {
                name: made.to_string(),
                state: Some("Succeeded".into()),
            });
        }
        f.versions = Some(Ok(listed));
        let out = f.pass(&op, now);
        notes.extend(out.notes);
        op = out.op;
        if op.state.is_over() {
            break;
        }
        let memo = Memo::read(&op).unwrap();
        if let Some(i) = sendable(&memo) {
            let what = memo.calls[i].act.describe();
            let url = format!("op-{n}");
            send(&mut op, &url);
            let failed = fail.is_some_and(|f| what.contains(f));
            f.statuses.insert(
                url.clone(),
                if failed {
                    Status::Failed(format!("{what}: refused"))
                } else {
                    Status::Ended(now)
                },
            );
            f.outputs.insert(url, output.into());
            sent.push(what);
        }
        now += Duration::minutes(1);
        // The instance reports after every pass (a started one too).
        f.beat("1", now);
    }
    (op, notes, sent)
}

#[test]
fn a_capture_goes_step_by_step_and_publishes_to_the_definition() {
    let mut f = Fixture::new();
    let (op, notes, sent) = drive(
        &mut f,
        op(Raw {
            max_history: Some("2"),
            ..auto()
        }),
        "vmss-healer-agent: machine-specific state cleared (cloud-init,machine-id)",
        None,
        40,
    );
    assert_eq!(op.state, State::Succeeded, "{notes:#?}");
    assert_eq!(
        sent,
        vec![
            "prepare-image on 1",
            "deallocate 1",
            &format!("snapshot {}", Memo::read(&op).unwrap().snapshot.unwrap()),
            "gallery SIG_rg_fleet and image definition api-prototype",
            "image version 2026.1201.0",
            "start 1",
            "model image /subscriptions/sub/resourceGroups/rg-fleet/providers/Microsoft.Compute/galleries/SIG_rg_fleet/images/api-prototype",
            &format!("delete snapshot {}", Memo::read(&op).unwrap().snapshot.unwrap()),
            // Two kept (the new one and 2026.103.0); the model's own 2026.101.0 never goes.
            "delete image version 2026.102.0",
        ]
    );
    assert!(op.holds.is_empty());
    let outcomes: Vec<&str> = notes.iter().map(|n| n.outcome).collect();
    assert!(
        outcomes.ends_with(&["published", "cleaned", "succeeded"]),
        "{outcomes:?}"
    );
}

#[test]
fn a_failure_before_publishing_restores_the_instance_and_never_touches_the_model() {
    for (fail, output, reimaged) in [
        ("image version", "machine-specific state cleared", false),
        ("snapshot", "machine-specific state cleared", false),
        // Sysprep: the restore is a reimage.
        (
            "image version",
            "machine-specific state cleared (sysprep generalize; reimage to serve again)",
            true,
        ),
    ] {
        let mut f = Fixture::new();
        let (op, notes, sent) = drive(&mut f, op(auto()), output, Some(fail), 40);
        assert_eq!(op.state, State::Failed, "{fail}: {notes:#?}");
        assert!(
            !sent.iter().any(|s| s.starts_with("model image")),
            "{sent:?}"
        );
        // Restored, then the snapshot taken for it deleted (none when the snapshot was refused).
        let restore = if reimaged { "reimage 1" } else { "start 1" };
        let restored = sent.iter().position(|s| s == restore);
        assert!(restored.is_some(), "{sent:?}");
        let discarded = sent.iter().position(|s| s.starts_with("delete snapshot"));
        if fail == "snapshot" {
            assert_eq!(sent.last().map(String::as_str), Some(restore), "{sent:?}");
            assert_eq!(discarded, None, "{sent:?}");
        } else {
            assert_eq!(discarded, Some(sent.len() - 1), "{sent:?}");
            assert!(restored < discarded, "{sent:?}");
        }
        assert!(op.last_error.unwrap().contains("refused"));
        assert!(op.holds.is_empty());
    }
    // An agent that does not answer as it should: nothing is captured, the instance restored.
    let mut f = Fixture::new();
    let (op, _, sent) = drive(&mut f, op(auto()), "", None, 40);
    assert_eq!(op.state, State::Failed);
    assert_eq!(sent, vec!["prepare-image on 1", "start 1"]);
    assert!(op.last_error.unwrap().contains("is the agent installed"));
}

#[test]
fn an_abort_before_publishing_restores_the_instance_and_publishes_nothing() {
    use crate::operations::Command;
    let output = "machine-specific state cleared";
    let mut undone = Vec::new();
    for k in 1..10 {
        let mut f = Fixture::new();
        let (running, _, before) = drive(&mut f, op(auto()), output, None, k);
        let stage = Memo::read(&running).unwrap().stage;
        let aborted = running.command(Command::Abort, T0).unwrap();
        if aborted.state != State::RollingBack {
            // Nothing to undo: not started, or published (the image is in use).
            assert_eq!(aborted.state, State::Aborted, "{stage:?}");
            assert!(
                matches!(stage, Stage::Choose | Stage::Publish | Stage::Cleanup),
                "{stage:?}"
            );
            continue;
        }
        let (op, notes, after) = drive(&mut f, aborted, output, None, 40);
        assert_eq!(op.state, State::Aborted, "{stage:?}: {notes:#?}");
        let sent: Vec<&String> = before.iter().chain(&after).collect();
        assert!(
            !sent.iter().any(|s| s.starts_with("model image")),
            "{stage:?}: nothing published: {sent:?}"
        );
        if sent.iter().any(|s| s.starts_with("deallocate")) {
            assert!(
                sent.iter().any(|s| s.as_str() == "start 1"),
                "{stage:?}: restored: {sent:?}"
            );
        }
        assert_eq!(
            notes.last().map(|n| n.outcome),
            Some("aborted"),
            "{notes:#?}"
        );
        assert!(op.holds.is_empty());
        undone.push(stage);
    }
    assert!(undone.len() >= 3, "aborts tried under way: {undone:?}");
}
