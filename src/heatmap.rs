//! `kiln heatmap`: draws a volume's heat over time from `volume_get_heatmap`.
//!
//! The picture has LBA on the y axis (offset 0 at the top) and time on the x
//! axis, one column per policy window. Each cell is coloured by its accesses
//! in that window on a log scale (dark blue → yellow → red); unmapped cells
//! are grey. The tier overlay: cells that are not on the fastest tier are
//! hatched (one hatch per tier), a white line marks every place where the
//! tier changes between neighbouring rows (a tier boundary), and two strips
//! on the right show the latest tier of every row and the planner's current
//! partition classes (hot / warm / cold). A legend names the tiers and the
//! colour scale.
//!
//! Rendering is pure ([`render_svg`], [`render_png`]); the PNG encoder is a
//! minimal one (zlib stored blocks, crc32, adler32) with a 3×5 bitmap font.

use std::fmt::Write as _;

use serde_json::Value;

/// The most rows drawn; more cells are summed into one row.
const MAX_ROWS: usize = 256;
/// The most columns drawn; more windows are summed into one column.
const MAX_COLS: usize = 900;
const UNMAPPED: u8 = 255;

/// Colour of unmapped cells.
const GREY: [u8; 3] = [70, 70, 70];
/// Colours of the tier strip, fastest tier first.
const TIER_COLOURS: [[u8; 3]; 4] = [
    [46, 204, 113],
    [155, 89, 182],
    [230, 126, 34],
    [52, 152, 219],
];
/// Colours of partition classes: hot, warm, cold.
const CLASS_COLOURS: [[u8; 3]; 3] = [[231, 76, 60], [241, 196, 15], [40, 60, 120]];

/// The heat map reduced to a grid of rows × columns.
#[derive(Debug)]
struct Grid {
    rows: usize,
    cols: usize,
    /// Accesses, `[col * rows + row]`.
    heat: Vec<u64>,
    /// Tier of each cell (the most common tier of the cells summed into it).
    tier: Vec<u8>,
    max: u64,
    size_bytes: u64,
    tiers: Vec<String>,
    /// Per column: (first window, unix ms).
    col_time: Vec<(u64, u64)>,
    /// Per row: partition class index (0 hot, 1 warm, 2 cold), if known.
    class: Vec<Option<usize>>,
    volume: String,
    windows: usize,
}

fn parse(v: &Value) -> Result<Grid, String> {
    let frames = v
        .get("frames")
        .and_then(Value::as_array)
        .ok_or("heat map has no 'frames' array")?;
    if frames.is_empty() {
        return Err("heat map has no frames yet (is the policy loop running?)".into());
    }
    let size_bytes = v.get("size_bytes").and_then(Value::as_u64).unwrap_or(0);
    let tiers: Vec<String> = v
        .get("tiers")
        .and_then(Value::as_array)
        .map(|a| {
            a.iter()
                .map(|t| t.as_str().unwrap_or("?").to_string())
                .collect()
        })
        .unwrap_or_default();
    let volume = v
        .get("volume")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_string();
    let u32s = |f: &Value, key: &str| -> Result<Vec<u64>, String> {
        f.get(key)
            .and_then(Value::as_array)
            .ok_or_else(|| format!("frame without '{key}'"))?
            .iter()
            .map(|x| {
                x.as_u64()
                    .ok_or_else(|| format!("'{key}' holds a non-number"))
            })
            .collect()
    };
    let cells = u32s(&frames[0], "accesses")?.len();
    if cells == 0 {
        return Err("frames have no cells".into());
    }
    let group = cells.div_ceil(MAX_ROWS);
    let rows = cells.div_ceil(group);
    let cgroup = frames.len().div_ceil(MAX_COLS);
    let cols = frames.len().div_ceil(cgroup);
    let mut heat = vec![0u64; rows * cols];
    let mut tier = vec![UNMAPPED; rows * cols];
    let mut col_time = vec![(0, 0); cols];
    // Per (col,row): votes per tier index (small: tiers are few).
    let mut votes = vec![[0u32; 8]; rows * cols];
    for (fi, f) in frames.iter().enumerate() {
        let c = fi / cgroup;
        if fi % cgroup == 0 {
            col_time[c] = (
                f.get("window").and_then(Value::as_u64).unwrap_or(fi as u64),
                f.get("unix_ms").and_then(Value::as_u64).unwrap_or(0),
            );
        }
        let acc = u32s(f, "accesses")?;
        let tr = u32s(f, "tiers")?;
        for (cell, a) in acc.iter().enumerate().take(cells) {
            heat[c * rows + cell / group] += a;
        }
        for (cell, t) in tr.iter().enumerate().take(cells) {
            if *t < 8 {
                votes[c * rows + cell / group][*t as usize] += 1;
            }
        }
    }
    for (i, v) in votes.iter().enumerate() {
        if let Some((t, n)) = v
            .iter()
            .enumerate()
            .max_by_key(|(t, n)| (**n, usize::MAX - t))
        {
            if *n > 0 {
                tier[i] = t as u8;
            }
        }
    }
    let max = heat.iter().copied().max().unwrap_or(0);
    // Partition classes by row (the class covering the row's first byte).
    let mut class = vec![None; rows];
    if let (Some(parts), true) = (
        v.get("partitions").and_then(Value::as_array),
        size_bytes > 0,
    ) {
        let row_bytes = size_bytes as f64 / rows as f64;
        for p in parts {
            let off = p.get("offset").and_then(Value::as_u64).unwrap_or(0) as f64;
            let len = p.get("length").and_then(Value::as_u64).unwrap_or(0) as f64;
            let k = match p.get("class").and_then(Value::as_str) {
                Some("hot") => 0,
                Some("warm") => 1,
                _ => 2,
            };
            let r0 = (off / row_bytes).floor() as usize;
            let r1 = (((off + len) / row_bytes).ceil() as usize).min(rows);
            for c in class.iter_mut().take(r1).skip(r0) {
                // The hottest class wins a shared row.
                *c = Some(c.map_or(k, |o: usize| o.min(k)));
            }
        }
    }
    Ok(Grid {
        rows,
        cols,
        heat,
        tier,
        max,
        size_bytes,
        tiers,
        col_time,
        class,
        volume,
        windows: frames.len(),
    })
}

/// Heat colour: log scale of `a` against `max`, dark blue → yellow → red.
pub fn heat_colour(a: u64, max: u64) -> [u8; 3] {
    let x = if max == 0 || a == 0 {
        0.0
    } else {
        ((a as f64).ln_1p() / (max as f64).ln_1p()).clamp(0.0, 1.0)
    };
    const STOPS: [(f64, [f64; 3]); 5] = [
        (0.0, [8.0, 16.0, 64.0]),
        (0.25, [30.0, 70.0, 170.0]),
        (0.55, [60.0, 170.0, 150.0]),
        (0.8, [250.0, 215.0, 40.0]),
        (1.0, [215.0, 25.0, 28.0]),
    ];
    let mut out = STOPS[0].1;
    for w in STOPS.windows(2) {
        let ((x0, c0), (x1, c1)) = (w[0], w[1]);
        if x >= x0 && x <= x1 {
            let t = (x - x0) / (x1 - x0);
            out = [0, 1, 2].map(|i| c0[i] + (c1[i] - c0[i]) * t);
        }
    }
    out.map(|c| c.round() as u8)
}

fn hex(c: [u8; 3]) -> String {
    format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2])
}

fn fmt_bytes(b: u64) -> String {
    const G: u64 = 1 << 30;
    const M: u64 = 1 << 20;
    if b >= G && b % (G / 4) == 0 {
        format!("{}GiB", b as f64 / G as f64)
    } else if b >= M {
        format!("{}MiB", b / M)
    } else {
        format!("{}KiB", b >> 10)
    }
}

/// Geometry shared by both renderers.
struct Layout {
    cw: usize,
    rh: usize,
    x0: usize,
    y0: usize,
    pw: usize,
    ph: usize,
    /// x of the tier strip and of the class strip.
    strip_x: usize,
    class_x: usize,
    strip_w: usize,
    legend_y: usize,
    width: usize,
    height: usize,
}

impl Layout {
    fn new(g: &Grid) -> Layout {
        let cw = (900 / g.cols).clamp(1, 12);
        let rh = (512 / g.rows).clamp(1, 8);
        let (x0, y0) = (80, 40);
        let (pw, ph) = (g.cols * cw, g.rows * rh);
        let strip_w = 14;
        let strip_x = x0 + pw + 8;
        let class_x = strip_x + strip_w + 4;
        let legend_y = y0 + ph + 40;
        Layout {
            cw,
            rh,
            x0,
            y0,
            pw,
            ph,
            strip_x,
            class_x,
            strip_w,
            legend_y,
            width: (class_x + strip_w + 70).max(x0 + 560),
            height: legend_y + 50 + 16 * g.tiers.len().max(1),
        }
    }
}

/// y-axis ticks: (row, label).
fn y_ticks(g: &Grid) -> Vec<(usize, String)> {
    (0..=4)
        .map(|i| {
            let row = g.rows * i / 4;
            (row, fmt_bytes(g.size_bytes * i as u64 / 4))
        })
        .collect()
}

/// x-axis ticks: (col, label) as seconds since the first frame.
fn x_ticks(g: &Grid) -> Vec<(usize, String)> {
    let n = 6.min(g.cols);
    let t0 = g.col_time[0].1;
    (0..n)
        .map(|i| {
            let c = if n == 1 {
                0
            } else {
                (g.cols - 1) * i / (n - 1)
            };
            let s = g.col_time[c].1.saturating_sub(t0) as f64 / 1000.0;
            (c, format!("{s:.0}s"))
        })
        .collect()
}

/// The legend's scale ticks: (fraction 0..1, label).
fn scale_ticks(max: u64) -> Vec<(f64, String)> {
    let mut v = vec![(0.0, "0".to_string())];
    let mut p = 1u64;
    while p <= max && max > 0 {
        v.push(((p as f64).ln_1p() / (max as f64).ln_1p(), p.to_string()));
        p *= 10;
    }
    if max > 0 {
        v.push((1.0, max.to_string()));
    }
    // Drop labels that would overlap.
    let mut out: Vec<(f64, String)> = Vec::new();
    for t in v {
        if out.last().is_none_or(|l| t.0 - l.0 > 0.12) || t.0 == 1.0 {
            if t.0 == 1.0 && out.last().is_some_and(|l| 1.0 - l.0 < 0.12) && out.len() > 1 {
                out.pop();
            }
            out.push(t);
        }
    }
    out
}

/// Renders the `volume_get_heatmap` answer as an SVG document.
pub fn render_svg(v: &Value) -> Result<String, String> {
    let g = parse(v)?;
    let l = Layout::new(&g);
    let mut s = String::new();
    let w = |s: &mut String, t: String| s.push_str(&t);
    w(
        &mut s,
        format!(
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" \
             viewBox=\"0 0 {} {}\" font-family=\"monospace\" font-size=\"11\">\n",
            l.width, l.height, l.width, l.height
        ),
    );
    s.push_str("<defs>\n");
    for t in 1..g.tiers.len().max(2) {
        // One hatch per slower tier: denser and rotated differently per tier.
        let size = 6 - (t as i32 - 1).min(3);
        let angle = [45, -45, 0, 90][(t - 1) % 4];
        let _ = writeln!(
            s,
            "<pattern id=\"hatch{t}\" patternUnits=\"userSpaceOnUse\" width=\"{size}\" \
             height=\"{size}\" patternTransform=\"rotate({angle})\"><line x1=\"0\" y1=\"0\" \
             x2=\"0\" y2=\"{size}\" stroke=\"#ffffff\" stroke-opacity=\"0.45\" \
             stroke-width=\"1\"/></pattern>"
        );
    }
    s.push_str("<linearGradient id=\"scale\" x1=\"0\" x2=\"1\" y1=\"0\" y2=\"0\">\n");
    for i in 0..=20 {
        let f = i as f64 / 20.0;
        let a = if g.max == 0 {
            0
        } else {
            (f * (g.max as f64).ln_1p()).exp_m1().round() as u64
        };
        let _ = writeln!(
            s,
            "<stop offset=\"{f:.2}\" stop-color=\"{}\"/>",
            hex(heat_colour(a, g.max.max(1)))
        );
    }
    s.push_str("</linearGradient>\n</defs>\n");
    let _ = writeln!(
        s,
        "<rect width=\"{}\" height=\"{}\" fill=\"#ffffff\"/>",
        l.width, l.height
    );
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"20\" font-size=\"14\">kiln heat map: volume {} ({}), {} windows, \
         peak {} accesses/cell/window</text>",
        l.x0,
        esc(&g.volume),
        fmt_bytes(g.size_bytes),
        g.windows,
        g.max
    );
    // Heat cells, run-length merged down each column.
    s.push_str("<g id=\"cells\" shape-rendering=\"crispEdges\">\n");
    for c in 0..g.cols {
        let mut r = 0;
        while r < g.rows {
            let colour = cell_colour(&g, c, r);
            let mut n = 1;
            while r + n < g.rows && cell_colour(&g, c, r + n) == colour {
                n += 1;
            }
            let _ = writeln!(
                s,
                "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"{}\"/>",
                l.x0 + c * l.cw,
                l.y0 + r * l.rh,
                l.cw,
                n * l.rh,
                hex(colour)
            );
            r += n;
        }
    }
    s.push_str("</g>\n<g id=\"tier-overlay\" shape-rendering=\"crispEdges\">\n");
    // Hatch over cells on slower tiers.
    for c in 0..g.cols {
        let mut r = 0;
        while r < g.rows {
            let t = g.tier[c * g.rows + r];
            let mut n = 1;
            while r + n < g.rows && g.tier[c * g.rows + r + n] == t {
                n += 1;
            }
            if t != 0 && t != UNMAPPED {
                let _ = writeln!(
                    s,
                    "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"url(#hatch{t})\"/>",
                    l.x0 + c * l.cw,
                    l.y0 + r * l.rh,
                    l.cw,
                    n * l.rh
                );
            }
            r += n;
        }
    }
    // Tier boundaries: where a row's tier differs from the row above, merged across columns.
    for r in 1..g.rows {
        let edge = |c: usize| {
            let (a, b) = (g.tier[c * g.rows + r - 1], g.tier[c * g.rows + r]);
            a != b && a != UNMAPPED && b != UNMAPPED
        };
        let mut c = 0;
        while c < g.cols {
            if !edge(c) {
                c += 1;
                continue;
            }
            let mut n = 1;
            while c + n < g.cols && edge(c + n) {
                n += 1;
            }
            let y = l.y0 + r * l.rh;
            let _ = writeln!(
                s,
                "<line class=\"tier-boundary\" x1=\"{}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" \
                 stroke=\"#ffffff\" stroke-width=\"1\"/>",
                l.x0 + c * l.cw,
                l.x0 + (c + n) * l.cw
            );
            c += n;
        }
    }
    s.push_str("</g>\n");
    // Right strips: latest tier per row, partition class per row.
    let last = g.cols - 1;
    let mut r = 0;
    while r < g.rows {
        let t = g.tier[last * g.rows + r];
        let mut n = 1;
        while r + n < g.rows && g.tier[last * g.rows + r + n] == t {
            n += 1;
        }
        let _ = writeln!(
            s,
            "<rect class=\"tier-strip\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"{}\"/>",
            l.strip_x,
            l.y0 + r * l.rh,
            l.strip_w,
            n * l.rh,
            hex(tier_colour(t))
        );
        r += n;
    }
    let mut r = 0;
    while r < g.rows {
        let k = g.class[r];
        let mut n = 1;
        while r + n < g.rows && g.class[r + n] == k {
            n += 1;
        }
        let _ = writeln!(
            s,
            "<rect class=\"class-strip\" x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"{}\"/>",
            l.class_x,
            l.y0 + r * l.rh,
            l.strip_w,
            n * l.rh,
            hex(k.map_or(GREY, |k| CLASS_COLOURS[k]))
        );
        r += n;
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" font-size=\"9\">tier</text><text x=\"{}\" y=\"{}\" \
         font-size=\"9\">plan</text>",
        l.strip_x,
        l.y0 - 4,
        l.class_x,
        l.y0 - 14
    );
    // Axes.
    let _ = writeln!(
        s,
        "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" stroke=\"#000\"/>",
        l.x0, l.y0, l.pw, l.ph
    );
    for (row, label) in y_ticks(&g) {
        let y = l.y0 + row * l.rh;
        let _ = writeln!(
            s,
            "<line x1=\"{}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#000\"/><text x=\"{}\" \
             y=\"{}\" text-anchor=\"end\">{label}</text>",
            l.x0 - 4,
            l.x0,
            l.x0 - 6,
            y + 4
        );
    }
    for (col, label) in x_ticks(&g) {
        let x = l.x0 + col * l.cw + l.cw / 2;
        let _ = writeln!(
            s,
            "<line x1=\"{x}\" y1=\"{}\" x2=\"{x}\" y2=\"{}\" stroke=\"#000\"/><text x=\"{x}\" \
             y=\"{}\" text-anchor=\"middle\">{label}</text>",
            l.y0 + l.ph,
            l.y0 + l.ph + 4,
            l.y0 + l.ph + 16
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">time (one column per window)</text>\
         <text x=\"14\" y=\"{}\" transform=\"rotate(-90 14 {})\" text-anchor=\"middle\">LBA \
         (volume offset)</text>",
        l.x0 + l.pw / 2,
        l.y0 + l.ph + 30,
        l.y0 + l.ph / 2,
        l.y0 + l.ph / 2
    );
    // Legend: colour scale, then tiers.
    let ly = l.legend_y;
    let _ = writeln!(
        s,
        "<g id=\"legend\"><text x=\"{}\" y=\"{}\">accesses per cell per window (log)</text>\
         <rect x=\"{}\" y=\"{}\" width=\"240\" height=\"10\" fill=\"url(#scale)\" \
         stroke=\"#000\"/>",
        l.x0,
        ly,
        l.x0,
        ly + 4
    );
    for (f, label) in scale_ticks(g.max) {
        let _ = writeln!(
            s,
            "<text x=\"{:.1}\" y=\"{}\" font-size=\"9\" text-anchor=\"middle\">{label}</text>",
            l.x0 as f64 + f * 240.0,
            ly + 24
        );
    }
    let lx = l.x0 + 280;
    let _ = writeln!(
        s,
        "<rect x=\"{lx}\" y=\"{}\" width=\"12\" height=\"10\" fill=\"{}\"/><text x=\"{}\" \
         y=\"{}\">unmapped</text>",
        ly - 8,
        hex(GREY),
        lx + 16,
        ly + 1
    );
    for (i, name) in g.tiers.iter().enumerate() {
        let y = ly + 16 + 16 * i;
        let hatch = if i == 0 {
            "none".to_string()
        } else {
            format!("url(#hatch{i})")
        };
        let _ = writeln!(
            s,
            "<rect x=\"{lx}\" y=\"{}\" width=\"12\" height=\"10\" fill=\"{}\"/><rect \
             x=\"{}\" y=\"{}\" width=\"24\" height=\"10\" fill=\"{}\"/><rect x=\"{}\" \
             y=\"{}\" width=\"24\" height=\"10\" fill=\"{hatch}\"/><text x=\"{}\" \
             y=\"{}\">tier {i}: {}{}</text>",
            y - 8,
            hex(tier_colour(i as u8)),
            lx + 16,
            y - 8,
            hex(heat_colour(0, 1)),
            lx + 16,
            y - 8,
            lx + 44,
            y + 1,
            esc(name),
            if i == 0 { " (plain)" } else { " (hatched)" }
        );
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" font-size=\"9\">white line: tier boundary; right strips: \
         latest tier, planner class (red hot, yellow warm, blue cold)</text></g>",
        l.x0,
        ly + 40
    );
    s.push_str("</svg>\n");
    Ok(s)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn cell_colour(g: &Grid, c: usize, r: usize) -> [u8; 3] {
    let i = c * g.rows + r;
    if g.tier[i] == UNMAPPED && g.heat[i] == 0 {
        GREY
    } else {
        heat_colour(g.heat[i], g.max)
    }
}

fn tier_colour(t: u8) -> [u8; 3] {
    if t == UNMAPPED {
        GREY
    } else {
        TIER_COLOURS[t as usize % TIER_COLOURS.len()]
    }
}

// ---------------------------------------------------------------------------------------------
// PNG
// ---------------------------------------------------------------------------------------------

/// An RGB raster.
struct Canvas {
    w: usize,
    h: usize,
    px: Vec<[u8; 3]>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Canvas {
        Canvas {
            w,
            h,
            px: vec![[255; 3]; w * h],
        }
    }
    fn rect(&mut self, x: usize, y: usize, w: usize, h: usize, c: [u8; 3]) {
        for yy in y..(y + h).min(self.h) {
            for xx in x..(x + w).min(self.w) {
                self.px[yy * self.w + xx] = c;
            }
        }
    }
    fn frame(&mut self, x: usize, y: usize, w: usize, h: usize, c: [u8; 3]) {
        self.rect(x, y, w, 1, c);
        self.rect(x, y + h, w + 1, 1, c);
        self.rect(x, y, 1, h, c);
        self.rect(x + w, y, 1, h, c);
    }
    /// Lightens pixels on a diagonal hatch (one orientation/density per tier).
    fn hatch(&mut self, x: usize, y: usize, w: usize, h: usize, tier: u8) {
        let period = 6 - (tier as usize).saturating_sub(1).min(3);
        for yy in y..(y + h).min(self.h) {
            for xx in x..(x + w).min(self.w) {
                let on = if tier % 2 == 1 {
                    (xx + yy) % period == 0
                } else {
                    (xx + self.w - yy % self.w) % period == 0
                };
                if on {
                    let p = &mut self.px[yy * self.w + xx];
                    *p = p.map(|v| v + ((255 - v as u16) * 45 / 100) as u8);
                }
            }
        }
    }
    /// 3×5 glyphs scaled by 2, one pixel of spacing.
    fn text(&mut self, x: usize, y: usize, s: &str, c: [u8; 3]) {
        let mut cx = x;
        for ch in s.chars() {
            let bits = glyph(ch);
            for row in 0..5 {
                for col in 0..3 {
                    if bits >> (14 - (row * 3 + col)) & 1 == 1 {
                        self.rect(cx + col * 2, y + row * 2, 2, 2, c);
                    }
                }
            }
            cx += 8;
        }
    }
    fn text_width(s: &str) -> usize {
        s.chars().count() * 8
    }
}

/// A 3×5 bitmap glyph, rows top to bottom, 3 bits each (msb = left), 15 bits in all.
fn glyph(c: char) -> u16 {
    let rows: [u8; 5] = match c.to_ascii_uppercase() {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 3, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 2, 2],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        'A' => [2, 5, 7, 5, 5],
        'B' => [6, 5, 6, 5, 6],
        'C' => [3, 4, 4, 4, 3],
        'D' => [6, 5, 5, 5, 6],
        'E' => [7, 4, 6, 4, 7],
        'F' => [7, 4, 6, 4, 4],
        'G' => [3, 4, 5, 5, 3],
        'H' => [5, 5, 7, 5, 5],
        'I' => [7, 2, 2, 2, 7],
        'J' => [1, 1, 1, 5, 2],
        'K' => [5, 5, 6, 5, 5],
        'L' => [4, 4, 4, 4, 7],
        'M' => [5, 7, 7, 5, 5],
        'N' => [6, 5, 5, 5, 5],
        'O' => [2, 5, 5, 5, 2],
        'P' => [6, 5, 6, 4, 4],
        'Q' => [2, 5, 5, 6, 3],
        'R' => [6, 5, 6, 5, 5],
        'S' => [3, 4, 2, 1, 6],
        'T' => [7, 2, 2, 2, 2],
        'U' => [5, 5, 5, 5, 7],
        'V' => [5, 5, 5, 5, 2],
        'W' => [5, 5, 7, 7, 5],
        'X' => [5, 5, 2, 5, 5],
        'Y' => [5, 5, 2, 2, 2],
        'Z' => [7, 1, 2, 4, 7],
        '.' => [0, 0, 0, 0, 2],
        ',' => [0, 0, 0, 2, 4],
        ':' => [0, 2, 0, 2, 0],
        '-' => [0, 0, 7, 0, 0],
        '(' => [1, 2, 2, 2, 1],
        ')' => [4, 2, 2, 2, 4],
        '/' => [1, 1, 2, 4, 4],
        '_' => [0, 0, 0, 0, 7],
        _ => [0; 5],
    };
    rows.iter().fold(0u16, |acc, r| (acc << 3) | *r as u16)
}

/// Renders the `volume_get_heatmap` answer as a PNG image (same layout as the SVG).
pub fn render_png(v: &Value) -> Result<Vec<u8>, String> {
    let g = parse(v)?;
    let l = Layout::new(&g);
    let mut cv = Canvas::new(l.width, l.height);
    let black = [0, 0, 0];
    cv.text(
        l.x0,
        10,
        &format!(
            "HEAT MAP: {} ({}), {} WINDOWS, PEAK {}",
            g.volume,
            fmt_bytes(g.size_bytes),
            g.windows,
            g.max
        ),
        black,
    );
    for c in 0..g.cols {
        for r in 0..g.rows {
            let (x, y) = (l.x0 + c * l.cw, l.y0 + r * l.rh);
            cv.rect(x, y, l.cw, l.rh, cell_colour(&g, c, r));
            let t = g.tier[c * g.rows + r];
            if t != 0 && t != UNMAPPED {
                cv.hatch(x, y, l.cw, l.rh, t);
            }
            if r > 0 {
                let a = g.tier[c * g.rows + r - 1];
                if a != t && a != UNMAPPED && t != UNMAPPED {
                    cv.rect(x, y, l.cw, 1, [255; 3]);
                }
            }
        }
    }
    let last = g.cols - 1;
    for r in 0..g.rows {
        let y = l.y0 + r * l.rh;
        cv.rect(
            l.strip_x,
            y,
            l.strip_w,
            l.rh,
            tier_colour(g.tier[last * g.rows + r]),
        );
        let k = g.class[r].map_or(GREY, |k| CLASS_COLOURS[k]);
        cv.rect(l.class_x, y, l.strip_w, l.rh, k);
    }
    cv.frame(l.x0 - 1, l.y0 - 1, l.pw + 1, l.ph + 1, black);
    for (row, label) in y_ticks(&g) {
        let y = l.y0 + row * l.rh;
        cv.rect(l.x0 - 5, y, 4, 1, black);
        let tw = Canvas::text_width(&label);
        cv.text(
            l.x0.saturating_sub(8 + tw),
            y.saturating_sub(5),
            &label,
            black,
        );
    }
    for (col, label) in x_ticks(&g) {
        let x = l.x0 + col * l.cw + l.cw / 2;
        cv.rect(x, l.y0 + l.ph, 1, 4, black);
        let tw = Canvas::text_width(&label);
        cv.text(x.saturating_sub(tw / 2), l.y0 + l.ph + 7, &label, black);
    }
    // Legend.
    let ly = l.legend_y;
    cv.text(l.x0, ly - 8, "ACCESSES/CELL/WINDOW (LOG)", black);
    for i in 0..240 {
        let f = i as f64 / 239.0;
        let a = if g.max == 0 {
            0
        } else {
            (f * (g.max as f64).ln_1p()).exp_m1().round() as u64
        };
        cv.rect(l.x0 + i, ly + 4, 1, 10, heat_colour(a, g.max.max(1)));
    }
    for (f, label) in scale_ticks(g.max) {
        let x = l.x0 + (f * 239.0) as usize;
        cv.text(
            x.saturating_sub(Canvas::text_width(&label) / 2),
            ly + 17,
            &label,
            black,
        );
    }
    let lx = l.x0 + 280;
    cv.rect(lx, ly - 8, 12, 10, GREY);
    cv.text(lx + 16, ly - 8, "UNMAPPED", black);
    for (i, name) in g.tiers.iter().enumerate() {
        let y = ly + 16 + 16 * i;
        cv.rect(lx, y - 8, 12, 10, tier_colour(i as u8));
        cv.rect(lx + 16, y - 8, 24, 10, heat_colour(0, 1));
        if i > 0 {
            cv.hatch(lx + 16, y - 8, 24, 10, i as u8);
        }
        cv.text(
            lx + 44,
            y - 8,
            &format!(
                "TIER {i}: {name} {}",
                if i == 0 { "(PLAIN)" } else { "(HATCHED)" }
            ),
            black,
        );
    }
    Ok(encode_png(cv.w, cv.h, &cv.px))
}

/// CRC-32 (IEEE), as PNG chunks use.
pub fn crc32(data: &[u8]) -> u32 {
    let mut table = [0u32; 256];
    for (n, e) in table.iter_mut().enumerate() {
        let mut c = n as u32;
        for _ in 0..8 {
            c = if c & 1 != 0 {
                0xedb8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
        }
        *e = c;
    }
    !data.iter().fold(!0u32, |c, &b| {
        table[((c ^ b as u32) & 0xff) as usize] ^ (c >> 8)
    })
}

/// Adler-32, the zlib checksum.
pub fn adler32(data: &[u8]) -> u32 {
    let (mut a, mut b) = (1u32, 0u32);
    for chunk in data.chunks(5552) {
        for &x in chunk {
            a += x as u32;
            b += a;
        }
        a %= 65521;
        b %= 65521;
    }
    (b << 16) | a
}

/// A zlib stream of stored (uncompressed) deflate blocks.
pub fn zlib_stored(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x78, 0x01];
    let mut blocks = data.chunks(65535).peekable();
    if blocks.peek().is_none() {
        out.extend_from_slice(&[1, 0, 0, 0xff, 0xff]);
    }
    while let Some(b) = blocks.next() {
        out.push(u8::from(blocks.peek().is_none()));
        let n = b.len() as u16;
        out.extend_from_slice(&n.to_le_bytes());
        out.extend_from_slice(&(!n).to_le_bytes());
        out.extend_from_slice(b);
    }
    out.extend_from_slice(&adler32(data).to_be_bytes());
    out
}

/// Encodes an 8-bit RGB image as PNG (filter 0 on every row, stored deflate).
pub fn encode_png(w: usize, h: usize, px: &[[u8; 3]]) -> Vec<u8> {
    let mut raw = Vec::with_capacity(h * (1 + 3 * w));
    for row in px.chunks(w) {
        raw.push(0);
        for p in row {
            raw.extend_from_slice(p);
        }
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let chunk = |out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]| {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    };
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&(w as u32).to_be_bytes());
    ihdr.extend_from_slice(&(h as u32).to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(&mut out, b"IDAT", &zlib_stored(&raw));
    chunk(&mut out, b"IEND", &[]);
    out
}

/// `kiln heatmap` arguments.
#[derive(clap::Args, Debug)]
pub struct HeatmapArgs {
    /// Volume name.
    #[arg(long, default_value = "vol0")]
    pub volume: String,
    /// Output file: .svg or .png.
    #[arg(long, short = 'o')]
    pub out: std::path::PathBuf,
    /// The server's RPC socket.
    #[arg(long, short = 's', default_value = "./kiln-data/kiln.sock")]
    pub socket: std::path::PathBuf,
    /// Windows (columns) to fetch, at most 900.
    #[arg(long, default_value_t = 900)]
    pub windows: u64,
    /// Render a saved `volume_get_heatmap` answer (JSON file) instead of asking a server.
    #[arg(long)]
    pub input: Option<std::path::PathBuf>,
}

/// Fetches the heat map and writes the picture. Returns a one-line summary.
pub fn run(args: &HeatmapArgs) -> Result<String, String> {
    let ext = args
        .out
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    if !matches!(ext.as_deref(), Some("svg" | "png")) {
        return Err(format!(
            "--out {}: the file name must end in .svg or .png",
            args.out.display()
        ));
    }
    let v = match &args.input {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?
        }
        None => crate::rpc::call(
            &args.socket,
            "volume_get_heatmap",
            Some(serde_json::json!({"volume": args.volume, "windows": args.windows})),
            std::time::Duration::from_secs(30),
        )?,
    };
    let bytes = if ext.as_deref() == Some("svg") {
        render_svg(&v)?.into_bytes()
    } else {
        render_png(&v)?
    };
    std::fs::write(&args.out, &bytes).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let frames = v["frames"].as_array().map_or(0, Vec::len);
    Ok(format!(
        "wrote {} ({} bytes, {frames} windows, {} partitions)",
        args.out.display(),
        bytes.len(),
        v["partitions"].as_array().map_or(0, Vec::len)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// 64 cells, 40 windows: a hot band that moves halfway, promoted to tier 0.
    fn synthetic() -> Value {
        let frames: Vec<Value> = (0..40u64)
            .map(|w| {
                let hot = if w < 20 { 8..16 } else { 40..48 };
                let accesses: Vec<u32> = (0..64)
                    .map(|c| {
                        if hot.contains(&c) {
                            1000 / (1 + (c % 8) as u32)
                        } else {
                            (c % 3) as u32
                        }
                    })
                    .collect();
                let tiers: Vec<u8> = (0..64)
                    .map(|c| match c {
                        60.. => 255,
                        _ if hot.contains(&c) && w % 20 > 2 => 0,
                        _ => 1,
                    })
                    .collect();
                json!({"window": w + 1, "unix_ms": 1_000_000 + w * 1000,
                       "accesses": accesses, "tiers": tiers})
            })
            .collect();
        json!({
            "volume": "vol0", "size_bytes": 64u64 << 20, "cell_bytes": 1u64 << 20,
            "tiers": ["fast", "capacity"], "frames": frames,
            "partitions": [
                {"offset": 0, "length": 40u64 << 20, "tier": 1, "class": "cold", "predicted": 0.0, "confidence": 1.0},
                {"offset": 40u64 << 20, "length": 8u64 << 20, "tier": 0, "class": "hot", "predicted": 900.0, "confidence": 0.9},
                {"offset": 48u64 << 20, "length": 16u64 << 20, "tier": 1, "class": "warm", "predicted": 3.0, "confidence": 0.5}
            ]
        })
    }

    #[test]
    fn svg_draws_cells_overlay_and_legend() {
        let svg = render_svg(&synthetic()).unwrap();
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        // Both tiers are named in the legend, with the scale's peak.
        assert!(svg.contains("tier 0: fast") && svg.contains("tier 1: capacity"));
        assert!(svg.contains(">1000<"), "scale peak label");
        // The hottest colour (red) and the coldest (dark blue) both appear.
        assert!(svg.contains(&hex(heat_colour(1000, 1000))));
        assert!(svg.contains(&hex(heat_colour(0, 1000))));
        assert!(svg.contains(&hex(GREY)), "unmapped cells are grey");
        // Tier overlay: hatched slow-tier cells and boundary lines where the tier changes.
        assert!(svg.contains("url(#hatch1)"));
        let boundaries = svg.matches("class=\"tier-boundary\"").count();
        assert!(boundaries >= 4, "{boundaries} boundaries");
        // Cells: 40 columns, run-length merged, at least 3 runs in every column.
        let cells = svg
            .split("<g id=\"cells\"")
            .nth(1)
            .unwrap()
            .split("</g>")
            .next()
            .unwrap()
            .matches("<rect")
            .count();
        assert!((120..=40 * 64).contains(&cells), "{cells} cell rects");
        assert!(svg.contains("class=\"class-strip\""));
        // Every tag that opens closes (a cheap well-formedness check).
        assert_eq!(svg.matches("<svg").count(), svg.matches("</svg>").count());
        assert_eq!(svg.matches("<g").count(), svg.matches("</g>").count());
    }

    #[test]
    fn png_is_well_formed() {
        let png = render_png(&synthetic()).unwrap();
        assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
        let w = u32::from_be_bytes(png[16..20].try_into().unwrap()) as usize;
        let h = u32::from_be_bytes(png[20..24].try_into().unwrap()) as usize;
        // Walk the chunks, checking each CRC.
        let mut at = 8;
        let mut idat = Vec::new();
        while at < png.len() {
            let n = u32::from_be_bytes(png[at..at + 4].try_into().unwrap()) as usize;
            let body = &png[at + 4..at + 8 + n];
            let crc = u32::from_be_bytes(png[at + 8 + n..at + 12 + n].try_into().unwrap());
            assert_eq!(crc32(body), crc);
            if &body[..4] == b"IDAT" {
                idat.extend_from_slice(&body[4..]);
            }
            at += 12 + n;
        }
        // Inflate the stored blocks by hand and check size and adler32.
        let mut raw = Vec::new();
        let mut i = 2;
        loop {
            let last = idat[i] & 1 == 1;
            let n = u16::from_le_bytes([idat[i + 1], idat[i + 2]]) as usize;
            raw.extend_from_slice(&idat[i + 5..i + 5 + n]);
            i += 5 + n;
            if last {
                break;
            }
        }
        assert_eq!(raw.len(), h * (1 + 3 * w));
        assert_eq!(
            u32::from_be_bytes(idat[i..i + 4].try_into().unwrap()),
            adler32(&raw)
        );
    }

    #[test]
    fn checksums_match_known_values() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
        assert_eq!(adler32(b"Wikipedia"), 0x11e6_0398);
    }

    #[test]
    fn empty_heatmap_is_an_error() {
        assert!(render_svg(&json!({"frames": []})).is_err());
        assert!(render_svg(&json!({})).is_err());
    }
}
