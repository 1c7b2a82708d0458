//! Columnar sources: Parquet files read row group by row group and Arrow IPC
//! files batch by batch (never whole), each row handed to a converter with
//! the row number that names it. Rows that cannot be decoded become one
//! rejection per row group or batch; the file's other rows are read.

use std::path::Path;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Int64Type};
use lvpipe_schemas::QuarantineReason;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use serde_json::{Map, Number, Value};

use super::{Body, Emit, InputBytes, Reject};
use crate::{Error, Result};

/// Turns row `row` of a batch into a record.
pub(super) type ConvertRow<'a> = dyn Fn(&RecordBatch, usize) -> Body + 'a;

/// Whether `path` is read as a columnar file (by its extension).
pub(super) fn is_columnar(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e, "parquet" | "arrow" | "ipc" | "feather"))
}

/// Reads every row of a Parquet or Arrow IPC file. `bytes` advance by each
/// row group's or batch's share of the file.
pub(super) fn read_columnar(
    path: &Path,
    origin: &str,
    bytes: &InputBytes,
    emit: &mut Emit,
    convert: &ConvertRow,
) -> Result<()> {
    let not_readable = |e: &dyn std::fmt::Display| {
        Error::Config(format!(
            "{}: not a readable Parquet or Arrow file: {e}",
            path.display()
        ))
    };
    let file_bytes = fs_err::metadata(path)?.len();
    let mut row = 0u64;
    let rows_of = |batch: &RecordBatch, row: &mut u64, emit: &mut Emit| -> Result<()> {
        for i in 0..batch.num_rows() {
            *row += 1;
            emit(format!("{origin}:row {row}"), convert(batch, i))?;
        }
        Ok(())
    };
    if path.extension().is_some_and(|e| e == "parquet") {
        let file = fs_err::File::open(path)?.into_parts().0;
        let builder = ParquetRecordBatchReaderBuilder::try_new(file.try_clone()?)
            .map_err(|e| not_readable(&e))?;
        let groups: Vec<i64> = builder
            .metadata()
            .row_groups()
            .iter()
            .map(|g| g.num_rows())
            .collect();
        for (g, &rows) in groups.iter().enumerate() {
            let reader = ParquetRecordBatchReaderBuilder::try_new(file.try_clone()?)
                .map_err(|e| not_readable(&e))?
                .with_row_groups(vec![g])
                .with_batch_size(256)
                .build();
            let mut done = 0u64;
            let failed = match reader {
                Err(e) => Some(e.to_string()),
                Ok(batches) => {
                    let mut failed = None;
                    for batch in batches {
                        match batch {
                            Ok(b) => {
                                done += b.num_rows() as u64;
                                rows_of(&b, &mut row, emit)?;
                            }
                            Err(e) => {
                                failed = Some(e.to_string());
                                break;
                            }
                        }
                    }
                    failed
                }
            };
            if let Some(e) = failed {
                let lost = rows as u64 - done;
                let first = row + 1;
                row += lost;
                let reject = Reject::new(
                    QuarantineReason::UnreadableRows,
                    format!("row group {g} ({lost} rows) cannot be decoded: {e}"),
                );
                emit(format!("{origin}:rows {first}-{row}"), Err(reject))?;
            }
            bytes.add_read(file_bytes / groups.len().max(1) as u64);
        }
        return Ok(());
    }
    let file = fs_err::File::open(path)?.into_parts().0;
    let mut magic = [0u8; 6];
    let is_file_format = {
        use std::io::Read;
        let mut f = file.try_clone()?;
        f.read(&mut magic)? == 6 && &magic == b"ARROW1"
    };
    let batches: Box<
        dyn Iterator<Item = std::result::Result<RecordBatch, arrow::error::ArrowError>>,
    > = if is_file_format {
        Box::new(arrow::ipc::reader::FileReader::try_new(file, None).map_err(|e| not_readable(&e))?)
    } else {
        Box::new(
            arrow::ipc::reader::StreamReader::try_new(std::io::BufReader::new(file), None)
                .map_err(|e| not_readable(&e))?,
        )
    };
    for (b, batch) in batches.enumerate() {
        match batch {
            Ok(batch) => rows_of(&batch, &mut row, emit)?,
            Err(e) => {
                // A stream cannot go on past a batch it cannot decode.
                let reject = Reject::new(
                    QuarantineReason::UnreadableRows,
                    format!("batch {b} and after cannot be decoded: {e}"),
                );
                emit(format!("{origin}:batch {b}"), Err(reject))?;
                break;
            }
        }
    }
    bytes.add_read(file_bytes);
    Ok(())
}

/// Row `row` of a batch as a JSON object of its columns (strings, numbers,
/// booleans, lists and structs; other types as null), so that a columnar
/// record goes through the same converter as its JSON form.
pub(super) fn row_json(batch: &RecordBatch, row: usize) -> Value {
    let mut object = Map::new();
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        object.insert(field.name().clone(), cell_json(column, row));
    }
    Value::Object(object)
}

fn cell_json(array: &ArrayRef, row: usize) -> Value {
    if array.is_null(row) {
        return Value::Null;
    }
    let list =
        |values: ArrayRef| Value::Array((0..values.len()).map(|i| cell_json(&values, i)).collect());
    match array.data_type() {
        DataType::Utf8 => Value::String(array.as_string::<i32>().value(row).to_string()),
        DataType::LargeUtf8 => Value::String(array.as_string::<i64>().value(row).to_string()),
        DataType::Utf8View => Value::String(array.as_string_view().value(row).to_string()),
        DataType::Boolean => Value::Bool(array.as_boolean().value(row)),
        DataType::Int8
        | DataType::Int16
        | DataType::Int32
        | DataType::Int64
        | DataType::UInt8
        | DataType::UInt16
        | DataType::UInt32 => match arrow::compute::cast(&array.slice(row, 1), &DataType::Int64) {
            Ok(a) => Value::Number(a.as_primitive::<Int64Type>().value(0).into()),
            Err(_) => Value::Null,
        },
        DataType::UInt64 => Value::Number(
            array
                .as_primitive::<arrow::datatypes::UInt64Type>()
                .value(row)
                .into(),
        ),
        DataType::Float32 | DataType::Float64 => {
            match arrow::compute::cast(&array.slice(row, 1), &DataType::Float64) {
                Ok(a) => {
                    Number::from_f64(a.as_primitive::<arrow::datatypes::Float64Type>().value(0))
                        .map_or(Value::Null, Value::Number)
                }
                Err(_) => Value::Null,
            }
        }
        DataType::List(_) => list(array.as_list::<i32>().value(row)),
        DataType::LargeList(_) => list(array.as_list::<i64>().value(row)),
        DataType::Struct(fields) => {
            let s = array.as_struct();
            let mut object = Map::new();
            for (field, column) in fields.iter().zip(s.columns()) {
                object.insert(field.name().clone(), cell_json(column, row));
            }
            Value::Object(object)
        }
        _ => Value::Null,
    }
}

/// The `input_ids` of a pre-tokenized row: a list of integers in u32's
/// range, not empty.
pub(super) fn row_tokens(batch: &RecordBatch, row: usize) -> Body {
    let Some(column) = batch.column_by_name("input_ids") else {
        return Err(Reject::new(
            QuarantineReason::InvalidTokens,
            "no `input_ids` column",
        ));
    };
    let values = match column.data_type() {
        DataType::List(_) if !column.is_null(row) => column.as_list::<i32>().value(row),
        DataType::LargeList(_) if !column.is_null(row) => column.as_list::<i64>().value(row),
        other => {
            return Err(Reject::new(
                QuarantineReason::InvalidTokens,
                format!("`input_ids` is {other} (null here), not a list of integers"),
            ));
        }
    };
    let ints = arrow::compute::cast(&values, &DataType::Int64).map_err(|_| {
        Reject::new(
            QuarantineReason::InvalidTokens,
            format!("`input_ids` holds {}, not integers", values.data_type()),
        )
    })?;
    tokens_sample(
        ints.as_primitive::<Int64Type>()
            .iter()
            .map(|v| v.unwrap_or(-1)),
    )
}

/// The `input_ids` of a pre-tokenized JSONL line.
pub(super) fn json_tokens(value: Value) -> Body {
    let Some(Value::Array(ids)) = value.get("input_ids") else {
        return Err(Reject::new(
            QuarantineReason::InvalidTokens,
            "missing list `input_ids`",
        ));
    };
    tokens_sample(ids.iter().map(|v| v.as_i64().unwrap_or(-1)))
}

fn tokens_sample(ids: impl Iterator<Item = i64>) -> Body {
    let mut tokens = Vec::new();
    for (i, id) in ids.enumerate() {
        match u32::try_from(id) {
            Ok(t) => tokens.push(t),
            Err(_) => {
                return Err(Reject::new(
                    QuarantineReason::InvalidTokens,
                    format!("`input_ids`[{i}] is not a token id (a non-negative integer): {id}"),
                ));
            }
        }
    }
    if tokens.is_empty() {
        return Err(Reject::new(
            QuarantineReason::InvalidTokens,
            "`input_ids` is empty",
        ));
    }
    Ok(super::RawSample {
        annotation_id: None,
        kind: lvpipe_schemas::SampleKind::Text,
        turns: vec![],
        media: vec![],
        tokens: Some(tokens),
    })
}
