//! What a scenario reports: a titled section of Markdown tables, notes, and the
//! invariants that broke.

use std::fmt::Write as _;

/// A table, rendered as aligned Markdown (readable in a terminal and in `BENCHMARKS.md`).
#[derive(Debug, Clone, Default)]
pub struct Table {
    headers: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new<S: Into<String>>(headers: impl IntoIterator<Item = S>) -> Self {
        Self {
            headers: headers.into_iter().map(Into::into).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row<S: Into<String>>(&mut self, cells: impl IntoIterator<Item = S>) {
        self.rows.push(cells.into_iter().map(Into::into).collect());
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    pub fn render(&self) -> String {
        let columns = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, cell) in row.iter().enumerate().take(columns) {
                widths[i] = widths[i].max(cell.chars().count());
            }
        }
        let line = |cells: &[String]| {
            let mut out = String::from("|");
            for (i, width) in widths.iter().enumerate() {
                let cell = cells.get(i).map_or("", String::as_str);
                let pad = width.saturating_sub(cell.chars().count());
                let _ = write!(out, " {cell}{} |", " ".repeat(pad));
            }
            out
        };
        let mut out = line(&self.headers);
        out.push('\n');
        out.push('|');
        for width in &widths {
            let _ = write!(out, " {} |", "-".repeat((*width).max(3)));
        }
        out.push('\n');
        for row in &self.rows {
            out.push_str(&line(row));
            out.push('\n');
        }
        out
    }
}

/// One scenario's report.
#[derive(Debug, Clone, Default)]
pub struct Section {
    pub title: String,
    /// What was run and which invariants were checked, as Markdown paragraphs.
    pub about: Vec<String>,
    pub tables: Vec<Table>,
    /// Skipped stores, measurement caveats.
    pub notes: Vec<String>,
    /// Each broken invariant, in words. Empty: everything held.
    pub violations: Vec<String>,
}

impl Section {
    pub fn new(title: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            ..Self::default()
        }
    }

    pub fn about(&mut self, text: impl Into<String>) {
        self.about.push(text.into());
    }

    pub fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }

    pub fn violation(&mut self, text: impl Into<String>) {
        self.violations.push(text.into());
    }

    pub fn render(&self) -> String {
        let mut out = format!("## {}\n\n", self.title);
        for paragraph in &self.about {
            out.push_str(paragraph);
            out.push_str("\n\n");
        }
        for table in self.tables.iter().filter(|t| !t.is_empty()) {
            out.push_str(&table.render());
            out.push('\n');
        }
        for note in &self.notes {
            let _ = writeln!(out, "- {note}");
        }
        if !self.notes.is_empty() {
            out.push('\n');
        }
        if self.violations.is_empty() {
            out.push_str("Invariants: **held**.\n");
        } else {
            out.push_str("Invariants: **BROKEN**\n\n");
            for violation in &self.violations {
                let _ = writeln!(out, "- {violation}");
            }
        }
        out
    }
}

/// `n` per second over `secs`, for tables.
pub fn per_sec(n: u64, secs: f64) -> String {
    if secs <= 0.0 {
        return "-".to_owned();
    }
    format!("{:.0}", n as f64 / secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_render_as_aligned_markdown() {
        let mut table = Table::new(["store", "runs/s"]);
        table.row(["redis", "12345"]);
        assert_eq!(
            table.render(),
            "| store | runs/s |\n| ----- | ------ |\n| redis | 12345  |\n"
        );
    }
}
