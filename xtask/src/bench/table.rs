//! A table rendered two ways: aligned plain text for the terminal, Markdown for the report.

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Table {
    pub headers: Vec<String>,
    pub rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(headers: &[&str]) -> Table {
        Table {
            headers: headers.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn widths(&self) -> Vec<usize> {
        let mut w: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, c) in row.iter().enumerate() {
                if i < w.len() {
                    w[i] = w[i].max(c.chars().count());
                }
            }
        }
        w
    }

    /// Columns padded to equal width; the first column left-aligned, the others right.
    pub fn text(&self) -> String {
        let w = self.widths();
        let line = |cells: &[String]| -> String {
            let parts: Vec<String> = w
                .iter()
                .enumerate()
                .map(|(i, &width)| {
                    let c = cells.get(i).map_or("", String::as_str);
                    if i == 0 {
                        format!("{c:<width$}")
                    } else {
                        format!("{c:>width$}")
                    }
                })
                .collect();
            parts.join("  ").trim_end().to_string()
        };
        let mut out = line(&self.headers);
        out.push('\n');
        out.push_str(&"-".repeat(w.iter().sum::<usize>() + 2 * w.len().saturating_sub(1)));
        out.push('\n');
        for row in &self.rows {
            out.push_str(&line(row));
            out.push('\n');
        }
        out
    }

    /// GitHub-flavoured Markdown; `|` inside cells is escaped.
    pub fn markdown(&self) -> String {
        let cell = |c: &str| c.replace('|', "\\|");
        let mut out = format!(
            "| {} |\n|{}|\n",
            self.headers
                .iter()
                .map(|h| cell(h))
                .collect::<Vec<_>>()
                .join(" | "),
            self.headers
                .iter()
                .enumerate()
                .map(|(i, _)| if i == 0 { "---" } else { "---:" })
                .collect::<Vec<_>>()
                .join("|")
        );
        for row in &self.rows {
            let cells: Vec<String> = (0..self.headers.len())
                .map(|i| cell(row.get(i).map_or("", String::as_str)))
                .collect();
            out.push_str(&format!("| {} |\n", cells.join(" | ")));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Table {
        let mut t = Table::new(&["case", "ns"]);
        t.row(vec!["udp|64".into(), "12.5".into()]);
        t.row(vec!["tcp".into(), "7".into()]);
        t
    }

    #[test]
    fn text_aligns_columns() {
        assert_eq!(
            sample().text(),
            "case      ns\n------------\nudp|64  12.5\ntcp        7\n"
        );
    }

    #[test]
    fn markdown_escapes_pipes_and_pads_short_rows() {
        let mut t = sample();
        t.row(vec!["short".into()]);
        assert_eq!(
            t.markdown(),
            "| case | ns |\n|---|---:|\n| udp\\|64 | 12.5 |\n| tcp | 7 |\n| short |  |\n"
        );
    }
}
