//! `lvpipe export`: a run as a Hugging Face or VILA folder.

use std::process::ExitCode;

use anyhow::Result;
use lvpipe_trainer::hf::{ExportFormat, export};

use super::out;
use crate::args::{ExportArgs, ExportFormatArg};

pub fn run(args: ExportArgs) -> Result<ExitCode> {
    let format = match args.format {
        ExportFormatArg::Hf => ExportFormat::Hf,
        ExportFormatArg::Vila => ExportFormat::Vila,
    };
    let files = export(&args.run, format, &args.out)?;
    for f in files {
        out(&format!("{}\n", args.out.join(f).display()))?;
    }
    Ok(ExitCode::SUCCESS)
}
