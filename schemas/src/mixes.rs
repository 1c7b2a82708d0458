//! The tables of a stage's mix (Arrow IPC files the loader memory-maps):
//! `samples.arrow`, `packs.arrow` and `mix_report.arrow`.

use std::sync::Arc;

use arrow::datatypes::{DataType, Field, Schema, SchemaRef};

/// Schema of a mix's `samples.arrow`: the selected samples in pack order,
/// tokens and encoded media ready for the loader.
pub fn mix_samples_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("pack_id", DataType::UInt32, false),
        Field::new("sample_id", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("chunk", DataType::UInt32, false),
        Field::new("num_media", DataType::UInt32, false),
        Field::new("expanded_len", DataType::UInt32, false),
        Field::new(
            "input_ids",
            DataType::List(Arc::new(Field::new("item", DataType::UInt32, false))),
            false,
        ),
        Field::new(
            "loss_mask",
            DataType::List(Arc::new(Field::new("item", DataType::UInt8, false))),
            false,
        ),
        // Encoded images and frames (JPEG, as stored in the shards); the
        // loader decodes them for the batches it is about to hand out.
        Field::new(
            "media",
            DataType::List(Arc::new(Field::new("item", DataType::Binary, false))),
            false,
        ),
    ]))
}

/// Schema of a mix's `packs.arrow`: which rows of `samples.arrow` share a
/// pack, its tokens and its padding.
pub fn packs_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("stage", DataType::UInt32, false),
        Field::new("pack_id", DataType::UInt32, false),
        Field::new("first_row", DataType::UInt64, false),
        Field::new("num_samples", DataType::UInt32, false),
        Field::new("tokens", DataType::UInt32, false),
        Field::new("waste", DataType::UInt32, false),
    ]))
}

/// Schema of `mix_report.arrow`: target against realized share per source.
pub fn mix_report_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("stage", DataType::UInt32, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("selected", DataType::UInt64, false),
        Field::new("too_long", DataType::UInt64, false),
        Field::new("target_share", DataType::Float64, false),
        Field::new("realized_share", DataType::Float64, false),
        Field::new("samples", DataType::UInt64, false),
        Field::new("tokens", DataType::UInt64, false),
    ]))
}
