//! Validation of a record batch against a table's schema and invariants.

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{UInt8Type, UInt32Type};

use crate::{
    Error, QuarantineReason, Result, SampleKind, TableKind, quarantine_schema, samples_schema,
};

/// Checks that `batch` has exactly the columns of `table` and that every row
/// keeps the table's invariants:
///
/// - samples: `kind` is known; `input_ids`, `loss_mask` and `num_text_tokens`
///   agree in length; the mask is 0/1 and sums to `num_loss_tokens`; `media`
///   holds `num_images + num_frames` items.
/// - quarantine: `reason` is a known code.
///
/// Schema metadata is ignored; field names, types and nullability are not.
pub fn validate_batch(table: TableKind, batch: &RecordBatch) -> Result<()> {
    let (name, expected) = match table {
        TableKind::Samples => ("samples", samples_schema()),
        TableKind::Quarantine => ("quarantine", quarantine_schema()),
    };
    let actual = batch.schema();
    if actual.fields() != expected.fields() {
        let missing: Vec<_> = expected
            .fields()
            .iter()
            .filter(|f| actual.field_with_name(f.name()).ok() != Some(f.as_ref()))
            .map(|f| format!("{}: {}", f.name(), f.data_type()))
            .collect();
        return Err(Error::SchemaMismatch {
            table: name,
            message: if missing.is_empty() {
                "columns out of order or extra columns".to_string()
            } else {
                format!("missing or mistyped columns: {}", missing.join(", "))
            },
        });
    }
    for (i, field) in expected.fields().iter().enumerate() {
        if !field.is_nullable() && batch.column(i).null_count() > 0 {
            let row = (0..batch.num_rows())
                .find(|&r| batch.column(i).is_null(r))
                .unwrap_or(0);
            return Err(invalid(
                name,
                row,
                field.name(),
                "null in a non-nullable column",
            ));
        }
    }
    match table {
        TableKind::Samples => validate_samples(batch),
        TableKind::Quarantine => {
            let reasons = column(batch, "reason").as_string::<i32>();
            for (row, reason) in reasons.iter().enumerate() {
                QuarantineReason::parse(reason.unwrap_or_default())
                    .map_err(|e| invalid(name, row, "reason", &e.to_string()))?;
            }
            Ok(())
        }
    }
}

fn validate_samples(batch: &RecordBatch) -> Result<()> {
    let kinds = column(batch, "kind").as_string::<i32>();
    let ids = column(batch, "input_ids").as_list::<i32>();
    let masks = column(batch, "loss_mask").as_list::<i32>();
    let media = column(batch, "media").as_list::<i32>();
    let n_text = column(batch, "num_text_tokens").as_primitive::<UInt32Type>();
    let n_loss = column(batch, "num_loss_tokens").as_primitive::<UInt32Type>();
    let n_img = column(batch, "num_images").as_primitive::<UInt32Type>();
    let n_frm = column(batch, "num_frames").as_primitive::<UInt32Type>();
    for row in 0..batch.num_rows() {
        let bad = |column: &str, message: String| invalid("samples", row, column, &message);
        SampleKind::parse(kinds.value(row)).map_err(|e| bad("kind", e.to_string()))?;
        let len = ids.value_length(row) as u32;
        if masks.value_length(row) as u32 != len || n_text.value(row) != len {
            return Err(bad(
                "loss_mask",
                format!(
                    "input_ids has {len} tokens, loss_mask {}, num_text_tokens {}",
                    masks.value_length(row),
                    n_text.value(row)
                ),
            ));
        }
        let mask = masks.value(row);
        let mask = mask.as_primitive::<UInt8Type>();
        if let Some(v) = mask.values().iter().find(|&&v| v > 1) {
            return Err(bad("loss_mask", format!("value {v} is not 0 or 1")));
        }
        let ones: u32 = mask.values().iter().map(|&v| v as u32).sum();
        if ones != n_loss.value(row) {
            return Err(bad(
                "num_loss_tokens",
                format!(
                    "loss_mask sums to {ones}, column says {}",
                    n_loss.value(row)
                ),
            ));
        }
        let items = media.value_length(row) as u32;
        if items != n_img.value(row) + n_frm.value(row) {
            return Err(bad(
                "media",
                format!(
                    "{items} media items, but num_images {} + num_frames {}",
                    n_img.value(row),
                    n_frm.value(row)
                ),
            ));
        }
    }
    Ok(())
}

fn column<'a>(batch: &'a RecordBatch, name: &str) -> &'a dyn Array {
    // The schema was compared field by field above, so the column exists.
    batch
        .column_by_name(name)
        .expect("validated schema")
        .as_ref()
}

fn invalid(table: &'static str, row: usize, column: &str, message: &str) -> Error {
    Error::InvalidRow {
        table,
        row,
        column: column.to_string(),
        message: message.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{ArrayRef, StringArray};

    use super::*;

    fn quarantine_batch(reason: &str) -> RecordBatch {
        let s = |v: &str| Arc::new(StringArray::from(vec![v])) as ArrayRef;
        RecordBatch::try_new(
            quarantine_schema(),
            vec![
                s("src"),
                s("a.json:3"),
                s(reason),
                s("detail"),
                Arc::new(StringArray::from(vec![None::<&str>])),
            ],
        )
        .unwrap()
    }

    #[test]
    fn quarantine_reason_codes_are_checked() {
        validate_batch(TableKind::Quarantine, &quarantine_batch("corrupt_media")).unwrap();
        let err = validate_batch(TableKind::Quarantine, &quarantine_batch("oops")).unwrap_err();
        assert!(err.to_string().contains("row 0, column `reason`"), "{err}");
    }

    #[test]
    fn a_batch_of_another_table_is_refused() {
        let err = validate_batch(TableKind::Samples, &quarantine_batch("duplicate")).unwrap_err();
        assert!(matches!(err, Error::SchemaMismatch { .. }), "{err}");
    }
}
