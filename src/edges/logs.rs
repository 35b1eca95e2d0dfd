//! How log lines reach the Functions host, and through it Application Insights, with their
//! severity. The host reads a custom handler's output line by line and has no other channel for
//! its level: every line on standard output is logged at Information; a line on standard error
//! is a Warning if it contains "warn" and otherwise an Error when it contains "error" or "fail"
//! (azure-functions-host, `WorkerProcess.ParseErrorMessageAndLog`). So warnings and errors go to
//! standard error, where the level `tracing` writes at the start of each line (`WARN`, `ERROR`)
//! carries them; everything else to standard output. Every line is redacted first.

use crate::secret::Output;
use tracing::Level;
use tracing_subscriber::fmt::writer::MakeWriterExt;
use tracing_subscriber::fmt::MakeWriter;

/// The handler's log writer: warnings and errors to standard error, the rest to standard output.
pub fn for_the_host() -> impl for<'a> MakeWriter<'a> + Send + Sync + 'static {
    Output::Stderr
        .with_max_level(Level::WARN)
        .or_else(Output::Stdout)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    /// A writer into a shared buffer, standing for one of the two streams.
    #[derive(Clone, Default)]
    struct Stream(Arc<Mutex<Vec<u8>>>);

    impl Write for Stream {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Stream {
        fn text(&self) -> String {
            String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
        }
    }

    #[test]
    fn warnings_and_errors_reach_the_host_as_such() {
        let (out, err) = (Stream::default(), Stream::default());
        let (o, e) = (out.clone(), err.clone());
        // The same routing as `for_the_host`, over buffers instead of the process's streams.
        let writer = (move || e.clone())
            .with_max_level(Level::WARN)
            .or_else(move || o.clone());
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_target(false)
            .with_writer(writer)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!("heartbeat stored");
            tracing::warn!("repairs paused");
            tracing::error!("mirror sync failed");
        });
        let (out, err) = (out.text(), err.text());
        assert!(
            out.contains("heartbeat stored") && !out.contains("paused"),
            "{out}"
        );
        // The host's rule, applied to what reached standard error.
        let level = |line: &str| {
            let lower = line.to_ascii_lowercase();
            if lower.contains("warn") {
                "Warning"
            } else if lower.contains("error") || lower.contains("fail") {
                "Error"
            } else {
                "Information"
            }
        };
        let levels: Vec<&str> = err.lines().map(level).collect();
        assert_eq!(levels, ["Warning", "Error"], "{err}");
    }
}
