//! Scenes: one to three shapes of one colour in one region of an image,
//! drawn with their facts (colour, shape, count, position), captions and
//! questions.

use std::io::Cursor;

use image::{ImageFormat, Rgb, RgbImage};
use rand::Rng;
use rand::rngs::SmallRng;
use rand::seq::IndexedRandom;

use crate::answers::ImageFacts;
use crate::{Error, Result};

pub(crate) const COLOURS: [(&str, [u8; 3]); 6] = [
    ("red", [220, 30, 30]),
    ("green", [30, 170, 50]),
    ("blue", [30, 60, 220]),
    ("yellow", [235, 205, 20]),
    ("purple", [140, 40, 170]),
    ("orange", [245, 130, 20]),
];
pub(crate) const SHAPES: [&str; 3] = ["circle", "square", "triangle"];
/// How many answers the video needle's question (the flash's colour) has:
/// V-NIAH's chance is one over it.
pub const VIDEO_NEEDLE_ANSWERS: usize = COLOURS.len();
const POSITIONS: [&str; 5] = [
    "top left",
    "top right",
    "bottom left",
    "bottom right",
    "center",
];
const NUMBERS: [&str; 4] = ["zero", "one", "two", "three"];

#[derive(Debug, Clone)]
pub(crate) struct Scene {
    colour: usize,
    shape: usize,
    count: u32,
    position: usize,
}

impl Scene {
    pub(crate) fn random(rng: &mut SmallRng) -> Self {
        Scene {
            colour: rng.random_range(0..COLOURS.len()),
            shape: rng.random_range(0..SHAPES.len()),
            count: rng.random_range(1..=3),
            position: rng.random_range(0..POSITIONS.len()),
        }
    }

    fn noun(&self) -> String {
        let shape = SHAPES[self.shape];
        if self.count == 1 {
            shape.to_string()
        } else {
            format!("{shape}s")
        }
    }

    fn where_(&self) -> String {
        match POSITIONS[self.position] {
            "center" => "in the center".to_string(),
            p => format!("at the {p}"),
        }
    }

    pub(crate) fn caption(&self, rng: &mut SmallRng) -> String {
        let (colour, count) = (COLOURS[self.colour].0, NUMBERS[self.count as usize]);
        let templates = [
            format!(
                "{} {colour} {} {}.",
                capitalize(count),
                self.noun(),
                self.where_()
            ),
            format!(
                "The image shows {count} {colour} {} {}.",
                self.noun(),
                self.where_()
            ),
            format!(
                "{} of the picture: {count} {colour} {}.",
                capitalize(&self.where_()),
                self.noun()
            ),
        ];
        templates.choose(rng).expect("non-empty").clone()
    }

    /// The four questions about the scene: (attribute, question, answer).
    pub(crate) fn questions(&self) -> Vec<(&'static str, String, String)> {
        let shape = SHAPES[self.shape];
        vec![
            (
                "colour",
                "What color are the shapes?".to_string(),
                COLOURS[self.colour].0.to_string(),
            ),
            (
                "shape",
                "Which shape is drawn?".to_string(),
                shape.to_string(),
            ),
            (
                "count",
                // Not "How many circles": a question naming the shape
                // would answer the shape question in the same conversation.
                "How many shapes are there?".to_string(),
                NUMBERS[self.count as usize].to_string(),
            ),
            (
                "position",
                "Where are the shapes?".to_string(),
                POSITIONS[self.position].to_string(),
            ),
        ]
    }

    pub(crate) fn facts(&self, file: String) -> ImageFacts {
        ImageFacts {
            file,
            colour: COLOURS[self.colour].0.to_string(),
            shape: SHAPES[self.shape].to_string(),
            count: self.count,
            position: POSITIONS[self.position].to_string(),
        }
    }

    /// Draws the scene: `count` shapes inside the scene's region.
    pub(crate) fn render(&self, rng: &mut SmallRng, w: u32, h: u32) -> RgbImage {
        let tint: [u8; 3] = [
            rng.random_range(225..=250),
            rng.random_range(225..=250),
            rng.random_range(225..=250),
        ];
        let mut img = RgbImage::from_pixel(w, h, Rgb(tint));
        let (fw, fh) = (w as f32, h as f32);
        // Region as fractions of the image: [x0, x1) x [y0, y1).
        let (x0, x1, y0, y1) = match POSITIONS[self.position] {
            "top left" => (0.0, 0.5, 0.0, 0.5),
            "top right" => (0.5, 1.0, 0.0, 0.5),
            "bottom left" => (0.0, 0.5, 0.5, 1.0),
            "bottom right" => (0.5, 1.0, 0.5, 1.0),
            _ => (0.25, 0.75, 0.25, 0.75),
        };
        let (rw, rh) = ((x1 - x0) * fw, (y1 - y0) * fh);
        // Shapes sit side by side along the region's longer axis.
        let n = self.count as f32;
        let horizontal = rw >= rh;
        // Shapes fill most of their cell: at the tiny recipe's 64 px a
        // third of a quadrant is 10 px, and smaller shapes lose their kind.
        let r = if horizontal {
            (rw / n).min(rh) * 0.45
        } else {
            (rh / n).min(rw) * 0.45
        };
        let colour = Rgb(COLOURS[self.colour].1);
        for i in 0..self.count {
            let t = (i as f32 + 0.5) / n;
            let (cx, cy) = if horizontal {
                (x0 * fw + t * rw, y0 * fh + rh / 2.0)
            } else {
                (x0 * fw + rw / 2.0, y0 * fh + t * rh)
            };
            let (cx, cy) = (
                cx + rng.random_range(-0.1..0.1) * r,
                cy + rng.random_range(-0.1..0.1) * r,
            );
            draw_shape(&mut img, SHAPES[self.shape], cx, cy, r, colour.0);
        }
        img
    }
}

/// Width and height of a scene image: the width within `(lo, hi)`, the
/// aspect ratio within 4:5 to 5:4. Padding to square shrinks a scene by its
/// aspect ratio, and the tiny recipe looks at 64 px: wider ranges made the
/// shapes a few pixels wide and their kind unreadable.
pub(crate) fn image_dims(rng: &mut SmallRng, (lo, hi): (u32, u32)) -> (u32, u32) {
    let w = rng.random_range(lo..=hi);
    let h = (w as f32 * rng.random_range(0.8..1.25)).round() as u32;
    (w, h.max(1))
}

/// Fills `shape` of radius `r` centred at (`cx`, `cy`), clipped to the image.
pub(crate) fn draw_shape(
    img: &mut RgbImage,
    shape: &str,
    cx: f32,
    cy: f32,
    r: f32,
    colour: [u8; 3],
) {
    let (w, h) = img.dimensions();
    let bx0 = (cx - r).floor().max(0.0) as u32;
    let by0 = (cy - r).floor().max(0.0) as u32;
    let bx1 = ((cx + r).ceil().max(0.0) as u32).min(w - 1);
    let by1 = ((cy + r).ceil().max(0.0) as u32).min(h - 1);
    for y in by0..=by1 {
        for x in bx0..=bx1 {
            let (dx, dy) = (x as f32 + 0.5 - cx, y as f32 + 0.5 - cy);
            let inside = match shape {
                "circle" => dx * dx + dy * dy <= r * r,
                "square" => dx.abs() <= r * 0.85 && dy.abs() <= r * 0.85,
                // Apex up: the half-width grows from 0 at the top to r at the bottom.
                _ => dy >= -r && dy <= r && dx.abs() <= (dy + r) / 2.0,
            };
            if inside {
                img.put_pixel(x, y, Rgb(colour));
            }
        }
    }
}

/// Draws the video needle, `colour` `shape` filling the middle of the frame
/// (packed RGB, `width` x `height`), as the long videos show it. Unknown
/// colour names are an error.
pub fn draw_video_needle(
    rgb: &mut Vec<u8>,
    width: u32,
    height: u32,
    colour: &str,
    shape: &str,
) -> Result<()> {
    let unknown = || Error::Invalid(format!("unknown needle `{colour} {shape}`"));
    let (_, fill) = COLOURS
        .iter()
        .find(|(name, _)| *name == colour)
        .ok_or_else(unknown)?;
    if !SHAPES.contains(&shape) {
        return Err(unknown());
    }
    let mut img = RgbImage::from_raw(width, height, std::mem::take(rgb)).ok_or_else(|| {
        Error::Invalid(format!(
            "a {width}x{height} frame needs {} bytes",
            width * height * 3
        ))
    })?;
    draw_needle(&mut img, shape, *fill);
    *rgb = img.into_raw();
    Ok(())
}

/// The needle: `shape` in `fill` over the middle of the frame.
pub(crate) fn draw_needle(img: &mut RgbImage, shape: &str, fill: [u8; 3]) {
    let (w, h) = img.dimensions();
    let (w, h) = (w as f32, h as f32);
    draw_shape(img, shape, w / 2.0, h / 2.0, h * 0.35, fill);
}

/// "red" -> "Red".
pub(crate) fn capitalize(s: &str) -> String {
    let mut c = s.chars();
    c.next()
        .map(|f| f.to_uppercase().chain(c).collect())
        .unwrap_or_default()
}

/// The image's bytes as `format` (JPEG at quality 92).
pub(crate) fn encode(img: &RgbImage, format: ImageFormat) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    match format {
        ImageFormat::Jpeg => {
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 92)
                .encode_image(img)
                .map_err(Error::Image)?;
        }
        _ => img
            .write_to(&mut Cursor::new(&mut out), format)
            .map_err(Error::Image)?,
    }
    Ok(out)
}
