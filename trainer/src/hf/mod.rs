//! Model folders of the ecosystem, in and out: Hugging Face folders
//! (`config.json` with safetensors, single or sharded, as `save_pretrained`
//! writes them), VILA folders (`llm/`, `vision_tower/`, `mm_projector/`
//! and a top `config.json`), and lvpipe's own run folders.
//!
//! Inside lvpipe every tensor has its VILA name (`llm.model.layers.0...`,
//! `vision_tower.vision_model...`, `mm_projector.layers.1...`); each part of
//! a folder is read under its own Hugging Face names and prefixed here.

mod export;
mod load;

pub use export::{ExportFormat, export};
pub use load::{Folder, Part, check_fits, load_into, open, read_safetensors};
