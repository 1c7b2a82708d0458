//! A mix's files: the selected samples in pack order, the packs and the mix
//! report as Arrow IPC, each written atomically.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    ArrayRef, AsArray, BinaryArray, Float64Array, ListArray, RecordBatch, StringArray, UInt8Array,
    UInt32Array, UInt64Array,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, UInt8Type, UInt32Type};
use lvpipe_schemas::{mix_report_schema, mix_samples_schema, packs_schema};

use super::{Pack, Selection, SourceReport, Unit};
use crate::{Error, Result};

/// Rows written per IPC record batch.
const ROWS_PER_BATCH: usize = 4096;

pub(super) fn samples_batches(
    selection: &Selection,
    order: &[Unit],
    packs: &[Pack],
) -> Result<Vec<RecordBatch>> {
    let mut pack_of = vec![0u32; order.len()];
    for (id, p) in packs.iter().enumerate() {
        pack_of[p.first..p.first + p.count].fill(id as u32);
    }
    let mut out = Vec::new();
    for (offset, chunk) in order.chunks(ROWS_PER_BATCH).enumerate() {
        let base = offset * ROWS_PER_BATCH;
        let col = |name: &str, u: &Unit| {
            selection.batches[u.batch]
                .column_by_name(name)
                .expect("selected")
                .clone()
        };
        let mut ids = Vec::new();
        let mut masks = Vec::new();
        let mut lens = Vec::with_capacity(chunk.len());
        let mut media_lens = Vec::with_capacity(chunk.len());
        let mut media_bytes: Vec<Vec<u8>> = Vec::new();
        for u in chunk {
            let list = col("input_ids", u);
            let values = list.as_list::<i32>().value(u.row);
            ids.extend_from_slice(
                &values.as_primitive::<UInt32Type>().values()[u.start as usize..u.end as usize],
            );
            let list = col("loss_mask", u);
            let values = list.as_list::<i32>().value(u.row);
            masks.extend_from_slice(
                &values.as_primitive::<UInt8Type>().values()[u.start as usize..u.end as usize],
            );
            lens.push((u.end - u.start) as usize);
            // Chunks of long documents are text-only; a whole sample brings its media.
            let list = col("media", u);
            let items = list.as_list::<i32>().value(u.row);
            let bytes = items
                .as_struct()
                .column_by_name("bytes")
                .expect("media schema")
                .as_binary::<i32>()
                .clone();
            media_lens.push(arrow::array::Array::len(&bytes));
            media_bytes.extend(bytes.iter().map(|b| b.unwrap_or_default().to_vec()));
        }
        let string = |name: &str| -> ArrayRef {
            Arc::new(
                chunk
                    .iter()
                    .map(|u| Some(col(name, u).as_string::<i32>().value(u.row).to_string()))
                    .collect::<StringArray>(),
            )
        };
        let media = |u: &Unit| {
            let b = &selection.batches[u.batch];
            let get = |n: &str| {
                b.column_by_name(n)
                    .expect("selected")
                    .as_primitive::<UInt32Type>()
                    .value(u.row)
            };
            get("num_images") + get("num_frames")
        };
        let item = |t: DataType| Arc::new(Field::new("item", t, false));
        let columns: Vec<ArrayRef> = vec![
            Arc::new(UInt32Array::from_iter_values(
                (0..chunk.len()).map(|i| pack_of[base + i]),
            )),
            string("sample_id"),
            string("source"),
            Arc::new(UInt32Array::from_iter_values(chunk.iter().map(|u| u.chunk))),
            Arc::new(UInt32Array::from_iter_values(chunk.iter().map(media))),
            Arc::new(UInt32Array::from_iter_values(
                chunk.iter().map(|u| u.expanded),
            )),
            Arc::new(ListArray::try_new(
                item(DataType::UInt32),
                OffsetBuffer::from_lengths(lens.iter().copied()),
                Arc::new(UInt32Array::from(ids)),
                None,
            )?),
            Arc::new(ListArray::try_new(
                item(DataType::UInt8),
                OffsetBuffer::from_lengths(lens.iter().copied()),
                Arc::new(UInt8Array::from(masks)),
                None,
            )?),
            Arc::new(ListArray::try_new(
                item(DataType::Binary),
                OffsetBuffer::from_lengths(media_lens),
                Arc::new(BinaryArray::from_iter_values(media_bytes.iter())),
                None,
            )?),
        ];
        out.push(RecordBatch::try_new(mix_samples_schema(), columns)?);
    }
    Ok(out)
}

pub(super) fn packs_batch(stage: usize, packs: &[Pack], context: u32) -> Result<RecordBatch> {
    Ok(RecordBatch::try_new(
        packs_schema(),
        vec![
            Arc::new(UInt32Array::from_iter_values(
                packs.iter().map(|_| stage as u32),
            )),
            Arc::new(UInt32Array::from_iter_values(0..packs.len() as u32)),
            Arc::new(UInt64Array::from_iter_values(
                packs.iter().map(|p| p.first as u64),
            )),
            Arc::new(UInt32Array::from_iter_values(
                packs.iter().map(|p| p.count as u32),
            )),
            Arc::new(UInt32Array::from_iter_values(
                packs.iter().map(|p| p.tokens),
            )),
            Arc::new(UInt32Array::from_iter_values(
                packs.iter().map(|p| context - p.tokens),
            )),
        ],
    )?)
}

pub(super) fn report_batch(stage: usize, reports: &[SourceReport]) -> Result<RecordBatch> {
    let schema = mix_report_schema();
    let u64s = |f: &dyn Fn(&SourceReport) -> u64| {
        Arc::new(UInt64Array::from_iter_values(reports.iter().map(f))) as ArrayRef
    };
    let f64s = |f: &dyn Fn(&SourceReport) -> f64| {
        Arc::new(Float64Array::from_iter_values(reports.iter().map(f))) as ArrayRef
    };
    Ok(RecordBatch::try_new(
        schema,
        vec![
            Arc::new(UInt32Array::from_iter_values(
                reports.iter().map(|_| stage as u32),
            )),
            Arc::new(StringArray::from_iter_values(
                reports.iter().map(|r| r.source.as_str()),
            )),
            u64s(&|r| r.selected),
            u64s(&|r| r.too_long),
            f64s(&|r| r.target_share),
            f64s(&|r| r.realized_share),
            u64s(&|r| r.samples),
            u64s(&|r| r.tokens),
        ],
    )?)
}

/// Writes an Arrow IPC file atomically.
pub(super) fn write_ipc(path: &Path, batches: &[RecordBatch]) -> Result<()> {
    let schema = batches
        .first()
        .map(|b| b.schema())
        .unwrap_or_else(mix_samples_schema);
    let tmp: PathBuf = path.with_extension("arrow.tmp");
    let file = std::fs::File::create(&tmp)?;
    let mut writer =
        arrow::ipc::writer::FileWriter::try_new(std::io::BufWriter::new(file), &schema)?;
    for batch in batches {
        writer.write(batch)?;
    }
    writer.finish()?;
    let file = writer
        .into_inner()?
        .into_inner()
        .map_err(|e| Error::Io(e.into_error()))?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

/// Reads every batch of a small IPC file (packs, reports) into memory.
pub fn read_ipc(path: &Path) -> Result<Vec<RecordBatch>> {
    let file = fs_err::File::open(path)?;
    let reader = arrow::ipc::reader::FileReader::try_new(std::io::BufReader::new(file), None)?;
    Ok(reader.collect::<std::result::Result<Vec<_>, _>>()?)
}
