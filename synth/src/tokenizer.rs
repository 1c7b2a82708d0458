//! The corpus's tokenizer: a byte-level BPE trained on its text, saved as a
//! Hugging Face `tokenizer.json` with the ChatML and media special tokens.

use std::path::Path;

use lvpipe_schemas::tokens;
use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    TokenizerBuilder,
};

use crate::{Error, Result};

/// Trains a byte-level BPE on `corpus` with the ChatML and media special
/// tokens, and saves it as a Hugging Face `tokenizer.json`.
pub fn train_tokenizer(corpus: &[String], vocab_size: usize, path: &Path) -> Result<()> {
    let fail = |e: tokenizers::Error| Error::Tokenizer {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let special: Vec<AddedToken> = tokens::ALL
        .iter()
        .map(|t| AddedToken::from(*t, true))
        .collect();
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .special_tokens(special)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .build();
    let byte_level = ByteLevel::default().add_prefix_space(false);
    let mut tokenizer = TokenizerBuilder::<
        BPE,
        NormalizerWrapper,
        PreTokenizerWrapper,
        PostProcessorWrapper,
        DecoderWrapper,
    >::new()
    .with_model(BPE::default())
    .with_normalizer(None)
    .with_pre_tokenizer(Some(byte_level.into()))
    .with_post_processor(Some(byte_level.into()))
    .with_decoder(Some(byte_level.into()))
    .build()
    .map_err(fail)?;
    tokenizer.train(&mut trainer, corpus.iter()).map_err(fail)?;
    let json = tokenizer.to_string(true).map_err(fail)?;
    fs_err::write(path, json)?;
    Ok(())
}
