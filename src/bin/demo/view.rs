//! What the demo shows while it runs: on a terminal, a live screen redrawn every tick (story
//! progress, a health bar per scale set, open incidents, the latest decisions); otherwise plain
//! lines, one per event, for logs and tests.

use std::io::Write;
use vmss_healer::status::{bar, SetStatus};

pub struct View {
    live: bool,
    log: Vec<String>,
}

impl View {
    pub fn new(live: bool) -> Self {
        View {
            live,
            log: Vec::new(),
        }
    }

    /// One event: printed at once in plain mode, kept for the screen in live mode.
    pub fn line(&mut self, seconds: f32, text: &str) {
        let line = format!("{seconds:>6.1}s  {text}");
        if !self.live {
            println!("{line}");
        }
        self.log.push(line);
    }

    pub fn frame(
        &self,
        tick: u32,
        last: u32,
        act: usize,
        acts: usize,
        title: &str,
        sets: &[SetStatus],
    ) {
        if !self.live {
            return;
        }
        let mut out = String::from("\x1b[H\x1b[2J");
        let done = (tick.min(last) * 30 / last.max(1)) as usize;
        out.push_str(&format!(
            "vmss-healer demo  [{}{}] tick {tick}/{last}\nact {act}/{acts}: {title}\n\n",
            "=".repeat(done),
            " ".repeat(30 - done)
        ));
        for s in sets {
            out.push_str(&format!(
                "{:<5} [{}] {:>3} ok {:>3} bad {:>3} fixing {:>3} maint  {}\n",
                s.name,
                bar(s, 40),
                s.healthy,
                s.unhealthy,
                s.repairing,
                s.maintenance,
                s.brake
                    .as_deref()
                    .map(|b| format!("PAUSED: {b}"))
                    .unwrap_or_default()
            ));
        }
        out.push_str("      # healthy  R repairing  ! unhealthy  M maintenance  . starting/suspect\n\nopen incidents\n");
        let incidents: Vec<String> = sets
            .iter()
            .flat_map(|s| {
                s.incidents.iter().map(move |i| {
                    format!(
                        "  {}#{} {} ({}) {} attempt {}",
                        s.name,
                        i.instance,
                        i.state,
                        i.cause,
                        i.action.as_deref().unwrap_or("-"),
                        i.attempt
                    )
                })
            })
            .collect();
        if incidents.is_empty() {
            out.push_str("  none\n");
        }
        for i in incidents.iter().take(8) {
            out.push_str(i);
            out.push('\n');
        }
        out.push_str("\ndecisions\n");
        let start = self.log.len().saturating_sub(14);
        for l in &self.log[start..] {
            let shown: String = l.chars().take(150).collect();
            out.push_str(&shown);
            out.push('\n');
        }
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(out.as_bytes());
        let _ = stdout.flush();
    }
}
