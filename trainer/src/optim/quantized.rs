//! Optimizer moments in 8 bits: blocks of [`BLOCK`] values, each stored as
//! its largest magnitude (f32) and one byte per value indexing a 256-entry
//! code book of the value divided by it, as bitsandbytes' blockwise 8-bit
//! optimizers do. The code book is bitsandbytes' dynamic map: a sign (for
//! the first moment), a decimal exponent from 1e-6 to 1, and a linear
//! fraction, so small moments keep their relative precision, which a
//! linear 8-bit grid would round to zero.

use std::sync::LazyLock;

/// Values per block (bitsandbytes' blockwise optimizers use 256).
pub const BLOCK: usize = 256;

/// bitsandbytes' `create_dynamic_map(signed)` with 8 bits, 7 of them for
/// the exponent: 256 sorted values in [-1, 1] (signed) or [0, 1].
fn dynamic_map(signed: bool) -> [f32; 256] {
    let mut data: Vec<f32> = Vec::with_capacity(256);
    let exponents = 7;
    for i in 0..exponents {
        let items = if signed { 1 << i } else { 2 << i };
        // The midpoints of `items` equal steps of [0.1, 1].
        let bounds: Vec<f32> = (0..=items)
            .map(|k| 0.1 + 0.9 * k as f32 / items as f32)
            .collect();
        let magnitude = 10f32.powi(i - (exponents - 1));
        for w in bounds.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(magnitude * mean);
            if signed {
                data.push(-magnitude * mean);
            }
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.resize(256, 0.0);
    data.sort_by(f32::total_cmp);
    data.try_into().expect("256 values")
}

static SIGNED: LazyLock<[f32; 256]> = LazyLock::new(|| dynamic_map(true));
static UNSIGNED: LazyLock<[f32; 256]> = LazyLock::new(|| dynamic_map(false));

/// A tensor's values in 8 bits.
#[derive(Debug, Clone, PartialEq)]
pub struct Quantized {
    /// Code book indices, one per value.
    pub codes: Vec<u8>,
    /// Each block's largest magnitude.
    pub absmax: Vec<f32>,
    /// Whether the code book has negative values (the first moment's).
    pub signed: bool,
}

impl Quantized {
    /// `n` zeros.
    pub fn zeros(n: usize, signed: bool) -> Self {
        let zero = map(signed)
            .iter()
            .position(|&x| x == 0.0)
            .expect("0 is coded") as u8;
        Quantized {
            codes: vec![zero; n],
            absmax: vec![0.0; n.div_ceil(BLOCK)],
            signed,
        }
    }

    pub fn len(&self) -> usize {
        self.codes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.codes.is_empty()
    }

    /// All values.
    pub fn decode(&self) -> Vec<f32> {
        let mut out = vec![0.0; self.len()];
        for ((chunk, codes), &absmax) in out
            .chunks_mut(BLOCK)
            .zip(self.codes.chunks(BLOCK))
            .zip(&self.absmax)
        {
            decode(codes, absmax, self.signed, chunk);
        }
        out
    }

    /// `values` in 8 bits.
    pub fn encode(values: &[f32], signed: bool) -> Self {
        let mut q = Quantized::zeros(values.len(), signed);
        for ((chunk, codes), absmax) in values
            .chunks(BLOCK)
            .zip(q.codes.chunks_mut(BLOCK))
            .zip(&mut q.absmax)
        {
            encode(chunk, codes, absmax, signed);
        }
        q
    }
}

fn map(signed: bool) -> &'static [f32; 256] {
    if signed { &SIGNED } else { &UNSIGNED }
}

/// One block's values from its codes and largest magnitude.
pub fn decode(codes: &[u8], absmax: f32, signed: bool, out: &mut [f32]) {
    let table = map(signed);
    for (o, &c) in out.iter_mut().zip(codes) {
        *o = table[c as usize] * absmax;
    }
}

/// One block: its largest magnitude, and each value's nearest code.
pub fn encode(values: &[f32], codes: &mut [u8], absmax: &mut f32, signed: bool) {
    let table = map(signed);
    let top = values.iter().fold(0f32, |m, v| m.max(v.abs()));
    *absmax = top;
    let inv = if top > 0.0 { 1.0 / top } else { 0.0 };
    for (c, &v) in codes.iter_mut().zip(values) {
        let x = v * inv;
        // The first entry not below x, or the one before it: the nearer.
        let i = table.partition_point(|&t| t < x).min(255);
        let nearer = if i > 0 && (x - table[i - 1]).abs() <= (table[i] - x).abs() {
            i - 1
        } else {
            i
        };
        *c = nearer as u8;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_code_books_are_bitsandbytes_dynamic_maps() {
        let (s, u) = (dynamic_map(true), dynamic_map(false));
        // 256 sorted entries from -1 (signed) or 0 to 1, 0 among them.
        assert!(s.windows(2).all(|w| w[0] <= w[1]) && u.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!((s[255], u[255], u[0]), (1.0, 1.0, 0.0));
        assert!(s.contains(&0.0));
        // The signed map is symmetric but for 0 and 1: 127 negatives.
        assert_eq!(s.iter().filter(|&&x| x < 0.0).count(), 127);
        // Smallest magnitudes: 1e-6 times the midpoint of [0.1, 1] (signed)
        // or of [0.1, 0.55] (unsigned).
        let tiny = |m: &[f32; 256]| m.iter().filter(|&&x| x > 0.0).fold(1f32, |a, &b| a.min(b));
        assert!((tiny(&s) - 0.55e-6).abs() < 1e-12, "{}", tiny(&s));
        assert!((tiny(&u) - 0.325e-6).abs() < 1e-12, "{}", tiny(&u));
    }

    #[test]
    fn blocks_round_trip_within_the_code_books_relative_precision() {
        // Magnitudes over six decades in one block, and a second, partial block.
        let values: Vec<f32> = (0..BLOCK + 37)
            .map(|i| {
                let sign = if i % 3 == 0 { -1.0 } else { 1.0 };
                sign * 10f32.powf(-((i % 60) as f32) / 10.0)
            })
            .collect();
        let q = Quantized::encode(&values, true);
        assert_eq!((q.codes.len(), q.absmax.len()), (values.len(), 2));
        let back = q.decode();
        for (v, b) in values.iter().zip(&back) {
            // The map spends its codes on the top decades: 64 steps from 0.1
            // to 1 of the block's maximum, 32 from 0.01 to 0.1, ...
            let limit = if v.abs() >= 0.01 {
                0.15 * v.abs()
            } else {
                0.5 * v.abs() + 1e-6
            };
            assert!((v - b).abs() <= limit, "{v} came back as {b}");
        }
        let zeros = Quantized::zeros(10, false);
        assert_eq!(zeros.decode(), vec![0.0; 10]);
    }
}
