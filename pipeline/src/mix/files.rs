//! A mix's files: the selected samples in pack order, the packs and the mix
//! report as Arrow IPC, each written atomically.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, BinaryBuilder, Float64Array, ListArray, RecordBatch, StringArray,
    UInt8Array, UInt32Array, UInt64Array,
};
use arrow::buffer::OffsetBuffer;
use arrow::datatypes::{DataType, Field, SchemaRef, UInt8Type, UInt32Type};
use lvpipe_schemas::{mix_report_schema, mix_samples_schema, packs_schema};

use super::{Pack, Selection, SourceReport, Unit};
use crate::{Error, Result};

/// Rows written per IPC record batch, at most.
const ROWS_PER_BATCH: usize = 4096;
/// Token, mask and media bytes per IPC record batch, at most (a batch holds
/// at least one row): what `mix` holds of a stage at once, whatever the
/// stage's size.
pub(super) const BYTES_PER_BATCH: usize = 8 << 20;

/// Where one row's tokens, mask and media sit in the [`Spool`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Spooled {
    offset: u64,
    len: u64,
}

/// The selected rows' tokens, masks and media, appended as the query streams
/// them and read back in pack order: an unnamed temporary file, so a stage
/// never has to fit in memory. A record is `tokens: u32`, the ids as u32
/// and the mask as u8, `media: u32`, then each item as `len: u32` and bytes,
/// all little-endian.
pub(crate) struct Spool {
    writer: BufWriter<File>,
    len: u64,
    buf: Vec<u8>,
}

impl Spool {
    /// A spool in `dir` (on the mix's own file system: it is as large as the
    /// selected part of the shards).
    pub(crate) fn new(dir: &Path) -> Result<Self> {
        Ok(Spool {
            writer: BufWriter::with_capacity(1 << 20, tempfile::tempfile_in(dir)?),
            len: 0,
            buf: Vec::new(),
        })
    }

    /// Appends row `row` of a batch with `input_ids`, `loss_mask` and `media`.
    pub(crate) fn append(&mut self, batch: &RecordBatch, row: usize) -> Result<Spooled> {
        let column = |name: &str| batch.column_by_name(name).expect("selected");
        let ids = column("input_ids").as_list::<i32>().value(row);
        let ids = ids.as_primitive::<UInt32Type>().values();
        let mask = column("loss_mask").as_list::<i32>().value(row);
        let mask = mask.as_primitive::<UInt8Type>().values();
        let items = column("media").as_list::<i32>().value(row);
        let bytes = items
            .as_struct()
            .column_by_name("bytes")
            .expect("media schema")
            .as_binary::<i32>();
        let buf = &mut self.buf;
        buf.clear();
        buf.extend_from_slice(&(ids.len() as u32).to_le_bytes());
        for id in ids.iter() {
            buf.extend_from_slice(&id.to_le_bytes());
        }
        buf.extend_from_slice(mask);
        buf.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        for item in bytes.iter() {
            let item = item.unwrap_or_default();
            buf.extend_from_slice(&(item.len() as u32).to_le_bytes());
            buf.extend_from_slice(item);
        }
        self.writer.write_all(buf)?;
        let spooled = Spooled {
            offset: self.len,
            len: buf.len() as u64,
        };
        self.len += spooled.len;
        Ok(spooled)
    }

    /// The spool, written, ready to be read back.
    pub(crate) fn finish(self) -> Result<SpoolReader> {
        let file = self
            .writer
            .into_inner()
            .map_err(|e| Error::Io(e.into_error()))?;
        Ok(SpoolReader { file })
    }
}

pub(crate) struct SpoolReader {
    file: File,
}

/// One spooled row, read back.
struct Record<'a> {
    ids: &'a [u8],
    mask: &'a [u8],
    media: Vec<&'a [u8]>,
}

impl SpoolReader {
    fn read<'a>(&self, at: Spooled, buf: &'a mut Vec<u8>) -> Result<Record<'a>> {
        use std::os::unix::fs::FileExt;
        buf.resize(at.len as usize, 0);
        self.file.read_exact_at(buf, at.offset)?;
        let mut rest: &'a [u8] = buf;
        let mut take = |n: usize| {
            let (head, tail) = rest.split_at(n);
            rest = tail;
            head
        };
        let u32_at = |b: &[u8]| u32::from_le_bytes(b.try_into().expect("4 bytes")) as usize;
        let tokens = u32_at(take(4));
        let ids = take(4 * tokens);
        let mask = take(tokens);
        let count = u32_at(take(4));
        let mut media = Vec::with_capacity(count);
        for _ in 0..count {
            let len = u32_at(take(4));
            media.push(take(len));
        }
        Ok(Record { ids, mask, media })
    }
}

/// Writes `samples.arrow`: every instance of `order` in pack order, its
/// tokens and media read back from the spool, a bounded batch at a time.
pub(super) fn write_samples(
    path: &Path,
    selection: &Selection,
    order: &[Unit],
    packs: &[Pack],
    spool: &SpoolReader,
    bytes_per_batch: usize,
) -> Result<()> {
    let mut pack_of = vec![0u32; order.len()];
    for (id, p) in packs.iter().enumerate() {
        pack_of[p.first..p.first + p.count].fill(id as u32);
    }
    let mut file = IpcFile::create(path, &mix_samples_schema())?;
    let mut record = Vec::new();
    let mut first = 0;
    while first < order.len() {
        // The batch's rows first, by their spooled sizes, so each buffer is
        // allocated once at its final size.
        let mut end = first;
        let (mut tokens, mut bytes) = (0usize, 0usize);
        while end < order.len()
            && end - first < ROWS_PER_BATCH
            && (end == first || bytes < bytes_per_batch)
        {
            let u = &order[end];
            tokens += (u.end - u.start) as usize;
            bytes += selection.rows[u.row as usize].spooled.len as usize;
            end += 1;
        }
        let mut ids: Vec<u32> = Vec::with_capacity(tokens);
        let mut masks: Vec<u8> = Vec::with_capacity(tokens);
        let mut lens = Vec::with_capacity(end - first);
        let mut media_lens = Vec::with_capacity(end - first);
        let mut media = BinaryBuilder::with_capacity(end - first, bytes);
        for u in &order[first..end] {
            let row = &selection.rows[u.row as usize];
            let r = spool.read(row.spooled, &mut record)?;
            let (start, stop) = (u.start as usize, u.end as usize);
            ids.extend(
                r.ids[4 * start..4 * stop]
                    .chunks_exact(4)
                    .map(|b| u32::from_le_bytes(b.try_into().expect("4 bytes"))),
            );
            masks.extend_from_slice(&r.mask[start..stop]);
            lens.push(stop - start);
            // Chunks of long documents are text-only; a whole sample brings its media.
            media_lens.push(r.media.len());
            for item in &r.media {
                media.append_value(item);
            }
        }
        let chunk = &order[first..end];
        let rows = |u: &Unit| &selection.rows[u.row as usize];
        let item = |t: DataType| Arc::new(Field::new("item", t, false));
        let columns: Vec<ArrayRef> = vec![
            Arc::new(UInt32Array::from_iter_values(
                pack_of[first..end].iter().copied(),
            )),
            Arc::new(StringArray::from_iter_values(
                chunk.iter().map(|u| rows(u).sample_id.as_str()),
            )),
            Arc::new(StringArray::from_iter_values(chunk.iter().map(|u| {
                selection.shard_sources[rows(u).shard_source as usize].as_str()
            }))),
            Arc::new(UInt32Array::from_iter_values(chunk.iter().map(|u| u.chunk))),
            Arc::new(UInt32Array::from_iter_values(
                chunk.iter().map(|u| rows(u).media),
            )),
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
                Arc::new(media.finish()),
                None,
            )?),
        ];
        file.write(&RecordBatch::try_new(mix_samples_schema(), columns)?)?;
        first = end;
    }
    file.finish()
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
    let mut file = IpcFile::create(path, &schema)?;
    for batch in batches {
        file.write(batch)?;
    }
    file.finish()
}

/// An Arrow IPC file written a batch at a time beside its final name, and
/// renamed into place once complete.
struct IpcFile {
    writer: arrow::ipc::writer::FileWriter<BufWriter<File>>,
    tmp: PathBuf,
    path: PathBuf,
}

impl IpcFile {
    fn create(path: &Path, schema: &SchemaRef) -> Result<Self> {
        let tmp: PathBuf = path.with_extension("arrow.tmp");
        let file = File::create(&tmp)?;
        let writer = arrow::ipc::writer::FileWriter::try_new(BufWriter::new(file), schema)?;
        Ok(IpcFile {
            writer,
            tmp,
            path: path.to_path_buf(),
        })
    }

    fn write(&mut self, batch: &RecordBatch) -> Result<()> {
        Ok(self.writer.write(batch)?)
    }

    fn finish(mut self) -> Result<()> {
        self.writer.finish()?;
        let file = self
            .writer
            .into_inner()?
            .into_inner()
            .map_err(|e| Error::Io(e.into_error()))?;
        file.sync_all()?;
        std::fs::rename(&self.tmp, &self.path)?;
        Ok(())
    }
}

/// Reads every batch of a small IPC file (packs, reports) into memory.
pub fn read_ipc(path: &Path) -> Result<Vec<RecordBatch>> {
    let file = fs_err::File::open(path)?;
    let reader = arrow::ipc::reader::FileReader::try_new(std::io::BufReader::new(file), None)?;
    Ok(reader.collect::<std::result::Result<Vec<_>, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mix::{Row, Selection};
    use arrow::array::{Int64Array, StructArray};
    use lvpipe_schemas::MEDIA_ITEM_FIELDS;

    /// `n` rows; row k has k + 1 tokens (100 k + i) and k % 3 media items
    /// of 1,000 bytes each, all `k`.
    fn rows(n: usize) -> RecordBatch {
        let lens: Vec<usize> = (0..n).map(|k| k + 1).collect();
        let ids: Vec<u32> = (0..n)
            .flat_map(|k| (0..=k as u32).map(move |i| 100 * k as u32 + i))
            .collect();
        let masks: Vec<u8> = ids.iter().map(|i| (i % 2) as u8).collect();
        let counts: Vec<usize> = (0..n).map(|k| k % 3).collect();
        let items: usize = counts.iter().sum();
        let bytes: Vec<Vec<u8>> = (0..n)
            .flat_map(|k| std::iter::repeat_n(vec![k as u8; 1000], k % 3))
            .collect();
        let u32s = || Arc::new(UInt32Array::from(vec![1u32; items])) as ArrayRef;
        let media = StructArray::try_new(
            MEDIA_ITEM_FIELDS.clone(),
            vec![
                Arc::new(arrow::array::BinaryArray::from_iter_values(&bytes)),
                Arc::new(StringArray::from(vec!["jpeg"; items])),
                u32s(),
                u32s(),
                u32s(),
                u32s(),
                u32s(),
                Arc::new(Int64Array::from(vec![0i64; items])),
            ],
            None,
        )
        .unwrap();
        let list = |t: DataType, lens: &[usize], values: ArrayRef| -> ArrayRef {
            Arc::new(
                ListArray::try_new(
                    Arc::new(Field::new("item", t, false)),
                    OffsetBuffer::from_lengths(lens.iter().copied()),
                    values,
                    None,
                )
                .unwrap(),
            )
        };
        RecordBatch::try_from_iter([
            (
                "input_ids",
                list(DataType::UInt32, &lens, Arc::new(UInt32Array::from(ids))),
            ),
            (
                "loss_mask",
                list(DataType::UInt8, &lens, Arc::new(UInt8Array::from(masks))),
            ),
            (
                "media",
                list(
                    DataType::Struct(MEDIA_ITEM_FIELDS.clone()),
                    &counts,
                    Arc::new(media),
                ),
            ),
        ])
        .unwrap()
    }

    #[test]
    fn samples_written_in_small_batches_equal_one_batch_and_come_back_from_the_spool() {
        let n = 12;
        let dir = tempfile::tempdir().unwrap();
        let batch = rows(n);
        let mut spool = Spool::new(dir.path()).unwrap();
        let rows: Vec<Row> = (0..n)
            .map(|k| Row {
                sample_id: format!("s{k:02}"),
                shard_source: 0,
                tokens: k as u32 + 1,
                media: (k % 3) as u32,
                spooled: spool.append(&batch, k).unwrap(),
            })
            .collect();
        let selection = Selection {
            rows,
            shard_sources: vec!["src".into()],
            units: vec![],
            reports: vec![],
        };
        // Backwards, with the last row cut to a chunk of tokens 2..5.
        let order: Vec<Unit> = (0..n as u32)
            .rev()
            .map(|k| Unit {
                source: 0,
                row: k,
                start: if k == 11 { 2 } else { 0 },
                end: if k == 11 { 5 } else { k + 1 },
                chunk: 0,
                expanded: k + 1,
            })
            .collect();
        let packs = vec![Pack {
            first: 0,
            count: n,
            tokens: 0,
        }];
        let reader = spool.finish().unwrap();
        let (one, small) = (dir.path().join("one.arrow"), dir.path().join("small.arrow"));
        write_samples(&one, &selection, &order, &packs, &reader, usize::MAX).unwrap();
        write_samples(&small, &selection, &order, &packs, &reader, 2500).unwrap();
        let (one, small) = (read_ipc(&one).unwrap(), read_ipc(&small).unwrap());
        assert_eq!(one.len(), 1);
        assert!(small.len() > 3, "{} batches", small.len());
        let small = arrow::compute::concat_batches(&small[0].schema(), &small).unwrap();
        assert_eq!(one[0], small);

        let ids = small.column_by_name("input_ids").unwrap().as_list::<i32>();
        let media = small.column_by_name("media").unwrap().as_list::<i32>();
        for (i, u) in order.iter().enumerate() {
            let k = u.row;
            let want: Vec<u32> = (u.start..u.end).map(|t| 100 * k + t).collect();
            assert_eq!(
                ids.value(i).as_primitive::<UInt32Type>().values(),
                &want[..]
            );
            let items = media.value(i);
            let items = items.as_binary::<i32>();
            assert_eq!(items.len(), k as usize % 3, "row {k}");
            assert!(items.iter().all(|b| b == Some(&[k as u8; 1000][..])));
        }
    }
}
