//! `handler`: the Azure Functions custom handler. The Functions host starts it with
//! `FUNCTIONS_CUSTOMHANDLER_PORT` set and posts each invocation to `/{function-name}`.

use anyhow::Context;
use std::sync::Arc;
use std::time::Duration;
use tracing_subscriber::EnvFilter;
use vmss_healer::compute::Compute;
use vmss_healer::host::{app, AppState, Counters};
use vmss_healer::identity::credential;
use vmss_healer::settings::Settings;
use vmss_healer::state::Store;

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--settings-table") {
        print!("{}", vmss_healer::settings::markdown_table());
        return;
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_target(false)
        .with_ansi(false)
        .init();

    let settings = match Settings::from_env() {
        Ok(s) => s,
        Err(problems) => {
            eprint!("{problems}");
            std::process::exit(2);
        }
    };
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
    if let Err(e) = runtime.block_on(serve(settings)) {
        tracing::error!(error = format!("{e:#}"), "handler stopped");
        eprintln!("handler: {e:#}");
        std::process::exit(1);
    }
}

async fn serve(settings: Settings) -> anyhow::Result<()> {
    let store =
        Store::connect(&settings.storage, credential).context("configuring table storage")?;
    let compute = Compute::new(
        &settings.arm_endpoint,
        credential(None).context("configuring the Resource Manager credential")?,
    )
    .context("configuring the Compute client")?;
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", settings.port))
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
    };
    axum::serve(listener, app(state))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
        .context("serving")
}
