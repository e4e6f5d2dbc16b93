//! kubectl-style tables: upper-case headers, columns padded to the widest cell
//! plus three spaces (kubectl's tabwriter padding), `-` for an empty cell.

/// A table being built row by row.
pub struct Table {
    headers: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(headers: &[&'static str]) -> Self {
        Self { headers: headers.to_vec(), rows: Vec::new() }
    }

    /// Adds a row; missing cells print as `-`, extra cells are dropped.
    pub fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The aligned text, one line per row, each ending in a newline.
    pub fn render(&self) -> String {
        let cell = |row: &[String], i: usize| -> String {
            match row.get(i) {
                Some(c) if !c.is_empty() => c.clone(),
                _ => "-".to_owned(),
            }
        };
        let columns = self.headers.len();
        let mut widths: Vec<usize> = self.headers.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (i, width) in widths.iter_mut().enumerate() {
                *width = (*width).max(cell(row, i).chars().count());
            }
        }
        let mut out = String::new();
        let header: Vec<String> = self.headers.iter().map(|h| (*h).to_owned()).collect();
        for row in std::iter::once(&header).chain(self.rows.iter()) {
            let mut line = String::new();
            for i in 0..columns {
                let text = if std::ptr::eq(row, &header) { row[i].clone() } else { cell(row, i) };
                if i + 1 == columns {
                    line.push_str(&text);
                } else {
                    let pad = widths[i] - text.chars().count() + 3;
                    line.push_str(&text);
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_aligned_with_three_spaces_and_empty_cells_print_a_dash() {
        let mut table = Table::new(&["NAME", "IP"]);
        table.row(vec!["web-1".into(), "10.0.0.1".into()]);
        table.row(vec!["w".into(), String::new()]);
        assert_eq!(table.render(), "NAME    IP\nweb-1   10.0.0.1\nw       -\n");
    }
}
