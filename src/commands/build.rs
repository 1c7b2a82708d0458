//! `lvpipe build-shards`: raw sources to Parquet shards.

use std::path::Path;
use std::process::ExitCode;

use anyhow::{Context, Result};
use lvpipe_sharding::video::{SeekMode, ShortVideos, VideoSettings};
use lvpipe_sharding::{
    BuildSettings, BuildSummary, ImageAspect, ImageLimits, ImageSettings, SourceSpec, build_shards,
};

use lvpipe_sharding::storage::{
    Location, fetch_parts, local_folder, publish_finalized, publish_shards,
};

use super::{cache_dir, location, out};
use crate::args::{AspectArg, BuildArgs, FrameSeekArg, ShortVideosArg};
use crate::progress::BuildProgress;

fn build_settings(args: &BuildArgs, out: &Path) -> Result<BuildSettings> {
    let mut sources = Vec::new();
    if let Some(registry) = &args.registry {
        sources.extend(
            SourceSpec::from_registry(registry)
                .with_context(|| format!("registry {}", registry.display()))?,
        );
    }
    for spec in &args.sources {
        sources.push(SourceSpec::parse(spec, args.media_root.as_deref())?);
    }
    let tokenizer = args.tokenizer.as_ref().context("--tokenizer is required")?;
    let mut settings = BuildSettings::new(out, tokenizer).with_sources(sources);
    settings.partition = args.partition;
    settings.chat_template = lvpipe_sharding::ChatTemplate::parse(&args.chat_template)?;
    settings.image = ImageSettings {
        size: args.image_size,
        aspect: match args.image_aspect {
            AspectArg::Pad => ImageAspect::Pad,
            AspectArg::Resize => ImageAspect::Resize,
        },
        jpeg_quality: args.jpeg_quality,
        limits: ImageLimits {
            max_pixels: args.max_image_pixels,
            max_bytes: args.max_media_bytes,
        },
    };
    settings.video = VideoSettings {
        policy: args.frames,
        seek: match args.frame_seek {
            FrameSeekArg::Exact => SeekMode::Exact,
            FrameSeekArg::Keyframe => SeekMode::Keyframe,
        },
        short: match args.short_videos {
            ShortVideosArg::Keep => ShortVideos::Keep,
            ShortVideosArg::Quarantine => ShortVideos::Quarantine,
        },
        max_pixels: args.max_video_pixels,
    };
    settings.target_shard_bytes = args.shard_size;
    settings.row_group_rows = args.row_group_rows;
    settings.strict = args.strict;
    settings.overwrite = args.overwrite;
    settings.threads = args.threads;
    settings.dedup = !args.keep_duplicates;
    settings.allow_media_outside_root = args.allow_media_outside_root;
    settings.max_record_bytes = args.max_record_bytes;
    settings.fail_after_shards = args.fail_after_shards;
    Ok(settings)
}

pub fn run(args: BuildArgs) -> Result<ExitCode> {
    // A build for object storage is made in the cache (where a rerun
    // resumes it), then published, its manifest last.
    let target = location(&args.out)?;
    let local = local_folder(&target, &cache_dir(None).join("staging"));
    let summary = match (args.finalize, &target) {
        (true, _) => {
            if let Location::Remote(remote) = &target {
                fetch_parts(remote, &local)?;
            }
            let summary = lvpipe_sharding::finalize(&local)
                .with_context(|| format!("build-shards --finalize in {}", args.out.display()))?;
            if let Location::Remote(remote) = &target {
                publish_finalized(&local, remote)?;
            }
            summary
        }
        (false, Location::Local(_)) => run_build(&build_settings(&args, &local)?)?,
        (false, Location::Remote(remote)) => {
            let summary = run_build(&build_settings(&args, &local)?)?;
            match args.partition {
                Some(p) => publish_shards(&local.join(p.dir_name()), &remote.join(&p.dir_name()))?,
                None => publish_shards(&local, remote)?,
            }
            summary
        }
    };
    if args.json {
        out(&(serde_json::to_string_pretty(&summary_json(&summary))? + "\n"))?;
    } else {
        out(&summary_text(&summary, &args.out))?;
    }
    Ok(ExitCode::SUCCESS)
}

fn run_build(settings: &BuildSettings) -> Result<BuildSummary> {
    let progress = BuildProgress::new();
    let result = build_shards(settings, &|event| progress.on_event(event));
    progress.finish();
    result.with_context(|| format!("build-shards into {}", settings.out.display()))
}

fn summary_json(s: &BuildSummary) -> serde_json::Value {
    serde_json::json!({
        "samples": s.samples,
        "quarantined": s.quarantined,
        "quarantined_by_reason": s.by_reason,
        "shards": s.shards,
        "bytes": s.bytes,
        "seconds": s.seconds,
        "resumed_records": s.resumed_records,
        "up_to_date": s.up_to_date,
        "input_bytes_read": s.input_bytes_read,
        "sources": s.manifest.sources,
    })
}

fn summary_text(s: &BuildSummary, out_dir: &Path) -> String {
    let mut text = String::new();
    if s.up_to_date {
        text.push_str(&format!(
            "{} already holds this build (same inputs and settings); nothing to do\n",
            out_dir.display()
        ));
    }
    text.push_str(&format!(
        "{:<14} {:>8} {:>8} {:>11}\n",
        "source", "records", "samples", "quarantined"
    ));
    for src in &s.manifest.sources {
        text.push_str(&format!(
            "{:<14} {:>8} {:>8} {:>11}\n",
            src.name, src.records, src.samples, src.quarantined
        ));
    }
    for (reason, n) in &s.by_reason {
        text.push_str(&format!("  quarantined {reason}: {n}\n"));
    }
    text.push_str(&format!(
        "{} samples, {} quarantined, {} shards, {:.1} MB in {} in {:.1}s{}\n",
        s.samples,
        s.quarantined,
        s.shards,
        s.bytes as f64 / 1e6,
        out_dir.display(),
        s.seconds,
        if s.resumed_records > 0 {
            format!(" (resumed after {} records)", s.resumed_records)
        } else {
            String::new()
        }
    ));
    if s.quarantined > 0 {
        text.push_str(&format!(
            "quarantined records, with their file, line and reason: lvpipe sql --shards {} \"SELECT origin, reason, detail FROM quarantine\"\n",
            out_dir.display()
        ));
    }
    text
}
