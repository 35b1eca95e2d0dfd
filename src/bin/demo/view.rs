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
                "{:<5} [{}] {:>3} ok {:>3} failing {:>3} fixing {:>3} maint  {}\n",
                s.name,
                bar(s, 40),
                s.healthy,
                s.unhealthy + s.suspect,
                s.repairing,
                s.maintenance,
                s.brake
                    .as_deref()
                    .map(|b| format!("PAUSED: {b}"))
                    .unwrap_or_default()
            ));
        }
        out.push_str("      # healthy  R repairing  ! unhealthy  ? failing, not counted yet  M maintenance  . starting\n\nopen incidents\n");
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
        let width = std::env::var("COLUMNS")
            .ok()
            .and_then(|c| c.parse::<usize>().ok())
            .unwrap_or(120)
            .max(40);
        for l in &self.log[start..] {
            out.push_str(&fit(l, width));
            out.push('\n');
        }
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(out.as_bytes());
        let _ = stdout.flush();
    }
}

/// A line cut to `width` characters at a word boundary, with an ellipsis: a terminal would
/// otherwise wrap it mid-word and push the screen down.
fn fit(line: &str, width: usize) -> String {
    if line.chars().count() <= width {
        return line.to_string();
    }
    let cut: String = line.chars().take(width.saturating_sub(1)).collect();
    let at = cut
        .rfind(' ')
        .filter(|&i| i > width / 2)
        .unwrap_or(cut.len());
    format!("{}…", cut[..at].trim_end())
}

#[cfg(test)]
mod tests {
    use super::fit;

    #[test]
    fn long_lines_are_cut_at_a_word() {
        assert_eq!(fit("short", 40), "short");
        let long =
            "withheld api#* too_many_unhealthy: 25 of 50 instances unhealthy, more than allowed";
        let cut = fit(long, 40);
        assert!(cut.chars().count() <= 40, "{cut}");
        assert!(
            cut.ends_with('…') && long.starts_with(cut.trim_end_matches('…')),
            "{cut}"
        );
        assert!(
            !cut.trim_end_matches('…').ends_with("unhealth"),
            "not mid-word: {cut}"
        );
    }
}
