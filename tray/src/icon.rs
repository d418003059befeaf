//! The tray's icons, drawn in code as RGBA buffers (no image files to ship or load).
//!
//! Each [`Look`] differs in shape *and* colour, so the states stay apart for colour-blind
//! users and on monochrome panels: a filled circle, a ring, a hollow square, a triangle with
//! "!", and a cross. The colours come from the Okabe–Ito palette, chosen to stay distinct under
//! the common colour-vision deficiencies. Edges are smoothed by sampling each pixel 4×4 times.

use crate::view::Look;

/// Width and height of an icon in pixels. 32 is what tray hosts ask for at common scales; they
/// scale it down for smaller panels.
pub const SIZE: u32 = 32;

/// Samples per pixel along each axis, for smooth edges.
const SUBSAMPLES: u32 = 4;

/// An opaque RGB colour.
type Rgb = [u8; 3];

/// Okabe–Ito bluish green.
const GREEN: Rgb = [0x00, 0x9E, 0x73];
/// Okabe–Ito orange.
const ORANGE: Rgb = [0xE6, 0x9F, 0x00];
/// A mid grey, readable on dark and light panels.
const GREY: Rgb = [0x99, 0x99, 0x99];
/// Okabe–Ito vermillion.
const VERMILLION: Rgb = [0xD5, 0x5E, 0x00];
/// Okabe–Ito reddish purple.
const PURPLE: Rgb = [0xCC, 0x79, 0xA7];
/// The "!" inside the error triangle.
const WHITE: Rgb = [0xFF, 0xFF, 0xFF];

/// The main colour of `look`'s icon.
pub fn colour(look: Look) -> Rgb {
    match look {
        Look::Connected => GREEN,
        Look::Connecting => ORANGE,
        Look::Disconnected => GREY,
        Look::Error => VERMILLION,
        Look::NoDaemon => PURPLE,
    }
}

/// The icon for `look`: [`SIZE`]×[`SIZE`] pixels, RGBA, rows top to bottom.
pub fn rgba(look: Look) -> Vec<u8> {
    let mut pixels = Vec::with_capacity((SIZE * SIZE * 4) as usize);
    for row in 0..SIZE {
        for column in 0..SIZE {
            let mut sum = [0u32; 3];
            let mut hits = 0u32;
            for sy in 0..SUBSAMPLES {
                for sx in 0..SUBSAMPLES {
                    let x = column as f32 + (sx as f32 + 0.5) / SUBSAMPLES as f32;
                    let y = row as f32 + (sy as f32 + 0.5) / SUBSAMPLES as f32;
                    if let Some(rgb) = paint(look, x, y) {
                        for (total, channel) in sum.iter_mut().zip(rgb) {
                            *total += u32::from(channel);
                        }
                        hits += 1;
                    }
                }
            }
            let rgb = sum.map(|total| total.checked_div(hits).unwrap_or(0) as u8);
            let alpha = (hits * 255 / (SUBSAMPLES * SUBSAMPLES)) as u8;
            pixels.extend_from_slice(&[rgb[0], rgb[1], rgb[2], alpha]);
        }
    }
    pixels
}

/// The colour of `look`'s shape at point (x, y) of the [`SIZE`] square, or `None` outside it.
fn paint(look: Look, x: f32, y: f32) -> Option<Rgb> {
    let centre = SIZE as f32 / 2.0;
    let distance = ((x - centre).powi(2) + (y - centre).powi(2)).sqrt();
    let inside = match look {
        Look::Connected => distance <= 13.0,
        Look::Connecting => (8.0..=13.5).contains(&distance),
        Look::Disconnected => {
            let within =
                |low: f32, high: f32| (low..=high).contains(&x) && (low..=high).contains(&y);
            within(4.0, 28.0) && !within(9.0, 23.0)
        }
        Look::Error => {
            if exclamation_mark(x, y) {
                return Some(WHITE);
            }
            triangle(x, y)
        }
        Look::NoDaemon => {
            // Two diagonal bars: distance to the line y = x and to y = SIZE - x.
            let width = 3.2 * std::f32::consts::SQRT_2;
            let on_bars = (x - y).abs() <= width || (x + y - SIZE as f32).abs() <= width;
            on_bars && (4.0..=28.0).contains(&x) && (4.0..=28.0).contains(&y)
        }
    };
    inside.then(|| colour(look))
}

/// Inside the error triangle: apex at the top centre, base along the bottom.
fn triangle(x: f32, y: f32) -> bool {
    let (top, bottom) = (2.0, 29.0);
    if !(top..=bottom).contains(&y) {
        return false;
    }
    let half_width = (y - top) / (bottom - top) * 14.5;
    (x - SIZE as f32 / 2.0).abs() <= half_width
}

/// The "!" inside the error triangle: a bar and a dot.
fn exclamation_mark(x: f32, y: f32) -> bool {
    let centred = (x - SIZE as f32 / 2.0).abs() <= 1.75;
    centred && ((10.0..=21.0).contains(&y) || (23.5..=27.0).contains(&y))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pixel(icon: &[u8], x: u32, y: u32) -> [u8; 4] {
        let at = ((y * SIZE + x) * 4) as usize;
        [icon[at], icon[at + 1], icon[at + 2], icon[at + 3]]
    }

    fn opaque(icon: &[u8], x: u32, y: u32, rgb: Rgb) -> bool {
        pixel(icon, x, y) == [rgb[0], rgb[1], rgb[2], 255]
    }

    fn clear(icon: &[u8], x: u32, y: u32) -> bool {
        pixel(icon, x, y)[3] == 0
    }

    #[test]
    fn every_icon_is_a_full_square_and_unlike_the_others() {
        let icons: Vec<Vec<u8>> = Look::ALL.iter().map(|look| rgba(*look)).collect();
        for (i, icon) in icons.iter().enumerate() {
            assert_eq!(icon.len(), (SIZE * SIZE * 4) as usize);
            // Corners are transparent: the panel shows through.
            assert!(clear(icon, 0, 0) && clear(icon, SIZE - 1, SIZE - 1));
            for other in &icons[i + 1..] {
                assert_ne!(icon, other);
            }
        }
        let colours: std::collections::HashSet<Rgb> = Look::ALL.map(colour).into();
        assert_eq!(colours.len(), Look::ALL.len());
    }

    #[test]
    fn shapes_are_the_documented_ones() {
        let circle = rgba(Look::Connected);
        assert!(opaque(&circle, 16, 16, GREEN), "filled centre");
        assert!(opaque(&circle, 16, 5, GREEN), "filled near the edge");

        let ring = rgba(Look::Connecting);
        assert!(clear(&ring, 16, 16), "hollow centre");
        assert!(opaque(&ring, 16, 5, ORANGE), "the ring itself");
        assert!(clear(&ring, 4, 4), "round, not square");

        let square = rgba(Look::Disconnected);
        assert!(clear(&square, 16, 16), "hollow centre");
        assert!(opaque(&square, 5, 5, GREY), "square corner");
        assert!(opaque(&square, 16, 26, GREY), "bottom side");

        let warning = rgba(Look::Error);
        assert!(opaque(&warning, 16, 14, WHITE), "the bar of the !");
        assert!(opaque(&warning, 16, 25, WHITE), "the dot of the !");
        assert!(opaque(&warning, 16, 22, VERMILLION), "the gap of the !");
        assert!(opaque(&warning, 6, 27, VERMILLION), "a base corner");
        assert!(clear(&warning, 5, 8), "pointed top");

        let cross = rgba(Look::NoDaemon);
        assert!(opaque(&cross, 16, 16, PURPLE), "where the bars cross");
        assert!(opaque(&cross, 6, 6, PURPLE) && opaque(&cross, 25, 6, PURPLE));
        assert!(
            clear(&cross, 16, 5) && clear(&cross, 5, 16),
            "open between the bars"
        );
    }

    #[test]
    fn edges_are_smoothed() {
        let circle = rgba(Look::Connected);
        let partial = circle
            .chunks(4)
            .filter(|pixel| pixel[3] > 0 && pixel[3] < 255)
            .count();
        assert!(partial > 20, "{partial} partly covered pixels");
    }
}
