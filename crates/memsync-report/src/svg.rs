//! A small SVG chart writer: one chart per file with a title, axes with ticks and labels, a
//! legend, and series drawn as lines with points or as grouped bars with min–max whiskers.
//!
//! Written here rather than taken from `plotters`, whose build (fonts, image back ends) costs
//! more on this 2-core machine than these few hundred lines, and whose text layout needs a
//! font file at run time; the SVG here leaves the fonts to whatever displays it.

use std::fmt::Write as _;

/// Okabe–Ito colours: distinguishable with the common colour-vision deficiencies (yellow left
/// out: unreadable on white).
const PALETTE: &[&str] = &[
    "#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#999999",
];

const WIDTH: f64 = 820.0;
const HEIGHT: f64 = 440.0;
const LEFT: f64 = 78.0;
const RIGHT: f64 = 250.0;
const TOP: f64 = 62.0;
const BOTTOM: f64 = 58.0;
/// Where the x axis lies.
const AXIS_Y: f64 = HEIGHT - BOTTOM;
/// Characters of a category label beyond which labels are drawn slanted.
const SLANT_CHARS: usize = 40;

/// How a series is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// Measured in this run: a solid line through filled points.
    Measured,
    /// Quoted from elsewhere: a dashed line through hollow points, "(published)" in the legend.
    Published,
}

/// A series of a line chart: (x, y) points, and per point an optional (min, max) range.
#[derive(Clone, Debug)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub ranges: Vec<Option<(f64, f64)>>,
    pub style: Style,
}

impl Series {
    pub fn new(name: impl Into<String>, style: Style) -> Self {
        Series {
            name: name.into(),
            points: Vec::new(),
            ranges: Vec::new(),
            style,
        }
    }

    pub fn point(mut self, x: f64, y: f64, range: Option<(f64, f64)>) -> Self {
        self.points.push((x, y));
        self.ranges.push(range);
        self
    }
}

/// The lowest and highest run behind a figure, if there were several.
type Range = Option<(f64, f64)>;

/// One bar: its value and the (min, max) of the runs behind it.
#[derive(Clone, Copy, Debug)]
pub struct Bar {
    pub value: f64,
    pub range: Option<(f64, f64)>,
}

/// What a chart shows.
#[derive(Clone, Debug)]
pub enum Body {
    /// Numeric x; one line per series.
    Lines(Vec<Series>),
    /// Categories along x; per category one bar per group (a group is a legend entry), `None`
    /// where that group has no figure for the category.
    Bars {
        categories: Vec<String>,
        groups: Vec<(String, Vec<Option<Bar>>)>,
    },
}

/// A chart: title (what it measures), subtitle (on which machine), axis labels and the data.
#[derive(Clone, Debug)]
pub struct Chart {
    pub title: String,
    pub subtitle: String,
    pub x_label: String,
    pub y_label: String,
    /// A logarithmic y axis (for figures that span decades, such as latency tails).
    pub log_y: bool,
    pub body: Body,
    /// Lines of small print under the legend (what differs between the series).
    pub notes: Vec<String>,
}

/// Text made safe for SVG character data and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            // Control characters are not allowed in XML 1.0 at all.
            c if (c as u32) < 0x20 && c != '\t' && c != '\n' => out.push('?'),
            c => out.push(c),
        }
    }
    out
}

/// A tick step of 1, 2, 2.5 or 5 times a power of ten, giving about `target` intervals over
/// `span`.
pub fn nice_step(span: f64, target: usize) -> f64 {
    if !(span.is_finite() && span > 0.0) {
        return 1.0;
    }
    let raw = span / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 2.5 {
        2.5
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// A linear axis: the rounded-out range covering `lo..=hi` and its ticks.
#[derive(Clone, Debug, PartialEq)]
pub struct Axis {
    pub min: f64,
    pub max: f64,
    pub ticks: Vec<f64>,
    pub log: bool,
}

impl Axis {
    /// A linear axis over the data, starting at zero when all data are positive (bars and
    /// throughputs read wrong from a cut-off baseline).
    pub fn linear(lo: f64, hi: f64, from_zero: bool) -> Axis {
        let (mut lo, mut hi) = if lo.is_finite() && hi.is_finite() && lo <= hi {
            (lo, hi)
        } else {
            (0.0, 1.0)
        };
        if from_zero && lo > 0.0 {
            lo = 0.0;
        }
        if hi - lo < f64::EPSILON * hi.abs().max(1.0) {
            // One value: give it room on both sides.
            let pad = if hi == 0.0 { 1.0 } else { hi.abs() * 0.5 };
            hi += pad;
            if !(from_zero && lo == 0.0) {
                lo -= pad;
            }
        }
        let step = nice_step(hi - lo, 5);
        let min = (lo / step).floor() * step;
        let max = (hi / step).ceil() * step;
        let mut ticks = Vec::new();
        let mut i = 0;
        loop {
            let t = min + step * i as f64;
            if t > max + step * 1e-9 {
                break;
            }
            // Clean the float noise of repeated additions (0.30000000000000004).
            ticks.push((t / step).round() * step);
            i += 1;
        }
        Axis {
            min,
            max,
            ticks,
            log: false,
        }
    }

    /// A log10 axis over positive data, from the decade below to the decade above.
    pub fn log10(lo: f64, hi: f64) -> Axis {
        let lo = if lo.is_finite() && lo > 0.0 { lo } else { 1.0 };
        let hi = if hi.is_finite() && hi >= lo {
            hi
        } else {
            lo * 10.0
        };
        let a = lo.log10().floor() as i32;
        let mut b = hi.log10().ceil() as i32;
        if b <= a {
            b = a + 1;
        }
        Axis {
            min: 10f64.powi(a),
            max: 10f64.powi(b),
            ticks: (a..=b).map(|e| 10f64.powi(e)).collect(),
            log: true,
        }
    }

    /// Where `v` falls, 0 at `min` and 1 at `max`.
    pub fn frac(&self, v: f64) -> f64 {
        if self.log {
            let v = v.max(self.min * 1e-3);
            (v.log10() - self.min.log10()) / (self.max.log10() - self.min.log10())
        } else {
            (v - self.min) / (self.max - self.min)
        }
    }
}

/// A tick label: no trailing zeros, no exponent for the sizes seen in benchmarks.
pub fn format_tick(v: f64) -> String {
    if v == 0.0 {
        return "0".to_owned();
    }
    let a = v.abs();
    let s = if !(1e-3..1e6).contains(&a) {
        format!("{v:.0e}")
    } else if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else {
        format!("{v:.4}")
    };
    if s.contains('.') && !s.contains('e') {
        s.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        s
    }
}

fn text(out: &mut String, x: f64, y: f64, attrs: &str, s: &str) {
    let _ = writeln!(
        out,
        r#"<text x="{x:.1}" y="{y:.1}" {attrs}>{}</text>"#,
        escape(s)
    );
}

impl Chart {
    /// The chart as a standalone SVG document.
    pub fn render(&self) -> String {
        let (pw, ph) = (WIDTH - LEFT - RIGHT, AXIS_Y - TOP);
        // Slanted category labels need room below the axis; the plot keeps its size.
        let height = HEIGHT + self.slant_room(pw);
        let mut o = String::new();
        let _ = writeln!(
            o,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="DejaVu Sans, Helvetica, Arial, sans-serif">"#
        );
        let _ = writeln!(o, "<title>{}</title>", escape(&self.title));
        let _ = writeln!(
            o,
            r##"<rect width="{WIDTH}" height="{height}" fill="#ffffff"/>"##
        );
        // A long title gets a smaller font rather than running off the picture.
        let room = WIDTH - LEFT - 12.0;
        let title_size = (room / (self.title.chars().count() as f64 * 0.6)).clamp(10.0, 15.0);
        text(
            &mut o,
            LEFT,
            24.0,
            &format!(r#"font-size="{title_size:.1}" font-weight="bold""#),
            &self.title,
        );
        text(
            &mut o,
            LEFT,
            42.0,
            r##"font-size="11" fill="#555555""##,
            &self.subtitle,
        );

        let (lo, hi) = self.y_range();
        let y = if self.log_y {
            Axis::log10(lo, hi)
        } else {
            Axis::linear(lo.min(0.0), hi, true)
        };
        let py = |v: f64| TOP + ph * (1.0 - y.frac(v));
        // Horizontal grid and y ticks.
        for &t in &y.ticks {
            let yy = py(t);
            let _ = writeln!(
                o,
                r##"<line x1="{LEFT}" y1="{yy:.1}" x2="{:.1}" y2="{yy:.1}" stroke="#e4e4e4"/>"##,
                LEFT + pw
            );
            text(
                &mut o,
                LEFT - 6.0,
                yy + 4.0,
                r#"font-size="11" text-anchor="end""#,
                &format_tick(t),
            );
        }
        let legend: Vec<(String, Style, usize)> = match &self.body {
            Body::Lines(series) => {
                self.render_lines(&mut o, series, &py, pw);
                series
                    .iter()
                    .enumerate()
                    .map(|(i, s)| (s.name.clone(), s.style, i))
                    .collect()
            }
            Body::Bars { categories, groups } => {
                self.render_bars(&mut o, categories, groups, &y, &py, pw);
                groups
                    .iter()
                    .enumerate()
                    .map(|(i, (n, _))| (n.clone(), style_of(n), i))
                    .collect()
            }
        };
        // Axes on top of the grid.
        let _ = writeln!(
            o,
            r##"<path d="M{LEFT},{TOP} V{:.1} H{:.1}" fill="none" stroke="#333333"/>"##,
            TOP + ph,
            LEFT + pw
        );
        text(
            &mut o,
            LEFT + pw / 2.0,
            height - 8.0,
            r#"font-size="12" text-anchor="middle""#,
            &self.x_label,
        );
        let (lx, ly) = (18.0, TOP + ph / 2.0);
        text(
            &mut o,
            lx,
            ly,
            &format!(r#"font-size="12" text-anchor="middle" transform="rotate(-90 {lx} {ly:.1})""#),
            &self.y_label,
        );
        self.render_legend(&mut o, &legend);
        o.push_str("</svg>\n");
        o
    }

    /// The room slanted category labels need below the usual bottom margin.
    fn slant_room(&self, pw: f64) -> f64 {
        let Body::Bars { categories, .. } = &self.body else {
            return 0.0;
        };
        if !slanted(categories, pw / categories.len().max(1) as f64) {
            return 0.0;
        }
        let longest = categories
            .iter()
            .map(|c| c.chars().count().min(SLANT_CHARS))
            .max()
            .unwrap_or(0);
        // sin(35°) of the label's length, less what the usual margin already holds.
        (label_width(&"x".repeat(longest)) * 0.58 + 20.0 - 30.0).max(0.0)
    }

    /// The smallest and largest y the chart must show (ranges included).
    fn y_range(&self) -> (f64, f64) {
        let mut vals: Vec<f64> = Vec::new();
        match &self.body {
            Body::Lines(series) => {
                for s in series {
                    vals.extend(s.points.iter().map(|p| p.1));
                    vals.extend(s.ranges.iter().flatten().flat_map(|r| [r.0, r.1]));
                }
            }
            Body::Bars { groups, .. } => {
                for (_, bars) in groups {
                    for b in bars.iter().flatten() {
                        vals.push(b.value);
                        vals.extend(b.range.iter().flat_map(|r| [r.0, r.1]));
                    }
                }
            }
        }
        vals.retain(|v| v.is_finite() && (!self.log_y || *v > 0.0));
        let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (lo, hi)
    }

    fn render_lines(&self, o: &mut String, series: &[Series], py: &dyn Fn(f64) -> f64, pw: f64) {
        let xs = series.iter().flat_map(|s| s.points.iter().map(|p| p.0));
        let (lo, hi) = xs.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
            (a.min(x), b.max(x))
        });
        let x = Axis::linear(lo, hi, true);
        let px = |v: f64| LEFT + pw * x.frac(v);
        for &t in &x.ticks {
            let xx = px(t);
            let _ = writeln!(
                o,
                r##"<line x1="{xx:.1}" y1="{:.1}" x2="{xx:.1}" y2="{:.1}" stroke="#333333"/>"##,
                AXIS_Y,
                AXIS_Y + 5.0
            );
            text(
                o,
                xx,
                AXIS_Y + 18.0,
                r#"font-size="11" text-anchor="middle""#,
                &format_tick(t),
            );
        }
        for (i, s) in series.iter().enumerate() {
            let c = PALETTE[i % PALETTE.len()];
            let mut pts: Vec<(f64, f64, Range)> = s
                .points
                .iter()
                .zip(&s.ranges)
                .filter(|(p, _)| p.0.is_finite() && p.1.is_finite())
                .map(|(p, r)| (p.0, p.1, *r))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let dash = if s.style == Style::Published {
                r#" stroke-dasharray="6 4""#
            } else {
                ""
            };
            if pts.len() > 1 {
                let d: Vec<String> = pts
                    .iter()
                    .map(|p| format!("{:.1},{:.1}", px(p.0), py(p.1)))
                    .collect();
                let _ = writeln!(
                    o,
                    r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"{dash}/>"#,
                    d.join(" ")
                );
            }
            for &(xv, yv, r) in &pts {
                let (cx, cy) = (px(xv), py(yv));
                if let Some((a, b)) = r {
                    let _ = writeln!(
                        o,
                        r#"<path d="M{cx:.1},{:.1} V{:.1} M{:.1},{:.1} h8 M{:.1},{:.1} h8" stroke="{c}" stroke-width="1"/>"#,
                        py(a),
                        py(b),
                        cx - 4.0,
                        py(a),
                        cx - 4.0,
                        py(b)
                    );
                }
                let fill = if s.style == Style::Published {
                    "#ffffff"
                } else {
                    c
                };
                let _ = writeln!(
                    o,
                    r#"<circle cx="{cx:.1}" cy="{cy:.1}" r="4" fill="{fill}" stroke="{c}" stroke-width="2"/>"#
                );
            }
        }
    }

    fn render_bars(
        &self,
        o: &mut String,
        categories: &[String],
        groups: &[(String, Vec<Option<Bar>>)],
        y: &Axis,
        py: &dyn Fn(f64) -> f64,
        pw: f64,
    ) {
        let n = categories.len().max(1) as f64;
        let slot = pw / n;
        let widest = (0..categories.len())
            .map(|ci| {
                groups
                    .iter()
                    .filter(
                        |(_, bars)| matches!(bars.get(ci), Some(Some(b)) if b.value.is_finite()),
                    )
                    .count()
            })
            .max()
            .unwrap_or(1)
            .max(1);
        let bw = (slot * 0.8 / widest as f64).min(60.0);
        let base = if y.log {
            py(y.min)
        } else {
            py(0.0_f64.max(y.min))
        };
        for (ci, cat) in categories.iter().enumerate() {
            let cx = LEFT + slot * (ci as f64 + 0.5);
            if slanted(categories, slot) {
                let l: String = cat.chars().take(SLANT_CHARS).collect();
                let (x, y) = (cx + 4.0, AXIS_Y + 14.0);
                text(
                    o,
                    x,
                    y,
                    &format!(
                        r#"font-size="11" text-anchor="end" transform="rotate(-35 {x:.1} {y:.1})""#
                    ),
                    &l,
                );
            } else {
                // A label wider than its slot is split on spaces over two lines.
                let words: Vec<&str> = cat.split(' ').collect();
                let half = words.len().div_ceil(2);
                let lines = if words.len() > 1 && label_width(cat) > slot {
                    vec![words[..half].join(" "), words[half..].join(" ")]
                } else {
                    vec![cat.clone()]
                };
                for (li, l) in lines.iter().enumerate() {
                    text(
                        o,
                        cx,
                        AXIS_Y + 16.0 + 13.0 * li as f64,
                        r#"font-size="11" text-anchor="middle""#,
                        l,
                    );
                }
            }
            // Only the groups with a figure here share the slot, so sparse groups leave no gaps.
            let present: Vec<(usize, &String, Bar)> = groups
                .iter()
                .enumerate()
                .filter_map(|(gi, (name, bars))| match bars.get(ci) {
                    Some(Some(b)) if b.value.is_finite() => Some((gi, name, *b)),
                    _ => None,
                })
                .collect();
            let k = present.len() as f64;
            for (pi, &(gi, name, b)) in present.iter().enumerate() {
                let c = PALETTE[gi % PALETTE.len()];
                let x0 = cx - bw * k / 2.0 + bw * pi as f64;
                let top = py(b.value).min(base);
                let (fill, extra) = if style_of(name) == Style::Published {
                    (
                        "#ffffff",
                        format!(r#" stroke="{c}" stroke-width="2" stroke-dasharray="4 3""#),
                    )
                } else {
                    (c, String::new())
                };
                let _ = writeln!(
                    o,
                    r#"<rect x="{:.1}" y="{top:.1}" width="{:.1}" height="{:.1}" fill="{fill}"{extra}><title>{}: {}</title></rect>"#,
                    x0 + 1.0,
                    (bw - 2.0).max(1.0),
                    (base - top).max(0.0),
                    escape(name),
                    format_tick(b.value)
                );
                if let Some((lo, hi)) = b.range {
                    let mx = x0 + bw / 2.0;
                    let _ = writeln!(
                        o,
                        r##"<path d="M{mx:.1},{:.1} V{:.1} M{:.1},{:.1} h6 M{:.1},{:.1} h6" stroke="#222222" stroke-width="1"/>"##,
                        py(lo),
                        py(hi),
                        mx - 3.0,
                        py(lo),
                        mx - 3.0,
                        py(hi)
                    );
                }
            }
        }
    }

    fn render_legend(&self, o: &mut String, entries: &[(String, Style, usize)]) {
        let x = WIDTH - RIGHT + 16.0;
        let mut y = TOP + 6.0;
        let bars = matches!(self.body, Body::Bars { .. });
        for (name, style, i) in entries {
            let c = PALETTE[i % PALETTE.len()];
            let fill = if *style == Style::Published {
                "#ffffff"
            } else {
                c
            };
            if bars {
                let _ = writeln!(
                    o,
                    r#"<rect x="{x:.1}" y="{:.1}" width="14" height="10" fill="{fill}" stroke="{c}" stroke-width="1.5"/>"#,
                    y - 8.0
                );
            } else {
                let dash = if *style == Style::Published {
                    r#" stroke-dasharray="6 4""#
                } else {
                    ""
                };
                let _ = writeln!(
                    o,
                    r#"<line x1="{x:.1}" y1="{:.1}" x2="{:.1}" y2="{:.1}" stroke="{c}" stroke-width="2"{dash}/><circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{fill}" stroke="{c}" stroke-width="2"/>"#,
                    y - 3.0,
                    x + 22.0,
                    y - 3.0,
                    x + 11.0,
                    y - 3.0
                );
            }
            for (k, line) in wrap(name, 30).iter().enumerate() {
                text(o, x + 28.0, y + 14.0 * k as f64, r#"font-size="11""#, line);
                if k > 0 {
                    y += 14.0;
                }
            }
            y += 20.0;
        }
        y += 6.0;
        for note in &self.notes {
            for line in wrap(note, 38) {
                text(o, x, y, r##"font-size="10" fill="#555555""##, &line);
                y += 13.0;
            }
            y += 4.0;
        }
    }
}

/// The width of a label at 11 px, near enough for layout.
fn label_width(s: &str) -> f64 {
    s.chars().count() as f64 * 6.3
}

/// Whether category labels must be slanted: some label does not fit its slot even on two lines.
fn slanted(categories: &[String], slot: f64) -> bool {
    categories.iter().any(|c| {
        let words: Vec<&str> = c.split(' ').collect();
        let half = words.len().div_ceil(2);
        let widest =
            label_width(&words[..half].join(" ")).max(label_width(&words[half..].join(" ")));
        widest > slot
    })
}

/// A series whose name says it was published elsewhere is drawn as such.
fn style_of(name: &str) -> Style {
    if name.contains("(published)") {
        Style::Published
    } else {
        Style::Measured
    }
}

/// Words packed into lines of at most `width` characters (a longer word stands alone).
pub fn wrap(s: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut cur = String::new();
    for w in s.split_whitespace() {
        if !cur.is_empty() && cur.chars().count() + 1 + w.chars().count() > width {
            lines.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(' ');
        }
        cur.push_str(w);
    }
    if !cur.is_empty() {
        lines.push(cur);
    }
    lines
}

#[cfg(test)]
mod tests;
