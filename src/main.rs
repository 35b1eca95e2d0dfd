//! `handler`: the Azure Functions custom handler. The Functions host starts it with
//! `FUNCTIONS_CUSTOMHANDLER_PORT` set and posts each invocation to `/{function-name}`.

use anyhow::Context;
use clap::{Parser, Subcommand};
use std::sync::Arc;
use std::time::Duration;
use tracing_subscriber::EnvFilter;
use vmss_healer::compute::Compute;
use vmss_healer::host::{app, AppState, Counters};
use vmss_healer::identity::credential;
use vmss_healer::secret::{self, redact};
use vmss_healer::settings::Settings;
use vmss_healer::state::Store;

/// The Azure Functions custom handler of vmss-healer. Without a command it serves the Functions
/// host on FUNCTIONS_CUSTOMHANDLER_PORT; the commands are the operator's, and read the same settings
/// as the Function App (HEALER_STORAGE or AzureWebJobsStorage, HEALER_SCALE_SETS, ...).
#[derive(Debug, Parser)]
#[command(name = "handler", version)]
struct Cli {
    /// Print the README's settings table and exit.
    #[arg(long)]
    settings_table: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Each scale set's health, brake, incidents and recent journal.
    Status {
        /// As JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// The audit trail: every decision, taken or withheld, and every outcome, oldest first.
    Journal {
        /// A watched scale set (resource id or name); every watched one if none.
        scale_set: Option<String>,
        /// Only this instance's rows (its instance id, or a Flexible VM's name).
        #[arg(long)]
        instance: Option<String>,
        /// Only this incident's (or operation's) rows.
        #[arg(long)]
        incident: Option<String>,
        /// Only rows of these kinds: repair, withheld, outcome, step, intent, operation
        /// (comma-separated or repeated).
        #[arg(long, value_delimiter = ',')]
        kind: Vec<String>,
        /// How far back: seconds, or a number with s, m or h.
        #[arg(long, default_value = "24h")]
        since: String,
        /// Only the newest this many rows.
        #[arg(long)]
        limit: Option<usize>,
        /// Each row's evidence (the verdict, heartbeat, mirror and call it rested on) too.
        #[arg(long)]
        evidence: bool,
        /// As JSON, for scripts (with the evidence).
        #[arg(long)]
        json: bool,
        /// Then each new row as it is written, until stopped (Ctrl-C); with --json, one row per
        /// line.
        #[arg(long)]
        follow: bool,
    },
    /// A manual brake: monitor-status starts no repair on the scale set until resumed.
    Pause {
        /// A watched scale set: its resource id or its name.
        scale_set: String,
        /// Why, for the journal and `handler status`.
        #[arg(long, default_value = "no reason given")]
        reason: String,
    },
    /// Lift an operator's pause.
    Resume {
        /// A watched scale set: its resource id or its name.
        scale_set: String,
    },
    /// The long-running operations (design §7), oldest first, with their progress.
    Operations {
        /// Only this watched scale set's (resource id or name).
        scale_set: Option<String>,
        /// As JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// A rolling, health-gated cycle of a scale set: every instance reimaged (or replaced, or
    /// upgraded to the latest model) batch by batch, never fewer than --min-healthy healthy.
    Cycle {
        /// A watched scale set: its resource id or its name.
        scale_set: String,
        /// reimage (keeps disks and addresses), replace (new instances first), or upgrade (the
        /// latest model, on instances not on it).
        #[arg(long, default_value = "reimage")]
        action: String,
        /// Instances per batch: a count or a share of the scale set.
        #[arg(long, default_value = "20%")]
        batch: String,
        /// Never fewer healthy instances than this (a count or a share).
        #[arg(long, default_value = "80%")]
        min_healthy: String,
        /// At most this many instances added to keep --min-healthy (default: a batch).
        #[arg(long)]
        max_surge: Option<String>,
        /// Only instances not on the scale set's latest model.
        #[arg(long)]
        only_outdated: bool,
        /// How long a batch has to come back healthy.
        #[arg(long, default_value = "30m")]
        timeout: String,
        /// A wait between batches.
        #[arg(long, default_value = "0s")]
        pause_between: String,
        /// Decide and journal every step, call nothing.
        #[arg(long)]
        dry_run: bool,
        /// Why, for the journal and `handler operations`.
        #[arg(long, default_value = "no reason given")]
        reason: String,
        /// As JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// A blue/green swap: the new scale set scaled to the old one's capacity, soaked healthy,
    /// autoscale moved to it, the old set scaled to zero; rolled back on any failure before.
    Swap {
        /// The watched scale set serving now (resource id or name).
        from: String,
        /// The watched scale set that takes over: at zero, or at --capacity already.
        to: String,
        /// Instances the new set serves with (default: the old set's capacity).
        #[arg(long)]
        capacity: Option<String>,
        /// How long every new instance must stay healthy before the old set is let go.
        #[arg(long, default_value = "5m")]
        soak: String,
        /// How long the new set has to come up healthy before the swap rolls back.
        #[arg(long, default_value = "30m")]
        timeout: String,
        /// Decide and journal every step, call nothing.
        #[arg(long)]
        dry_run: bool,
        /// Why, for the journal and `handler operations`.
        #[arg(long, default_value = "no reason given")]
        reason: String,
        /// As JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// A golden image from a known-good instance: prepared, captured into a gallery image
    /// version, restored; the model then follows the image definition.
    Prototype {
        /// A watched scale set (resource id or name), already on a gallery image.
        scale_set: String,
        /// The instance to capture.
        #[arg(long)]
        instance: Option<String>,
        /// Choose the instance ready the longest.
        #[arg(long)]
        auto: bool,
        /// The gallery (default SIG_<resource group>).
        #[arg(long)]
        gallery: Option<String>,
        /// Image versions to keep (at least 2).
        #[arg(long, default_value = "3")]
        max_history: String,
        /// With --auto: how long the instance must have been ready.
        #[arg(long, default_value = "1h")]
        minimum_ready: String,
        /// How long each step on the instance may take, its return to health included.
        #[arg(long, default_value = "30m")]
        timeout: String,
        /// How long the image version may take to be created.
        #[arg(long, default_value = "3h")]
        version_timeout: String,
        /// Then upgrade every instance to the new image, as `handler cycle --action upgrade`.
        #[arg(long)]
        then_cycle: bool,
        /// Decide and journal every step, call nothing.
        #[arg(long)]
        dry_run: bool,
        /// Why, for the journal and `handler operations`.
        #[arg(long, default_value = "no reason given")]
        reason: String,
        /// As JSON, for scripts.
        #[arg(long)]
        json: bool,
    },
    /// Pause, resume or abort a long-running operation.
    Operation {
        #[command(subcommand)]
        command: OperationCommand,
    },
}

#[derive(Debug, Subcommand)]
enum OperationCommand {
    /// Hold it where it is (what it holds stays held) until resumed.
    Pause(OperationArgs),
    /// Take a paused operation up again on the next pass.
    Resume(OperationArgs),
    /// End it, freeing what it held. What has an undo is undone first, as a failure would be: a
    /// stateful replacement, a swap before its scale-in, a golden image before it is published.
    Abort(OperationArgs),
}

#[derive(Debug, clap::Args)]
struct OperationArgs {
    /// The operation's id (`handler operations` lists them).
    id: String,
    /// The watched scale set it runs on, when the id alone is ambiguous.
    #[arg(long)]
    scale_set: Option<String>,
    /// Why, for the journal.
    #[arg(long, default_value = "no reason given")]
    reason: String,
}

fn main() {
    // Before anything could quote them: the configured secrets are masked in every output.
    vmss_healer::settings::register_secrets(|k| std::env::var(k).ok());
    // Usage errors exit 2, help exits 0: neither needs settings.
    let cli = Cli::parse();
    if cli.settings_table {
        print!("{}", vmss_healer::settings::markdown_table());
        return;
    }
    if let Some(command) = cli.command {
        std::process::exit(operator_command(command));
    }
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(problems) => {
            eprint!("{}", redact(&problems.to_string()));
            std::process::exit(2);
        }
    };
    // The host starts the handler in the app's root, next to host.json (`workingDirectory` "").
    if let Ok(host_json) = std::fs::read_to_string("host.json") {
        if let Err(problem) = settings.check_function_timeout(&host_json) {
            eprintln!(
                "invalid configuration (1 problem):\n  - {}",
                redact(&problem)
            );
            std::process::exit(2);
        }
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    // Telemetry is optional: when it cannot start, the handler runs and says why.
    let mut warnings = settings.warnings.clone();
    let telemetry = settings
        .telemetry
        .as_ref()
        .and_then(|target| match start_telemetry(target, runtime.handle()) {
            Ok(t) => Some(t),
            Err(e) => {
                warnings.push(format!(
                    "{e:#}; traces and metrics are not exported (the host still records the log lines)"
                ));
                None
            }
        });
    {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        use tracing_subscriber::Layer;
        let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
        let lines = tracing_subscriber::fmt::layer()
            .with_target(false)
            .with_ansi(false)
            .with_writer(vmss_healer::logs::for_the_host());
        let exported = telemetry.as_ref().map(|t| {
            use opentelemetry::trace::TracerProvider;
            // Events become log records (with severity); spans only spans, not also span events,
            // which would export every line twice.
            let spans = tracing_opentelemetry::layer()
                .with_tracer(t.traces.tracer("vmss-healer"))
                .with_filter(tracing_subscriber::filter::filter_fn(|m| m.is_span()));
            opentelemetry_appender_tracing::layer::OpenTelemetryTracingBridge::new(&t.logs)
                .and_then(spans)
        });
        tracing_subscriber::registry()
            .with(filter)
            .with(lines)
            .with(exported)
            .init();
    }
    for warning in &warnings {
        tracing::error!(problem = %warning, "an optional setting cannot be used; the rest runs");
    }
    let mut settings = settings;
    settings.warnings = warnings;
    let served = runtime.block_on(serve(settings));
    if let Err(e) = &served {
        tracing::error!(error = format!("{e:#}"), "handler stopped");
    }
    // Off the runtime, which the last uploads still run on.
    if let Some(t) = telemetry {
        t.shutdown();
    }
    drop(runtime);
    if let Err(e) = served {
        // A misconfiguration found against Azure at startup: listed as any other, exit 2.
        if let Some(problems) = e.downcast_ref::<vmss_healer::settings::SettingsErrors>() {
            eprint!("{}", redact(&problems.to_string()));
            std::process::exit(2);
        }
        eprintln!("handler: {}", redact(&format!("{e:#}")));
        std::process::exit(1);
    }
}

/// The export to Application Insights, uploading with the app's identity when the host is told
/// to (`APPLICATIONINSIGHTS_AUTHENTICATION_STRING`).
fn start_telemetry(
    target: &vmss_healer::telemetry::Target,
    runtime: &tokio::runtime::Handle,
) -> anyhow::Result<vmss_healer::telemetry::Telemetry> {
    let credential = if target.entra {
        Some(credential(None).context("Application Insights with Microsoft Entra authentication")?)
    } else {
        None
    };
    let uplink = vmss_healer::telemetry::Uplink::new(target, runtime.clone(), credential)?;
    vmss_healer::telemetry::Telemetry::start(target, uplink)
}

/// An operator's command; returns the exit code (2: bad usage or settings).
fn operator_command(command: Command) -> i32 {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::new("warn"))
        .with_target(false)
        .with_ansi(false)
        .with_writer(secret::Output::Stderr)
        .init();
    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(problems) => {
            eprint!("{}", redact(&problems.to_string()));
            return 2;
        }
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("cannot start the async runtime: {e}");
            return 1;
        }
    };
    let name = match &command {
        Command::Status { .. } => "status",
        Command::Journal { .. } => "journal",
        Command::Pause { .. } => "pause",
        Command::Resume { .. } => "resume",
        Command::Operations { .. } => "operations",
        Command::Operation { .. } => "operation",
        Command::Cycle { .. } => "cycle",
        Command::Swap { .. } => "swap",
        Command::Prototype { .. } => "prototype",
    };
    let result = runtime.block_on(async {
        let store =
            Store::connect(&settings.storage, credential).context("configuring table storage")?;
        use vmss_healer::operator;
        match &command {
            Command::Status { json } => operator::status(&settings, &store, *json).await,
            Command::Journal {
                scale_set,
                instance,
                incident,
                kind,
                since,
                limit,
                evidence,
                json,
                follow,
            } => {
                let query = operator::journal_query(
                    instance.as_deref(),
                    incident.as_deref(),
                    kind,
                    since,
                    *limit,
                    *evidence,
                )?;
                if *follow {
                    // A reader that went away (`| head`) ends the following.
                    let emit = |text: &str| {
                        use std::io::Write;
                        let mut out = std::io::stdout().lock();
                        out.write_all(redact(text).as_bytes())
                            .and_then(|()| out.flush())
                            .is_ok()
                    };
                    operator::follow_journal(
                        &settings,
                        &store,
                        scale_set.as_deref(),
                        &query,
                        *json,
                        emit,
                    )
                    .await
                    .map(|()| String::new())
                } else {
                    operator::journal(&settings, &store, scale_set.as_deref(), &query, *json).await
                }
            }
            Command::Pause { scale_set, reason } => {
                operator::set_pause(&settings, &store, scale_set, Some(reason)).await
            }
            Command::Resume { scale_set } => {
                operator::set_pause(&settings, &store, scale_set, None).await
            }
            Command::Operations { scale_set, json } => {
                operator::list_operations(&settings, &store, scale_set.as_deref(), *json).await
            }
            Command::Cycle {
                scale_set,
                action,
                batch,
                min_healthy,
                max_surge,
                only_outdated,
                timeout,
                pause_between,
                dry_run,
                reason,
                json,
            } => {
                let raw = vmss_healer::operations::cycle::Raw {
                    action: Some(action),
                    batch: Some(batch),
                    min_healthy: Some(min_healthy),
                    max_surge: max_surge.as_deref(),
                    only_outdated: *only_outdated,
                    timeout: Some(timeout),
                    pause_between: Some(pause_between),
                    dry_run: *dry_run,
                };
                operator::start_cycle(&settings, &store, scale_set, &raw, reason, *json).await
            }
            Command::Swap {
                from,
                to,
                capacity,
                soak,
                timeout,
                dry_run,
                reason,
                json,
            } => {
                let raw = vmss_healer::operations::swap::Raw {
                    capacity: capacity.as_deref(),
                    soak: Some(soak),
                    timeout: Some(timeout),
                    dry_run: *dry_run,
                };
                operator::start_swap(&settings, &store, from, to, &raw, reason, *json).await
            }
            Command::Prototype {
                scale_set,
                instance,
                auto,
                gallery,
                max_history,
                minimum_ready,
                timeout,
                version_timeout,
                then_cycle,
                dry_run,
                reason,
                json,
            } => {
                let raw = vmss_healer::operations::prototype::Raw {
                    instance: instance.as_deref(),
                    auto: *auto,
                    gallery: gallery.as_deref(),
                    max_history: Some(max_history),
                    minimum_ready: Some(minimum_ready),
                    timeout: Some(timeout),
                    version_timeout: Some(version_timeout),
                    then_cycle: *then_cycle,
                    dry_run: *dry_run,
                };
                operator::start_prototype(&settings, &store, scale_set, &raw, reason, *json).await
            }
            Command::Operation { command } => {
                use vmss_healer::operations::Command as Op;
                let (op, args) = match command {
                    OperationCommand::Pause(a) => (Op::Pause, a),
                    OperationCommand::Resume(a) => (Op::Resume, a),
                    OperationCommand::Abort(a) => (Op::Abort, a),
                };
                operator::command_operation(
                    &settings,
                    &store,
                    &args.id,
                    args.scale_set.as_deref(),
                    op,
                    &args.reason,
                )
                .await
            }
        }
    });
    match result {
        Ok(text) => {
            print!("{}", redact(&text));
            0
        }
        Err(e) => {
            eprintln!("handler {name}: {}", redact(&format!("{e:#}")));
            // The caller's mistake (a set or operation that is not there, a command the
            // operation's state does not allow): a usage error, exit 2.
            if e.downcast_ref::<vmss_healer::operator::NoSuchScaleSet>()
                .is_some()
                || e.downcast_ref::<vmss_healer::operator::NoSuchOperation>()
                    .is_some()
                || e.downcast_ref::<vmss_healer::operations::Refused>()
                    .is_some()
                || e.downcast_ref::<vmss_healer::operator::NotStarted>()
                    .is_some()
                || e.downcast_ref::<vmss_healer::operator::BadQuery>()
                    .is_some()
            {
                2
            } else {
                1
            }
        }
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let store =
        Store::connect(&settings.storage, credential).context("configuring table storage")?;
    let compute = Compute::new(
        &settings.arm_endpoint,
        credential(None).context("configuring the Resource Manager credential")?,
        settings.call_timeout.unsigned_abs(),
    )
    .context("configuring the Compute client")?;
    // A stateful policy that cannot work on its set (an address on a Uniform set) stops the
    // handler here, every such problem listed; the host allows 30 s before `GET /` must answer.
    let refusals = tokio::time::timeout(
        Duration::from_secs(10),
        vmss_healer::sync::stateful_refusals(&compute, &settings),
    )
    .await
    .unwrap_or_default();
    if !refusals.is_empty() {
        return Err(vmss_healer::settings::SettingsErrors(refusals).into());
    }
    let listener = vmss_healer::admission::bind(settings.port)
        .await
        .with_context(|| format!("listening on 127.0.0.1:{}", settings.port))?;
    tracing::info!(
        port = settings.port,
        scale_sets = settings.scale_sets.len(),
        dry_run = settings.dry_run,
        "handler ready"
    );

    // Tables are created in the background: the host needs `GET /` answered within 30 s even when
    // storage is slow, and invocations meanwhile fail as transient (and are retried).
    let tables = store.clone();
    tokio::spawn(async move {
        let mut delay = Duration::from_secs(1);
        loop {
            match tables.ensure_tables().await {
                Ok(()) => break,
                Err(e) => {
                    tracing::error!(error = %e, retry_in_s = delay.as_secs(), "cannot create the tables yet");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(30));
                }
            }
        }
    });

    let notifier = vmss_healer::alert::Notifier::new(settings.webhook_url.clone());
    let state = AppState {
        settings: Arc::new(settings),
        store,
        compute,
        notifier,
        counters: Arc::new(Counters::default()),
        prompts: Default::default(),
    };
    axum::serve(listener, app(state))
        .with_graceful_shutdown(stopped())
        .await
        .context("serving")
}

/// Ctrl-C, or the platform's SIGTERM when it stops or recycles the app: either lets the telemetry
/// buffered so far be exported.
async fn stopped() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
