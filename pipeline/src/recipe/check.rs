//! A recipe checked on its own: every problem, one line each, before any
//! data is read (`lvpipe plan` adds the checks against the shards).

use std::collections::{BTreeMap, HashSet};

use lvpipe_schemas::{FramePolicy, TrainableModule};

use super::{
    INIT_PARTS, INIT_STD_MODULES, ModelConfig, Order, Recipe, RopeBase, RopeScalingSpec, Stage,
    StageInit, rotary_dims,
};

impl Recipe {
    /// Every problem the recipe has on its own, one line each (empty when fine).
    pub fn check(&self) -> Vec<String> {
        let mut problems = check_model(&self.model);
        if self.stages.is_empty() {
            problems.push("the recipe has no [[stage]]".to_string());
        }
        let mut names = HashSet::new();
        for (i, stage) in self.stages.iter().enumerate() {
            let at = format!("stage {} ({})", i + 1, stage.name);
            if !names.insert(stage.name.as_str()) {
                problems.push(format!("{at}: another stage has the same name"));
            }
            problems.extend(stage_limits(&at, stage));
            problems.extend(check_stage(&at, stage, &self.model));
            problems.extend(check_sources(&at, stage));
        }
        problems.extend(self.check_init_chain());
        problems
    }

    /// Each stage starts from `base` or from a stage before it.
    fn check_init_chain(&self) -> Vec<String> {
        let index: BTreeMap<&str, usize> = self
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| (s.name.as_str(), i))
            .collect();
        let mut problems = Vec::new();
        for (i, stage) in self.stages.iter().enumerate() {
            if let StageInit::Parts(parts) = &stage.init {
                for (part, folder) in parts {
                    if !INIT_PARTS.contains(&part.as_str()) {
                        problems.push(format!(
                            "stage {} ({}): init names part `{part}`, not one of {}",
                            i + 1,
                            stage.name,
                            INIT_PARTS.join(", ")
                        ));
                    }
                    if !folder.starts_with("hf:") {
                        problems.push(format!(
                            "stage {} ({}): init.{part} `{folder}` must be a model folder, `hf:DIR`",
                            i + 1,
                            stage.name
                        ));
                    }
                }
            }
            let Some(name) = stage.init.stage() else {
                continue;
            };
            match index.get(name) {
                None => problems.push(format!(
                    "stage {} ({}): init `{}` is neither `base` nor a stage of this recipe",
                    i + 1,
                    stage.name,
                    stage.init
                )),
                Some(&j) if j >= i => problems.push(format!(
                    "stage {} ({}): init `{}` is not an earlier stage (the init chain has a cycle or runs forward)",
                    i + 1,
                    stage.name,
                    stage.init
                )),
                Some(_) => {}
            }
        }
        problems
    }
}

/// Largest context a stage may ask for, in tokens (LongVILA trains to 2M).
pub const MAX_CONTEXT: u32 = 1 << 24;
/// Largest global batch, in packs.
pub const MAX_GLOBAL_BATCH: u32 = 1 << 20;
/// Largest `repeat` of a source.
pub const MAX_REPEAT: u32 = 10_000;

/// Values beyond what any run needs, which would make planning or mixing
/// allocate without bound; a stage outside them is not planned.
pub(crate) fn stage_limits(at: &str, stage: &Stage) -> Vec<String> {
    let mut problems = Vec::new();
    let mut over = |what: &str, value: u64, max: u64| {
        if value > max {
            problems.push(format!("{at}: {what} {value} is over the limit of {max}"));
        }
    };
    over("context", u64::from(stage.context), u64::from(MAX_CONTEXT));
    over(
        "global_batch",
        u64::from(stage.global_batch),
        u64::from(MAX_GLOBAL_BATCH),
    );
    over(
        "sequence_parallel",
        u64::from(stage.sequence_parallel),
        4096,
    );
    over("lora_r", stage.lora_r.map_or(0, u64::from), 65_536);
    for source in &stage.sources {
        let name = format!("source {} repeat", source.name);
        over(
            &name,
            source.repeat.map_or(0, u64::from),
            u64::from(MAX_REPEAT),
        );
    }
    for source in stage
        .sources
        .iter()
        .filter_map(|s| s.weight.map(|w| (s, w)))
    {
        if source.1 > 1e6 {
            problems.push(format!(
                "{at}, source {}: weight {} is over the limit of 1e6",
                source.0.name, source.1
            ));
        }
    }
    problems
}

/// The model's sizes and initialization.
fn check_model(m: &ModelConfig) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(e) = lvpipe_sharding::ChatTemplate::parse(&m.chat_template) {
        problems.push(format!("model: {e}"));
    }
    for (what, value, max) in [
        ("image_size", m.image_size, 16_384),
        ("hidden_size", m.hidden_size, 1 << 16),
        ("intermediate_size", m.intermediate_size, 1 << 18),
        ("num_layers", m.num_layers, 1024),
        ("vocab_size", m.vocab_size, 1 << 24),
    ] {
        if value > max {
            problems.push(format!("model: {what} {value} is over the limit of {max}"));
        }
    }
    if let Some(r) = m.initializer_range.filter(|r| !positive(*r)) {
        problems.push(format!("model: initializer_range {r} must be positive"));
    }
    for (module, std) in &m.init_std {
        if !INIT_STD_MODULES.contains(&module.as_str()) {
            problems.push(format!(
                "model: init_std names `{module}`, not one of {}",
                INIT_STD_MODULES.join(", ")
            ));
        } else if !positive(*std) {
            problems.push(format!("model: init_std.{module} {std} must be positive"));
        }
    }
    let head_dim = m.hidden_size / m.num_heads.max(1);
    let rotated = rotary_dims(head_dim as usize, m.partial_rotary_factor);
    if !(m.partial_rotary_factor > 0.0 && m.partial_rotary_factor <= 1.0) || rotated < 2 {
        problems.push(format!(
            "model: partial_rotary_factor {} must be in (0, 1] and rotate at least 2 of the head's {head_dim} dimensions",
            m.partial_rotary_factor
        ));
    }
    // A patch grid keeps whole patches only (SigLIP at 384 px with 14 px
    // patches sees 27 x 27), so the sizes need not divide.
    if m.patch_size == 0 || m.patch_size > m.image_size {
        problems.push(format!(
            "model: patch_size {} must be in 1..=image_size {}",
            m.patch_size, m.image_size
        ));
    }
    if m.num_kv_heads == 0 || !m.num_heads.is_multiple_of(m.num_kv_heads.max(1)) {
        problems.push(format!(
            "model: num_heads {} is not a multiple of num_kv_heads {}",
            m.num_heads, m.num_kv_heads
        ));
    }
    if m.num_heads == 0 || !m.hidden_size.is_multiple_of(m.num_heads.max(1)) {
        problems.push(format!(
            "model: hidden_size {} is not a multiple of num_heads {}",
            m.hidden_size, m.num_heads
        ));
    }
    problems
}

/// A stage's schedule, batch, modules and sequence parallelism.
fn check_stage(at: &str, stage: &Stage, m: &ModelConfig) -> Vec<String> {
    let mut problems = Vec::new();
    for module in &stage.trainable {
        if let Err(e) = TrainableModule::parse(module) {
            problems.push(format!("{at}: {e}"));
        }
    }
    if stage.trainable.is_empty() {
        problems.push(format!("{at}: trains nothing (trainable is empty)"));
    }
    match (stage.epochs, stage.steps) {
        (None, None) | (Some(_), Some(_)) => {
            problems.push(format!("{at}: give exactly one of epochs and steps"))
        }
        (Some(0), _) | (_, Some(0)) => problems.push(format!("{at}: zero epochs or steps")),
        _ => {}
    }
    if stage.global_batch == 0 || stage.context == 0 {
        problems.push(format!("{at}: global_batch and context must be positive"));
    }
    if !(0.0..1.0).contains(&stage.warmup) {
        problems.push(format!(
            "{at}: warmup {} is not a fraction in [0, 1)",
            stage.warmup
        ));
    }
    let sp = stage.sequence_parallel.max(1);
    let ulysses = stage.sp_mode.is_ulysses();
    if ulysses && !m.num_heads.is_multiple_of(sp) {
        problems.push(format!(
            "{at}: sequence_parallel {sp} does not divide num_heads {} (Ulysses splits heads)",
            m.num_heads
        ));
    }
    if ulysses
        && sp > 1
        && !m.num_kv_heads.is_multiple_of(sp)
        && !sp.is_multiple_of(m.num_kv_heads.max(1))
    {
        problems.push(format!(
            "{at}: sequence_parallel {sp} and num_kv_heads {} neither divides the other (KV heads cannot be split or replicated)",
            m.num_kv_heads
        ));
    }
    if let Some(mb) = stage.micro_batch
        && (mb == 0 || !stage.global_batch.is_multiple_of(mb))
    {
        problems.push(format!(
            "{at}: micro_batch {mb} must divide global_batch {}",
            stage.global_batch
        ));
    }
    if (stage.lora_r.is_some() || stage.lora_alpha.is_some())
        && !stage
            .trainable
            .iter()
            .any(|m| m == TrainableModule::LlmLora.as_str())
    {
        problems.push(format!(
            "{at}: lora_r/lora_alpha without `llm_lora` in trainable"
        ));
    }
    if let Some(b) = stage.adam_beta2.filter(|b| !(0.0..1.0).contains(b)) {
        problems.push(format!("{at}: adam_beta2 {b} must be in [0, 1)"));
    }
    if let Some(w) = stage.weight_decay.filter(|w| !(positive(*w) || *w == 0.0)) {
        problems.push(format!("{at}: weight_decay {w} must be at least 0"));
    }
    if stage.order == Order::Shuffled {
        for source in stage.sources.iter().filter(|s| s.part.is_some()) {
            problems.push(format!(
                "{at}, source {}: `part` needs order = \"sequential\"",
                source.name
            ));
        }
    }
    match &stage.rope_base {
        Some(RopeBase::One(b)) if !positive(*b) => {
            problems.push(format!("{at}: rope_base {b} must be positive"))
        }
        Some(RopeBase::Progressive(bases))
            if bases.is_empty() || bases.iter().any(|b| !positive(*b)) =>
        {
            problems.push(format!(
                "{at}: rope_base list {bases:?} must be non-empty and positive"
            ))
        }
        _ => {}
    }
    let factor = match &stage.rope_scaling {
        Some(s) => {
            if !RopeScalingSpec::TYPES.contains(&s.rope_type.as_str()) {
                problems.push(format!(
                    "{at}: rope_scaling type `{}` is not one of {}",
                    s.rope_type,
                    RopeScalingSpec::TYPES.join(", ")
                ));
            }
            if s.factor.is_nan() || s.factor < 1.0 {
                problems.push(format!(
                    "{at}: rope_scaling factor {} must be at least 1",
                    s.factor
                ));
            }
            s.factor.max(1.0)
        }
        None => 1.0,
    };
    let positions = stage.positions(m);
    if f64::from(stage.context) > f64::from(positions) * factor {
        problems.push(format!(
            "{at}: context {} is beyond the model's positions: max_position_embeddings {positions} x rope_scaling factor {factor}; \
             set the stage's max_position_embeddings (as VILA writes the extended length) or a rope_scaling",
            stage.context
        ));
    }
    if let Some(policy) = &stage.frames {
        match policy.parse::<FramePolicy>().map(|p| p.max_frames()) {
            Err(e) => problems.push(format!("{at}: {e}")),
            Ok(n) if sp > 1 && n % sp != 0 => problems.push(format!(
                "{at}: frames `{policy}` gives {n} frames, not a multiple of sequence_parallel {sp}: \
                 {} would be silently trimmed",
                n % sp
            )),
            Ok(_) => {}
        }
    }
    problems
}

/// A stage's sources: weights, repeats and queries.
fn check_sources(at: &str, stage: &Stage) -> Vec<String> {
    let mut problems = Vec::new();
    if stage.sources.is_empty() {
        problems.push(format!("{at}: no [[stage.source]]"));
    }
    for source in &stage.sources {
        match (source.repeat, source.weight) {
            (Some(_), Some(_)) => problems.push(format!(
                "{at}, source {}: give repeat or weight, not both",
                source.name
            )),
            (Some(0), _) => problems.push(format!(
                "{at}, source {}: repeat must be at least 1",
                source.name
            )),
            (_, Some(w)) if !(w > 0.0 && w.is_finite()) => problems.push(format!(
                "{at}, source {}: weight {w} must be positive",
                source.name
            )),
            _ => {}
        }
        if let Err(e) = datafusion::sql::parser::DFParser::parse_sql(&source.sql("sample_id")) {
            problems.push(format!(
                "{at}, source {}: the query does not parse: {e}",
                source.name
            ));
        }
    }
    let mixed = stage.sources.iter().any(|s| s.weight.is_some())
        && stage.sources.iter().any(|s| s.weight.is_none());
    if mixed {
        problems.push(format!(
            "{at}: some sources have a weight and others not: weigh all or none"
        ));
    }
    problems
}

/// Greater than zero (so NaN is not).
fn positive(x: f64) -> bool {
    x > 0.0
}
