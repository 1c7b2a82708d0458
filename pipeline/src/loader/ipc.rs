//! Arrow IPC files over a memory map, read without trusting their bytes:
//! the footer and every batch's extent are checked before anything is
//! sliced, and Arrow's readers are guarded against damaged files.

use super::*;

/// An Arrow IPC file over a memory map. Opening reads the footer and each
/// batch's message header (its row count), not the data: a batch is decoded,
/// without copying its buffers, the first time one of its rows is read. The
/// first batch of a mix of a million samples is as quick as of a thousand.
pub(super) struct MappedIpc {
    pub(super) path: std::path::PathBuf,
    pub(super) buffer: Buffer,
    pub(super) schema: arrow::datatypes::SchemaRef,
    pub(super) decoder: FileDecoder,
    pub(super) blocks: Vec<arrow::ipc::Block>,
    /// Row offset of each batch, for row -> (batch, row) lookups.
    pub(super) starts: Vec<u64>,
    pub(super) rows: u64,
    pub(super) batches: Vec<std::sync::OnceLock<RecordBatch>>,
}

impl MappedIpc {
    pub(super) fn open(path: &Path) -> Result<Self> {
        let file = fs_err::File::open(path)?;
        // SAFETY: the file is opened read-only and mixes are written once, by
        // rename; a process that rewrites a mix under a running loader would
        // break this, as it would any memory-mapped reader.
        #[allow(unsafe_code)]
        let map = unsafe { memmap2::Mmap::map(file.file())? };
        let buffer = Buffer::from(bytes::Bytes::from_owner(map));
        let bad = |m: String| Error::Folder {
            path: path.to_path_buf(),
            message: m,
        };
        if buffer.len() < 10 {
            return Err(bad("not an Arrow IPC file".into()));
        }
        let trailer = buffer.len() - 10;
        let footer_len = read_footer_length(buffer[trailer..].try_into().expect("10 bytes"))?;
        let footer_start = trailer.checked_sub(footer_len).ok_or_else(|| {
            bad(format!(
                "the footer claims {footer_len} bytes of a {}-byte file: the file is damaged",
                buffer.len()
            ))
        })?;
        let footer =
            root_as_footer(&buffer[footer_start..trailer]).map_err(|e| bad(e.to_string()))?;
        let fb_schema = footer.schema().ok_or_else(|| bad("no schema".into()))?;
        // arrow panics on a schema with unknown types; a damaged file is an error.
        let schema = Arc::new(guarded(path, "schema", || Ok(fb_to_schema(fb_schema)))?);
        let decoder = FileDecoder::new(schema.clone(), footer.version());
        let blocks: Vec<arrow::ipc::Block> =
            footer.recordBatches().iter().flatten().copied().collect();
        let mut starts = Vec::with_capacity(blocks.len());
        let mut total = 0u64;
        for block in &blocks {
            let end = u64::try_from(block.offset())
                .ok()
                .and_then(|o| o.checked_add(u64::try_from(block.metaDataLength()).ok()?))
                .and_then(|o| o.checked_add(u64::try_from(block.bodyLength()).ok()?));
            if end.is_none_or(|end| end > footer_start as u64) {
                return Err(bad(format!(
                    "a batch at byte {} reaches past the data: the file is damaged",
                    block.offset()
                )));
            }
            starts.push(total);
            total += message_rows(&buffer, block).ok_or_else(|| {
                bad(format!(
                    "batch at byte {} has no record batch header",
                    block.offset()
                ))
            })?;
        }
        Ok(MappedIpc {
            path: path.to_path_buf(),
            batches: blocks.iter().map(|_| std::sync::OnceLock::new()).collect(),
            buffer,
            schema,
            decoder,
            blocks,
            starts,
            rows: total,
        })
    }

    /// The batch holding global row `row`, and the row within it.
    pub(super) fn row(&self, row: u64) -> Result<(&RecordBatch, usize)> {
        if row >= self.rows {
            return Err(Error::Folder {
                path: self.path.clone(),
                message: format!("row {row} of {}", self.rows),
            });
        }
        let b = self.starts.partition_point(|&s| s <= row) - 1;
        let r = (row - self.starts[b]) as usize;
        if let Some(batch) = self.batches[b].get() {
            return Ok((batch, r));
        }
        let block = &self.blocks[b];
        let len = block.bodyLength() as usize + block.metaDataLength() as usize;
        let data = self.buffer.slice_with_length(block.offset() as usize, len);
        let batch = guarded(&self.path, "record batch", || {
            Ok(self.decoder.read_record_batch(block, &data)?)
        })?
        .ok_or_else(|| Error::Folder {
            path: self.path.clone(),
            message: format!("batch {b} is empty"),
        })?;
        Ok((self.batches[b].get_or_init(|| batch), r))
    }
}

/// Runs `read` over a memory-mapped file's bytes, turning a panic of the
/// Arrow reader on damaged bytes into an error that names the file.
fn guarded<T>(path: &Path, what: &str, read: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(read)).unwrap_or_else(|_| {
        Err(Error::Folder {
            path: path.to_path_buf(),
            message: format!("its {what} cannot be read: the file is damaged; rerun `lvpipe mix`"),
        })
    })
}

/// Rows of the record batch message at `block`, read from its header.
fn message_rows(buffer: &Buffer, block: &arrow::ipc::Block) -> Option<u64> {
    let start = usize::try_from(block.offset()).ok()?;
    let meta =
        buffer.get(start..start.checked_add(usize::try_from(block.metaDataLength()).ok()?)?)?;
    // Encapsulated messages start with 0xFFFFFFFF and the flatbuffer's size
    // (older writers omit the marker).
    let (size_at, body) = if meta.get(..4)? == [0xFF; 4] {
        (4, 8)
    } else {
        (0, 4)
    };
    let size = i32::from_le_bytes(meta.get(size_at..size_at + 4)?.try_into().ok()?) as usize;
    let message = arrow::ipc::root_as_message(meta.get(body..body + size)?).ok()?;
    Some(message.header_as_record_batch()?.length() as u64)
}
