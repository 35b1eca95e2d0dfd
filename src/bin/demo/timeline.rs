//! The run as one picture (SVG): every instance a row, every tick a column coloured by what the
//! healer judged it, repairs marked, pauses shaded, acts labelled.

use std::collections::BTreeMap;
use std::fmt::Write;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cell {
    Healthy,
    Suspect,
    Unhealthy,
    Repairing,
    Maintenance,
    Starting,
    /// Held by a long-running operation (being cycled).
    Cycling,
}

impl Cell {
    fn colour(self) -> &'static str {
        match self {
            Cell::Healthy => "#3a9d5d",
            Cell::Suspect => "#e0b030",
            Cell::Unhealthy => "#d64541",
            Cell::Repairing => "#f07f1e",
            Cell::Maintenance => "#4a7bd0",
            Cell::Starting => "#b8c4cc",
            Cell::Cycling => "#8e5bd0",
        }
    }
}

#[derive(Default)]
pub struct Timeline {
    /// (set, instance) → (tick, cell).
    rows: BTreeMap<(String, u64), Vec<(u32, Cell)>>,
    repairs: Vec<(String, u64, u32)>,
    /// (set, tick) while the set was paused, with the brake.
    pauses: Vec<(String, u32, String)>,
    acts: Vec<(u32, String)>,
    /// Seconds since the start at each tick, for the time axis.
    times: BTreeMap<u32, f32>,
    ticks: u32,
}

impl Timeline {
    pub fn cell(&mut self, set: &str, instance: u64, tick: u32, cell: Cell) {
        self.rows
            .entry((set.to_string(), instance))
            .or_default()
            .push((tick, cell));
        self.ticks = self.ticks.max(tick + 1);
    }

    pub fn repair(&mut self, set: &str, instance: u64, tick: u32) {
        self.repairs.push((set.to_string(), instance, tick));
    }

    pub fn pause(&mut self, set: &str, tick: u32, brake: &str) {
        self.pauses.push((set.to_string(), tick, brake.to_string()));
    }

    pub fn time(&mut self, tick: u32, seconds: f32) {
        self.times.insert(tick, seconds);
    }

    pub fn act(&mut self, tick: u32, title: &str) {
        self.acts.push((tick, title.to_string()));
    }

    pub fn svg(&self) -> String {
        const LEFT: u32 = 90;
        const TOP: u32 = 40;
        const CELL_W: u32 = 10;
        const ROW_H: u32 = 3;
        const GAP: u32 = 14;
        let mut set_top: BTreeMap<&str, (u32, u32)> = BTreeMap::new();
        let mut y_of: BTreeMap<(&str, u64), u32> = BTreeMap::new();
        let mut y = TOP;
        let mut current: Option<&str> = None;
        for (set, instance) in self.rows.keys() {
            if current != Some(set.as_str()) {
                if current.is_some() {
                    y += GAP;
                }
                current = Some(set.as_str());
                set_top.insert(set.as_str(), (y, y));
            }
            y_of.insert((set.as_str(), *instance), y);
            if let Some(span) = set_top.get_mut(set.as_str()) {
                span.1 = y + ROW_H;
            }
            y += ROW_H;
        }
        let width = (LEFT + self.ticks * CELL_W + 20).max(LEFT + 900);
        // Below the rows: the time axis, then the acts.
        let axis = y + 4;
        let y = axis + 16;
        let height = y + 24 + self.acts.len() as u32 * 14;
        let mut s = String::new();
        let _ = writeln!(
            s,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="10">"#
        );
        let _ = writeln!(s, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let _ = writeln!(
            s,
            r#"<text x="{LEFT}" y="16" font-size="13" font-weight="bold">vmss-healer demo: every instance a row, every tick a column</text>"#
        );
        for ((set, instance), cells) in &self.rows {
            let row_y = y_of[&(set.as_str(), *instance)];
            // One rectangle per run of equal cells: a row is a few runs, not a cell per tick.
            let mut i = 0;
            while i < cells.len() {
                let (start, cell) = cells[i];
                let mut end = start;
                while i + 1 < cells.len() && cells[i + 1].1 == cell && cells[i + 1].0 == end + 1 {
                    i += 1;
                    end = cells[i].0;
                }
                let _ = writeln!(
                    s,
                    r#"<rect x="{}" y="{row_y}" width="{}" height="{ROW_H}" fill="{}"/>"#,
                    LEFT + start * CELL_W,
                    (end - start + 1) * CELL_W,
                    cell.colour()
                );
                i += 1;
            }
        }
        for (set, (top, bottom)) in &set_top {
            let _ = writeln!(
                s,
                r#"<text x="4" y="{}" font-weight="bold">{set}</text>"#,
                (top + bottom) / 2 + 4
            );
        }
        for (set, tick, brake) in self.pause_runs() {
            let spans: Vec<(u32, u32)> = if set.as_str() == "*" {
                set_top.values().copied().collect()
            } else {
                set_top.get(set.as_str()).copied().into_iter().collect()
            };
            for (top, bottom) in spans {
                let x = LEFT + tick.0 * CELL_W;
                let _ = writeln!(
                    s,
                    r#"<rect x="{x}" y="{top}" width="{}" height="{}" fill="black" fill-opacity="0.25"><title>paused: {brake}</title></rect><text x="{}" y="{}" fill="white" font-weight="bold" class="pause-label">{}</text>"#,
                    (tick.1 - tick.0 + 1) * CELL_W,
                    bottom - top,
                    x + 3,
                    top + 11,
                    escape(&brake)
                );
            }
        }
        for (set, instance, tick) in &self.repairs {
            if let Some(row_y) = y_of.get(&(set.as_str(), *instance)) {
                let (x, y) = (LEFT + tick * CELL_W + CELL_W / 2, row_y + ROW_H / 2);
                let _ = writeln!(
                    s,
                    r#"<circle cx="{x}" cy="{y}" r="4" fill="black"><title>repair {set}#{instance}</title></circle>"#
                );
            }
        }
        // The time axis: a tick mark every ten ticks, with the seconds since the start.
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{axis}" x2="{}" y2="{axis}" stroke="#333" class="axis"/>"##,
            LEFT + self.ticks * CELL_W
        );
        for (tick, seconds) in self.times.iter().filter(|(t, _)| *t % 10 == 0) {
            let x = LEFT + tick * CELL_W;
            let _ = writeln!(
                s,
                r##"<line x1="{x}" y1="{axis}" x2="{x}" y2="{}" stroke="#333"/><text x="{x}" y="{}" text-anchor="middle">{seconds:.0} s</text>"##,
                axis + 4,
                axis + 14
            );
        }
        // Each act: a numbered line where it starts, and its title in the list below the chart.
        for (i, (tick, title)) in self.acts.iter().enumerate() {
            let x = LEFT + tick * CELL_W;
            let _ = writeln!(
                s,
                r##"<line x1="{x}" y1="{}" x2="{x}" y2="{y}" stroke="#333" stroke-dasharray="2,2"/><text x="{}" y="{}" font-weight="bold">{}</text><text x="{LEFT}" y="{}">{}. {}</text>"##,
                TOP - 4,
                x + 2,
                TOP - 4 - (i as u32 % 2) * 9,
                i + 1,
                y + 16 + i as u32 * 14,
                i + 1,
                escape(title)
            );
        }
        let legend = [
            (Cell::Healthy, "healthy"),
            (Cell::Suspect, "suspect"),
            (Cell::Unhealthy, "unhealthy"),
            (Cell::Repairing, "repairing"),
            (Cell::Maintenance, "maintenance"),
            (Cell::Starting, "starting"),
            (Cell::Cycling, "cycling"),
        ];
        for (i, (cell, name)) in legend.iter().enumerate() {
            let x = LEFT + 330 + i as u32 * 80;
            let _ = writeln!(
                s,
                r#"<rect x="{x}" y="24" width="10" height="8" fill="{}"/><text x="{}" y="32">{name}</text>"#,
                cell.colour(),
                x + 13
            );
        }
        let _ = writeln!(s, "</svg>");
        s
    }
}

impl Timeline {
    /// Pauses as (set, (first tick, last tick), brake) runs.
    fn pause_runs(&self) -> Vec<(String, (u32, u32), String)> {
        let mut runs: Vec<(String, (u32, u32), String)> = Vec::new();
        let mut sorted = self.pauses.clone();
        sorted.sort();
        for (set, tick, brake) in sorted {
            match runs.last_mut() {
                Some((s, span, b)) if *s == set && *b == brake && span.1 + 1 == tick => {
                    span.1 = tick
                }
                _ => runs.push((set, (tick, tick), brake)),
            }
        }
        runs
    }
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}
