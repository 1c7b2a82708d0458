//! WebDataset tars: members grouped by key, `KEY.jpg|png|webp` with
//! `KEY.txt`, one sample per key.

use std::io::{Read, Seek};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use lvpipe_schemas::{QuarantineReason, SampleKind};

use super::{Emit, RawMedia, RawSample, Reject, check_reserved};
use crate::Result;
use crate::chat::{Segment, SpecialTokens};

/// A key's members as they were met: the key, and each member's extension
/// and content (captions read, images where they are).
type Group = (String, Vec<(String, RawMedia)>);

const IMAGE_EXTENSIONS: [&str; 8] = ["jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff"];

/// A WebDataset tar: adjacent members sharing a key form one sample.
/// Images are not read here but located (offset and size in `archive`), and
/// the reader seeks past them: their bytes are read by the worker that
/// builds the record, so a partition task reads only its own. Members
/// larger than `max_member_bytes` (the media limit, or the archive's own
/// size: a header claiming more is corrupt) are quarantined unread.
pub(super) fn read_wds<R: Read + Seek>(
    reader: R,
    archive_path: &Arc<PathBuf>,
    origin: &str,
    max_member_bytes: u64,
    emit: &mut Emit,
) -> Result<()> {
    let mut archive = tar::Archive::new(reader);
    let entries = match archive.entries_with_seek() {
        Ok(entries) => entries,
        Err(e) => {
            let reject = Reject::new(
                QuarantineReason::CorruptMedia,
                format!("not a tar archive: {e}"),
            );
            return emit(origin.to_string(), Err(reject));
        }
    };
    let mut group: Option<Group> = None;
    let mut last_member = String::from("(start)");
    for entry in entries {
        let mut entry = match entry {
            Ok(entry) => entry,
            Err(e) => {
                flush_wds(origin, group.take(), emit)?;
                let detail = format!(
                    "tar read error after member `{last_member}`: {e}; the rest is skipped"
                );
                return emit(
                    format!("{origin}!{last_member}"),
                    Err(Reject::new(QuarantineReason::CorruptMedia, detail)),
                );
            }
        };
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let raw_path = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        last_member = raw_path.clone();
        let path = Path::new(&raw_path);
        if path.components().any(|c| {
            matches!(
                c,
                Component::ParentDir | Component::RootDir | Component::Prefix(_)
            )
        }) {
            flush_wds(origin, group.take(), emit)?;
            let detail = "member path is absolute or contains `..`";
            emit(
                format!("{origin}!{raw_path}"),
                Err(Reject::new(QuarantineReason::UnsafePath, detail)),
            )?;
            continue;
        }
        // WebDataset keys are the path up to the first dot of the file name.
        let file_name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        let (stem, ext) = file_name.split_once('.').unwrap_or((file_name, ""));
        let key = path.with_file_name(stem).to_string_lossy().into_owned();
        let size = entry.size();
        if size > max_member_bytes {
            flush_wds(origin, group.take(), emit)?;
            let detail = format!(
                "member claims {size} bytes, more than {max_member_bytes} (the media limit or the archive's size)"
            );
            emit(
                format!("{origin}!{raw_path}"),
                Err(Reject::new(QuarantineReason::MediaTooLarge, detail)),
            )?;
            continue;
        }
        let ext = ext.to_ascii_lowercase();
        let content = if IMAGE_EXTENSIONS.contains(&ext.as_str()) {
            RawMedia::Member {
                archive: archive_path.clone(),
                name: raw_path,
                offset: entry.raw_file_position(),
                size,
            }
        } else {
            let mut bytes = Vec::with_capacity(size as usize);
            if let Err(e) = entry.read_to_end(&mut bytes) {
                flush_wds(origin, group.take(), emit)?;
                let detail = format!("cannot read member: {e}; the rest is skipped");
                return emit(
                    format!("{origin}!{raw_path}"),
                    Err(Reject::new(QuarantineReason::CorruptMedia, detail)),
                );
            }
            RawMedia::Bytes(bytes)
        };
        if group.as_ref().is_some_and(|(k, _)| *k != key) {
            flush_wds(origin, group.take(), emit)?;
        }
        group
            .get_or_insert_with(|| (key, Vec::new()))
            .1
            .push((ext, content));
    }
    flush_wds(origin, group, emit)
}

fn flush_wds(origin: &str, group: Option<Group>, emit: &mut Emit) -> Result<()> {
    let Some((key, members)) = group else {
        return Ok(());
    };
    let here = format!("{origin}!{key}");
    let image = members
        .iter()
        .find(|(ext, _)| IMAGE_EXTENSIONS.contains(&ext.as_str()));
    let caption = members.iter().find_map(|(ext, content)| match content {
        RawMedia::Bytes(bytes) if ext == "txt" => Some(bytes),
        _ => None,
    });
    let body = match (image, caption) {
        (None, _) => Err(Reject::new(
            QuarantineReason::MissingMedia,
            format!("sample `{key}` has no image member"),
        )),
        (_, None) => Err(Reject::new(
            QuarantineReason::EmptyDocument,
            format!("sample `{key}` has no .txt caption"),
        )),
        (Some((_, image)), Some(caption)) => match std::str::from_utf8(caption) {
            Err(e) => Err(Reject::new(
                QuarantineReason::NonUtf8,
                format!("{key}.txt: invalid UTF-8 at byte {}", e.valid_up_to()),
            )),
            Ok(text) if text.trim().is_empty() => Err(Reject::new(
                QuarantineReason::EmptyDocument,
                format!("{key}.txt is empty"),
            )),
            Ok(text) => {
                let turns = vec![
                    Segment {
                        role: "user",
                        content: format!("{}\n", SpecialTokens::IMAGE),
                    },
                    Segment {
                        role: "assistant",
                        content: text.trim().to_string(),
                    },
                ];
                check_reserved(&turns).map(|()| RawSample {
                    annotation_id: Some(key.clone()),
                    kind: SampleKind::ImageText,
                    turns,
                    media: vec![image.clone()],
                    tokens: None,
                })
            }
        },
    };
    emit(here, body)
}
