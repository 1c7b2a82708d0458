//! PNG charts drawn directly into an RGB buffer (no plotting dependency):
//! line charts of training curves and accuracy heatmaps, labelled with a
//! built-in 5x7 bitmap font.

use std::path::Path;

use image::{Rgb, RgbImage};

use crate::{Error, Result};

const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
const BLACK: Rgb<u8> = Rgb([30, 30, 30]);
const GREY: Rgb<u8> = Rgb([200, 200, 200]);
/// Series colours (matplotlib's tab10).
const PALETTE: [[u8; 3]; 6] = [
    [31, 119, 180],
    [255, 127, 14],
    [44, 160, 44],
    [214, 39, 40],
    [148, 103, 189],
    [140, 86, 75],
];

/// One line of a chart.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// Width of a legend entry: its line, its label and a gap.
fn legend_entry_width(label: &str) -> i32 {
    24 + text_width(label) + 16
}

/// A line chart of `series` with vertical markers (`(x, label)`).
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    markers: &[(f64, String)],
) -> Result<()> {
    let (w, h) = (960u32, 480u32);
    let (left, right, top, bottom) = (90i32, 20i32, 40i32, 50i32);
    let mut img = RgbImage::from_pixel(w, h, WHITE);
    let all = series
        .iter()
        .flat_map(|s| s.points.iter())
        .filter(|p| p.1.is_finite());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if x0 > x1 {
        (x0, x1, y0, y1) = (0.0, 1.0, 0.0, 1.0);
    }
    if x1 - x0 < 1e-12 {
        x1 = x0 + 1.0;
    }
    let pad = ((y1 - y0) * 0.05).max(1e-12);
    // Non-negative data (a loss, a learning rate) keeps its axis at or
    // above zero.
    let floor = if y0 >= 0.0 { 0.0 } else { f64::MIN };
    let (y0, y1) = ((y0 - pad).max(floor), y1 + pad);
    let (pw, ph) = (w as i32 - left - right, h as i32 - top - bottom);
    let px = |x: f64| left + ((x - x0) / (x1 - x0) * f64::from(pw)).round() as i32;
    let py = |y: f64| top + ph - ((y - y0) / (y1 - y0) * f64::from(ph)).round() as i32;
    // Grid and ticks.
    for k in 0..=4 {
        let y = y0 + (y1 - y0) * f64::from(k) / 4.0;
        let yy = py(y);
        hline(&mut img, left, left + pw, yy, GREY);
        let text = tick(y);
        text_at(&mut img, left - 8 - text_width(&text), yy - 7, &text, BLACK);
    }
    for k in 0..=5 {
        let x = x0 + (x1 - x0) * f64::from(k) / 5.0;
        let text = tick(x);
        text_at(
            &mut img,
            px(x) - text_width(&text) / 2,
            top + ph + 8,
            &text,
            BLACK,
        );
    }
    // A label that would run into the previous one goes a row lower (a
    // short stage's markers sit a few pixels apart).
    let (mut row, mut free_from) = (0, i32::MIN);
    for (x, label) in markers {
        let xx = px(*x);
        for y in (top..top + ph).step_by(6) {
            vline(&mut img, xx, y, (y + 3).min(top + ph), BLACK);
        }
        row = if xx + 4 < free_from { row + 1 } else { 0 };
        text_at(&mut img, xx + 4, top + 4 + 18 * row, label, BLACK);
        free_from = free_from.max(xx + 4 + text_width(label) + 4);
    }
    hline(&mut img, left, left + pw, top + ph, BLACK);
    vline(&mut img, left, top, top + ph, BLACK);
    let legend_width: i32 = series.iter().map(|s| legend_entry_width(&s.label)).sum();
    let mut legend_x = left + pw - legend_width;
    for (i, s) in series.iter().enumerate() {
        let c = Rgb(PALETTE[i % PALETTE.len()]);
        let pts: Vec<(i32, i32)> = s
            .points
            .iter()
            .filter(|p| p.1.is_finite())
            .map(|&(x, y)| (px(x), py(y)))
            .collect();
        for pair in pts.windows(2) {
            line(&mut img, pair[0], pair[1], c);
        }
        if pts.len() == 1 {
            line(&mut img, pts[0], pts[0], c);
        }
        // The legend sits in the top margin, right-aligned beside the
        // title, where the stage markers' labels cannot cover it.
        for d in 0..3 {
            hline(&mut img, legend_x, legend_x + 18, 18 + d, c);
        }
        text_at(&mut img, legend_x + 24, 12, &s.label, BLACK);
        legend_x += legend_entry_width(&s.label);
    }
    text_at(&mut img, left, 12, title, BLACK);
    text_at(
        &mut img,
        left + pw / 2 - text_width(x_label) / 2,
        h as i32 - 22,
        x_label,
        BLACK,
    );
    text_at(&mut img, 6, 12, y_label, BLACK);
    save(&img, path)
}

/// A heatmap of values in [0, 1] (NaN: no data), red (0) to green (1),
/// each cell labelled with its percentage.
pub fn heatmap(
    path: &Path,
    title: &str,
    corner: &str,
    rows: &[String],
    cols: &[String],
    values: &[Vec<f64>],
) -> Result<()> {
    let (cell_w, cell_h) = (110i32, 40i32);
    let left = 20
        + rows
            .iter()
            .map(|r| text_width(r))
            .max()
            .unwrap_or(0)
            .max(text_width(corner));
    let top = 70i32;
    let w = (left + cell_w * cols.len() as i32 + 20).max(text_width(title) + 40);
    let h = top + cell_h * rows.len() as i32 + 20;
    let mut img = RgbImage::from_pixel(w as u32, h as u32, WHITE);
    text_at(&mut img, 10, 10, title, BLACK);
    text_at(&mut img, 10, top - 24, corner, BLACK);
    for (c, label) in cols.iter().enumerate() {
        let x = left + cell_w * c as i32 + cell_w / 2 - text_width(label) / 2;
        text_at(&mut img, x, top - 24, label, BLACK);
    }
    for (r, label) in rows.iter().enumerate() {
        let y = top + cell_h * r as i32;
        text_at(&mut img, 10, y + cell_h / 2 - 7, label, BLACK);
        for (c, v) in values[r].iter().enumerate() {
            let x = left + cell_w * c as i32;
            let colour = if v.is_finite() {
                let t = v.clamp(0.0, 1.0);
                Rgb([
                    (230.0 - 180.0 * t) as u8,
                    (60.0 + 150.0 * t) as u8,
                    (60.0 + 20.0 * t) as u8,
                ])
            } else {
                GREY
            };
            for yy in y + 1..y + cell_h - 1 {
                hline(&mut img, x + 1, x + cell_w - 2, yy, colour);
            }
            let text = if v.is_finite() {
                format!("{:.0}%", v * 100.0)
            } else {
                "-".to_string()
            };
            text_at(
                &mut img,
                x + cell_w / 2 - text_width(&text) / 2,
                y + cell_h / 2 - 7,
                &text,
                WHITE,
            );
        }
    }
    save(&img, path)
}

fn save(img: &RgbImage, path: &Path) -> Result<()> {
    img.save(path).map_err(|source| Error::Chart {
        path: path.to_path_buf(),
        source,
    })
}

fn tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-2..1e5).contains(&a) {
        format!("{v:.1e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.3}")
    }
}

fn put(img: &mut RgbImage, x: i32, y: i32, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn hline(img: &mut RgbImage, x0: i32, x1: i32, y: i32, c: Rgb<u8>) {
    for x in x0..=x1 {
        put(img, x, y, c);
    }
}

fn vline(img: &mut RgbImage, x: i32, y0: i32, y1: i32, c: Rgb<u8>) {
    for y in y0..=y1 {
        put(img, x, y, c);
    }
}

/// A 2-pixel-wide line (Bresenham).
fn line(img: &mut RgbImage, (mut x0, mut y0): (i32, i32), (x1, y1): (i32, i32), c: Rgb<u8>) {
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let mut err = dx + dy;
    loop {
        put(img, x0, y0, c);
        put(img, x0, y0 + 1, c);
        if x0 == x1 && y0 == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x0 += sx;
        }
        if e2 <= dx {
            err += dx;
            y0 += sy;
        }
    }
}

/// Glyphs at 2x scale: 12 px advance, 14 px high.
const SCALE: i32 = 2;

fn text_width(text: &str) -> i32 {
    text.chars().count() as i32 * 6 * SCALE
}

fn text_at(img: &mut RgbImage, x: i32, y: i32, text: &str, c: Rgb<u8>) {
    for (i, ch) in text.chars().enumerate() {
        let rows = glyph(ch);
        for (r, bits) in rows.iter().enumerate() {
            for col in 0..5 {
                if bits & (0b10000 >> col) != 0 {
                    for dy in 0..SCALE {
                        for dx in 0..SCALE {
                            put(
                                img,
                                x + (i as i32 * 6 + col) * SCALE + dx,
                                y + r as i32 * SCALE + dy,
                                c,
                            );
                        }
                    }
                }
            }
        }
    }
}

/// 5x7 glyph rows (bit 4 is the left column); lower case draws as upper.
fn glyph(c: char) -> [u8; 7] {
    let rows = match c.to_ascii_uppercase() {
        '0' => "01110 10001 10011 10101 11001 10001 01110",
        '1' => "00100 01100 00100 00100 00100 00100 01110",
        '2' => "01110 10001 00001 00010 00100 01000 11111",
        '3' => "11111 00010 00100 00010 00001 10001 01110",
        '4' => "00010 00110 01010 10010 11111 00010 00010",
        '5' => "11111 10000 11110 00001 00001 10001 01110",
        '6' => "00110 01000 10000 11110 10001 10001 01110",
        '7' => "11111 00001 00010 00100 01000 01000 01000",
        '8' => "01110 10001 10001 01110 10001 10001 01110",
        '9' => "01110 10001 10001 01111 00001 00010 01100",
        'A' => "01110 10001 10001 11111 10001 10001 10001",
        'B' => "11110 10001 10001 11110 10001 10001 11110",
        'C' => "01110 10001 10000 10000 10000 10001 01110",
        'D' => "11100 10010 10001 10001 10001 10010 11100",
        'E' => "11111 10000 10000 11110 10000 10000 11111",
        'F' => "11111 10000 10000 11110 10000 10000 10000",
        'G' => "01110 10001 10000 10111 10001 10001 01111",
        'H' => "10001 10001 10001 11111 10001 10001 10001",
        'I' => "01110 00100 00100 00100 00100 00100 01110",
        'J' => "00111 00010 00010 00010 00010 10010 01100",
        'K' => "10001 10010 10100 11000 10100 10010 10001",
        'L' => "10000 10000 10000 10000 10000 10000 11111",
        'M' => "10001 11011 10101 10101 10001 10001 10001",
        'N' => "10001 10001 11001 10101 10011 10001 10001",
        'O' => "01110 10001 10001 10001 10001 10001 01110",
        'P' => "11110 10001 10001 11110 10000 10000 10000",
        'Q' => "01110 10001 10001 10001 10101 10010 01101",
        'R' => "11110 10001 10001 11110 10100 10010 10001",
        'S' => "01111 10000 10000 01110 00001 00001 11110",
        'T' => "11111 00100 00100 00100 00100 00100 00100",
        'U' => "10001 10001 10001 10001 10001 10001 01110",
        'V' => "10001 10001 10001 10001 10001 01010 00100",
        'W' => "10001 10001 10001 10101 10101 10101 01010",
        'X' => "10001 10001 01010 00100 01010 10001 10001",
        'Y' => "10001 10001 10001 01010 00100 00100 00100",
        'Z' => "11111 00001 00010 00100 01000 10000 11111",
        '.' => "00000 00000 00000 00000 00000 01100 01100",
        ',' => "00000 00000 00000 00000 01100 00100 01000",
        '-' => "00000 00000 00000 11111 00000 00000 00000",
        ':' => "00000 01100 01100 00000 01100 01100 00000",
        '%' => "11000 11001 00010 00100 01000 10011 00011",
        '(' => "00010 00100 01000 01000 01000 00100 00010",
        ')' => "01000 00100 00010 00010 00010 00100 01000",
        '/' => "00000 00001 00010 00100 01000 10000 00000",
        '=' => "00000 00000 11111 00000 11111 00000 00000",
        '+' => "00000 00100 00100 11111 00100 00100 00000",
        '_' => "00000 00000 00000 00000 00000 00000 11111",
        _ => "00000 00000 00000 00000 00000 00000 00000",
    };
    let mut out = [0u8; 7];
    for (i, row) in rows.split(' ').enumerate() {
        out[i] = u8::from_str_radix(row, 2).unwrap_or(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charts_draw_their_data() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.png");
        let rising = Series {
            label: "loss".into(),
            points: (0..50).map(|i| (f64::from(i), f64::from(i))).collect(),
        };
        line_chart(
            &path,
            "T",
            "step",
            "loss",
            &[rising],
            &[(25.0, "S2".into())],
        )
        .unwrap();
        let img = image::open(&path).unwrap().into_rgb8();
        let blue = Rgb(PALETTE[0]);
        // The line rises from the bottom left to the top right of the plot.
        let xs: Vec<(u32, u32)> = img
            .enumerate_pixels()
            .filter(|(x, y, p)| **p == blue && *x > 100 && *y > 60)
            .map(|(x, y, _)| (x, y))
            .collect();
        let left = xs.iter().min_by_key(|p| p.0).unwrap();
        let right = xs.iter().max_by_key(|p| p.0).unwrap();
        assert!(left.1 > right.1 + 200, "{left:?} {right:?}");
        // Non-negative data: the axis starts at 0, so the line starts on
        // the bottom axis (y = 430), not above a padding below zero.
        assert!(left.1 >= 420, "{left:?}");
        // The legend sits in the top margin, right of the title, not over
        // the stage markers' labels at the top of the plot.
        assert!(
            img.enumerate_pixels()
                .any(|(x, y, p)| *p == blue && y < 40 && x > 800)
        );

        let path = dir.path().join("h.png");
        let rows = vec!["512".to_string(), "2048".to_string()];
        let cols = vec!["0%".to_string(), "100%".to_string()];
        heatmap(
            &path,
            "N",
            "len",
            &rows,
            &cols,
            &[vec![0.0, 1.0], vec![f64::NAN, 0.5]],
        )
        .unwrap();
        let img = image::open(&path).unwrap().into_rgb8();
        let (w, h) = img.dimensions();
        let red = img.pixels().filter(|p| p.0 == [230, 60, 60]).count();
        let green = img.pixels().filter(|p| p.0 == [50, 210, 80]).count();
        assert!(red > 1000 && green > 1000, "{red} {green} of {w}x{h}");
    }
}
