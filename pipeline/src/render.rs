//! Query results as a table, CSV or JSON.

use arrow::array::{Array, RecordBatch};
use arrow::util::display::{ArrayFormatter, FormatOptions};
use comfy_table::{Cell, Table};

use crate::Result;

/// How `lvpipe sql` prints results.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// An aligned text table; long cells (image bytes, token lists) are cut.
    Table,
    Csv,
    /// One JSON object per row, newline-delimited.
    Json,
}

/// Longest cell of the table format, in characters.
const MAX_CELL_CHARS: usize = 80;

/// Renders batches in the given format.
pub fn render(batches: &[RecordBatch], format: OutputFormat) -> Result<String> {
    match format {
        OutputFormat::Table => render_table(batches),
        OutputFormat::Csv => {
            let mut out = Vec::new();
            let mut writer = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut out);
            for batch in batches {
                writer.write(batch)?;
            }
            drop(writer);
            Ok(String::from_utf8_lossy(&out).into_owned())
        }
        OutputFormat::Json => {
            let mut writer = arrow::json::LineDelimitedWriter::new(Vec::new());
            for batch in batches {
                writer.write(batch)?;
            }
            writer.finish()?;
            Ok(String::from_utf8_lossy(&writer.into_inner()).into_owned())
        }
    }
}

fn render_table(batches: &[RecordBatch]) -> Result<String> {
    let Some(first) = batches.first() else {
        return Ok("(no rows)\n".to_string());
    };
    let mut table = Table::new();
    table.load_preset("||--+-++|    ++++++");
    table.set_header(first.schema().fields().iter().map(|f| Cell::new(f.name())));
    let options = FormatOptions::default().with_null("NULL");
    let mut rows = 0;
    for batch in batches {
        let formatters = batch
            .columns()
            .iter()
            .map(|c| ArrayFormatter::try_new(c.as_ref() as &dyn Array, &options))
            .collect::<Result<Vec<_>, _>>()?;
        for row in 0..batch.num_rows() {
            table.add_row(
                formatters
                    .iter()
                    .map(|f| Cell::new(cut(f.value(row).to_string()))),
            );
            rows += 1;
        }
    }
    Ok(format!(
        "{table}\n({rows} row{})\n",
        if rows == 1 { "" } else { "s" }
    ))
}

fn cut(text: String) -> String {
    // One line per row: newlines in messages would break the table apart.
    let text = if text.contains('\n') {
        text.replace('\n', "\\n")
    } else {
        text
    };
    if text.chars().count() <= MAX_CELL_CHARS {
        return text;
    }
    let head: String = text.chars().take(MAX_CELL_CHARS - 1).collect();
    format!("{head}…")
}
