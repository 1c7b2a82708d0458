//! Text with known facts: filler sentences, planted facts ("The secret code
//! of NAME is CODE."), the code catalogue, and the self-repeating notes from
//! which a model learns to copy from its context. The needle evaluation draws
//! its haystacks and needles here too, so training text and evaluation agree.

use rand::rngs::SmallRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};

use crate::scene::capitalize;

const FILLER_SUBJECTS: [&str; 12] = [
    "the old mill",
    "a quiet river",
    "the northern road",
    "the village baker",
    "a tall lighthouse",
    "the morning train",
    "the market square",
    "a small garden",
    "the city library",
    "a wooden bridge",
    "the harbour master",
    "the hill farm",
];
const FILLER_VERBS: [&str; 10] = [
    "stood near",
    "looked over",
    "was far from",
    "was painted like",
    "was older than",
    "was quieter than",
    "opened toward",
    "was built beside",
    "was seen from",
    "was known for",
];
const FILLER_TAILS: [&str; 10] = [
    "in the early spring",
    "after the long rain",
    "during the festival",
    "before the winter came",
    "when the bells rang",
    "on most evenings",
    "for many years",
    "under a grey sky",
    "at the end of the day",
    "without any noise",
];
pub(crate) const NAMES: [&str; 16] = [
    "Alder", "Brisa", "Corvin", "Delia", "Emrys", "Fenna", "Galen", "Hesper", "Ilsa", "Jory",
    "Kestrel", "Liora", "Maren", "Nilo", "Orla", "Perrin",
];

/// Codes that recur across documents, as years and prices do in web text.
/// The long documents cite only these, so the tokenizer makes each of them
/// one token and reads any other 4-digit code in pieces; the code lists
/// draw [`LEDGER_COMMON`] of their items from them. With every code cited
/// in the long documents instead, the tokenizer spent 2,723 entries on
/// whole codes, each read a few times in the lists: the copy head attended
/// to them but did not copy them, and the needles whose code was one of
/// them (about 30%) were found 2 times in 37 at 2,048 tokens
/// (docs/trainer.md, "Why the tiny recipe is as it is").
pub(crate) struct Catalogue(pub(crate) Vec<u32>);

impl Catalogue {
    pub(crate) fn new(seed: u64, n: usize) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed ^ 0x636f_6465);
        let mut all: Vec<u32> = (1000..10000).collect();
        all.shuffle(&mut rng);
        all.truncate(n);
        Catalogue(all)
    }

    /// A catalogue code.
    pub(crate) fn common(&self, rng: &mut SmallRng) -> String {
        self.0.choose(rng).expect("non-empty").to_string()
    }

    /// A catalogue code with probability `p`, else any 4-digit code.
    fn code(&self, rng: &mut SmallRng, p: f64) -> String {
        if rng.random_bool(p) {
            self.common(rng)
        } else {
            rng.random_range(1000..10000u32).to_string()
        }
    }
}

/// The share of code-list items drawn from the [`Catalogue`].
const LEDGER_COMMON: f64 = 0.3;

/// The sentence of a planted fact; a recall repeats it, and a needle
/// question is its prefix up to "is" ([`needle_prompt`]).
pub fn needle_fact(name: &str, code: &str) -> String {
    format!("{} {code}.", needle_prompt(name))
}

/// What a model completes with the code when it has retrieved the fact.
pub fn needle_prompt(name: &str) -> String {
    format!("The secret code of {name} is")
}

/// `n` filler sentences of the long documents, from `seed`: haystacks for
/// needle and perplexity evaluations.
pub fn filler_sentences(seed: u64, n: usize) -> Vec<String> {
    let mut rng = SmallRng::seed_from_u64(seed);
    (0..n).map(|_| filler_sentence(&mut rng)).collect()
}

/// Names of the needles (`{name}{index}` in documents).
pub const NEEDLE_NAMES: [&str; 16] = NAMES;

/// `gap` filler sentences.
fn filler(rng: &mut SmallRng, gap: usize) -> Vec<String> {
    (0..gap).map(|_| filler_sentence(rng)).collect()
}

/// A list of 3 to 10 codes, `gap` filler sentences, and the list again:
/// every token of the repeat can be copied. [`LEDGER_COMMON`] of the codes
/// are from the catalogue: single tokens that occur once in a list, on
/// which the copy forms; the rest are read in pieces, as most needles are.
pub(crate) fn ledger_note(rng: &mut SmallRng, gap: usize, codes: &Catalogue) -> String {
    let n = rng.random_range(3..=10);
    let codes: Vec<String> = (0..n).map(|_| codes.code(rng, LEDGER_COMMON)).collect();
    let list = format!("The ledger reads {}.", codes.join(" "));
    let mut sentences = vec![list.clone()];
    sentences.extend(filler(rng, gap));
    sentences.push(list);
    sentences.join(" ")
}

/// One to six secret codes somewhere in `gap` filler sentences, and every
/// code recalled in another order at the end: the recalled codes can be
/// copied by name. The facts sit at any depth, as the needles do (stated
/// first, the copy learned that facts are found only at a document's start),
/// and in a quarter of the long notes right before the recalls: a needle at
/// depth 1 is asked right after its fact, deep in a long document, which
/// uniform depths almost never showed (the copy then found 1 in 12 such
/// needles at 2,048 tokens, against 4 in 12 with these notes).
pub(crate) fn roster_note(rng: &mut SmallRng, gap: usize) -> String {
    let facts: Vec<String> = (0..rng.random_range(1..=6))
        .map(|_| {
            let name = format!(
                "{}{}",
                NAMES.choose(rng).expect("non-empty"),
                rng.random_range(0..9000u32)
            );
            needle_fact(&name, &rng.random_range(1000..10000u32).to_string())
        })
        .collect();
    let mut recalls = facts.clone();
    recalls.shuffle(rng);
    let lead = if gap > 3 && rng.random_bool(0.25) {
        gap
    } else {
        rng.random_range(0..=gap)
    };
    let mut sentences = filler(rng, lead);
    sentences.extend(facts);
    sentences.extend(filler(rng, gap - lead));
    sentences.extend(recalls);
    sentences.join(" ")
}

pub(crate) fn filler_sentence(rng: &mut SmallRng) -> String {
    let s = FILLER_SUBJECTS.choose(rng).expect("non-empty");
    let v = FILLER_VERBS.choose(rng).expect("non-empty");
    let o = FILLER_SUBJECTS.choose(rng).expect("non-empty");
    let t = FILLER_TAILS.choose(rng).expect("non-empty");
    format!("{} {v} {o} {t}.", capitalize(s))
}

/// The needle an evaluation asks for `key`: a name no training text uses
/// (training names stay below 9000) and a 4-digit code.
pub fn eval_needle(key: u64) -> (String, String) {
    let name = format!("{}{}", NAMES[(key % 16) as usize], 9000 + key % 1000);
    let code = (1000 + (key >> 20) % 9000).to_string();
    (name, code)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sentences(text: &str) -> Vec<&str> {
        text.split_inclusive(". ").map(str::trim).collect()
    }

    /// The codes of a ledger note's first list.
    fn ledger_codes(note: &str) -> Vec<&str> {
        sentences(note)[0]
            .strip_prefix("The ledger reads ")
            .and_then(|l| l.strip_suffix('.'))
            .unwrap()
            .split(' ')
            .collect()
    }

    #[test]
    fn ledger_notes_read_the_same_list_twice_around_the_filler() {
        let mut rng = SmallRng::seed_from_u64(1);
        for gap in [0, 2, 40] {
            let note = ledger_note(&mut rng, gap, &Catalogue::new(1, 16));
            let s = sentences(&note);
            assert_eq!(s.len(), gap + 2, "{note}");
            assert_eq!(s[0], s[gap + 1]);
            let codes = ledger_codes(&note);
            assert!((3..=10).contains(&codes.len()), "{note}");
            assert!(
                codes
                    .iter()
                    .all(|c| c.len() == 4 && c.parse::<u32>().is_ok())
            );
            assert!(
                s[1..=gap]
                    .iter()
                    .all(|f| !f.contains("ledger") && !f.contains(" is "))
            );
        }
    }

    #[test]
    fn roster_notes_recall_every_code_by_name_after_the_filler() {
        let mut rng = SmallRng::seed_from_u64(2);
        let mut leads = Vec::new();
        for gap in [0, 3, 100, 100, 100] {
            let note = roster_note(&mut rng, gap);
            let s = sentences(&note);
            let k = (s.len() - gap) / 2;
            assert!((1..=6).contains(&k) && s.len() == 2 * k + gap, "{note}");
            // The facts: k in a row somewhere in the filler, then the recalls.
            let at: Vec<usize> = (0..s.len()).filter(|&i| s[i].contains(" is ")).collect();
            assert_eq!(at.len(), 2 * k, "{note}");
            let lead = at[0];
            assert_eq!(at[..k], (lead..lead + k).collect::<Vec<_>>()[..], "{note}");
            assert_eq!(
                at[k..],
                (s.len() - k..s.len()).collect::<Vec<_>>()[..],
                "{note}"
            );
            leads.push(lead);
            let mut stated: Vec<&str> = s[lead..lead + k].to_vec();
            let mut recalled: Vec<&str> = s[s.len() - k..].to_vec();
            stated.sort();
            recalled.sort();
            assert_eq!(stated, recalled, "{note}");
            for fact in &stated {
                let name = fact
                    .strip_prefix("The secret code of ")
                    .and_then(|f| f.split(" is ").next())
                    .unwrap();
                let index: u32 = name
                    .trim_start_matches(char::is_alphabetic)
                    .parse()
                    .unwrap();
                assert!(
                    index < 9000,
                    "{name} could collide with an evaluation needle"
                );
            }
        }
        // Long notes state their facts at different depths.
        assert!(leads[2..].iter().any(|&l| l != leads[2]), "{leads:?}");
    }

    #[test]
    fn a_fraction_of_ledger_items_are_catalogue_codes() {
        let mut rng = SmallRng::seed_from_u64(4);
        let catalogue = Catalogue::new(4, 512);
        let items: Vec<u32> = (0..300)
            .flat_map(|_| {
                let note = ledger_note(&mut rng, 0, &catalogue);
                ledger_codes(&note)
                    .iter()
                    .map(|c| c.parse().unwrap())
                    .collect::<Vec<u32>>()
            })
            .collect();
        let common = items.iter().filter(|c| catalogue.0.contains(c)).count();
        // LEDGER_COMMON (0.3) drawn from it, and 512 in 9,000 of the rest.
        let share = common as f64 / items.len() as f64;
        assert!((0.27..0.38).contains(&share), "{common} of {}", items.len());
    }

    #[test]
    fn a_quarter_of_long_roster_notes_recall_right_after_their_facts() {
        let mut rng = SmallRng::seed_from_u64(3);
        let gap = 60;
        let leads: Vec<usize> = (0..400)
            .map(|_| {
                let note = roster_note(&mut rng, gap);
                let s = sentences(&note);
                s.iter().position(|s| s.contains(" is ")).unwrap()
            })
            .collect();
        // A quarter on purpose, and 1 in 61 of the rest by the uniform draw.
        let last = leads.iter().filter(|&&l| l == gap).count();
        assert!(
            (80..=130).contains(&last),
            "{last} of 400 notes state their facts right before the recalls"
        );
        // The others still sit at any depth.
        let early = leads.iter().filter(|&&l| l < gap / 2).count();
        assert!(early > 100, "{early} of 400 in the first half: {leads:?}");
    }
}
