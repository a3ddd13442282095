//! Printing a report: pretty JSON with `--json`, the human rendering otherwise.

use serde::Serialize;

/// Print `report` on stdout as JSON, or as `render` makes it readable.
pub fn print<T: Serialize>(report: &T, json: bool, render: impl FnOnce(&T) -> String) {
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(report)
                .unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
        );
    } else {
        print!("{}", render(report));
    }
}
